"""A fitted map from a sequence EU to P(the answer is wrong), applied.

The hallucination stage fits the maps (``evaluate.hallucination``: a logistic map per method, and
Platt or isotonic chosen by held-out log-loss); ``rundir.hallucination_map`` reads the one a run
chose; `score`, `serve` and the LM-Polygraph plugin apply it here - numpy only, no evaluation code.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-4  # probabilities kept in [eps, 1 - eps]: a log-loss stays finite


def apply_map(fitted: dict, score: np.ndarray) -> np.ndarray:
    """P(wrong) of each sequence score under ``fitted``: ``kind`` "isotonic" (its ``x``, ``y`` knots) or a
    Platt / logistic map (``coef``, ``intercept`` on the score standardized by ``score_mean``, ``score_std``)."""
    if fitted.get("kind", "platt") == "isotonic":
        p = np.interp(score, fitted["x"], fitted["y"])
    else:
        z = fitted["coef"] * (np.asarray(score, dtype=np.float64) - fitted["score_mean"]) / fitted["score_std"] \
            + fitted["intercept"]
        p = 1.0 / (1.0 + np.exp(-z))
    return np.clip(p, EPS, 1 - EPS)


def p_wrong(score: float, fitted: dict) -> float:
    """A fitted map (the hallucination stage's logistic ``coef``, ``intercept``, ``score_mean``, ``score_std``;
    or its calibration's chosen map, Platt or isotonic) applied to one sequence score: P(the answer is wrong)."""
    return float(apply_map(fitted, np.array([score], dtype=np.float64))[0])
