"""report.md, a self-contained report.html and figures/*.png from a `reproduce` run directory.

Everything shown is read from the run's eval/*.json files; nothing is recomputed or filtered.
The paper's orderings are checked against our numbers and the report says plainly where they
disagree.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

from drafteu import draft_base_kinds, figures, fileio, rundir
from drafteu.config import ExperimentConfig
from drafteu.errors import DraftEUError
from drafteu.methods import named


def _load(run: Path, name: str) -> dict | None:
    return rundir.stage_result(run, name)


def _pm(d: dict, digits: int = 4) -> str:
    if d is None or d.get("mean") is None or (isinstance(d["mean"], float) and math.isnan(d["mean"])):
        return "n/a"
    return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _ci(d: dict, digits: int = 3) -> str:
    if not d or d.get("value") is None or math.isnan(d["value"]):
        return "n/a"
    return f"{d['value']:.{digits}f} [{d['low']:.{digits}f}, {d['high']:.{digits}f}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures.


def _cost_modes(cst: dict) -> list[str]:
    """The cost in both of the stage's modes: what a deployment pays (the shared prefix cached, a prompt
    run once for its answers) next to the paper's full forwards, from the positions each pass ran."""
    ref, modes = cst["reference"], cst["modes"]
    names = list(modes)
    rows = []
    for m in cst["methods"]:
        row = [m]
        for mode in names:
            r = modes[mode]["methods"][m]
            row += [f"{r['fed_flops_per_token'] / 1e9:.3f}",
                    f"{modes[mode]['fed_flops_rel_reference'].get(m, float('nan')):.2f}x",
                    f"{r['ms_per_token']:.1f}", f"{modes[mode]['wall_rel_reference'].get(m, float('nan')):.2f}x"]
        rows.append(row)
    head = ["method"] + [h for mode in names for h in (f"GFLOPs / token, {mode}", f"vs {ref}", f"ms / token, {mode}",
                                                        f"vs {ref}")]
    return ["", "The same answers in both modes, interleaved: *prefix shared* caches the "
                f"{cst.get('shared_prefix', 0)} "
            "prompt tokens every answer starts with and runs a prompt once for its answers (what a deployment pays; "
            f"{ref} re-draws its noise per prompt, so its cache is per prompt); *full forwards* runs every answer "
            "whole (the paper's accounting). GFLOPs count the positions each pass ran (prompts and padding included).",
            "",
            _table(head, rows)]


# ---------------------------------------------------------------------------------------------
# The paper's orderings, as each stage decided them (every verdict is computed once, in its stage).


def claims(*results: dict | None) -> list[str]:
    """One line per paper claim in the stages' ``comparisons``: the difference, its paired interval
    and the verdict (``evaluate/compare.py``), or a measured ratio."""
    lines = []

    def walk(node):
        if "claim" in node:
            if "ratio" in node:
                lines.append(f"- {node['claim']}: {node['ratio']:.2f} — **{node['verdict']}**")
            else:
                lines.append(f"- {node['claim']}: difference {node['difference']:+.4f}, 95% interval "
                             f"[{node['low']:+.4f}, {node['high']:+.4f}] ({node['resamples']} question resamples) — "
                             f"**{node['verdict']}**")
            return
        for child in node.values():
            if isinstance(child, dict):
                walk(child)

    for r in results:
        walk((r or {}).get("comparisons", {}))
    return lines


# ---------------------------------------------------------------------------------------------
# Heat-maps of generated answers (HTML).


