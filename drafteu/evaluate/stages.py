"""The evaluation stages of `drafteu reproduce`, reading the answers and token EU that
``evaluate.scoring_stage.stage_score`` stored: fidelity (Tables 1, 3, 5), proxy robustness (Table 4),
hallucination detection (Table 2) and cost (Table 6).  Each returns the JSON written to
``eval/<stage>.json``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from drafteu import divergence, estimators, fileio
from drafteu import perturbation as noise_strength
from drafteu.config import ExperimentConfig
from drafteu.evaluate import compare, cost, fidelity, hallucination
from drafteu.evaluate.labels import cross_check, relabel
from drafteu.evaluate.scoring_stage import TrialEstimators
from drafteu.methods import DRAFT_METHODS, ESTIMATORS, TARGET_ONLY, named
from drafteu.posterior import family_seeds, member_seed
from drafteu.progress import progress
from drafteu.rundir import (
    PROXY_BIAS,
    EnsembleSpec,
    draft_dir,
    ensembles,
    eval_rows,
    fidelity_rows,
    key_of,
    labels,
    token_eu,
)
from drafteu.rundir import rounded as _round
from drafteu.sources import HiddenSource, reduce_chunks


def _trial_questions(cfg: ExperimentConfig, qids: list[str], trial: int) -> list[str]:
    if cfg.eval.retrain_per_trial:
        return qids
    return fidelity.bootstrap_questions(qids, seed=cfg.seed * 1000 + trial)


def _roles() -> tuple[str, str, str, str]:
    """(truth, reference, proposed, untrained): the names the paper's claims are about (methods.py)."""
    return named("truth"), named("reference"), named("proposed"), named("baseline drafts")


def _claim(result: dict, claim: str) -> dict:
    return {"claim": claim, **result}


def stage_fidelity(cfg: ExperimentConfig, run: Path) -> dict:
    truth_name, reference, proposed, untrained = _roles()
    scores = token_eu(run)
    fid = fidelity_rows(eval_rows(run), cfg.eval.fidelity_questions)
    qkeys = [key_of(r) for r in fid]
    methods = [reference] + labels(cfg)
    variance_only = f"variance only ({proposed}'s JSD)" if proposed in cfg.drafts.methods else None
    out = {"questions": len(qkeys), "trials": cfg.eval.trials,
           "trial_kind": "retrained" if cfg.eval.retrain_per_trial else "redrawn noise + bootstrap of questions",
           "methods": {}}
    for m in methods + ([variance_only] if variance_only else []):
        per_trial = []
        for t in range(cfg.eval.trials):
            truth = {k: np.array(scores[(k, truth_name, t)]["eu"]) for k in qkeys}
            src, field = (proposed, "variance") if m == variance_only else (m, "eu")  # a diagnostic: no bias term
            tt = t if (qkeys[0], src, t) in scores else 0
            est = {k: np.array(scores[(k, src, tt)][field]) for k in qkeys}
            per_trial.append(fidelity.trial_metrics(est, truth, _trial_questions(cfg, qkeys, t)))
        out["methods"][m] = {"trials": per_trial, **fidelity.summarize(per_trial)}
    # The paper's orderings (Tables 1, 5), each as a paired interval of trial 0's difference
    truth = {k: np.array(scores[(k, truth_name, 0)]["eu"]) for k in qkeys}

    def est(m):
        return {k: np.array(scores[(k, m, 0)]["eu"]) for k in qkeys}

    comparisons = {}
    if {proposed, untrained} <= set(methods):
        d = compare.fidelity_difference(est(proposed), est(untrained), truth, qkeys, resamples=cfg.eval.bootstrap,
                                        seed=cfg.seed)
        comparisons[f"{proposed} vs {untrained}"] = {
            "rmse": _claim(d["rmse"], f"RMSE {proposed} - {untrained} (paper: < 0)"),
            "spearman": _claim(d["spearman"], f"Spearman {proposed} - {untrained} (paper: > 0)")}
    ours = [m for m in labels(cfg) if EnsembleSpec.from_label(m).method == proposed]
    others = [m for m in labels(cfg) if EnsembleSpec.from_label(m).method != proposed]
    if ours and others:  # "DDD has the lowest RMSE of the draft ensembles": the best of each side
        best = {m: out["methods"][m]["rmse"]["mean"] for m in ours + others}
        a, b = min(ours, key=best.get), min(others, key=best.get)
        d = compare.fidelity_difference(est(a), est(b), truth, qkeys, resamples=cfg.eval.bootstrap, seed=cfg.seed)
        comparisons[f"best {proposed} vs best other"] = {"rmse": _claim(
            d["rmse"], f"RMSE of the best {proposed} ensemble ({a}) - the best other ({b}) (paper: < 0, "
            f"{proposed} has the lowest RMSE of the draft ensembles)")}
    out["comparisons"] = comparisons
    # The bias term's share of each ensemble's estimate and its size next to the ground truth (trial 0):
    # the diagnostic of drafts too far from the target (docs/method.md §15)
    mean_truth = float(np.mean(np.concatenate(list(truth.values()))))
    out["perturbation"] = perturbation(cfg, mean_truth)
    out["bias"] = {}
    for m in labels(cfg):
        var = np.concatenate([np.array(scores[(k, m, 0)]["variance"]) for k in qkeys])
        bias = np.concatenate([np.array(scores[(k, m, 0)]["bias"]) for k in qkeys])
        out["bias"][m] = {"mean_variance": float(var.mean()), "mean_bias": float(bias.mean()),
                          "share": float(bias.sum() / max(var.sum() + bias.sum(), 1e-30)),
                          "bias_vs_truth": float(bias.mean() / mean_truth) if mean_truth > 0 else None}
    return out


