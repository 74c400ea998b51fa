"""Hallucination detection from sequence-level EU (Table 2, App. B.5; docs/method.md §10).

Label 1 = the answer is wrong (or has no extractable answer).  A one-feature logistic regression
fitted on a train split of questions maps the sequence score to P(wrong); AUROC, ECE (equal-width
bins), Brier score and PRR are computed on the test split, with bootstrap percentile intervals.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from drafteu.calibration import EPS, apply_map


def ece(prob: np.ndarray, label: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width bins on [0, 1] (bins as in sklearn's
    ``calibration_curve(strategy="uniform")``): sum_b |B_b|/n * |mean label - mean prob|."""
    prob, label = np.asarray(prob, dtype=np.float64), np.asarray(label, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], prob)
    total = 0.0
    for b in range(bins):
        sel = ids == b
        if sel.any():
            total += sel.sum() * abs(label[sel].mean() - prob[sel].mean())
    return float(total / max(len(prob), 1))


def rejection_area(uncertainty: np.ndarray, quality: np.ndarray) -> float:
    """Area under the prediction-rejection curve: the mean quality of the k least uncertain
    answers, averaged over k = 1..n (LM-Polygraph's PredictionRejectionArea)."""
    order = np.argsort(np.asarray(uncertainty, dtype=np.float64), kind="stable")
    q = np.asarray(quality, dtype=np.float64)[order]
    kept_mean = np.cumsum(q) / np.arange(1, len(q) + 1)
    return float(kept_mean.mean())


def prr(uncertainty: np.ndarray, quality: np.ndarray) -> float:
    """Prediction rejection ratio: (area_ue - area_random) / (area_oracle - area_random), where
    the random area is the mean quality and the oracle rejects by true quality.  NaN when every
    answer has the same quality."""
    quality = np.asarray(quality, dtype=np.float64)
    random = float(quality.mean())
    oracle = rejection_area(-quality, quality)
    if oracle - random == 0:
        return float("nan")
    return (rejection_area(uncertainty, quality) - random) / (oracle - random)


def metrics(prob: np.ndarray, label: np.ndarray, bins: int = 15) -> dict:
    """AUROC, ECE, Brier and PRR of predicted P(wrong) ``prob`` against ``label`` (1 = wrong)."""
    from sklearn.metrics import brier_score_loss, roc_auc_score

    prob, label = np.asarray(prob, dtype=np.float64), np.asarray(label, dtype=np.int64)
    both = 0 < label.sum() < len(label)
    return {
        "auroc": float(roc_auc_score(label, prob)) if both else float("nan"),
        "ece": ece(prob, label, bins),
        "brier": float(brier_score_loss(label, prob)),
        "prr": prr(prob, 1 - label),
    }