def heatmaps(cfg: ExperimentConfig, run: Path) -> str:
    from drafteu import models
    from drafteu.data import token_pieces
    from drafteu.display import color

    if not (run / rundir.TOKEN_EU).exists():
        return ""
    rows = rundir.fidelity_rows(rundir.eval_rows(run), cfg.eval.heatmap_examples)  # different questions
    scores = rundir.token_eu(run)
    tok = models.load(cfg.target, tokenizer_only=True).tokenizer
    methods = [named("truth"), named("reference")] + rundir.labels(cfg)
    parts = []
    for row in rows:
        pieces = token_pieces(tok, row["response_ids"])
        verdict = "correct" if row["correct"] else "wrong"
        parts.append(f"<h4>{html.escape(row['question'])} <small>({verdict}; gold "
                     f"{html.escape(str(row['gold']))})</small></h4>")
        for m in methods:
            r = scores.get((rundir.key_of(row), m, 0))
            if r is None:
                continue
            top = max(r["eu"], default=0.0) or 1.0
            spans = "".join(
                f'<span title="{e:.4g}" style="background:{color(e / top)}">{html.escape(p)}</span>'
                for p, e in zip(pieces, r["eu"], strict=True))
            parts.append(f'<div class="hm"><b>{html.escape(m)}</b> <small>(max {top:.3g} nats)</small><br>'
                         f'{spans}</div>')
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------


def _perturbation_lines(pert: dict | None) -> list[str]:
    """Each use of the noise, measured: its members' mean MI against ln K, KL to the target and, for
    the drafts built of noise, KL to the draft they perturb."""
    if not pert:
        return []
    sets = pert["sets"]
    lines = [f"Each use of the noise (σ = {pert['sigma']}, {pert['scale']}; the drafts' own σ where given), "
             f"measured on {pert['answers']} answers:", ""]
    lines.append(_table(
        ["members", "σ", "K", "mean MI", "MI / ln K", "KL(member ‖ target)", "KL(mean ‖ target)",
         "KL(member ‖ the draft perturbed)"],
        [[n, f"{r.get('sigma', pert['sigma']):g}", str(r["members"]), f"{r['mean_mi']:.4f}",
          f"{r['share_of_ln_k']:.1%}",
          f"{r['kl_member_to_target']:.4f}", f"{r['kl_mean_to_target']:.4f}",
          f"{r['kl_member_to_centre']:.4f}" if "kl_member_to_centre" in r else "-"] for n, r in sets.items()]))
    warned = [f"**Warning** ({n}): {r['warning']}." for n, r in sets.items()  # the family's: with fidelity's
              if r.get("warning") and n != "ground-truth family"]
    return lines + [""] + [w for line in warned for w in (line, "")]


