"""Evaluation metrics against scikit-learn / scipy references and direct definitions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, mean_squared_error, roc_auc_score

from drafteu import calibration
from drafteu.evaluate import cost, fidelity, hallucination


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_rmse_and_spearman_match_sklearn_and_scipy(rng):
    a, b = rng.normal(size=500), rng.normal(size=500)
    b[:50] = b[0]  # ties
    assert fidelity.rmse(a, b) == pytest.approx(np.sqrt(mean_squared_error(a, b)), rel=1e-12)
    assert fidelity.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)
    assert np.isnan(fidelity.spearman(a, np.ones_like(a)))
    with pytest.raises(ValueError):
        fidelity.rmse(a, b[:10])


def test_trial_metrics_pool_questions_and_bootstrap_resamples_whole_questions(rng):
    est = {f"q{i}": rng.random(i + 2) for i in range(6)}
    truth = {k: v + rng.normal(scale=0.1, size=v.size) for k, v in est.items()}
    qs = fidelity.bootstrap_questions(list(est), seed=3)
    assert len(qs) == 6 and set(qs) <= set(est)
    assert qs == fidelity.bootstrap_questions(list(est), seed=3)
    m = fidelity.trial_metrics(est, truth, qs)
    e = np.concatenate([est[q] for q in qs])
    t = np.concatenate([truth[q] for q in qs])
    assert m["tokens"] == e.size
    assert m["rmse"] == pytest.approx(np.sqrt(mean_squared_error(e, t)))
    s = fidelity.summarize([{"rmse": 1.0, "spearman": 0.5}, {"rmse": 3.0, "spearman": float("nan")}])
    assert s["rmse"] == {"mean": 2.0, "std": pytest.approx(np.sqrt(2)), "n": 2}
    assert s["spearman"] == {"mean": 0.5, "std": 0.0, "n": 1}


def test_ece_matches_sklearn_calibration_curve(rng):
    prob = rng.random(400)
    label = (rng.random(400) < prob ** 2).astype(int)
    frac_pos, mean_pred = calibration_curve(label, prob, n_bins=15, strategy="uniform")
    edges = np.linspace(0, 1, 16)
    counts = np.bincount(np.searchsorted(edges[1:-1], prob), minlength=15)
    counts = counts[counts > 0]
    ref = float(np.sum(counts * np.abs(frac_pos - mean_pred)) / len(prob))
    assert hallucination.ece(prob, label, 15) == pytest.approx(ref, rel=1e-12)
    assert hallucination.ece(np.full(10, 0.3), np.array([1, 1, 1] + [0] * 7)) == pytest.approx(0.0)


def _prr_reference(unc, quality):
    """PRR from its definition: mean quality kept when rejecting the j most uncertain, j = 0..n-1."""
    n = len(unc)
    order = np.argsort(-unc, kind="stable")  # most uncertain first

    def area(order):
        return np.mean([quality[order[j:]].mean() for j in range(n)])

    oracle, rand = area(np.argsort(quality, kind="stable")), quality.mean()
    return (area(order) - rand) / (oracle - rand)


def test_prr_matches_its_definition(rng):
    unc = rng.random(60)
    quality = (rng.random(60) > unc).astype(float)
    assert hallucination.prr(unc, quality) == pytest.approx(_prr_reference(unc, quality), rel=1e-9)
    assert hallucination.prr(-quality, quality) == pytest.approx(1.0)  # oracle
    assert np.isnan(hallucination.prr(unc, np.ones(60)))


def test_metrics_match_sklearn(rng):
    prob, label = rng.random(200), rng.integers(0, 2, 200)
    m = hallucination.metrics(prob, label)
    assert m["auroc"] == pytest.approx(roc_auc_score(label, prob))
    assert m["brier"] == pytest.approx(brier_score_loss(label, prob))


def test_evaluate_separates_an_informative_score_and_reports_intervals(rng):
    qids = [f"q{i // 3}" for i in range(300)]
    label = rng.integers(0, 2, 300)
    score = label + rng.normal(scale=0.7, size=300)
    out = hallucination.evaluate(score, label, qids, fit_fraction=0.5, seed=0, bootstrap=200)
    assert out["n_fit"] + out["n_test"] == 300
    fit_q, test_q = hallucination.split_questions(qids, 0.5, 0)
    assert not fit_q & test_q  # the split is by question
    assert 0.75 < out["auroc"]["value"] <= 1 and out["auroc"]["low"] <= out["auroc"]["value"] <= out["auroc"]["high"]
    assert out["coef"] > 0
    noise = hallucination.evaluate(rng.normal(size=300), label, qids, bootstrap=200)
    assert abs(noise["auroc"]["value"] - 0.5) < 0.15
    assert "error" in hallucination.evaluate(score, np.zeros(300, int), qids, bootstrap=10)


def test_flops_accounting():
    assert cost.flops_per_token(target_params=100, target_passes=3) == 600  # TokUR / ground truth, K_T = 3
    assert cost.flops_per_token(target_params=100, target_passes=1, draft_params=10, draft_passes=6) == 2 * (60 + 100)
    # K = 6 drafts of 10 parameters sharing a 4-parameter trunk: 4 once, 6 x 6 for the rest, + the proxy
    assert cost.flops_per_token(target_params=100, target_passes=1, draft_params=10, draft_passes=6,
                                shared_params=4) == 2 * (100 + 4 + 36)
    assert cost.relative({"tokur": 4.0, "ddd": 1.0}, "tokur") == {"tokur": 1.0, "ddd": 0.25}
    import torch

    lin = torch.nn.Linear(4, 4)
    tied = torch.nn.Sequential(lin, lin)
    assert cost.parameters(tied) == 20


def test_vectorized_bootstrap_metrics_equal_the_scalar_ones(rng):
    prob = np.round(rng.random(40), 2)  # ties in the scores
    label = rng.integers(0, 2, 40)
    idx = rng.integers(0, 40, size=(30, 40))
    idx[0] = 0  # a resample with one class only: AUROC undefined
    batch = hallucination.metrics_batch(prob, label, idx)
    for b in range(30):
        ref = hallucination.metrics(prob[idx[b]], label[idx[b]])
        for k, v in ref.items():
            if np.isnan(v):
                assert np.isnan(batch[k][b]), (k, b)
            else:
                assert batch[k][b] == pytest.approx(v, rel=1e-9, abs=1e-12), (k, b)


def test_hallucination_intervals_resample_whole_questions(rng):
    """The per-method intervals draw questions, not answers: each resample is exactly the answers of
    the drawn questions (checked against the scalar metrics, for equal and unequal answer counts),
    and when a question's answers are copies of each other the interval is wider than an answer-level
    bootstrap's (which would count 3 copies as 3 independent answers)."""
    qids = [f"q{i // 3}" for i in range(60)]
    prob = rng.random(60)
    label = (rng.random(60) < prob).astype(int)
    for ids in (qids, qids[:-1]):  # 20 questions x 3 answers; then one question with 2
        n = len(ids)
        draws = hallucination.question_bootstrap(prob[:n], label[:n], ids, 50, seed=3)
        groups = {}
        for i, q in enumerate(ids):
            groups.setdefault(q, []).append(i)
        rows = list(groups.values())
        pick = np.random.default_rng(3).integers(0, len(rows), size=(50, len(rows)))
        for b in range(50):
            idx = np.concatenate([rows[j] for j in pick[b]])
            ref = hallucination.metrics(prob[:n][idx], label[:n][idx])
            for k, v in ref.items():
                assert (np.isnan(draws[k][b]) if np.isnan(v) else draws[k][b] == pytest.approx(v, abs=1e-12)), (k, b)
    base_p, base_y = rng.random(100), (rng.random(100) < 0.5).astype(int)
    prob3, label3 = np.repeat(base_p, 3), np.repeat(base_y, 3)
    q3 = [f"q{i // 3}" for i in range(300)]
    by_question = hallucination.question_bootstrap(prob3, label3, q3, 1000, seed=0)["brier"]
    by_answer = hallucination.metrics_batch(prob3, label3,
                                            np.random.default_rng(0).integers(0, 300, (1000, 300)))["brier"]
    width = lambda a: np.subtract(*np.percentile(a, [97.5, 2.5]))  # noqa: E731
    assert width(by_question) > 1.4 * width(by_answer)