def perturbation(cfg: ExperimentConfig, mean_truth: float) -> dict:
    """How strong the ground-truth family's perturbation is on the scored answers: its mean MI per
    token against ln K, and a plain warning near either end (``drafteu.perturbation.verdict``)."""
    ceiling = float(np.log(cfg.eval.family_size))
    share = mean_truth / ceiling
    return {"sigma": cfg.noise.sigma, "scale": cfg.noise.scale or "absolute", "rank": cfg.noise.rank,
            "modules": list(cfg.noise.target_modules), "family_size": cfg.eval.family_size,
            "mean_mi": mean_truth, "ln_k": ceiling, "share_of_ln_k": share,
            "warning": noise_strength.verdict(share, cfg.eval.family_size, relative=cfg.noise.relative)}


def stage_perturbation(cfg: ExperimentConfig, run: Path) -> dict:
    """What each use of the noise is, measured on the first ``eval.proxy_questions`` evaluation
    answers (docs/method.md §2): the ground-truth family (trial 0's), TokUR's draws (one per
    question, as it scores), one draw of the OSD teachers (``proxy.n_teacher`` members) and the
    ensembles built of noise (untrained, K-only; trial 0's): each set's mean MI against ln K and its
    KL to the raw target, and for the drafts' noise also the KL to the draft it perturbs."""
    from drafteu import models
    from drafteu.kvcache import shared_prefix
    from drafteu.posterior import NoisyModel

    e = cfg.eval
    rows = [r for r in fidelity_rows(eval_rows(run), e.proxy_questions) if r["response_ids"]]
    pairs = [(list(r["prompt_ids"]), list(r["response_ids"])) for r in rows]
    lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    noisy = NoisyModel(lm.model, cfg.noise)
    plen = shared_prefix([p for p, _ in pairs])
    family = noisy.set_members("family", family_seeds(cfg.seed, e.family_size))
    reference = ESTIMATORS[named("reference")]  # TokUR: its draws, as it scores
    tokur = reference.build(estimators.BuildContext(noisy=noisy, seed=cfg.seed,
                                                    sizes={reference.size_setting: getattr(e, reference.size_setting)}))
    teachers = noisy.set_members("teacher", [member_seed("osd", cfg.seed, 1, k) for k in range(cfg.proxy.n_teacher)])
    sets = {"ground-truth family": [family] * len(pairs), "TokUR": tokur.slots(pairs),
            "OSD teachers": [teachers] * len(pairs)}
    drafts = noise_ensembles(cfg)
    out = {"sigma": cfg.noise.sigma, "scale": cfg.noise.scale or "absolute", "rank": cfg.noise.rank,
           "modules": list(cfg.noise.target_modules), "answers": len(pairs), "sets": {}}
    target = HiddenSource(noisy.model, None, prefix_len=plen, context=noisy.base)  # one raw-target pass for all
    with progress("perturbation", total=len(sets) + len(drafts)) as bar:
        for name, slots in sets.items():
            out["sets"][name] = noise_strength.strength(noisy, slots, pairs, plen, target=target)
            bar.update(advance=1, info=name)
        if drafts:
            tokenizer = models.load(cfg.target, tokenizer_only=True)
            bases = estimators.DraftBases()
            for spec in drafts:
                name = f"{spec.label} drafts"
                out["sets"][name] = {"sigma": cfg.drafts.sigma} | _draft_noise(
                    draft_dir(run, cfg, spec, 0), tokenizer, target, pairs, plen, bases,
                    next(lm.model.parameters()).device,
                    relative=cfg.noise.relative,
                    kernel=cfg.eval.draft_kernel)  # the drafts' noise: cfg.noise with drafts.sigma
                bar.update(advance=1, info=name)
    return out


