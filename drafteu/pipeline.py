"""`drafteu reproduce`: every stage of an experiment, in order, into one run directory.

The stages: data -> draft_base -> drafts (+ layouts, + per-trial redraws) -> teachers -> proxy ->
eval_samples -> score -> proxy_robustness -> fidelity -> hallucination -> cost -> report.  The
directory layout and its readers are ``drafteu.rundir``; this module only orders the stages and
imports downward (train/, evaluate/, report).

Every stage is skipped when its outputs are complete (training stages by their manifests,
evaluation stages by a hash of the config sections they read), and the long ones resume after a
kill: generation and scoring append one response at a time, training checkpoints.  Trials follow
docs/method.md §5: with ``retrain_per_trial`` every ensemble is retrained per trial seed; otherwise a
trial redraws the cheap random elements (ground-truth family, TokUR, untrained and K-only noise)
and bootstrap-resamples the evaluated questions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from drafteu import generate, hardware, rundir, runio
from drafteu.config import ExperimentConfig, GenerationSection, section_values
from drafteu.errors import DraftEUError
from drafteu.methods import DRAFT_METHODS

TEACHER_SEED_OFFSET = 7919  # the proxy's data teachers are not the ground-truth family


# ---------------------------------------------------------------------------------------------
# Training-side stages.


def _generate_cfg(cfg: ExperimentConfig, out: Path, **kw) -> generate.GenerateConfig:
    base = section_values(cfg.data, generate.SamplingSettings) | section_values(cfg.generation, GenerationSection) | dict(
        out=out, target=cfg.target, split="train", noise=cfg.noise, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    return generate.GenerateConfig(**(base | kw))


def stage_data(cfg: ExperimentConfig, run: Path) -> dict:
    return generate.run(_generate_cfg(cfg, rundir.samples_path(run).parent))


def stage_draft_base(cfg: ExperimentConfig, run: Path) -> dict | None:
    """The truncated, warmed-up draft base in ``run/draft_base``.

    With ``draft_base.cache`` the base is trained once per machine: under
    ``$DRAFTEU_CACHE/draft_base/<key>`` (key: the target's identity + the recipe: layers, held-out
    fraction, training settings, seed and the warm-up data — its generation settings, or the digest
    of the run's samples) and copied into each run (the copy keeps runs relocatable).  With
    ``draft_base.data`` the target first answers that task's train questions, cached under
    ``draft_base/data-<key of the data recipe>`` so that recipes differing only in depth or training
    share one data set."""
    if cfg.draft_base.model != "truncate":
        return None
    import hashlib
    import shutil

    from drafteu import models
    from drafteu.train import draft_base
    from drafteu.train.loop import wait_for_everyone

    sec, out = cfg.draft_base, run / "draft_base"
    if (out / "manifest.json").exists() and (out / "config.json").exists():
        return runio.json_load(out / "manifest.json")  # complete: skip
    settings = section_values(sec, draft_base.DraftBaseSettings)
    if sec.data is None:
        samples = rundir.samples_path(run)
        data_recipe = {"samples_sha256": hashlib.sha256(samples.read_bytes()).hexdigest()[:16]}
    else:
        data_recipe = section_values(sec.data, generate.SamplingSettings)
    data_key = {"target": models.identity(cfg.target), "seed": cfg.seed, "data": data_recipe}
    cache = models.cache_dir() / "draft_base"
    home = cache / f"L{sec.layers}-{runio.digest(data_key | settings)}" if sec.cache else run / "draft_base_data"
    reused = sec.cache and (home / "model" / "manifest.json").exists()
    if sec.data is not None:  # keyed by the data recipe alone: bases of other depths share it
        data_dir = cache / f"data-{runio.digest(data_key)}" if sec.cache else home / "data"
        if runio.is_main_process() and not reused:  # generation: the main process; training: every process
            generate.run(_generate_cfg(cfg, data_dir, **data_recipe))
        wait_for_everyone()
        samples = data_dir / "samples.jsonl"
    if not sec.cache:
        return draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=out, target=cfg.target, seed=cfg.seed,
                                                         device=cfg.device, **settings))
    manifest = draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=home / "model", target=cfg.target,
                                                         seed=cfg.seed, device=cfg.device, **settings))
    manifest = manifest | {"cache": {"path": str(home), "reused": reused, "data": data_recipe}}
    if runio.is_main_process():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(home / "model", tmp, ignore=shutil.ignore_patterns("trainer"))
        runio.write_json(tmp / "manifest.json", manifest)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt (complete ones returned above)
        tmp.rename(out)  # atomic: a killed copy leaves no half-written draft base
    wait_for_everyone()
    return manifest


def _drafts_cfg(cfg: ExperimentConfig, run: Path, spec: rundir.EnsembleSpec, trial: int):
    from drafteu.train import drafts

    d = cfg.drafts
    s, m = spec.layout or (d.partitions, d.per_partition)
    out = rundir.draft_dir(run, cfg, spec, trial).parent
    method = spec.method
    seed = cfg.seed + trial
    ddd = rundir.EnsembleSpec("ddd")
    konly_from = rundir.draft_dir(run, cfg, ddd, trial) / "s0_m0" if method == "konly" else None
    if konly_from is not None and not (konly_from / "adapter_model.safetensors").exists():
        konly_from = rundir.draft_dir(run, cfg, ddd, 0) / "s0_m0" if trial > 0 else None
    settings = section_values(d, drafts.DraftSettings) | {"partitions": s, "per_partition": m}
    if d.baseline_steps is not None and DRAFT_METHODS[method].trainer == "trl":
        settings["train"] = dataclasses.replace(d.train, max_steps=d.baseline_steps)
    return drafts.DraftsConfig(
        **settings,
        samples=rundir.samples_path(run), out=out, base=rundir.base_model(cfg, run), target=cfg.target,
        method=method, init_noise=dataclasses.replace(cfg.noise, sigma=d.init_sigma),
        noise=dataclasses.replace(cfg.noise, sigma=d.sigma), seed=seed, konly_from=konly_from, device=cfg.device)


def stage_drafts(cfg: ExperimentConfig, run: Path) -> dict:
    from drafteu.train import drafts

    done = {}
    for trial in range(cfg.eval.trials):
        # konly re-uses ddd's s0_m0 when present, so it comes last
        for spec in sorted(rundir.trial_ensembles(cfg, trial), key=lambda e: e.method == "konly"):
            dcfg = _drafts_cfg(cfg, run, spec, trial)
            path = dcfg.out / dcfg.method / "manifest.json"
            if rundir.fresh(path, runio.config_hash(dcfg)):
                continue
            done[f"{spec.label} t{trial}"] = drafts.run(dcfg)["seconds"]
    return {"trained": done}


def stage_teachers(cfg: ExperimentConfig, run: Path) -> dict | None:
    if cfg.proxy.data != "teachers":
        return None
    p = cfg.proxy
    return {f"t{k}": generate.run(_generate_cfg(
        cfg, rundir.teacher_dir(run, k), questions=p.questions, samples=p.samples, member=k,
        family_seed=cfg.seed + TEACHER_SEED_OFFSET)) for k in range(p.teachers)}


def stage_proxy(cfg: ExperimentConfig, run: Path) -> dict:
    from drafteu.train import proxy

    if cfg.proxy.data == "teachers":
        samples = [rundir.teacher_dir(run, k) / "samples.jsonl" for k in range(cfg.proxy.teachers)]
    else:
        samples = [rundir.samples_path(run)]
    return proxy.run(proxy.ProxyConfig(
        samples=samples, out=rundir.proxy_adapter(run).parent, target=cfg.target, noise=cfg.noise, seed=cfg.seed,
        device=cfg.device, **section_values(cfg.proxy, proxy.ProxySettings)))


def stage_eval_samples(cfg: ExperimentConfig, run: Path) -> dict:
    e = cfg.eval
    return generate.run(_generate_cfg(
        cfg, run / rundir.EVAL_SAMPLES, task=e.task or cfg.data.task, split=e.split, questions=e.questions, samples=e.repeats,
        temperature=e.temperature, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size))


# ---------------------------------------------------------------------------------------------
# The pipeline.

TRAINING_STAGES = ("draft_base", "drafts", "proxy")


def _eval_stage(name: str, fn, keys, cfg: ExperimentConfig, run: Path):
    """Run an evaluation stage unless eval/<name>.json was made from the same config sections."""
    path = rundir.eval_json(run, name)
    meta = run / rundir.TOKEN_EU_META
    key = rundir.stage_hash(*keys, runio.json_load(meta) if meta.exists() else None)
    if rundir.fresh(path, key):
        return None
    result = fn(cfg, run)
    runio.write_json(path, {"config_hash": key, **result})
    return result


def _groups(heldout: float) -> int:
    """Question groups a held-out split makes (``draft_base.split_heldout``)."""
    return max(2, round(1 / heldout)) if heldout > 0 else 1


def preflight(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Every check that can be made before any work: the run directory, the device, and whether the
    configured questions are enough for every partition the stages will make."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DraftEUError(f"--run {run_dir} is a file; give a directory (new or an earlier run of this config)")
    hardware.resolve_device(cfg.device)
    n = cfg.data.questions if cfg.data.questions is not None else (200 if cfg.data.task == "easy-word" else None)
    if n is None:
        return  # a dataset's size is known only once it is read
    needs = []
    if cfg.draft_base.model == "truncate" and cfg.draft_base.heldout > 0:
        needs.append((_groups(cfg.draft_base.heldout), f"draft_base.heldout {cfg.draft_base.heldout:g} splits them "
                      f"into {_groups(cfg.draft_base.heldout)} groups", "lower draft_base.heldout"))
    parts = [cfg.drafts.partitions] if any(DRAFT_METHODS[m].partitions for m in cfg.drafts.methods) else []
    parts += [s for s, _ in cfg.drafts.layouts]
    if parts:
        needs.append((max(parts), f"the drafts need {max(parts)} disjoint partitions", "lower drafts.partitions"))
    if cfg.proxy.heldout > 0:
        pq = n if cfg.proxy.data == "samples" or cfg.proxy.questions is None else min(n, cfg.proxy.questions)
        if pq < _groups(cfg.proxy.heldout):
            raise DraftEUError(f"the proxy trains on {pq} questions, but proxy.heldout {cfg.proxy.heldout:g} splits "
                               f"them into {_groups(cfg.proxy.heldout)} groups; raise the questions or lower "
                               "proxy.heldout (0: no held-out check)")
    for need, why, fix in needs:
        if n < need:
            raise DraftEUError(f"data.questions is {n}, but {why}: raise data.questions to >= {need} or {fix}")


def run(cfg: ExperimentConfig, run_dir: Path, *, log=print) -> dict:
    """Every stage in order; returns the run manifest (stage -> seconds, skipped or not)."""
    from drafteu import report
    from drafteu.evaluate import scoring, stages

    run_dir = Path(run_dir)
    preflight(cfg, run_dir)  # config errors before any work
    device = hardware.resolve_device(cfg.device)
    precision = {sec: hardware.resolve_mixed_precision(getattr(cfg, sec).train.mixed_precision, device)[0]
                 for sec in ("draft_base", "drafts", "proxy")}
    hw = hardware.describe(device) | {"dtype": hardware.resolve_dtype(cfg.dtype, device), "mixed_precision": precision}
    log(f"device {hw['device']} ({hw['hardware']}), model dtype {hw['dtype']}, "
        f"training mixed precision {', '.join(f'{k} {v}' for k, v in precision.items())}")
    run_dir.mkdir(parents=True, exist_ok=True)
    runio.write_config(run_dir, cfg)
    manifest_path = run_dir / "manifest.json"
    manifest = runio.json_load(manifest_path) if manifest_path.exists() else {}
    manifest.update({"stage": "reproduce", "name": cfg.name, "versions": runio.versions(),
                     "config_hash": runio.config_hash(cfg), "hardware": hw})
    manifest.setdefault("stages", {})
    e = cfg.eval
    steps = [
        ("data", lambda: stage_data(cfg, run_dir)),
        ("draft_base", lambda: stage_draft_base(cfg, run_dir)),
        ("drafts", lambda: stage_drafts(cfg, run_dir)),
        ("teachers", lambda: stage_teachers(cfg, run_dir)),
        ("proxy", lambda: stage_proxy(cfg, run_dir)),
        ("eval_samples", lambda: stage_eval_samples(cfg, run_dir)),
        ("score", lambda: scoring.stage_score(cfg, run_dir)),
        ("proxy_robustness", lambda: _eval_stage("proxy_robustness", stages.stage_proxy_robustness,
                                                 (e.reference_size, e.proxy_ks, e.proxy_questions, e.trials), cfg, run_dir)),
        ("fidelity", lambda: _eval_stage("fidelity", stages.stage_fidelity, (e.trials, e.fidelity_questions), cfg, run_dir)),
        ("hallucination", lambda: _eval_stage("hallucination", stages.stage_hallucination,
                                              (e.aggregations, e.fit_fraction, e.bootstrap, e.ece_bins), cfg, run_dir)),
        ("cost", lambda: _eval_stage("cost", stages.stage_cost, (e.cost_responses, cfg.device), cfg, run_dir)),
    ]
    total = time.time()
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    for name, fn in steps:
        t0 = time.time()
        log(f"[{name}] ...")
        if world == 1 or name in TRAINING_STAGES:
            fn()  # under `accelerate launch` every process trains (accelerate shards the batches)
        else:
            if rank == 0:
                fn()  # generation and evaluation: the main process only, the others wait
            from accelerate import PartialState

            PartialState().wait_for_everyone()
        seconds = round(time.time() - t0, 2)
        prev = manifest["stages"].get(name, {})
        # A stage found complete takes ~0 s: keep the time of the run that computed it as well.
        manifest["stages"][name] = {"seconds": seconds, "compute_seconds": max(seconds, prev.get("compute_seconds", 0))}
        log(f"[{name}] {seconds:.1f} s")
        runio.write_json(manifest_path, manifest)
    manifest["last_run_seconds"] = round(time.time() - total, 1)
    manifest.setdefault("runs", []).append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            "seconds": manifest["last_run_seconds"]})
    runio.write_json(manifest_path, manifest)
    if rank == 0:
        log("[report] ...")
        report.write(cfg, run_dir)  # last, so it shows this run's stage timings
        log(f"[report] {run_dir / 'report.md'}")
    return manifest