def test_paired_comparisons_read_their_intervals():
    """A method compared with itself: difference 0 and 'cannot tell'; a clearly better estimator
    agrees with a 'lower RMSE' claim; the verdict follows the interval and the margin."""
    from drafteu.evaluate import compare

    rng = np.random.default_rng(0)
    qs = [f"q{i}" for i in range(40)]
    truth = {q: rng.gamma(2.0, 0.05, size=12) for q in qs}
    good = {q: t + rng.normal(0, 0.01, t.size) for q, t in truth.items()}
    bad = {q: t + 0.5 + rng.normal(0, 0.2, t.size) for q, t in truth.items()}
    same = compare.fidelity_difference(good, good, truth, qs, resamples=200)
    assert same["rmse"]["difference"] == 0 and same["rmse"]["verdict"] == "cannot tell at this size"
    diff = compare.fidelity_difference(good, bad, truth, qs, resamples=200)
    assert diff["rmse"]["high"] < 0 and diff["rmse"]["verdict"] == "agrees"
    assert diff["spearman"]["verdict"] == "agrees"
    assert compare.fidelity_difference(bad, good, truth, qs, resamples=200)["rmse"]["verdict"] == "disagrees"
    assert compare.verdict(-0.02, 0.01, "higher", margin=-0.03) == "agrees"  # within 0.03 of the other
    assert compare.verdict(-0.08, -0.05, "higher", margin=-0.03) == "disagrees"
    assert compare.verdict(-0.05, 0.01, "higher", margin=-0.03) == "cannot tell at this size"