def noise_ensembles(cfg: ExperimentConfig) -> list[EnsembleSpec]:
    """The ensembles the perturbation stage measures: those whose members are noise, not trained (untrained,
    K-only: `DraftMethod.trained` false, their noise redrawn per trial)."""
    return [s for s in ensembles(cfg) if s.layout is None and not DRAFT_METHODS[s.method].trained]


def _draft_noise(directory: Path, tokenizer, target: HiddenSource, pairs, plen: int, bases, device,
                 relative: bool, kernel: str = "recipe") -> dict:
    """``perturbation.measure`` of one noise ensemble: its members against the raw target and against
    the draft they perturb (the draft base with its adapters off; K-only: the trained draft its
    manifest ``perturbs``)."""
    ens = ESTIMATORS[named("estimate")].build(estimators.BuildContext(
        target=tokenizer, drafts=directory, device=device, prefix_len=plen, bases=bases, kernel=kernel))
    perturbs = estimators.read_drafts_manifest(directory).get("perturbs")
    if perturbs is not None:
        model = estimators.load_adapter(ens.drafts, directory / perturbs, "perturbed")
        centre = HiddenSource(model, ["perturbed"], prefix_len=plen)
    elif DRAFT_METHODS[ens.method].trainer == "noise":  # noise on the draft base itself
        centre = HiddenSource(ens.drafts, None, prefix_len=plen, context=ens.drafts.disable_adapter)
    else:  # K-only made before manifests named the trained draft
        centre = None
    try:
        members = ens.draft_hidden(pairs)
        cut = dataclasses.replace(target.hidden(pairs), vocab=ens.vocab)
        around = dataclasses.replace(centre.hidden(pairs), vocab=ens.vocab) if centre is not None else None
        return noise_strength.measure(members, cut, around, setting="drafts.sigma", relative=relative)
    finally:
        if perturbs is not None:
            ens.drafts.delete_adapter("perturbed")
        ens.close()


def stage_proxy_robustness(cfg: ExperimentConfig, run: Path) -> dict:
    """Table 4: the bias term KL(q_mix || p_hat) with p_hat from K fresh noisy targets vs p_mix, against
    a large fixed reference family (docs/method.md §9).  q_mix = the DDD (else first) ensemble."""
    e = cfg.eval
    rows = fidelity_rows(eval_rows(run), e.proxy_questions)
    proposed = named("proposed")
    label = proposed if proposed in cfg.drafts.methods else labels(cfg)[0]
    path = run / PROXY_BIAS
    done = {(r["key"], r["estimate"], r["trial"]) for r in fileio.read_jsonl(path, repair=True)}
    estimates = ["reference", "p_mix", "raw target"] + [f"K={k}" for k in e.proxy_ks]
    need = [(r, t) for t in range(e.trials) for r in rows
            if any((key_of(r), est, t) not in done for est in estimates[3:])]
    need += [(r, -1) for r in rows if any((key_of(r), est, -1) not in done for est in estimates[:3])]
    if need:
        _measure_proxy_bias(cfg, run, rows, label, need)
    return _summarize_proxy_bias(cfg, run, rows, label, estimates)


