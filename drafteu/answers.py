"""A scored answer as drafteu writes it, and answers read from a file.

``to_json`` is the JSON shape `drafteu score` and `drafteu speculate` share (a public contract: the
README documents it); ``read_answers`` reads ``score --answers`` files, naming the file and line of
anything wrong.
"""

from __future__ import annotations

from pathlib import Path

from drafteu import spans
from drafteu.errors import DraftEUError
from drafteu.estimators import AGGREGATIONS, TokenScores


def to_json(question: str, answer: str, method: str, target: str, scores: TokenScores, pieces) -> dict:
    """The JSON shape shared by `score` and `speculate` (a public contract)."""
    tokens = []
    for i, (tid, piece) in enumerate(zip(scores.token_ids, pieces, strict=True)):
        tok = {"id": int(tid), "text": piece, "eu": float(scores.eu[i])}
        if scores.variance is not None:
            tok["variance"] = float(scores.variance[i])
        if scores.bias is not None:
            tok["bias"] = float(scores.bias[i])
        tokens.append(tok)
    return {
        "question": question,
        "answer": answer,
        "method": method,
        "target": target,
        "tokens": tokens,
        "sequence": {how: scores.aggregate(how) for how in AGGREGATIONS},
        "spans": spans.ranked(list(pieces), scores.eu.tolist()),  # sentences / lines, the riskiest first
    }


def read_answers(path: Path, question: str) -> list[tuple[str, str]]:
    """(question, answer) per line of a JSONL file of {"answer": ...} or {"question": ..., "answer": ...}."""
    import json

    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answer = row["answer"]
        except (ValueError, KeyError, TypeError):
            raise DraftEUError(f"{path}:{n}: not a JSON object with an \"answer\" field") from None
        if not isinstance(answer, str) or not answer.strip():
            raise DraftEUError(f"{path}:{n}: the answer is empty or not text")
        out.append((str(row.get("question") or question), answer))
    if not out:
        raise DraftEUError(f"{path} holds no answers")
    return out
