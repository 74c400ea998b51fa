"""Answer labels, cross-checked: drafteu's checker against HF's math-verify.

The hallucination AUROCs are only as good as the correct / wrong labels.  drafteu labels an answer
with ``data.extract_answer`` + ``data.is_correct`` (numeric, tolerant of units, ``$``, thousands
separators, LaTeX fractions, mixed numbers, ``\\times 10^k`` and "answer is a - b = c").  HF's
``math-verify`` parses LaTeX into sympy and compares symbolically; on model answers each catches
cases the other misses (math-verify reads a thin space ``1\\,000`` as ``1 * 0``).  Running both
and listing every disagreement is how the checker's mistakes are found (docs/method.md §14).
"""

from __future__ import annotations

from collections.abc import Iterable

from drafteu import data


def relabel(rows: Iterable[dict]) -> tuple[list[dict], int]:
    """``rows`` with ``extracted`` / ``correct`` recomputed from the text by today's checker (labels
    stored at generation time predate any checker fix), and how many labels changed."""
    out, changed = [], 0
    for r in rows:
        extracted = data.extract_answer(r["response"])
        correct = data.is_correct(extracted, r["gold"])
        changed += bool(r.get("correct")) != correct
        out.append({**r, "extracted": extracted, "correct": correct})
    return out, changed


def math_verify_correct(response: str, gold: str) -> bool | None:
    """math-verify's verdict on ``response`` against the numeric ``gold`` (None: not installed)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    try:
        return bool(verify(parse(str(gold)), parse(response or "")))
    except Exception:  # math-verify raises on some inputs (parse timeouts, sympy errors): no verdict
        return False


def cross_check(rows: Iterable[dict], keep: int = 50) -> dict:
    """Both checkers over answer rows (``response``, ``gold``, ``correct``): counts and up to
    ``keep`` disagreements (question id, gold, drafteu's extraction, each verdict, the answer's tail)."""
    rows = list(rows)
    verdicts = [math_verify_correct(r["response"], r["gold"]) for r in rows]
    if rows and all(v is None for v in verdicts):
        return {"answers": len(rows), "math_verify": "not installed (pip install math-verify)"}
    differ = [(r, v) for r, v in zip(rows, verdicts, strict=True) if v is not None and bool(r["correct"]) != v]
    return {
        "answers": len(rows),
        "agree": len(rows) - len(differ),
        "drafteu_only_correct": sum(1 for r, v in differ if r["correct"]),
        "math_verify_only_correct": sum(1 for r, v in differ if not r["correct"]),
        "disagreements": [
            {"qid": r.get("qid"), "gold": r["gold"],
             "extracted": r["extracted"] if "extracted" in r else data.extract_answer(r["response"]),
             "drafteu": bool(r["correct"]), "math_verify": v, "tail": (r["response"] or "")[-160:]}
            for r, v in differ[:keep]
        ],
    }