def _measure_proxy_bias(cfg: ExperimentConfig, run: Path, rows: list[dict], label: str,
                       need: list[tuple[dict, int]]) -> None:
    """The bias term of ``need``'s (answer, trial) pairs against the reference, p_mix, the raw target
    (trial -1: drawn once) and K fresh noisy targets (per trial), appended to ``PROXY_BIAS``."""
    e, path = cfg.eval, run / PROXY_BIAS
    trial_est = TrialEstimators(cfg, run, rows)
    trial_est.set_trial(0, [EnsembleSpec.from_label(label)], target_only=[named("baseline")])  # the raw target
    ens, noisy, plen = trial_est.estimators[label], trial_est.noisy, trial_est.prefix_len
    ref = HiddenSource(noisy.model,
                       noisy.set_members("ref", family_seeds(cfg.seed, e.reference_size, tag="reference")),
                       prefix_len=plen)
    raw_target = trial_est.estimators[named("baseline")].source  # the target, adapters off
    fresh_sources = {k: HiddenSource(noisy.model, [], prefix_len=plen) for k in e.proxy_ks}
    v = ens.vocab

    def cut(h):  # a copy: the sources' memoized batches (the entropy estimator's) keep their vocabulary
        return dataclasses.replace(h, vocab=v)

    def bias_terms(pair, *sources):
        """KL(q_mix || mixture of each source) at every response position of one answer (a source: a
        function of the pairs giving Hidden - a HiddenSource's ``hidden``, or p_mix wherever it runs)."""
        hidden = [ens.draft_hidden([pair])] + [cut(s([pair])) for s in sources]

        def fn(q, *ps):
            qm = divergence.mixture(q)
            return tuple(divergence.kl(qm, divergence.mixture(p)) for p in ps)

        return reduce_chunks(fn, *hidden)

    with progress("proxy robustness", total=len(need)) as bar:
        for row in [r for r, t in need if t == -1]:
            pair = (row["prompt_ids"], row["response_ids"])
            terms = bias_terms(pair, ref.hidden, ens.proxy_hidden, raw_target.hidden)
            fileio.append_jsonl(path, [{"key": key_of(row), "trial": -1, "estimate": name, "bias": _round(b)}
                                      for name, b in zip(("reference", "p_mix", "raw target"), terms, strict=True)])
            bar.update(advance=1)
        for t in range(e.trials):
            todo = [r for r, tt in need if tt == t]
            if not todo:
                continue
            for k in e.proxy_ks:  # redrawn in place: set_names drops the stale prefix cache
                fresh_sources[k].set_names(
                    noisy.set_members(f"fresh{k}_", [member_seed("robust", cfg.seed, t, k, j) for j in range(k)]))
            for row in todo:
                terms = bias_terms((row["prompt_ids"], row["response_ids"]),
                                   *(src.hidden for src in fresh_sources.values()))
                fileio.append_jsonl(path, [{"key": key_of(row), "trial": t, "estimate": f"K={k}", "bias": _round(b)}
                                          for k, b in zip(fresh_sources, terms, strict=True)])
                bar.update(advance=1, info=f"trial {t}")


def _summarize_proxy_bias(cfg: ExperimentConfig, run: Path, rows: list[dict], label: str,
                         estimates: list[str]) -> dict:
    """Table 4 from the stored bias terms: each estimate against the reference per trial, and the
    paired comparison of p_mix with the largest fresh family."""
    e, path = cfg.eval, run / PROXY_BIAS
    stored = {(r["key"], r["estimate"], r["trial"]): np.array(r["bias"]) for r in fileio.read_jsonl(path)}
    keys = [key_of(r) for r in rows]
    truth = {k: stored[(k, "reference", -1)] for k in keys}
    result = {"ensemble": label, "reference_size": e.reference_size, "questions": len(keys), "estimates": {}}
    for est in estimates[1:]:
        per_trial = []
        for t in range(e.trials):
            tt = -1 if est in ("p_mix", "raw target") else t
            vals = {k: stored[(k, est, tt)] for k in keys}
            per_trial.append(fidelity.trial_metrics(vals, truth,
                                                    fidelity.bootstrap_questions(keys, cfg.seed * 1000 + t)))
        result["estimates"][est] = {"trials": per_trial, **fidelity.summarize(per_trial)}
    big = f"K={max(e.proxy_ks)}"
    p_mix, fresh = ({k: stored[(k, est, t)] for k in keys} for est, t in (("p_mix", -1), (big, 0)))

    def d_rmse(qs):
        t = fidelity.pooled(truth, qs)
        return fidelity.rmse(fidelity.pooled(p_mix, qs), t) - fidelity.rmse(fidelity.pooled(fresh, qs), t)

    result["comparisons"] = {f"p_mix vs {big}": _claim(compare.paired_bootstrap(
        keys, d_rmse, better="lower", resamples=e.bootstrap, seed=cfg.seed),
        f"bias-term RMSE to the reference, p_mix - {big} fresh noisy targets (paper: < 0)")}
    return result