def _bias_lines(cfg: ExperimentConfig, run: Path, fid: dict) -> list[str]:
    """The bias term next to the variance and the ground truth, the draft base's measured distance to
    the target, and the warning when the bias dominates (docs/method.md §15)."""
    from drafteu.diagnostics import (
        BASE_KL_WARN,
        BIAS_WARN_SHARE,
        draft_fit,
        proxy_fit,
        proxy_fit_warning,
    )

    lines = []
    base = rundir.draft_base_manifest(run)
    if base.get("kl_to_target") is not None:
        what = base.get("quantize") or f"{base.get('layers')} layers"
        lines += [f"Draft base ({base.get('kind', 'truncate')}, {what}): KL to the target {base['kl_to_target']:.4f} "
                  f"nats/token, top-1 agreement {base.get('top1_agreement_after') or float('nan'):.3f} on "
                  f"{base.get('heldout_examples')} held-out answers"
                  + (f"; its matmuls: {base['kernel']}" if base.get("kernel") else "") + ".", ""]
    if fid.get("bias"):
        lines.append(_table(["ensemble", "mean variance (JSD)", "mean bias KL(q_mix ‖ p_mix)", "bias share of EU",
                             "bias / ground truth"],
                            [[m, f"{b['mean_variance']:.4f}", f"{b['mean_bias']:.4f}", f"{b['share']:.0%}",
                              f"{b['bias_vs_truth']:.1f}x" if b["bias_vs_truth"] is not None else "n/a"]
                             for m, b in fid["bias"].items()]))
        lines.append("")
        worst = [m for m, b in fid["bias"].items() if b["share"] > BIAS_WARN_SHARE]
        if worst:
            lines += [f"**Warning**: the bias term is over {BIAS_WARN_SHARE:.0%} of the EU of {', '.join(worst)}: "
                      "these drafts are too far from the target for their EU to be epistemic (docs/method.md §15).", ""]
        fit = proxy_fit(run / "proxy")
        if fit:
            reached = {True: "; OSD stopped on its held-out plateau", False: "; OSD ended before its held-out plateau",
                       None: ""}[fit["plateau"]]
            lines += [f"Proxy fit (held out): KL(family mean ‖ p_mix) {fit['kl_to_family_mean']:.4f} nats/token, "
                      f"against {fit['raw_target_kl']:.4f} for the raw target{reached}.", ""]
            if proxy_fit_warning(fit):
                lines += [f"**Warning**: {proxy_fit_warning(fit)}.", ""]
        for method in fid["bias"]:
            d = draft_fit(rundir.draft_dir(run, cfg, rundir.EnsembleSpec(method), 0))
            if d:
                rest = "" if d["plateau"] == d["count"] else ", the others ran their configured steps"
                lines += [f"Draft training ({method}, held out): SFT loss on {d['questions']} held-out questions, "
                          f"mean of {d['count']} drafts: first {d['first']:.4f}, best {d['best']:.4f}, last "
                          f"{d['last']:.4f} nats/token ({min(d['steps'])}-{max(d['steps'])} steps); {d['plateau']} "
                          f"of {d['count']} stopped on their held-out plateau{rest}.", ""]
        if (base.get("kl_to_target") or 0) > BASE_KL_WARN:
            lines += [f"**Warning**: the draft base's KL to the target ({base['kl_to_target']:.2f} nats/token) is over "
                      f"{BASE_KL_WARN}: every ensemble on it is too far from the target for its EU to be epistemic "
                      "(docs/method.md §15).", ""]
    return lines


def _setup(cfg: ExperimentConfig, run: Path) -> list[str]:
    d, db, dr, p, e = cfg.data, cfg.draft_base, cfg.drafts, cfg.proxy, cfg.eval
    man = rundir.run_manifest(run)
    base = kind.describe(db) if (kind := draft_base_kinds.kind(db.model)) else db.model
    steps = dr.train.max_steps or f"{dr.train.epochs} epoch(s)"
    lines = [
        f"- Target: `{cfg.target}`; draft base: {base}.",
        f"- Draft data: {d.task}, {d.questions or 'all'} train questions x {d.samples} samples (T = {d.temperature}, "
        f"≤ {d.max_new_tokens} tokens).",
        f"- Drafts: {', '.join(dr.methods)}; S x M = {dr.partitions} x {dr.per_partition}"
        + (f", extra DDD layouts {dr.layouts}" if dr.layouts else "")
        + f"; LoRA r {dr.lora_r}" + (f" on the top {dr.lora_layers} layers" if dr.lora_layers else "")
        + f"; {steps} steps of {dr.train.batch_size} x {dr.train.grad_accum} sequences, lr {dr.train.lr}"
        + (f"; scored with eval.draft_kernel {e.draft_kernel} (what ran: the cost section)."
           if e.draft_kernel != "recipe" else "."),
        "- Proxy (OSD): data from "
        f"{f'{p.teachers} fixed noisy teachers' if p.data == 'teachers' else 'the draft data'}; "
        f"{p.n_teacher} fresh teachers per batch; {p.train.max_steps or str(p.train.epochs) + ' epochs'} steps; "
        + ("its LoRA on the draft base (row K of the drafts' pass, no target pass)" if p.base == "draft_base"
           else "its LoRA on the target") + (f", on the top {p.lora_layers} layers." if p.lora_layers else "."),
        f"- Evaluation: {e.split} questions {e.questions or 'all'} x {e.repeats} answers (T = {e.temperature}); ground "
        f"truth = MI of a fixed K = {e.family_size} family (σ = {cfg.noise.sigma}, rank {cfg.noise.rank}); TokUR K = "
        f"{e.tokur_size}; {e.trials} trials "
        f"({'retrained' if e.retrain_per_trial else 'redrawn noise + bootstrap of questions, docs/method.md §5'}).",
    ]
    stages = man.get("stages", {})
    if stages:
        work = {k: v.get("compute_seconds", v["seconds"]) for k, v in stages.items()}
        lines.append(f"- Compute time per stage (the run that computed it): {sum(work.values()):.0f} s in all — "
                     + ", ".join(f"{k} {v:.0f} s" for k, v in work.items()) + "; "
                     f"the last `reproduce` took {sum(v['seconds'] for v in stages.values()):.0f} s "
                     "(finished stages are skipped).")
    if cfg.notes:
        lines.append(f"- Notes: {cfg.notes.strip()}")
    return lines


