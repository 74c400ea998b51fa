"""Token-level fidelity of EU estimates against the ground truth (Tables 1, 3, 4, 5; docs/method.md §4-5, §9).

Over all evaluated response positions pooled: RMSE(estimate, truth) and Spearman's rho.  A trial
pools the positions of a (bootstrap) sample of questions, so questions, not tokens, are the unit
that is resampled.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import spearmanr


def rmse(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Root mean squared error over pooled positions."""
    estimate, truth = np.asarray(estimate, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if estimate.shape != truth.shape or estimate.size == 0:
        raise ValueError(f"rmse needs two non-empty arrays of one shape, got {estimate.shape} and {truth.shape}")
    return float(np.sqrt(np.mean((estimate - truth) ** 2)))


def spearman(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Spearman's rank correlation (ties get average ranks); NaN when either side is constant."""
    estimate, truth = np.asarray(estimate, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    if estimate.size < 2 or np.ptp(estimate) == 0 or np.ptp(truth) == 0:
        return float("nan")
    return float(spearmanr(estimate, truth).statistic)


def pooled(per_question: Mapping[str, np.ndarray], questions: Sequence[str]) -> np.ndarray:
    """Concatenate the positions of ``questions`` (repeats allowed: a bootstrap sample)."""
    return np.concatenate([np.asarray(per_question[q], dtype=np.float64) for q in questions])


def bootstrap_questions(questions: Sequence[str], seed: int) -> list[str]:
    """A resample of ``questions`` with replacement (same size), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [questions[i] for i in rng.integers(0, len(questions), size=len(questions))]


def trial_metrics(estimate: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                  questions: Sequence[str]) -> dict:
    """RMSE and Spearman of one trial over the pooled positions of ``questions``."""
    e, t = pooled(estimate, questions), pooled(truth, questions)
    return {"rmse": rmse(e, t), "spearman": spearman(e, t), "tokens": int(t.size),
            "mean_estimate": float(e.mean()), "mean_truth": float(t.mean())}


def summarize(trials: Sequence[dict], keys: Sequence[str] = ("rmse", "spearman")) -> dict:
    """Mean and (sample) standard deviation across trials, ignoring NaN trials."""
    out = {}
    for k in keys:
        vals = np.array([t[k] for t in trials], dtype=np.float64)
        vals = vals[~np.isnan(vals)]
        out[k] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                  "std": float(vals.std(ddof=1)) if vals.size > 1 else 0.0, "n": int(vals.size)}
    return out