def stage_hallucination(cfg: ExperimentConfig, run: Path) -> dict:
    truth, reference, proposed, _ = _roles()
    rows, relabelled = relabel(eval_rows(run))
    scores = token_eu(run)
    label = np.array([0 if r["correct"] else 1 for r in rows])
    qids = [r["qid"] for r in rows]
    baseline = named("baseline")
    methods = [reference, baseline] + labels(cfg) + [truth]
    # the target's token NLL, stored with predictive entropy's pass (runs scored before it was stored have none)
    nll = all("nll" in scores[(key_of(r), baseline, 0)] for r in rows)
    signals = methods + ([PERPLEXITY] if nll else [])
    out = {"answers": len(rows), "questions": len(set(qids)), "wrong_rate": float(label.mean()),
           "labels": {**cross_check(rows), "relabelled": relabelled}, "methods": {}}
    first = {}
    how = cfg.eval.aggregations[0]
    for m in signals:
        out["methods"][m] = {}
        for agg in cfg.eval.aggregations:
            seq = np.array([estimators.aggregate(torch.tensor(
                scores[(key_of(r), baseline, 0)]["nll"] if m == PERPLEXITY else scores[(key_of(r), m, 0)]["eu"]), agg)
                for r in rows])
            if agg == how:
                first[m] = seq
            out["methods"][m][agg] = hallucination.evaluate(
                seq, label, qids, fit_fraction=cfg.eval.fit_fraction, seed=cfg.seed, bins=cfg.eval.ece_bins,
                bootstrap=cfg.eval.bootstrap)
    out["selective"] = _selective(first, label, qids, cfg, rows, scores, proposed)
    if proposed in first:  # P(wrong) you can check: Platt or isotonic, chosen by held-out log-loss
        out["calibration"] = {"method": proposed, "aggregation": how} | hallucination.calibrate(
            first[proposed], label, qids, fit_fraction=cfg.eval.fit_fraction, seed=cfg.seed, bins=cfg.eval.ece_bins)
    out["comparisons"] = {}
    if proposed in first:  # the paper: DDD detects hallucinations about as well as TokUR (within AUROC_MARGIN)
        c = compare.auroc_difference(first[proposed], first[reference], label, qids, margin=-compare.AUROC_MARGIN,
                                     resamples=cfg.eval.bootstrap, seed=cfg.seed)
        out["comparisons"][f"{proposed} vs {reference}"] = _claim(
            c | {"aggregation": how}, f"AUROC {proposed} - {reference}, {how} token EU, all answers (paper: "
            f"{proposed} no worse by more than {compare.AUROC_MARGIN})")
        added = _added_to(first[proposed], first[baseline], label, qids, cfg)
        if added is not None:
            out["comparisons"][f"{proposed} + {baseline} vs {baseline}"] = _claim(
                added | {"aggregation": how}, f"AUROC of a logistic map on [{how} {proposed} EU, {how} {baseline}] - "
                f"on {baseline} alone, fitted on the fit questions, test answers (does the EU add to a free signal?)")
    return out


def _selective(first: dict, label: np.ndarray, qids: list[str], cfg: ExperimentConfig, rows, scores, proposed) -> dict:
    """Risk-coverage of every signal (its first aggregation) and of the proposed method's max-token EU:
    the accuracy of the answers kept against the share kept, the oracle and random selection."""
    signals = dict(first)
    if proposed in first and "max" in cfg.eval.aggregations and cfg.eval.aggregations[0] != "max":
        signals[f"{proposed} (max token)"] = np.array(
            [estimators.aggregate(torch.tensor(scores[(key_of(r), proposed, 0)]["eu"]), "max") for r in rows])
    methods = {m: hallucination.risk_coverage(v, label, qids, resamples=cfg.eval.bootstrap, seed=cfg.seed + 2)
               for m, v in signals.items()}
    grid = next(iter(methods.values()))["coverage"] if methods else []
    return {"aggregation": cfg.eval.aggregations[0], "methods": methods, **hallucination.selective_bounds(label, grid)}