def write(cfg: ExperimentConfig, run: Path) -> Path:
    """Write report.md, report.html and figures/*.png; returns the markdown path."""
    run = Path(run)
    fid, rob, hal, cst = (_load(run, n) for n in ("fidelity", "proxy_robustness", "hallucination", "cost"))
    figs = figures.write(run, fid, rob, hal, cst)
    md = [f"# drafteu report: {cfg.name}", "", *_setup(cfg, run), ""]
    if fid:
        md += _fidelity_section(cfg, run, fid)
    if rob:
        md += _robustness_section(rob)
    if hal:
        md += _hallucination_section(cfg, hal)
    if cst:
        md += _cost_section(run, cst)
    checks = claims(fid, rob, hal, cst)
    if checks:
        md += ["## The paper's orderings, checked", "",
               "Each difference is bootstrapped over questions with both sides on the same resamples: an interval "
               "wholly on the paper's side of its margin **agrees**, wholly on the other side **disagrees**, "
               "otherwise **cannot tell at this size** (docs/method.md §10).", "", *checks, ""]
    md += ["## Figures", ""] + [f"![{p.stem}](figures/{p.name})" for p in figs] + [""]
    md += ["Token-level EU heat-maps of generated answers are in report.html.", ""]
    text = "\n".join(md)
    fileio.write_text_atomic(run / "report.md", text)
    fileio.write_text_atomic(run / "report.html", _html(cfg, run, text, figs))
    return run / "report.md"


def _fidelity_section(cfg: ExperimentConfig, run: Path, fid: dict) -> list[str]:
    """Tables 1, 3, 5: each method against the ground truth, the perturbation, the bias term's share."""
    md = []
    md += ["## Fidelity against the ground truth (Tables 1, 3, 5)", "",
           f"{fid['questions']} held-out answers (one per question), {fid['trials']} trials "
           f"({fid['trial_kind']}); mean ± std over trials.", ""]
    md.append(_table(["method", "mean EU", "RMSE", "Spearman"], [
        [m, f"{sum(t['mean_estimate'] for t in r['trials']) / len(r['trials']):.4f}", _pm(r["rmse"]),
         _pm(r["spearman"], 3)] for m, r in fid["methods"].items()]))
    truth = fid["methods"][next(iter(fid["methods"]))]["trials"]
    md += ["", f"Ground-truth mean EU: {sum(t['mean_truth'] for t in truth) / len(truth):.4f} nats. "
           "'variance only' is that ensemble's JSD term alone (no bias term).", ""]
    pert = fid.get("perturbation")
    if pert:
        md += [f"Perturbation: σ = {pert['sigma']} ({pert['scale']}), rank {pert['rank']} on "
               f"{', '.join(pert['modules'])}; the family's mean MI is {pert['mean_mi']:.4f} nats/token, "
               f"{pert['share_of_ln_k']:.1%} of its ceiling ln {pert['family_size']} = {pert['ln_k']:.3f}.", ""]
        if pert.get("warning"):
            md += [f"**Warning**: {pert['warning']}.", ""]
    md += _perturbation_lines(_load(run, "perturbation"))
    md += _bias_lines(cfg, run, fid)
    return md


