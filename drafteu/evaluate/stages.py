"""The evaluation stages of `drafteu reproduce`, reading the answers and token EU that
``pipeline.stage_score`` stored: fidelity (Tables 1, 3, 5), proxy robustness (Table 4),
hallucination detection (Table 2) and cost (Table 6).  Each returns the JSON written to
``eval/<stage>.json``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from drafteu import divergence, estimators, runio
from drafteu.config import ExperimentConfig
from drafteu.evaluate import cost, fidelity, hallucination
from drafteu.pipeline import Scorer, _round, ensembles, eval_rows, fidelity_rows, key_of, token_eu
from drafteu.posterior import family_seeds, member_seed
from drafteu.progress import progress


def _trial_questions(cfg: ExperimentConfig, qids: list[str], trial: int) -> list[str]:
    if cfg.eval.retrain_per_trial:
        return qids
    return fidelity.bootstrap_questions(qids, seed=cfg.seed * 1000 + trial)


def stage_fidelity(cfg: ExperimentConfig, run: Path) -> dict:
    scores = token_eu(run)
    fid = fidelity_rows(eval_rows(run), cfg.eval.fidelity_questions)
    qkeys = [key_of(r) for r in fid]
    methods = ["tokur"] + ensembles(cfg)
    out = {"questions": len(qkeys), "trials": cfg.eval.trials,
           "trial_kind": "retrained" if cfg.eval.retrain_per_trial else "redrawn noise + bootstrap of questions",
           "methods": {}}
    for m in methods + ["variance only"]:
        per_trial = []
        for t in range(cfg.eval.trials):
            truth = {k: np.array(scores[(k, "groundtruth", t)]["eu"]) for k in qkeys}
            if m == "variance only":  # DDD's JSD alone (no bias term), as a diagnostic
                src = "ddd" if "ddd" in cfg.drafts.methods else None
                if src is None:
                    break
                tt = t if (qkeys[0], src, t) in scores else 0
                est = {k: np.array(scores[(k, src, tt)]["variance"]) for k in qkeys}
            else:
                tt = t if (qkeys[0], m, t) in scores else 0
                est = {k: np.array(scores[(k, m, tt)]["eu"]) for k in qkeys}
            per_trial.append(fidelity.trial_metrics(est, truth, _trial_questions(cfg, qkeys, t)))
        if per_trial:
            out["methods"][m] = {"trials": per_trial, **fidelity.summarize(per_trial)}
    return out


def stage_proxy_robustness(cfg: ExperimentConfig, run: Path) -> dict:
    """Table 4: the bias term KL(q_mix || p_hat) with p_hat from K fresh noisy targets vs p_mix, against
    a large fixed reference family (METHOD.md §9).  q_mix = the DDD (else first) ensemble."""
    e = cfg.eval
    rows = fidelity_rows(eval_rows(run), e.proxy_questions)
    label = "ddd" if "ddd" in cfg.drafts.methods else ensembles(cfg)[0]
    path = run / "eval" / "proxy_bias.jsonl"
    done = {(r["key"], r["estimate"], r["trial"]) for r in runio.read_jsonl(path, repair=True)}
    estimates = ["reference", "p_mix", "raw target"] + [f"K={k}" for k in e.proxy_ks]
    need = [(r, t) for t in range(e.trials) for r in rows
            if any((key_of(r), est, t) not in done for est in estimates[3:])]
    need += [(r, -1) for r in rows if any((key_of(r), est, -1) not in done for est in estimates[:3])]
    if need:
        scorer = Scorer(cfg, run, rows)
        scorer.set_trial(0, [label])
        ens, noisy = scorer.drafts[label], scorer.noisy
        ref = noisy.set_members("ref", family_seeds(cfg.seed, e.reference_size, tag="reference"))
        v = ens.vocab

        def q_mix(row):
            ids, keep = estimators.response_inputs(row["prompt_ids"], row["response_ids"], scorer.device)
            q = scorer.forward(label, ens.runner, ens.names, ids, keep)[:, :-1, :v]
            return ids, keep, divergence.mixture(q)

        with progress("proxy robustness", total=len(need)) as bar:
            for row in [r for r, t in need if t == -1]:
                ids, keep, qm = q_mix(row)
                p_ref = divergence.mixture(scorer.members_logits("ref", ref, ids, keep)[:, :-1, :v])
                p_mix = scorer.proxy_logits(ids, keep)[:-1, :v]
                raw = scorer.target_logits(ids, keep)[:-1, :v]
                runio.append_jsonl(path, [{"key": key_of(row), "trial": -1, "estimate": name,
                                           "bias": _round(divergence.kl(qm, p))}
                                          for name, p in (("reference", p_ref), ("p_mix", p_mix), ("raw target", raw))])
                bar.update(advance=1)
            for t in range(e.trials):
                todo = [r for r, tt in need if tt == t]
                if not todo:
                    continue
                fresh = {k: noisy.set_members(f"fresh{k}_", [member_seed("robust", cfg.seed, t, k, j) for j in range(k)])
                         for k in e.proxy_ks}
                for k in e.proxy_ks:
                    scorer._prefix.pop(f"fresh{k}", None)  # redrawn members: their prefix cache is stale
                for row in todo:
                    ids, keep, qm = q_mix(row)
                    out = []
                    for k, names in fresh.items():
                        p_k = divergence.mixture(scorer.members_logits(f"fresh{k}", names, ids, keep)[:, :-1, :v])
                        out.append({"key": key_of(row), "trial": t, "estimate": f"K={k}",
                                    "bias": _round(divergence.kl(qm, p_k))})
                    runio.append_jsonl(path, out)
                    bar.update(advance=1, info=f"trial {t}")
    stored = {(r["key"], r["estimate"], r["trial"]): np.array(r["bias"]) for r in runio.read_jsonl(path)}
    keys = [key_of(r) for r in rows]
    truth = {k: stored[(k, "reference", -1)] for k in keys}
    result = {"ensemble": label, "reference_size": e.reference_size, "questions": len(keys), "estimates": {}}
    for est in estimates[1:]:
        per_trial = []
        for t in range(e.trials):
            tt = -1 if est in ("p_mix", "raw target") else t
            vals = {k: stored[(k, est, tt)] for k in keys}
            per_trial.append(fidelity.trial_metrics(vals, truth, fidelity.bootstrap_questions(keys, cfg.seed * 1000 + t)))
        result["estimates"][est] = {"trials": per_trial, **fidelity.summarize(per_trial)}
    return result


def stage_hallucination(cfg: ExperimentConfig, run: Path) -> dict:
    rows = eval_rows(run)
    scores = token_eu(run)
    label = np.array([0 if r["correct"] else 1 for r in rows])
    qids = [r["qid"] for r in rows]
    methods = ["tokur", "entropy"] + ensembles(cfg) + ["groundtruth"]
    out = {"answers": len(rows), "questions": len(set(qids)), "wrong_rate": float(label.mean()), "methods": {}}
    for m in methods:
        out["methods"][m] = {}
        for how in cfg.eval.aggregations:
            seq = np.array([estimators.aggregate(torch.tensor(scores[(key_of(r), m, 0)]["eu"]), how) for r in rows])
            out["methods"][m][how] = hallucination.evaluate(
                seq, label, qids, fit_fraction=cfg.eval.fit_fraction, seed=cfg.seed, bins=cfg.eval.ece_bins,
                bootstrap=cfg.eval.bootstrap)
    return out


def stage_cost(cfg: ExperimentConfig, run: Path) -> dict:
    """FLOPs per token and measured wall time per method on the same answers, in this one run."""
    rows = eval_rows(run)[: cfg.eval.cost_responses]
    scorer = Scorer(cfg, run, rows, prefix=False)  # full forwards: every method pays for every token
    labels = ensembles(cfg)
    scorer.set_trial(0, labels)
    n_target = cost.parameters(scorer.lm.model)
    tokens = sum(len(r["response_ids"]) for r in rows)
    prompt_tokens = sum(len(r["prompt_ids"]) for r in rows)
    methods = ["tokur", "groundtruth", "entropy"] + labels
    scorer.score(rows[0], methods, 0)  # warm-up: first-call allocations are not the method's cost
    wall = dict.fromkeys(methods, 0.0)
    for i, r in enumerate(rows):  # methods interleaved answer by answer: machine noise hits all alike
        for m in methods:
            t0 = time.perf_counter()
            scorer.score(r, [m], i + 1)  # TokUR: fresh members per answer
            wall[m] += time.perf_counter() - t0
    flops, passes = {}, {}
    for m in methods:
        ens = scorer.drafts.get(m)
        k_d = len(ens.names) if ens else 0
        n_d = cost.parameters(ens.drafts.get_base_model()) if ens else 0
        flops[m] = cost.flops_per_token(m, target_params=n_target, draft_params=n_d,
                                        k_target=cfg.eval.tokur_size if m == "tokur" else cfg.eval.family_size,
                                        k_drafts=k_d)
        passes[m] = (f"{k_d} x draft ({n_d / 1e6:.1f}M) + 1 x proxy ({n_target / 1e6:.1f}M)" if ens else
                     f"{1 if m == 'entropy' else (cfg.eval.tokur_size if m == 'tokur' else cfg.eval.family_size)}"
                     f" x target ({n_target / 1e6:.1f}M)")
    return {"answers": len(rows), "tokens": tokens, "prompt_tokens": prompt_tokens, "device": str(scorer.device), "threads": torch.get_num_threads(),
            "methods": {m: {"passes": passes[m], "flops_per_token": flops[m], "wall_s": wall[m],
                            "ms_per_token": 1000 * wall[m] / max(tokens, 1)} for m in methods},
            "flops_rel_tokur": cost.relative(flops), "wall_rel_tokur": cost.relative(wall)}
