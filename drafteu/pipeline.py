"""`drafteu reproduce`: every stage of an experiment, in order, into one run directory.

The stages (``STAGES``): data -> draft_base -> drafts (+ layouts, + per-trial redraws) -> teachers
-> proxy -> eval_samples -> score -> perturbation -> proxy_robustness -> fidelity -> hallucination -> cost, then the
report.  Each declares the config slice it reads and the stages it consumes; ``drafteu.contract``
keeps a stamp per stage and decides, in one place, whether the stage is current (skipped),
interrupted (resumed: generation and scoring append one batch at a time, training checkpoints) or
made from other inputs (recomputed with everything downstream, after saying which keys changed).
The directory layout and its readers are ``drafteu.rundir``; this module only declares and
orders the stages and imports downward (train/, evaluate/, report).

Trials follow docs/method.md §5: with ``retrain_per_trial`` every ensemble is retrained per trial
seed; otherwise a trial redraws the cheap random elements (ground-truth family, TokUR, untrained
and K-only noise) and bootstrap-resamples the evaluated questions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

from drafteu import contract, draft_base_kinds, fileio, generate, hardware, preflight, rundir
from drafteu.config import ExperimentConfig, GenerationSection, section_values
from drafteu.contract import Context, Stage
from drafteu.errors import DraftEUError
from drafteu.methods import DRAFT_METHODS

TEACHER_SEED_OFFSET = 7919  # the proxy's data teachers are not the ground-truth family


# ---------------------------------------------------------------------------------------------
# What each stage reads: dotted config keys -> their identity (fileio.identity: no locations).


def pick(cfg: ExperimentConfig, *keys: str) -> dict:
    """The identity of config keys ``keys`` (``"data.task"``, or a whole section ``"drafts"``)."""
    out = {}
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        out[key] = fileio.identity(value)
    return out


def backend_if_sampling(temperature: float) -> tuple[str, ...]:
    """vLLM and the HF backend draw different samples for one seed (greedy answers agree)."""
    return ("generation.backend",) if temperature > 0 else ()


SAMPLING = ("task", "questions", "samples", "temperature", "top_p", "max_new_tokens", "shots")


def reads_data(cfg):
    return pick(cfg, "target", "seed", "dtype", *(f"data.{k}" for k in SAMPLING),
                *backend_if_sampling(cfg.data.temperature))


def _own_data(db) -> bool:
    """Whether the draft base answers questions of its own to train on (else it reads the run's data)."""
    kind = draft_base_kinds.kind(db.model)
    return kind is not None and kind.own_data and db.data is not None


def reads_draft_base(cfg):
    db = cfg.draft_base
    kind = draft_base_kinds.kind(db.model)
    if kind is None:
        return pick(cfg, "draft_base.model")  # a sibling: used as it is
    own_data = ("dtype", *backend_if_sampling(db.data.temperature)) if _own_data(db) else ()
    return pick(cfg, *kind.reads, *own_data)


def after_draft_base(cfg):
    trained = draft_base_kinds.kind(cfg.draft_base.model) is not None
    return ("data",) if trained and not _own_data(cfg.draft_base) else ()


def reads_drafts(cfg):
    return pick(cfg, "target", "seed", "noise", "drafts", "eval.trials", "eval.retrain_per_trial")


def reads_teachers(cfg):
    if cfg.proxy.data != "teachers":
        return pick(cfg, "proxy.data")
    return pick(cfg, "target", "seed", "dtype", "noise",
                *(f"data.{k}" for k in SAMPLING if k not in ("questions", "samples")),
                "proxy.data", "proxy.teachers", "proxy.questions", "proxy.samples",
                *backend_if_sampling(cfg.data.temperature))


def reads_proxy(cfg):
    return pick(cfg, "target", "seed", "noise", "proxy")


def after_proxy(cfg):
    data = ("teachers",) if cfg.proxy.data == "teachers" else ("data",)
    return data + (("draft_base",) if cfg.proxy.base == "draft_base" else ())  # p_mix's adapter on the draft base


def reads_eval_samples(cfg):
    e = cfg.eval
    return pick(cfg, "target", "seed", "dtype", "data.top_p", "data.shots", *(() if e.task else ("data.task",)),
                "eval.task", "eval.split", "eval.questions", "eval.repeats", "eval.temperature", "eval.max_new_tokens",
                *backend_if_sampling(e.temperature))


# ---------------------------------------------------------------------------------------------
# Training-side stages.


def _generate_cfg(cfg: ExperimentConfig, out: Path, **kw) -> generate.GenerateConfig:
    sampling = section_values(cfg.data, generate.SamplingSettings) | section_values(cfg.generation, GenerationSection)
    base = sampling | dict(
        out=out, target=cfg.target, split="train", noise=cfg.noise, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    return generate.GenerateConfig(**(base | kw))


def data_cfg(cfg: ExperimentConfig, run: Path) -> generate.GenerateConfig:
    return _generate_cfg(cfg, rundir.samples_path(run).parent)


def stage_data(ctx: Context) -> dict:
    return generate.run(data_cfg(ctx.cfg, ctx.run))


def draft_base_data_cfg(cfg: ExperimentConfig, out: Path) -> generate.GenerateConfig | None:
    """The draft base's own warm-up data (``draft_base.data``), or None: the run's draft data."""
    if cfg.draft_base.data is None:
        return None
    return _generate_cfg(cfg, out, **section_values(cfg.draft_base.data, generate.SamplingSettings))


def draft_base_cfg(cfg: ExperimentConfig, samples: Path, out: Path):
    from drafteu.train import draft_base

    return draft_base.DraftBaseConfig(samples=samples, out=out, target=cfg.target, seed=cfg.seed, device=cfg.device,
                                      kind=cfg.draft_base.model,
                                      **section_values(cfg.draft_base, draft_base.DraftBaseSettings))


def stage_draft_base(ctx: Context) -> dict | None:
    """The built draft base in ``run/draft_base``: the truncated, warmed-up target, or the target
    quantized (``draft_base.model: quantize``: a recipe with its measured KL to the target).

    With ``draft_base.cache`` it is built once per machine, under
    ``$DRAFTEU_CACHE/draft_base/L<layers>-<key>`` or ``Q<bits>-<key>`` (key: the target's identity on this machine + the
    stage's digest, i.e. its recipe and - without ``draft_base.data`` - the run's draft data), and
    copied into each run (the copy keeps runs relocatable).  With ``draft_base.data`` the target first
    answers that task's train questions, cached under ``draft_base/data-<key of the data recipe>``
    so that recipes differing only in depth or training share one data set."""
    cfg, run = ctx.cfg, ctx.run
    kind = draft_base_kinds.kind(cfg.draft_base.model)
    if kind is None:
        return None  # a sibling model: nothing to build
    from drafteu import models
    from drafteu.train import draft_base

    sec, out = cfg.draft_base, run / "draft_base"
    cache = (models.writable_cache() if sec.cache else models.cache_dir()) / "draft_base"
    target = models.identity(cfg.target)
    entry = draft_base.CachedBase(cache / f"{kind.label(sec)}-{fileio.digest([target, ctx.digest])}")
    reused = sec.cache and entry.verified()
    samples = rundir.samples_path(run)
    data_home = entry.home if sec.cache else run / "draft_base_data"
    gen = draft_base_data_cfg(cfg, data_home / "data") if kind.own_data else None
    if gen is not None:  # keyed by the data recipe alone: bases of other depths share it
        if sec.cache:
            gen = dataclasses.replace(gen, out=cache / f"data-{fileio.digest([target, fileio.identity(gen)])}")
        if fileio.is_main_process() and not reused:  # generation: the main process; training: every process
            generate.run(gen)
        fileio.barrier()
        samples = gen.out / "samples.jsonl"
    if not sec.cache:
        return draft_base.run(draft_base_cfg(cfg, samples, out))
    manifest = entry.build(draft_base_cfg(cfg, samples, entry.model), reused)
    manifest = manifest | {"cache": {"path": str(entry.home), "reused": reused, "data": fileio.identity(sec.data)}}
    if fileio.is_main_process():
        entry.copy_to(out, manifest)
    fileio.barrier()
    return manifest


def _drafts_cfg(cfg: ExperimentConfig, run: Path, spec: rundir.EnsembleSpec, trial: int):
    from drafteu.train import drafts

    d = cfg.drafts
    s, m = spec.layout or (d.partitions, d.per_partition)
    out = rundir.draft_dir(run, cfg, spec, trial).parent
    method = spec.method
    seed = cfg.seed + trial
    # K-only perturbs its source's (DDD's) s0_m0: this trial's, else trial 0's; without the source it trains its own
    konly_from, source = None, DRAFT_METHODS[method].copies_of
    if source and source in d.methods:
        of = rundir.EnsembleSpec(source)
        konly_from = rundir.draft_dir(run, cfg, of, trial if of in rundir.trial_ensembles(cfg, trial) else 0) / "s0_m0"
    settings = section_values(d, drafts.DraftSettings) | {"partitions": s, "per_partition": m}
    if d.baseline_steps is not None and DRAFT_METHODS[method].trainer == "trl":
        settings["train"] = dataclasses.replace(d.train, max_steps=d.baseline_steps)
    return drafts.DraftsConfig(
        **settings,
        samples=rundir.samples_path(run), out=out, base=rundir.base_model(cfg, run), target=cfg.target,
        method=method, init_noise=dataclasses.replace(cfg.noise, sigma=d.init_sigma),
        noise=dataclasses.replace(cfg.noise, sigma=d.sigma), seed=seed, konly_from=konly_from, device=cfg.device)


def drafts_cfgs(cfg: ExperimentConfig, run: Path) -> list:
    """Every ensemble the drafts stage builds, trial by trial; copies (K only) after the ensemble whose
    s0_m0 they re-use."""
    return [_drafts_cfg(cfg, run, spec, trial) for trial in range(cfg.eval.trials)
            for spec in sorted(rundir.trial_ensembles(cfg, trial),
                               key=lambda e: bool(DRAFT_METHODS[e.method].copies_of))]


def ensemble_files(dcfg) -> list[Path]:
    """What a complete ensemble has: its manifest and every draft's adapter."""
    from drafteu.train import drafts

    out = dcfg.out / dcfg.method
    return [out / "manifest.json"] + [out / n / "adapter_model.safetensors" for n in drafts.adapter_names(dcfg)]


def stage_drafts(ctx: Context) -> dict:
    from drafteu.train import drafts

    done = {}
    for dcfg in drafts_cfgs(ctx.cfg, ctx.run):
        if not all(p.exists() for p in ensemble_files(dcfg)):  # drafts.run builds only the missing drafts
            done[str((dcfg.out / dcfg.method).relative_to(ctx.run))] = drafts.run(dcfg)["seconds"]
    return {"trained": done}


def teacher_cfgs(cfg: ExperimentConfig, run: Path) -> list[generate.GenerateConfig]:
    p = cfg.proxy
    if p.data != "teachers":
        return []
    return [_generate_cfg(cfg, rundir.teacher_dir(run, k), questions=p.questions, samples=p.samples, member=k,
                          family_seed=cfg.seed + TEACHER_SEED_OFFSET) for k in range(p.teachers)]


def stage_teachers(ctx: Context) -> dict | None:
    return {gen.out.name: generate.run(gen) for gen in teacher_cfgs(ctx.cfg, ctx.run)} or None


def proxy_cfg(cfg: ExperimentConfig, run: Path):
    from drafteu.train import proxy

    if cfg.proxy.data == "teachers":
        samples = [rundir.teacher_dir(run, k) / "samples.jsonl" for k in range(cfg.proxy.teachers)]
    else:
        samples = [rundir.samples_path(run)]
    return proxy.ProxyConfig(samples=samples, out=rundir.proxy_adapter(run).parent, target=cfg.target, noise=cfg.noise,
                             seed=cfg.seed, device=cfg.device, **section_values(cfg.proxy, proxy.ProxySettings),
                             draft_base=rundir.base_model(cfg, run) if cfg.proxy.base == "draft_base" else None)


def stage_proxy(ctx: Context) -> dict:
    from drafteu.train import proxy

    return proxy.run(proxy_cfg(ctx.cfg, ctx.run))


def eval_samples_cfg(cfg: ExperimentConfig, run: Path) -> generate.GenerateConfig:
    e = cfg.eval
    return _generate_cfg(cfg, run / rundir.EVAL_SAMPLES, task=e.task or cfg.data.task, split=e.split,
                         questions=e.questions, samples=e.repeats, temperature=e.temperature,
                         max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)


def stage_eval_samples(ctx: Context) -> dict:
    return generate.run(eval_samples_cfg(ctx.cfg, ctx.run))


# ---------------------------------------------------------------------------------------------
# Evaluation stages (drafteu.evaluate): each writes eval/<name>.json.


def _evaluation(name: str, fn):
    def run_stage(ctx: Context) -> dict:
        result = fn(ctx.cfg, ctx.run)
        fileio.write_json(rundir.eval_json(ctx.run, name), result)
        return result

    return run_stage


def _stages() -> tuple[Stage, ...]:
    from drafteu.evaluate import scoring_stage, stages

    def keys(*ks):  # eval.draft_kernel only when set: runs made before the option keep their identity
        return lambda cfg: pick(cfg, *ks, *(("eval.draft_kernel",) if cfg.eval.draft_kernel != "recipe" else ()))

    trained = ("eval_samples", "drafts", "proxy")
    model = ("target", "dtype", "seed", "noise")

    def files(*rel):  # the products of a stage: run-relative files
        return lambda cfg, run: [run / r for r in rel]

    def evaluation(name, fn, reads, after, outputs, version=2):
        return Stage(name, _evaluation(name, fn), reads, after, outputs=outputs, version=version,
                     products=files(f"eval/{name}.json"))

    return (
        Stage("data", stage_data, reads_data, outputs=("data",), products=files("data/samples.jsonl")),
        Stage("draft_base", stage_draft_base, reads_draft_base, after_draft_base,
              outputs=("draft_base", "draft_base_data"), every_process=True,
              products=lambda cfg, run: [run / "draft_base" / k.product, run / "draft_base" / "manifest.json"]
              if (k := draft_base_kinds.kind(cfg.draft_base.model)) else []),
        Stage("drafts", stage_drafts, reads_drafts, lambda cfg: ("data", "draft_base"), outputs=("drafts",),
              every_process=True,
              products=lambda cfg, run: [p for d in drafts_cfgs(cfg, run) for p in ensemble_files(d)]),
        Stage("teachers", stage_teachers, reads_teachers, outputs=("proxy_data",),
              products=lambda cfg, run: [g.out / "samples.jsonl" for g in teacher_cfgs(cfg, run)]),
        Stage("proxy", stage_proxy, reads_proxy, after_proxy, outputs=("proxy",), every_process=True,
              products=files("proxy/manifest.json", "proxy/adapter/adapter_model.safetensors")),
        Stage("eval_samples", stage_eval_samples, reads_eval_samples, outputs=(str(rundir.EVAL_SAMPLES),),
              products=files(f"{rundir.EVAL_SAMPLES}/samples.jsonl")),
        Stage("score", lambda ctx: scoring_stage.stage_score(ctx.cfg, ctx.run),
              keys(*model, "eval.family_size", "eval.tokur_size", "eval.trials", "eval.retrain_per_trial",
                   "eval.fidelity_questions"), lambda cfg: trained,
              outputs=(str(rundir.TOKEN_EU), str(rundir.TOKEN_EU_META), "eval/token_eu.part*.jsonl"),
              every_process=True, products=files(str(rundir.TOKEN_EU))),
        evaluation("perturbation", stages.stage_perturbation,
                   keys(*model, "eval.family_size", "eval.tokur_size", "eval.proxy_questions", "proxy.n_teacher"),
                   lambda cfg: ("eval_samples",) + (("drafts",) if stages.noise_ensembles(cfg) else ()),
                   ("eval/perturbation.json",), version=3),  # 3: the drafts' noise ensembles
        evaluation("proxy_robustness", stages.stage_proxy_robustness,
                   keys(*model, "eval.family_size", "eval.reference_size", "eval.proxy_ks", "eval.proxy_questions",
                        "eval.trials", "eval.bootstrap"), lambda cfg: trained,
                   ("eval/proxy_bias.jsonl", "eval/proxy_robustness.json")),
        evaluation("fidelity", stages.stage_fidelity,
                   keys("seed", "noise", "eval.family_size", "eval.trials", "eval.fidelity_questions",
                        "eval.retrain_per_trial", "eval.bootstrap"),
                   lambda cfg: ("score",), ("eval/fidelity.json",), version=3),  # 3: the perturbation's strength
        evaluation("hallucination", stages.stage_hallucination,
                   keys("seed", "eval.aggregations", "eval.fit_fraction", "eval.bootstrap", "eval.ece_bins"),
                   lambda cfg: ("score",), ("eval/hallucination.json",),
                   version=4),  # 3: the map's score scaling; 4: perplexity, EU added to entropy
        evaluation("cost", stages.stage_cost,
                   keys(*model, "eval.cost_responses", "eval.family_size", "eval.tokur_size"),
                   lambda cfg: trained, ("eval/cost.json",), version=7),
        # 3: quantized weights counted; 4: shared trunk; 5: batched; 6: both modes (prefix shared / full forwards);
        # 7: the draft's and target's parameters (the report's reading of the cost)
    )


STAGES = _stages()


def plan(cfg: ExperimentConfig, run_dir: Path) -> list[contract.Decision]:
    """What ``run`` will do with each stage: skip, resume, run or recompute (and why), from the
    stamps in ``run_dir`` and the config.  A stage whose upstream is rebuilt is rebuilt too."""
    found = contract.digests(STAGES, cfg)
    decisions, rebuilt = [], set()
    for stage in STAGES:
        d = contract.decide(stage, Path(run_dir), *found[stage.name], products=stage.products(cfg, Path(run_dir)))
        ups = [u for u in d.upstream if u in rebuilt]
        if ups and d.action in ("skip", "resume"):
            d.action, d.why = "recompute", f"{', '.join(ups)} is rebuilt"
        if d.action in ("run", "recompute"):
            rebuilt.add(stage.name)
        decisions.append(d)
    return decisions


def context(cfg: ExperimentConfig, run_dir: Path, name: str) -> Context:
    """What stage ``name``'s function gets in ``run_dir`` (to call one stage's work directly)."""
    digest, _, upstream = contract.digests(STAGES, cfg)[name]
    return Context(cfg, Path(run_dir), digest, upstream)


def run(cfg: ExperimentConfig, run_dir: Path, *, log=print, until: str | None = None) -> dict:
    """Every stage in order (up to ``until`` when given), each skipped, resumed or recomputed as
    ``plan`` decides; then the report.  Returns the run manifest (per stage: seconds this run and
    the seconds it took to make)."""
    run_dir = Path(run_dir)
    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise DraftEUError(f"--until {until!r}: not a stage; the stages are {', '.join(names)}")
    preflight.check(cfg, run_dir)  # config errors before anything is printed or written (the only check)
    log(f"reproduce {cfg.name} into {run_dir}")
    with fileio.locked(run_dir, "run"):  # one process writes a run directory at a time
        return _run(cfg, run_dir, log, names.index(until) + 1 if until is not None else len(names))


def _run(cfg: ExperimentConfig, run_dir: Path, log, stages: int) -> dict:
    from drafteu import report

    device = hardware.resolve_device(cfg.device)
    precision = {sec: hardware.resolve_mixed_precision(getattr(cfg, sec).train.mixed_precision, device)[0]
                 for sec in ("draft_base", "drafts", "proxy")}
    hw = hardware.describe(device) | {"dtype": hardware.resolve_dtype(cfg.dtype, device), "mixed_precision": precision}
    log(f"device {hw['device']} ({hw['hardware']}), model dtype {hw['dtype']}, "
        f"training mixed precision {', '.join(f'{k} {v}' for k, v in precision.items())}")
    main = fileio.is_main_process()
    if main:
        for name in contract.recover(run_dir, STAGES):  # a killed recompute: the previous results come back
            log(f"[{name}] a recompute did not finish: its previous outputs are back")
    fileio.barrier()
    decisions = plan(cfg, run_dir)[:stages]
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        contract.keep_run_files(run_dir)
        fileio.write_config(run_dir, cfg)
    try:
        manifest = _run_stages(cfg, run_dir, log, decisions, hw, main)
    except BaseException:
        if main:
            contract.restore_run_files(run_dir)  # failed before any new result: config.yaml, manifest.json as they were
        raise
    if main:
        contract.drop_run_files(run_dir)
    if main and stages == len(STAGES):
        log("[report] ...")
        report.write(cfg, run_dir)  # last, so it shows this run's stage timings
        log(f"[report] {run_dir / 'report.md'}")
    return manifest


def _run_stages(cfg: ExperimentConfig, run_dir: Path, log, decisions, hw: dict, main: bool) -> dict:
    """Run the decided stages in order; returns the run manifest.  A stage that fails gets its previous
    outputs back (``contract.restore``) before the error goes on."""
    manifest_path = run_dir / "manifest.json"
    manifest = fileio.json_load(manifest_path) if manifest_path.exists() else {}
    manifest.update({"stage": "reproduce", "name": cfg.name, "versions": fileio.versions(),
                     "config_hash": fileio.config_hash(cfg), "hardware": hw,
                     "digests": {d.stage.name: d.digest for d in decisions}})
    manifest.pop("stages", None)
    manifest["stages"] = {}
    total = time.time()
    for d in decisions:
        name = d.stage.name
        if d.action == "skip":
            log(f"[{name}] current: skipped")
        else:
            log(f"[{name}] " + {"run": "...", "resume": f"resuming{f' ({d.why})' if d.why else ''} ...",
                                "recompute": f"recomputing ({d.why}) ..."}[d.action])
        t0 = time.time()
        if d.action != "skip":
            if main:
                contract.begin(run_dir, d)
            try:
                fileio.barrier()
                with contract.Heartbeat(run_dir, d) if main else contextlib.nullcontext():
                    if main or d.stage.every_process:
                        d.stage.run(Context(cfg, run_dir, d.digest, d.upstream))
                fileio.barrier()
            except BaseException:
                if main and contract.restore(run_dir, d.stage):
                    log(f"[{name}] failed: its previous outputs are back")
                raise
            if main:
                contract.finish(run_dir, d, time.time() - t0)
                contract.drop_run_files(run_dir)  # the run now holds new results: its new config.yaml stays
            log(f"[{name}] {time.time() - t0:.1f} s")
        stamp = contract.read_stamp(contract.stamp_path(run_dir, name)) or {}
        manifest["stages"][name] = {"seconds": round(time.time() - t0, 2),
                                    "compute_seconds": stamp.get("seconds", round(time.time() - t0, 2)),
                                    "action": d.action}
        if main:
            fileio.write_json(manifest_path, manifest)
    manifest["last_run_seconds"] = round(time.time() - total, 1)
    manifest.setdefault("runs", []).append({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                            "seconds": manifest["last_run_seconds"]})
    if main:
        fileio.write_json(manifest_path, manifest)
    return manifest