def _robustness_section(rob: dict) -> list[str]:
    """Table 4: the bias term with p_mix against K fresh noisy targets."""
    md = []
    md += ["## Proxy robustness: the bias term (Table 4, Fig. 2)", "",
           f"KL(q_mix ‖ p̂) of the {rob['ensemble']} ensemble on {rob['questions']} answers; reference p̂ = mean of a "
           f"fixed K = {rob['reference_size']} target family; K = k rows use k fresh perturbed copies of the raw "
           "target per trial; mean ± std over trials.", ""]
    md.append(_table(["p̂", "RMSE vs reference", "Spearman vs reference"],
                     [[n, _pm(r["rmse"]), _pm(r["spearman"], 3)] for n, r in rob["estimates"].items()]))
    md.append("")
    return md


def _hallucination_section(cfg: ExperimentConfig, hal: dict) -> list[str]:
    """Table 2: hallucination detection per method and aggregation."""
    md = []
    how = cfg.eval.aggregations[0]
    md += ["## Hallucination detection (Table 2)", "",
           f"{hal['answers']} answers to {hal['questions']} questions, {hal['wrong_rate']:.1%} wrong; logistic map "
           f"fitted on {cfg.eval.fit_fraction:.0%} of the questions; test-split metrics with 95% intervals from "
           f"{cfg.eval.bootstrap} resamples of test questions (all answers of a drawn question together); "
           f"sequence score = {how} token EU.", ""]
    lab = hal.get("labels", {})
    if "agree" in lab:
        md += [f"Labels: drafteu's answer checker and math-verify agree on {lab['agree']} of {lab['answers']} answers "
               f"({lab['drafteu_only_correct']} correct only for drafteu, {lab['math_verify_only_correct']} only for "
               "math-verify; each listed in eval/hallucination.json)"
               + (f"; {lab['relabelled']} labels changed since generation by answer-checker fixes"
                  if lab.get("relabelled") else "") + ".", ""]
    rows = []
    for m, r in hal["methods"].items():
        x = r[how]
        if "error" in x:
            rows.append([m, x["error"], "", "", ""])
        else:
            rows.append([m, _ci(x["auroc"]), _ci(x["ece"]), _ci(x["brier"]), _ci(x["prr"])])
    md.append(_table(["method", "AUROC", "ECE", "Brier", "PRR"], rows))
    if len(cfg.eval.aggregations) > 1:
        md += ["", "AUROC by aggregation:", ""]
        md.append(_table(["method", *cfg.eval.aggregations], [
            [m, *(_ci(r[a].get("auroc")) for a in cfg.eval.aggregations)] for m, r in hal["methods"].items()]))
    md += _selective_section(hal.get("selective"))
    md += _calibration_section(hal.get("calibration"))
    md.append("")
    return md


def _calibration_section(cal: dict | None) -> list[str]:
    """The map from the proposed method's EU to P(wrong): Platt against isotonic, the choice and its check."""
    if not cal or "error" in cal:
        return []
    chosen = cal["chosen"]
    md = ["", "### Calibration: P(wrong) you can check", "",
          f"P(wrong) from {cal['method']}'s {cal['aggregation']} token EU: a Platt (logistic) and an isotonic map, "
          f"each scored by {cal['folds']}-fold log-loss over the {cal['n_fit']} fit answers (folds of questions); the "
          f"lower, **{chosen}**, is the map `drafteu score` and `drafteu serve` report P(wrong) with (`p_wrong`, its "
          f"provenance in `p_wrong_map`). Both maps on the {cal['n_test']} test answers:", ""]
    md.append(_table(["map", "cross-validated log-loss (fit)", "ECE (test)", "Brier (test)", "log-loss (test)"], [
        [k + (" (chosen)" if k == chosen else ""), f"{cal['cv_log_loss'][k]:.4f}", f"{t['ece']:.4f}",
         f"{t['brier']:.4f}",
         f"{t['log_loss']:.4f}"] for k, t in cal["test"].items()]))
    return md


