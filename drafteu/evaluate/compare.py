"""Paired comparisons with question-level bootstrap intervals: does this run agree with an ordering
the paper reports, disagree with it, or is it too small to tell?

Two estimates are compared on the *same* resamples of questions (a question and all its tokens or
answers are drawn together), so their shared noise cancels and the interval is that of the
difference itself.  ``verdict`` reads the interval against the paper's claim: the difference's
95% interval lies on the claimed side of a margin -> "agrees", wholly on the other side ->
"disagrees", straddles it -> "cannot tell at this size".
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from drafteu.evaluate.fidelity import pooled, rmse, spearman

AUROC_MARGIN = 0.03  # "DDD detects hallucinations about as well as TokUR": within this much AUROC


def verdict(low: float, high: float, better: str, margin: float = 0.0) -> str:
    """``better``: 'lower' (the claim is difference < margin) or 'higher' (difference > margin)."""
    if not (np.isfinite(low) and np.isfinite(high)):
        return "cannot tell at this size"
    if better == "lower":
        return "agrees" if high < margin else "disagrees" if low > margin else "cannot tell at this size"
    return "agrees" if low > margin else "disagrees" if high < margin else "cannot tell at this size"


def _interval(point: float, draws: np.ndarray, better: str, margin: float) -> dict:
    draws = draws[np.isfinite(draws)]
    low, high = (np.percentile(draws, [2.5, 97.5]) if draws.size else (np.nan, np.nan))
    return {"difference": float(point), "low": float(low), "high": float(high), "better": better,
            "margin": margin, "verdict": verdict(float(low), float(high), better, margin), "resamples": int(draws.size)}


def paired_bootstrap(questions: Sequence[str], stat: Callable[[Sequence[str]], float], *, better: str,
                     margin: float = 0.0, resamples: int = 1000, seed: int = 0) -> dict:
    """``stat(questions)`` (a difference of two estimates) on all questions and on ``resamples``
    question resamples with replacement; its 95% interval and verdict."""
    rng = np.random.default_rng(seed)
    qs = list(questions)
    draws = np.array([stat([qs[i] for i in rng.integers(0, len(qs), len(qs))]) for _ in range(resamples)])
    return _interval(stat(qs), draws, better, margin)


def fidelity_difference(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                        questions: Sequence[str], *, resamples: int = 1000, seed: int = 0) -> dict:
    """RMSE(a) - RMSE(b) (claim: a is lower) and Spearman(a) - Spearman(b) (claim: a is higher)
    against ``truth``, per-question token arrays, paired over question resamples."""
    def d_rmse(qs):
        t = pooled(truth, qs)
        return rmse(pooled(a, qs), t) - rmse(pooled(b, qs), t)

    def d_rho(qs):
        t = pooled(truth, qs)
        return spearman(pooled(a, qs), t) - spearman(pooled(b, qs), t)

    return {"rmse": paired_bootstrap(questions, d_rmse, better="lower", resamples=resamples, seed=seed),
            "spearman": paired_bootstrap(questions, d_rho, better="higher", resamples=resamples, seed=seed)}


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """AUROC of ``score`` for label 1 (scikit-learn's); NaN with one class."""
    from sklearn.metrics import roc_auc_score

    label = np.asarray(label, dtype=np.int64)
    return float(roc_auc_score(label, score)) if 0 < label.sum() < label.size else float("nan")


def auroc_difference(score_a: np.ndarray, score_b: np.ndarray, label: np.ndarray, qids: Sequence[str], *,
                     margin: float = 0.0, resamples: int = 1000, seed: int = 0) -> dict:
    """AUROC(a) - AUROC(b) of answer scores for the wrong-answer label (claim: a is higher than b
    by more than ``margin``; a negative margin claims 'no worse than b by more than -margin'),
    answers grouped by question for the resampling."""
    score_a, score_b, label = (np.asarray(x, dtype=np.float64) for x in (score_a, score_b, label))
    rows: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        rows.setdefault(q, []).append(i)

    def stat(qs):
        idx = np.concatenate([rows[q] for q in qs])
        return auroc(score_a[idx], label[idx]) - auroc(score_b[idx], label[idx])

    return paired_bootstrap(sorted(rows), stat, better="higher", margin=margin, resamples=resamples, seed=seed)
