"""`drafteu score`: generate (or take) an answer and report its token-level EU."""

from __future__ import annotations

import contextlib
from pathlib import Path

from drafteu import data, estimators, models, rundir, spans
from drafteu.config import ScoreConfig
from drafteu.errors import DraftEUError
from drafteu.estimators import AGGREGATIONS, TokenScores
from drafteu.evaluate.hallucination import p_wrong
from drafteu.generate import HFBackend, Sampling
from drafteu.kvcache import lcp
from drafteu.methods import ESTIMATORS
from drafteu.posterior import NoisyModel
from drafteu.runio import write_json


def greedy_answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy response token ids, cut before the first end-of-sequence token."""
    backend = HFBackend(getattr(model, "name_or_path", ""), tokenizer, model=model, prefix_cache=False)
    return backend.generate([prompt_ids], Sampling(temperature=0.0, max_new_tokens=max_new_tokens))[0][0]


class StreamPieces:
    """Token texts for streaming: decodes the growing answer so multi-byte characters stay whole."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for t in ids:
            self.ids.append(t)
            text = self.tok.decode(self.ids, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                out.append("")
                continue
            out.append(text[len(self.text):])
            self.text = text
        return out


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Text of each token such that the pieces concatenate to the decoded response.

    Decoding prefixes (not single ids) keeps multi-byte characters split across tokens intact.
    """
    pieces = StreamPieces(tokenizer)(ids)
    full = tokenizer.decode(ids, skip_special_tokens=False)
    if pieces and "".join(pieces) != full:  # the answer ends inside a multi-byte character
        pieces[-1] += full[len("".join(pieces)):]
    return pieces


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


def run(cfg: ScoreConfig) -> dict | list[dict]:
    """Load the target, get the answer(s), score them in one batched pass, return (and optionally
    write) the JSON: one object, or a list of them for ``--answers``."""
    if cfg.json is not None and Path(cfg.json).is_dir():
        raise DraftEUError(f"--json {cfg.json} is a directory; give a file path")
    items = read_answers(cfg.answers, cfg.question) if cfg.answers is not None else None
    lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    noisy = NoisyModel(lm.model, cfg.noise)  # validates the noise modules before any work
    kind = ESTIMATORS[cfg.method]
    if kind.uses_drafts:  # load (and check) the ensemble before generating anything
        drafts_dir, proxy_dir = rundir.resolve_drafts(cfg.drafts, cfg.proxy)
        est = estimators.DraftEnsemble(drafts_dir, lm, proxy_dir, device=cfg.device, dtype=cfg.dtype,
                                       kernel=cfg.draft_kernel)
    shots = data.shots_for("score", cfg.shots)
    if items is None:
        prompt_ids = data.format_prompt(lm.tokenizer, cfg.question, shots)
        if cfg.answer is None:
            models.check_context(lm.model.config, len(prompt_ids) + cfg.max_new_tokens,
                                 "the prompt + --max-new-tokens", "shorten the question or lower --max-new-tokens",
                                 cfg.target)
            with est.base_target() if kind.uses_drafts else contextlib.nullcontext():
                response_ids = greedy_answer(lm.model, lm.tokenizer, prompt_ids, cfg.max_new_tokens)
        else:
            response_ids = list(lm.tokenizer(cfg.answer, add_special_tokens=False)["input_ids"])
        pairs, questions = [(prompt_ids, response_ids)], [cfg.question]
    else:
        prompts = {q: data.format_prompt(lm.tokenizer, q, shots) for q in dict.fromkeys(q for q, _ in items)}
        pairs = [(prompts[q], list(lm.tokenizer(a, add_special_tokens=False)["input_ids"])) for q, a in items]
        questions = [q for q, _ in items]
    for n, (prompt_ids, response_ids) in enumerate(pairs, 1):
        where = f" (answer {n})" if items is not None else ""
        models.check_context(lm.model.config, len(prompt_ids) + len(response_ids), "the prompt + answer" + where,
                             "shorten the question or the answer", cfg.target)
    if not kind.uses_drafts:
        est = kind.build(noisy, size=cfg.family_size, seed=cfg.seed,
                         prefix_len=lcp([p for p, _ in pairs]) if len(pairs) > 1 else 0)
    # the run's map from sequence EU to P(wrong) (a run directory's hallucination stage), with its provenance
    fitted = rundir.hallucination_map(Path(cfg.drafts), est.method) if kind.uses_drafts else None
    results = []
    for question, (_, response_ids), scores in zip(questions, pairs, est.score_batch(pairs), strict=True):
        answer = lm.tokenizer.decode(response_ids, skip_special_tokens=True)
        result = to_json(question, answer, cfg.method, cfg.target, scores, token_pieces(lm.tokenizer, response_ids))
        if kind.uses_drafts and response_ids:
            result["diagnostic"] = estimators.bias_diagnostic(scores.variance, scores.bias, est.base_kl, est.proxy_fit)
        if kind.uses_drafts and est.kernel is not None:
            result["draft_kernel"] = est.kernel  # what the self-draft's layers ran on, and why
        if fitted is not None and response_ids:
            result["p_wrong"] = p_wrong(result["sequence"][fitted["aggregation"]], fitted)
            result["p_wrong_map"] = fitted["provenance"]
        results.append(result)
    out = results if items is not None else results[0]
    if cfg.json is not None:
        write_json(cfg.json, out)
    return out