def metrics_batch(prob: np.ndarray, label: np.ndarray, idx: np.ndarray, bins: int = 15) -> dict:
    """``metrics`` of every resample ``prob[idx[b]], label[idx[b]]`` at once: idx (B, n) -> each (B,).

    Vectorized versions of the same definitions (tested equal row by row): AUROC by the
    Mann-Whitney rank statistic (average ranks for ties), ECE as sum_b |sum label - sum prob| / n
    over equal-width bins, Brier, and PRR from the rejection areas.
    """
    from scipy.stats import rankdata

    p = np.asarray(prob, dtype=np.float64)[idx]
    y = np.asarray(label, dtype=np.float64)[idx]
    n = idx.shape[1]
    pos = y.sum(1)
    ranks = rankdata(p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        auroc = ((ranks * y).sum(1) - pos * (pos + 1) / 2) / (pos * (n - pos))
    auroc[(pos == 0) | (pos == n)] = np.nan
    edges = np.linspace(0.0, 1.0, bins + 1)
    ids = np.searchsorted(edges[1:-1], p)
    ece_v = np.zeros(len(idx))
    for b in range(bins):
        m = ids == b
        ece_v += np.abs((y * m).sum(1) - (p * m).sum(1))
    ece_v /= n
    brier = ((p - y) ** 2).mean(1)
    quality = 1 - y
    steps = np.arange(1, n + 1)

    def area(order):
        q = np.take_along_axis(quality, order, axis=1)
        return (np.cumsum(q, axis=1) / steps).mean(1)

    rand = quality.mean(1)
    oracle = area(np.argsort(-quality, axis=1, kind="stable"))
    with np.errstate(invalid="ignore", divide="ignore"):
        prr_v = (area(np.argsort(p, axis=1, kind="stable")) - rand) / (oracle - rand)
    prr_v[oracle - rand == 0] = np.nan
    return {"auroc": auroc, "ece": ece_v, "brier": brier, "prr": prr_v}


def question_bootstrap(prob: np.ndarray, label: np.ndarray, qids: Sequence[str], resamples: int, seed: int,
                       bins: int = 15) -> dict:
    """``metrics`` on ``resamples`` resamples of *questions* with replacement (each drawn question
    brings all its answers): the answers to one question share its difficulty, so resampling answers
    one by one would understate the spread.  Returns metric -> (resamples,) array.  Questions with
    equal answer counts (the usual ``repeats``) go through ``metrics_batch`` at once."""
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        groups.setdefault(q, []).append(i)
    rows = list(groups.values())
    pick = np.random.default_rng(seed).integers(0, len(rows), size=(resamples, len(rows)))
    if len({len(r) for r in rows}) == 1:
        table = np.array(rows)  # (questions, answers per question)
        return metrics_batch(prob, label, table[pick].reshape(resamples, -1), bins)
    draws = [metrics(prob[idx], label[idx], bins) for idx in
             (np.concatenate([rows[j] for j in row]) for row in pick)]
    return {k: np.array([d[k] for d in draws], dtype=np.float64) for k in draws[0]}


def split_questions(qids: Sequence[str], fit_fraction: float, seed: int) -> tuple[set, set]:
    """(fit, test) question sets: a seeded shuffle of the distinct questions, cut at ``fit_fraction``."""
    uniq = sorted(set(qids))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    cut = max(1, min(len(uniq) - 1, round(len(uniq) * fit_fraction)))
    return set(uniq[:cut]), set(uniq[cut:])


def evaluate(score: np.ndarray, label: np.ndarray, qids: Sequence[str], *, fit_fraction: float = 0.5,
             seed: int = 0, bins: int = 15, bootstrap: int = 1000) -> dict:
    """Fit the logistic map on the fit questions, report test metrics with 95% intervals from a
    bootstrap over test questions (``question_bootstrap``).

    Returns ``{"n_fit", "n_test", "wrong_rate_test", metric: {"value", "low", "high"}, ...}`` or
    ``{"error": why}`` when the fit split holds only one class.
    """
    from sklearn.linear_model import LogisticRegression

    score, label = np.asarray(score, dtype=np.float64), np.asarray(label, dtype=np.int64)
    fit_q, _ = split_questions(qids, fit_fraction, seed)
    fit = np.array([q in fit_q for q in qids])
    if len(set(label[fit].tolist())) < 2:
        return {"error": "the fit split has only one class (all answers right or all wrong)",
                "n_fit": int(fit.sum()), "n_test": int((~fit).sum())}
    # Standardize the one feature so the regularized fit does not depend on the score's scale.
    mu, sd = score[fit].mean(), score[fit].std() or 1.0
    x = ((score - mu) / sd)[:, None]
    model = LogisticRegression().fit(x[fit], label[fit])
    prob = model.predict_proba(x[~fit])[:, 1]
    y = label[~fit]
    point = metrics(prob, y, bins)
    draws = question_bootstrap(prob, y, [q for q, f in zip(qids, fit, strict=True) if not f], bootstrap, seed + 1, bins)
    # the fitted map, P(wrong) = sigmoid(coef * (score - score_mean) / score_std + intercept)
    out = {"n_fit": int(fit.sum()), "n_test": int(len(y)), "wrong_rate_test": float(y.mean()),
           "coef": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0]),
           "score_mean": float(mu), "score_std": float(sd)}
    for k, v in point.items():
        arr = draws[k]
        arr = arr[~np.isnan(arr)]
        lo, hi = (np.percentile(arr, [2.5, 97.5]) if arr.size else (float("nan"), float("nan")))
        out[k] = {"value": v, "low": float(lo), "high": float(hi)}
    return out