def _selective_section(sel: dict | None) -> list[str]:
    """Selective answering: the accuracy of the answers a signal is least uncertain about."""
    if not sel or not sel.get("methods"):
        return []
    grid = next(iter(sel["methods"].values()))["coverage"]
    cov = list(next(iter(sel["methods"].values()))["at"])
    oracle = {c: sel["oracle"][min(range(len(grid)), key=lambda i: abs(grid[i] - float(c)))] for c in cov}
    md = ["", "### Selective answering (risk-coverage)", "",
          f"Answer only the share of answers a signal ({sel['aggregation']} token score) is least uncertain about: the "
          "accuracy of those kept, with 95% intervals over question resamples (every answer counts; no map is fitted). "
          f"Random selection keeps the overall accuracy, {sel['random']:.1%}; an oracle that drops the wrong answers "
          f"first reaches {', '.join(f'{oracle[c]:.1%} at {float(c):.0%}' for c in cov)}.", ""]
    md.append(_table(["signal", *(f"accuracy at {float(c):.0%} answered" for c in cov)],
                     [[m, *(_ci(r["at"][c]) for c in cov)] for m, r in sel["methods"].items()]))
    return md


def _cost_section(run: Path, cst: dict) -> list[str]:
    """Table 6: FLOPs and wall time per method, in both modes, and the kernel the drafts ran on."""
    md = []
    md += ["## Cost (Table 6)", "",
           f"Scoring the same {cst['answers']} answers ({cst['tokens']} response tokens after "
           f"{cst.get('prompt_tokens', 0)} prompt tokens, full forwards without prefix caching) with each method, "
           f"interleaved answer by answer in one process on `{cst['device']}` ({cst['threads']} threads). FLOPs count "
           "every model pass per token; the proxy pass is part of every draft method.", ""]
    ref = cst["reference"]
    md.append(_table(["method", "passes per token", "GFLOPs / token", f"FLOPs vs {ref}", "wall (s)", f"wall vs {ref}"],
                     [
        [m, r["passes"], f"{r['flops_per_token'] / 1e9:.3f}", f"{cst['flops_rel_reference'].get(m, float('nan')):.2f}x",
         f"{r['wall_s']:.2f}",
         f"{cst['wall_rel_reference'].get(m, float('nan')):.2f}x"] for m, r in cst["methods"].items()]))
    if "modes" in cst:
        md += _cost_modes(cst)
    md += _cost_reading(cst)
    base = rundir.draft_base_manifest(run)
    if base.get("kernel"):
        ran = cst.get("draft_kernel") or f"the quantized base as it is: {base['kernel']}"
        md += ["", f"The drafts ran on {ran}; its weights take "
               f"{base['weight_bytes'] / 2**20:.0f} MiB against the target's "
               f"{base['target_weight_bytes'] / 2**20:.0f} MiB."]
    md.append("")
    return md


def _cost_reading(cst: dict) -> list[str]:
    """Why the drafts cost what they do, where they are no cheaper than the reference: the draft's size."""
    ref, prop, params = cst["reference"], named("proposed"), cst.get("params")
    rel = cst["flops_rel_reference"].get(prop)
    if params is None or rel is None or rel < 0.9:
        return []
    return ["", f"{prop} costs {rel:.2f}x {ref}'s FLOPs here because each of its {params['members']} draft passes runs "
                "a "
            f"model of {params['draft'] / params['target']:.0%} of the target's parameters, plus the proxy's pass, "
            f"against {params['target_passes']} target passes: the method saves compute only with drafts much smaller "
            "than the target, as in docs/results/qwen-gsm8k.md's cost table (0.5B drafts for a 1.5B target)."]