PERPLEXITY = "perplexity"  # the target's token NLL as a free signal beside predictive entropy (mean: log perplexity)


def _added_to(eu: np.ndarray, free: np.ndarray, label: np.ndarray, qids: list[str],
              cfg: ExperimentConfig) -> dict | None:
    """AUROC(map on [eu, free]) - AUROC(map on free) on the test answers, paired over test questions."""
    both = hallucination.fitted_test_scores(np.stack([eu, free], 1), label, qids, fit_fraction=cfg.eval.fit_fraction,
                                            seed=cfg.seed)
    alone = hallucination.fitted_test_scores(free, label, qids, fit_fraction=cfg.eval.fit_fraction, seed=cfg.seed)
    if both is None or alone is None:
        return None
    test = both[1]
    return compare.auroc_difference(both[0], alone[0], label[test], [q for q, t in zip(qids, test, strict=True) if t],
                                    resamples=cfg.eval.bootstrap, seed=cfg.seed)


# The cost stage's two modes: (name, shared) - every method with the prompts' shared prefix cached
# and a prompt run once for its answers (what a deployment pays), or full forwards (the paper's accounting).
COST_MODES = (("full forwards", False), ("prefix shared", True))


def _sources(est) -> list[tuple[HiddenSource, int]]:
    """(source, rows per scored position) of an estimator: the passes its cost is made of."""
    return [(p.source, p.rows) for p in est.passes()]


def _share(est, prefix_len: int, shared: bool) -> None:
    """Run ``est``'s passes with the shared prefix cached and prompts shared between answers, or not."""
    for src, _ in _sources(est):
        src.prefix_len, src.share_prompts = (prefix_len, True) if shared else (0, False)
        src.invalidate()


def _timed(trial_est, rows: list[dict], methods: list[str], plen: int, tokens: int):
    """(wall seconds, positions per scored token of each pass) per mode and method: every method scores
    ``rows`` in one batched pass per mode, interleaved method by method and mode by mode, then all in
    the reverse order (machine noise hits every method alike), after a warm-up."""
    for _, shared in COST_MODES:  # warm-up: first-call allocations are not the method's cost
        for m in methods:
            _share(trial_est.estimators[m], plen, shared)
        trial_est.score(rows[:1], methods)
    wall = {mode: dict.fromkeys(methods, 0.0) for mode, _ in COST_MODES}
    fed: dict[str, dict[str, list[float]]] = {mode: {} for mode, _ in COST_MODES}
    for order, modes in ((methods, COST_MODES), (methods[::-1], COST_MODES[::-1])):
        for m in order:
            est = trial_est.estimators[m]
            for mode, shared in modes:
                _share(est, plen, shared)
                est.forget()  # nothing cached from the warm-up, the other mode or the other order
                before = [src.fed for src, _ in _sources(est)]
                t0 = time.perf_counter()
                trial_est.score(rows, [m])  # one batched pass over the answers, as the score stage runs it
                wall[mode][m] += (time.perf_counter() - t0) / 2
                # positions per scored token, each pass's rows counted once
                fed[mode][m] = [(src.fed - b) / rows_per / max(tokens, 1)
                                for (src, rows_per), b in zip(_sources(est), before, strict=True)]
    return wall, fed