COVERAGES = (0.5, 0.8)  # the shares of answers kept that the report states accuracy at


def accuracy_at(uncertainty: np.ndarray, wrong: np.ndarray, coverage: float) -> float:
    """Accuracy of the answers kept when only the ``coverage`` share with the lowest uncertainty is
    answered (selective answering; ties in the order given)."""
    keep = np.argsort(uncertainty, kind="stable")[: max(1, round(coverage * len(uncertainty)))]
    return float(1.0 - wrong[keep].mean())


def risk_coverage(uncertainty: np.ndarray, wrong: np.ndarray, qids: Sequence[str], *, resamples: int = 1000,
                  seed: int = 0, points: int = 20) -> dict:
    """Selective answering by ``uncertainty``: the accuracy of the kept answers at ``points`` coverages
    (the curve), and at ``COVERAGES`` with 95% intervals from resamples of questions (all answers of a
    drawn question together, as ``question_bootstrap``).  No map is fitted: every answer counts."""
    uncertainty, wrong = np.asarray(uncertainty, dtype=np.float64), np.asarray(wrong, dtype=np.int64)
    grid = [round((i + 1) / points, 4) for i in range(points)]
    groups: dict[str, list[int]] = {}
    for i, q in enumerate(qids):
        groups.setdefault(q, []).append(i)
    rows = list(groups.values())
    pick = np.random.default_rng(seed).integers(0, len(rows), size=(resamples, len(rows)))
    at = {}
    for c in COVERAGES:
        draws = np.array([accuracy_at(uncertainty[idx], wrong[idx], c)
                          for idx in (np.concatenate([rows[j] for j in row]) for row in pick)])
        lo, hi = np.percentile(draws, [2.5, 97.5])
        at[f"{c:g}"] = {"value": accuracy_at(uncertainty, wrong, c), "low": float(lo), "high": float(hi)}
    return {"coverage": grid, "accuracy": [accuracy_at(uncertainty, wrong, c) for c in grid], "at": at}


def selective_bounds(wrong: np.ndarray, coverage: list[float]) -> dict:
    """The oracle's curve (every wrong answer ranked last) and random selection's accuracy."""
    wrong = np.asarray(wrong, dtype=np.int64)
    right = int((wrong == 0).sum())
    n = len(wrong)
    return {"oracle": [min(1.0, right / max(1, round(c * n))) for c in coverage], "random": float(1 - wrong.mean())}


def fitted_test_scores(features: np.ndarray, label: np.ndarray, qids: Sequence[str], *, fit_fraction: float = 0.5,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
    """P(wrong) of a logistic map on several answer features (n, k), fitted on the fit questions
    (``split_questions``, as ``evaluate``; each feature standardized on them), for the test answers:
    (their probabilities, a boolean mask of the test answers), or None when the fit split has one class."""
    from sklearn.linear_model import LogisticRegression

    x, label = np.asarray(features, dtype=np.float64), np.asarray(label, dtype=np.int64)
    x = x[:, None] if x.ndim == 1 else x
    fit_q, _ = split_questions(qids, fit_fraction, seed)
    fit = np.array([q in fit_q for q in qids])
    if len(set(label[fit].tolist())) < 2:
        return None
    mu, sd = x[fit].mean(0), x[fit].std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)
    return LogisticRegression().fit(x[fit], label[fit]).predict_proba(x[~fit])[:, 1], ~fit


MAPS = ("platt", "isotonic")  # the calibration maps compared (scikit-learn's), chosen by held-out log-loss