def test_auroc_difference_groups_answers_by_question():
    from drafteu.evaluate import compare

    rng = np.random.default_rng(1)
    qids = [f"q{i // 3}" for i in range(300)]
    label = rng.integers(0, 2, 300)
    informative = label + rng.normal(0, 0.5, 300)
    noise = rng.normal(0, 1, 300)
    assert compare.auroc(informative, label) > 0.8 and compare.auroc(np.ones(4), np.ones(4)) != compare.auroc(
        np.ones(4), np.ones(4))  # one class: NaN
    d = compare.auroc_difference(informative, noise, label, qids, resamples=200)
    assert d["difference"] == pytest.approx(compare.auroc(informative, label) - compare.auroc(noise, label))
    assert d["verdict"] == "agrees" and d["low"] > 0
    assert compare.auroc_difference(noise, noise, label, qids, resamples=50)["difference"] == 0


def test_the_report_renders_each_stages_verdict_once():
    """Every paper claim's verdict is decided in its stage (``comparisons``); the report writes each
    one line with that verdict, and none of its own."""
    from drafteu import report

    interval = {"difference": -0.1, "low": -0.2, "high": -0.05, "resamples": 10, "verdict": "agrees"}
    fid = {"comparisons": {"a vs b": {"rmse": {"claim": "RMSE a - b (paper: < 0)", **interval},
                                      "spearman": {"claim": "Spearman a - b (paper: > 0)", **interval,
                                                   "verdict": "disagrees"}}}}
    cst = {"comparisons": {"cost": {"claim": "wall a / ref (paper: < 1)", "ratio": 1.7, "verdict": "disagrees"}}}
    lines = report.claims(fid, None, {"comparisons": {}}, cst)
    assert lines == ["- RMSE a - b (paper: < 0): difference -0.1000, 95% interval [-0.2000, -0.0500] "
                     "(10 question resamples) — **agrees**",
                     "- Spearman a - b (paper: > 0): difference -0.1000, 95% interval [-0.2000, -0.0500] "
                     "(10 question resamples) — **disagrees**",
                     "- wall a / ref (paper: < 1): 1.70 — **disagrees**"]


def test_the_perturbation_is_stated_against_ln_k_with_a_warning_near_either_end():
    """SmolLM2's demo family: 0.077 nats/token of ln 3 (7%, fine); Gemma 3 270M's at the same absolute
    sigma: 0.460 (42%, saturating); a family whose members barely differ: a warning too."""
    import dataclasses
    import math

    from drafteu.config import ExperimentConfig
    from drafteu.evaluate.stages import perturbation

    cfg = ExperimentConfig()
    fine, hot, cold = (perturbation(cfg, m) for m in (0.077, 0.460, 0.0005))
    k = cfg.eval.family_size
    assert fine["ln_k"] == pytest.approx(math.log(k)) and fine["share_of_ln_k"] == pytest.approx(0.077 / math.log(k))
    assert fine["warning"] is None and fine["scale"] == "absolute"
    assert "disagree on most tokens" in hot["warning"] and "barely differ" in cold["warning"]
    assert "use noise.scale: relative" in cold["warning"]  # the fix it names: absolute noise may go relative
    relative = dataclasses.replace(cfg, noise=dataclasses.replace(cfg.noise, scale="relative"))
    assert "noise.scale" not in perturbation(relative, 0.0005)["warning"]  # already relative: only sigma is named