def _counted(trial_est, methods: list[str]):
    """(the paper's FLOPs per token, the passes in words, the FLOPs of each of ``_sources``' passes) per
    method: each of its estimator's ``passes()`` counted as parameters x passes (a shared trunk once, the
    proxy a row of the drafts' pass when it sits on the draft base)."""
    flops, passes, parts = {}, {}, {}
    for m in methods:
        parts[m], words = [], []
        for p in trial_est.estimators[m].passes():
            n = cost.parameters(p.model)
            n_s = cost.trunk_parameters(p.model, p.trunk)
            parts[m].append(cost.flops_per_token(target_params=0, target_passes=0, draft_params=n,
                                                 draft_passes=p.passes, shared_params=n_s))
            note = f"; {p.note}" if p.note else ""
            shared = f", the first {p.trunk} layers ({n_s / 1e6:.1f}M) once" if n_s else ""
            words.append(f"{p.passes} x {p.name} ({n / 1e6:.1f}M{note}){shared}")
        flops[m], passes[m] = sum(parts[m]), " + ".join(words)
    return flops, passes, parts


def stage_cost(cfg: ExperimentConfig, run: Path) -> dict:
    """FLOPs per token and measured wall time per method on the same answers, in this one run, in both
    ``COST_MODES`` (interleaved: method by method, mode by mode, both orders).  ``flops_per_token`` is
    the paper's parameter count x passes; ``fed_flops_per_token`` scales it by the positions each pass
    really ran (prompts, the shared prefix and padding included) per scored token."""
    from drafteu.kvcache import shared_prefix

    rows = eval_rows(run)[: cfg.eval.cost_responses]
    trial_est = TrialEstimators(cfg, run, rows, shared=False)  # every method pays for every token it needs
    specs = [EnsembleSpec.from_label(m) for m in labels(cfg)]
    trial_est.set_trial(0, specs)
    n_target = cost.parameters(trial_est.lm.model)
    tokens = sum(len(r["response_ids"]) for r in rows)
    prompt_tokens = sum(len(r["prompt_ids"]) for r in rows)
    plen = shared_prefix([r["prompt_ids"] for r in rows])
    methods = list(TARGET_ONLY) + labels(cfg)
    wall, fed = _timed(trial_est, rows, methods, plen, tokens)
    flops, passes, parts = _counted(trial_est, methods)
    reference, proposed = named("reference"), named("proposed")
    modes = {}
    for mode, _ in COST_MODES:
        fed_flops = {m: sum(f * x for f, x in zip(parts[m], fed[mode][m], strict=True)) for m in methods}
        modes[mode] = {"methods": {m: {"wall_s": wall[mode][m], "ms_per_token": 1000 * wall[mode][m] / max(tokens, 1),
                                       "fed_flops_per_token": fed_flops[m],
                                       "positions_per_token": [round(x, 4) for x in fed[mode][m]]} for m in methods},
                       "wall_rel_reference": cost.relative(wall[mode], reference),
                       "fed_flops_rel_reference": cost.relative(fed_flops, reference)}
    full = modes[COST_MODES[0][0]]
    rel_wall = full["wall_rel_reference"]
    result = {"answers": len(rows), "tokens": tokens, "prompt_tokens": prompt_tokens, "shared_prefix": plen,
              "device": str(trial_est.device), "threads": torch.get_num_threads(), "reference": reference,
              "methods": {m: {"passes": passes[m], "flops_per_token": flops[m], **full["methods"][m]} for m in methods},
              "flops_rel_reference": cost.relative(flops, reference), "wall_rel_reference": rel_wall,
              "modes": modes, "comparisons": {}}
    if proposed in trial_est.estimators:  # what the report's reading of the cost needs
        ens, ref = trial_est.estimators[proposed], trial_est.estimators[reference]
        result["params"] = {"target": n_target, "draft": cost.parameters(ens.passes()[0].model),
                            "members": ens.size, "target_passes": ref.size}
    kernel = next((trial_est.estimators[m].kernel for m in labels(cfg) if trial_est.estimators[m].kernel), None)
    if kernel:  # a quantized self-draft: what its members' layers ran on, and why
        result["draft_kernel"] = kernel
    if proposed in rel_wall:  # the paper: the drafts cost less than TokUR (a measurement, no interval)
        for mode, _ in COST_MODES:
            r = modes[mode]["wall_rel_reference"][proposed]
            key = f"{proposed} vs {reference} cost" + ("" if mode == COST_MODES[0][0] else f", {mode}")
            result["comparisons"][key] = {
                "claim": f"wall time {proposed} / {reference} per scored token, {mode}, measured side by side "
                         "(paper: < 1)", "ratio": r, "verdict": "agrees" if r < 1 else "disagrees"}
    return result