GENERATED = "<!-- written by `drafteu report --publish`: everything below this line is replaced on the next publish -->"
EVAL_JSONS = ("fidelity", "perturbation", "proxy_robustness", "hallucination", "cost")


def check_publish(out: Path, name: str) -> None:
    """--publish takes a folder it can write and --name a plain file name: a one-line error otherwise."""
    out = Path(out)
    if not name or name in (".", "..") or name != Path(name).name or "/" in name or "\\" in name:
        raise DraftEUError(f"--name {name!r}: give a plain file name (no folders, not '.' or '..'), e.g. "
                           "embedded-study; the report goes to PUBLISH/NAME.md")
    if out.exists() and not out.is_dir():
        raise DraftEUError(f"--publish {out} is a file; give a folder, e.g. docs/results")
    why = fileio.unwritable(out)
    if why:
        raise DraftEUError(f"--publish {out} cannot be written ({why}); give a writable folder")


def publish(run: Path, out: Path, name: str) -> dict[str, Path]:
    """Copy a run's results where they are committed: ``out/<name>.md`` (the report, figures linked
    as ``<name>/<figure>.png``), the figures and report.html in ``out/<name>/``, and ``out/<name>.json``
    (config, stage times and every eval/*.json: each number the report shows).  Text above ``GENERATED`` in an existing
    ``<name>.md`` (a reading of the results) is kept."""
    import shutil

    from drafteu.config import load_experiment

    run, out = Path(run), Path(out)
    check_publish(out, name)
    if not (run / "report.md").exists():
        raise DraftEUError(f"{run} has no report.md; run `drafteu reproduce` (or `drafteu report --run {run}`) first")
    cfg = load_experiment(run / "config.yaml")
    md_path, fig_dir = out / f"{name}.md", out / name
    fig_dir.mkdir(parents=True, exist_ok=True)
    for fig in sorted((run / "figures").glob("*.png")):
        shutil.copyfile(fig, fig_dir / fig.name)
    if (run / "report.html").exists():  # the token-level heat-maps
        shutil.copyfile(run / "report.html", fig_dir / "report.html")
    keep = ""
    if md_path.exists():
        old = md_path.read_text(encoding="utf-8")
        # text above the marker is kept; a file without one is all hand-written: kept whole, above it
        keep = old.split(GENERATED)[0] if GENERATED in old else old.rstrip() + "\n\n"
    body = (run / "report.md").read_text(encoding="utf-8").replace("](figures/", f"]({name}/")
    body = body.replace("are in report.html", f"are in [{name}/report.html]({name}/report.html)")
    fileio.write_text_atomic(md_path, f"{keep}{GENERATED}\n\n{body}")
    manifest = rundir.run_manifest(run)
    numbers = {"config": fileio.plain(cfg), "manifest": manifest,
               **{k: _load(run, k) for k in EVAL_JSONS if _load(run, k) is not None}}
    fileio.write_json(out / f"{name}.json", numbers)
    return {"markdown": md_path, "json": out / f"{name}.json", "figures": fig_dir}


def _html(cfg: ExperimentConfig, run: Path, md: str, figs: list[Path]) -> str:
    """A self-contained page: the markdown rendered (markdown-it-py, CommonMark with tables), figures
    inlined as base64 instead of linked, heat-maps."""
    from markdown_it import MarkdownIt

    text = "\n".join(line for line in md.splitlines() if not line.startswith("!["))  # the figures come inlined
    body = [MarkdownIt("commonmark", {"html": False}).enable("table").render(text)]
    for p in figs:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"></figure>')
    hm = heatmaps(cfg, run)
    if hm:
        body += ["<h2>Token-level EU of generated answers (trial 0)</h2>",
                 "<p>Background: white (0) to red (the largest EU of that method on that answer); "
                 "hover for nats.</p>", hm]
    style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;line-height:1.45}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             ".hm{font-family:monospace;white-space:pre-wrap;margin:.4em 0 .8em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>drafteu report: {html.escape(cfg.name)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