def test_risk_coverage_keeps_the_least_uncertain_answers():
    """Selective answering: the accuracy of the answers kept, the oracle and random selection, and
    intervals over question resamples that contain the point."""
    import numpy as np

    from drafteu.evaluate import hallucination

    wrong = np.array([0, 0, 0, 1, 0, 1, 1, 1, 0, 1])
    perfect = wrong + np.linspace(0, 0.1, 10)  # every wrong answer more uncertain than every right one
    assert hallucination.accuracy_at(perfect, wrong, 0.5) == 1.0
    assert hallucination.accuracy_at(-perfect, wrong, 0.5) == 0.0  # the worst order keeps the wrong ones
    assert hallucination.accuracy_at(perfect, wrong, 1.0) == 0.5
    qids = [f"q{i // 2}" for i in range(10)]
    rc = hallucination.risk_coverage(perfect, wrong, qids, resamples=200, points=10)
    assert rc["coverage"][4] == 0.5 and rc["accuracy"][4] == 1.0 and rc["accuracy"][-1] == 0.5
    assert set(rc["at"]) == {"0.5", "0.8"}
    assert all(r["low"] <= r["value"] <= r["high"] for r in rc["at"].values())
    bounds = hallucination.selective_bounds(wrong, rc["coverage"])
    assert bounds["random"] == 0.5 and bounds["oracle"][4] == 1.0 and bounds["oracle"][-1] == 0.5
    assert rc["accuracy"] == pytest.approx(bounds["oracle"])  # a perfect signal is the oracle


def test_calibration_chooses_by_held_out_log_loss_and_its_map_is_what_p_wrong_applies(tmp_path):
    """Platt and isotonic maps fitted on the fit questions, the one with the lower cross-validated log-loss
    chosen; the stored map gives the same P(wrong) through calibration.p_wrong and the run's reader."""
    import json

    import numpy as np

    from drafteu import rundir
    from drafteu.evaluate import hallucination

    rng = np.random.default_rng(1)
    n = 600
    score = rng.uniform(0, 1, n)
    qids = [f"q{i // 3}" for i in range(n)]
    # a step-shaped truth: P(wrong) 0.1 below 0.5, 0.9 above - a sigmoid cannot follow it, isotonic can
    label = (rng.uniform(0, 1, n) < np.where(score > 0.5, 0.9, 0.1)).astype(int)
    cal = hallucination.calibrate(score, label, qids, seed=0)
    assert cal["chosen"] == "isotonic" and cal["cv_log_loss"]["isotonic"] < cal["cv_log_loss"]["platt"]
    assert cal["test"]["isotonic"]["ece"] < cal["test"]["platt"]["ece"]
    assert cal["n_fit"] + cal["n_test"] == n and all(len(t["reliability"]) > 3 for t in cal["test"].values())
    p = calibration.p_wrong(0.9, cal["map"])
    assert 0.8 < p < 1.0 and calibration.p_wrong(0.1, cal["map"]) < 0.2
    # a smooth truth: the logistic map does as well, and is what the reader returns as P(wrong) with its provenance
    smooth = (rng.uniform(0, 1, n) < 1 / (1 + np.exp(-6 * (score - 0.5)))).astype(int)
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    fitted = hallucination.calibrate(score, smooth, qids, seed=0)
    (run / "eval" / "hallucination.json").write_text(json.dumps(
        {"methods": {}, "calibration": {"method": "ddd", "aggregation": "mean"} | fitted}))
    m = rundir.hallucination_map(run, "ddd")
    assert m["aggregation"] == "mean" and m["provenance"]["map"] == fitted["chosen"]
    assert m["provenance"]["answers_fitted"] == fitted["n_fit"]
    assert calibration.p_wrong(0.7, m) == pytest.approx(calibration.p_wrong(0.7, fitted["map"]))
    assert rundir.hallucination_map(run, "other") is None and rundir.hallucination_map(tmp_path, "ddd") is None