def _fit_map(kind: str, score: np.ndarray, label: np.ndarray) -> dict:
    """A map from a sequence score to P(wrong), fitted on (score, label), as plain numbers."""
    if kind == "platt":  # the logistic map of ``evaluate``: a sigmoid of the standardized score
        from sklearn.linear_model import LogisticRegression

        mu, sd = float(score.mean()), float(score.std()) or 1.0
        model = LogisticRegression().fit(((score - mu) / sd)[:, None], label)
        return {"kind": "platt", "coef": float(model.coef_[0, 0]), "intercept": float(model.intercept_[0]),
                "score_mean": mu, "score_std": sd}
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=EPS, y_max=1 - EPS, increasing=True, out_of_bounds="clip").fit(score, label)
    return {"kind": "isotonic", "x": [float(x) for x in iso.X_thresholds_], "y": [float(y) for y in iso.y_thresholds_]}


def log_loss(prob: np.ndarray, label: np.ndarray) -> float:
    prob = np.clip(prob, EPS, 1 - EPS)
    return float(-(label * np.log(prob) + (1 - label) * np.log(1 - prob)).mean())


def reliability(prob: np.ndarray, label: np.ndarray, bins: int = 10) -> list[list[float]]:
    """[mean predicted P(wrong), observed wrong rate, answers] per equal-width bin with answers."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(prob, edges[1:-1]), 0, bins - 1)
    return [[float(prob[which == b].mean()), float(label[which == b].mean()), int((which == b).sum())]
            for b in range(bins) if (which == b).any()]


def calibrate(score: np.ndarray, label: np.ndarray, qids: Sequence[str], *, fit_fraction: float = 0.5, seed: int = 0,
              folds: int = 5, bins: int = 15) -> dict:
    """Platt and isotonic maps from a sequence score to P(wrong): each's log-loss by cross-validation over
    the fit questions (``folds`` folds of questions), the lower one chosen and fitted on all fit answers;
    both maps' test-split ECE, Brier and log-loss and reliability diagrams, so the choice can be checked.
    ``{"error": why}`` when the fit split holds only one class."""
    score, label = np.asarray(score, dtype=np.float64), np.asarray(label, dtype=np.int64)
    fit_q, _ = split_questions(qids, fit_fraction, seed)
    fit = np.array([q in fit_q for q in qids])
    if len(set(label[fit].tolist())) < 2:
        return {"error": "the fit split has only one class (all answers right or all wrong)"}
    fit_idx = np.flatnonzero(fit)
    uniq = sorted({qids[i] for i in fit_idx})
    order = np.random.default_rng(seed + 3).permutation(len(uniq))
    fold_of = {uniq[j]: k % folds for k, j in enumerate(order)}
    cv = {}
    for kind in MAPS:
        probs = np.empty(len(fit_idx))
        for f in range(folds):
            held = np.array([fold_of[qids[i]] == f for i in fit_idx])
            train = fit_idx[~held]
            if not held.any() or len(set(label[train].tolist())) < 2:
                probs[held] = label[train].mean() if len(train) else 0.5
                continue
            probs[held] = apply_map(_fit_map(kind, score[train], label[train]), score[fit_idx[held]])
        cv[kind] = log_loss(probs, label[fit_idx])
    chosen = min(MAPS, key=lambda k: cv[k])
    maps = {k: _fit_map(k, score[fit], label[fit]) for k in MAPS}
    y = label[~fit]
    test = {}
    for k in MAPS:
        p = apply_map(maps[k], score[~fit])
        test[k] = {"ece": ece(p, y, bins), "brier": float(np.mean((p - y) ** 2)), "log_loss": log_loss(p, y),
                   "reliability": reliability(p, y)}
    return {"chosen": chosen, "cv_log_loss": cv, "folds": folds, "n_fit": int(fit.sum()), "n_test": int((~fit).sum()),
            "map": maps[chosen], "test": test}
