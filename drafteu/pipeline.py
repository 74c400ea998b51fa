"""`drafteu reproduce`: every stage of an experiment, in order, into one run directory.

    data/            target samples on train questions        (generate)
    draft_base/      truncated + warmed-up target (when draft_base.model is 'truncate')
    drafts/<m>/      one ensemble per method; drafts/layouts/SxM/ddd; drafts/trials/t<i>/<m>
    proxy_data/t<k>/ answers of fixed noisy teachers          (generate --member k)
    proxy/           the OSD proxy adapter
    eval/samples/    target answers on test questions, `repeats` each
    eval/token_eu.jsonl         token EU per (response, method, trial)       (score)
    eval/proxy_bias.jsonl       bias term under each p estimate             (proxy robustness)
    eval/fidelity.json  eval/proxy_robustness.json  eval/hallucination.json  eval/cost.json
    report.md  report.html  figures/*.png

Every stage is skipped when its outputs are complete (training stages by their manifests,
evaluation stages by a hash of the config sections they read), and the long ones resume after a
kill: generation and scoring append one response at a time, training checkpoints.  Trials follow
METHOD.md §5: with ``retrain_per_trial`` every ensemble is retrained per trial seed; otherwise a
trial redraws the cheap random elements (ground-truth family, TokUR, untrained and K-only noise)
and bootstrap-resamples the evaluated questions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from drafteu import divergence, estimators, generate, hardware, models, runio
from drafteu.config import ExperimentConfig
from drafteu.errors import DraftEUError
from drafteu.posterior import NoisyModel, family_seeds, member_seed
from drafteu.progress import progress

TRAINED = ("ddd", "idd", "fdd", "gkd", "minillm")  # retrained per trial only with retrain_per_trial
TEACHER_SEED_OFFSET = 7919  # the proxy's data teachers are not the ground-truth family


# ---------------------------------------------------------------------------------------------
# Small helpers.


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps([runio.plain(p) for p in parts], sort_keys=True).encode()).hexdigest()[:16]


def _fresh(path: Path, key: str) -> bool:
    """True when ``path`` (a JSON stage output) exists and was made from config hash ``key``."""
    try:
        return runio.json_load(path).get("config_hash") == key
    except (OSError, ValueError):
        return False


def ensembles(cfg: ExperimentConfig) -> list[str]:
    """Labels of every ensemble scored: the methods, then the extra DDD layouts ("ddd SxM")."""
    return list(cfg.drafts.methods) + [f"ddd {s}x{m}" for s, m in cfg.drafts.layouts]


def draft_dir(run: Path, cfg: ExperimentConfig, label: str, trial: int) -> Path:
    """Directory of ensemble ``label`` in ``trial`` (shared across trials where nothing is redrawn)."""
    if label.startswith("ddd "):
        s, m = label.split()[1].split("x")
        root = run / "drafts" / "layouts" / f"{s}x{m}"
    else:
        root = run / "drafts"
    method = label.split()[0]
    redrawn = cfg.eval.retrain_per_trial or method not in TRAINED
    if trial > 0 and redrawn:
        root = run / "drafts" / "trials" / f"t{trial}" / root.relative_to(run / "drafts")
    return root / method


def trial_labels(cfg: ExperimentConfig, trial: int) -> list[str]:
    """Ensembles that have their own numbers in ``trial`` (others re-use trial 0's)."""
    if trial == 0 or cfg.eval.retrain_per_trial:
        return ensembles(cfg)
    return [lab for lab in ensembles(cfg) if lab.split()[0] not in TRAINED]


def _round(t: torch.Tensor | None):
    return None if t is None else [float(f"{x:.6g}") for x in t.tolist()]


# ---------------------------------------------------------------------------------------------
# Training-side stages.


def _generate_cfg(cfg: ExperimentConfig, out: Path, **kw) -> generate.GenerateConfig:
    d = cfg.data
    base = dict(out=out, target=cfg.target, task=d.task, split="train", questions=d.questions, samples=d.samples,
                temperature=d.temperature, max_new_tokens=d.max_new_tokens, batch_size=d.batch_size,
                shots=d.shots, noise=cfg.noise, seed=cfg.seed, dtype=cfg.dtype, device=cfg.device)
    return generate.GenerateConfig(**(base | kw))


def stage_data(cfg: ExperimentConfig, run: Path) -> dict:
    return generate.run(_generate_cfg(cfg, run / "data"))


def base_model(cfg: ExperimentConfig, run: Path) -> str:
    return str(run / "draft_base") if cfg.draft_base.model == "truncate" else cfg.draft_base.model


def stage_draft_base(cfg: ExperimentConfig, run: Path) -> dict | None:
    if cfg.draft_base.model != "truncate":
        return None
    from drafteu.train import draft_base

    return draft_base.run(draft_base.DraftBaseConfig(
        samples=run / "data" / "samples.jsonl", out=run / "draft_base", target=cfg.target,
        layers=cfg.draft_base.layers, heldout=cfg.draft_base.heldout, train=cfg.draft_base.train, seed=cfg.seed, device=cfg.device))


def _drafts_cfg(cfg: ExperimentConfig, run: Path, label: str, trial: int):
    from drafteu.posterior import NoiseConfig
    from drafteu.train import drafts

    d = cfg.drafts
    s, m = (int(x) for x in label.split()[1].split("x")) if " " in label else (d.partitions, d.per_partition)
    out = draft_dir(run, cfg, label, trial).parent
    method = label.split()[0]
    seed = cfg.seed + trial
    konly_from = draft_dir(run, cfg, "ddd", trial) / "s0_m0" if method == "konly" else None
    if konly_from is not None and not (konly_from / "adapter_model.safetensors").exists():
        konly_from = draft_dir(run, cfg, "ddd", 0) / "s0_m0" if trial > 0 else None
    return drafts.DraftsConfig(
        samples=run / "data" / "samples.jsonl", out=out, base=base_model(cfg, run), target=cfg.target,
        method=method, partitions=s, per_partition=m, lora_r=d.lora_r, lora_alpha=d.lora_alpha,
        lora_dropout=d.lora_dropout, lora_modules=d.lora_modules,
        init_noise=NoiseConfig(sigma=d.init_sigma, rank=cfg.noise.rank, target_modules=cfg.noise.target_modules,
                               scheme=cfg.noise.scheme),
        noise=NoiseConfig(sigma=d.sigma, rank=cfg.noise.rank, target_modules=cfg.noise.target_modules,
                          scheme=cfg.noise.scheme),
        train=d.train, max_new_tokens=d.max_new_tokens, seed=seed, konly_from=konly_from, device=cfg.device)


def stage_drafts(cfg: ExperimentConfig, run: Path) -> dict:
    from drafteu.train import drafts

    done = {}
    order = sorted(ensembles(cfg), key=lambda lab: lab == "konly")  # konly re-uses ddd s0_m0 when present
    for trial in range(cfg.eval.trials):
        for label in order:
            if trial > 0 and label not in trial_labels(cfg, trial):
                continue
            dcfg = _drafts_cfg(cfg, run, label, trial)
            path = dcfg.out / dcfg.method / "manifest.json"
            if _fresh(path, runio.config_hash(dcfg)):
                continue
            done[f"{label} t{trial}"] = drafts.run(dcfg)["seconds"]
    return {"trained": done}


def stage_teachers(cfg: ExperimentConfig, run: Path) -> dict | None:
    if cfg.proxy.data != "teachers":
        return None
    p = cfg.proxy
    return {f"t{k}": generate.run(_generate_cfg(
        cfg, run / "proxy_data" / f"t{k}", questions=p.questions, samples=p.samples, member=k,
        family_seed=cfg.seed + TEACHER_SEED_OFFSET)) for k in range(p.teachers)}


def stage_proxy(cfg: ExperimentConfig, run: Path) -> dict:
    from drafteu.train import proxy

    if cfg.proxy.data == "teachers":
        samples = [run / "proxy_data" / f"t{k}" / "samples.jsonl" for k in range(cfg.proxy.teachers)]
    else:
        samples = [run / "data" / "samples.jsonl"]
    return proxy.run(proxy.ProxyConfig(
        samples=samples, out=run / "proxy", target=cfg.target, teachers=cfg.proxy.n_teacher, noise=cfg.noise,
        heldout=cfg.proxy.heldout,
        train=cfg.proxy.train, seed=cfg.seed, device=cfg.device))


def stage_eval_samples(cfg: ExperimentConfig, run: Path) -> dict:
    e = cfg.eval
    return generate.run(_generate_cfg(
        cfg, run / "eval" / "samples", task=e.task or cfg.data.task, split=e.split, questions=e.questions, samples=e.repeats,
        temperature=e.temperature, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size))


# ---------------------------------------------------------------------------------------------
# Scoring: token EU of every method on the evaluation answers.


def eval_rows(run: Path) -> list[dict]:
    rows = runio.read_jsonl(run / "eval" / "samples" / "samples.jsonl")
    if not rows:
        raise DraftEUError(f"{run}/eval/samples holds no answers; the eval_samples stage did not run")
    return rows


def key_of(row: dict) -> str:
    return f"{row['qid']}#{row['sample']}"


def fidelity_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """The first answer of each of the first ``limit`` questions (all questions when None)."""
    firsts = [r for r in rows if r["sample"] == 0]
    return firsts if limit is None else firsts[:limit]


class Scorer:
    """The target (with its noise members and the proxy adapter) and the draft ensembles of one trial.

    Every model that is fixed across answers (the ground-truth family, the target, the proxy, each
    draft ensemble) computes the KV cache of the prompts' shared prefix (system + worked examples)
    once and re-uses it, so an answer costs its question and response tokens only; positions are
    unchanged, so the numbers equal full forwards (tested).  TokUR draws fresh members per
    question (seeded by trial and question index, so a resumed run draws the same), and its
    prefix is recomputed for each draw.  ``prefix=False`` runs full forwards (the cost table).
    """

    def __init__(self, cfg: ExperimentConfig, run: Path, rows: list[dict] | None = None, prefix: bool = True):
        from drafteu.generate import _lcp

        self.cfg, self.run = cfg, run
        self.lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
        self.device = next(self.lm.model.parameters()).device
        self.noisy = NoisyModel(self.lm.model, cfg.noise)
        self.noisy.set_members("family", family_seeds(cfg.seed, cfg.eval.family_size))  # makes it a PeftModel
        self.noisy.model.load_adapter(run / "proxy" / "adapter", adapter_name="proxy")
        self.noisy.model.eval()
        self.tok_only = models.load(cfg.target, tokenizer_only=True)
        self.plen = _lcp([r["prompt_ids"] for r in rows]) if prefix and rows and len(rows) > 1 else 0
        self.trial, self.drafts, self._prefix = None, {}, {}
        self.family: list[str] = []

    def set_trial(self, trial: int, labels: list[str]) -> None:
        cfg = self.cfg
        self.trial, self._prefix = trial, {}
        self.family = self.noisy.set_members("family", family_seeds(cfg.seed + trial, cfg.eval.family_size))
        self.drafts = {lab: estimators.DraftEnsemble(draft_dir(self.run, cfg, lab, trial), self.tok_only,
                                                     device=self.device) for lab in labels}
        self._tokur_q = None

    def forward(self, key: str, model, names: list[str] | None, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(B, keep, V) logits of ``model`` on (1, L) ``ids`` for each adapter in ``names`` (B = len(names);
        None = the model as is, B = 1), re-using the cached prefix KV of ``key``."""
        import copy

        b = len(names) if names else 1
        kw = {"adapter_names": list(names)} if names else {}
        plen = min(self.plen, ids.shape[1] - keep)
        if plen <= 0:
            return model(input_ids=ids.repeat(b, 1), logits_to_keep=keep, **kw).logits
        if self._prefix.get(key, (None, -1))[1] != plen:
            out = model(input_ids=ids[:, :plen].repeat(b, 1), use_cache=True, **kw)
            self._prefix[key] = (out.past_key_values, plen)
        cache = copy.deepcopy(self._prefix[key][0])
        return model(input_ids=ids[:, plen:].repeat(b, 1), past_key_values=cache, use_cache=True,
                     logits_to_keep=keep, **kw).logits

    def proxy_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.forward("proxy", self.noisy.model, ["proxy"], ids, keep)[0]

    def target_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        with self.noisy.base() as m:
            return self.forward("target", m, None, ids, keep)[0]

    def members_logits(self, key: str, names: list[str], ids: torch.Tensor, keep: int) -> torch.Tensor:
        return self.forward(key, self.noisy.model, names, ids, keep)

    def tokur_members(self, q_index: int) -> list[str]:
        """Fresh TokUR members for question ``q_index`` of this trial (drawn once per question)."""
        if self._tokur_q != q_index:
            e = self.cfg.eval
            seeds = [member_seed("tokur", self.cfg.seed + self.trial, q_index, k) for k in range(e.tokur_size)]
            self.tokur = self.noisy.set_members("tokur", seeds)
            self._tokur_q = q_index
            self._prefix.pop("tokur", None)
        return self.tokur

    @torch.no_grad()
    def score(self, row: dict, methods: list[str], q_index: int) -> dict[str, estimators.TokenScores]:
        """TokenScores per method for one answer (``q_index``: its question's index, for TokUR)."""
        resp = list(row["response_ids"])
        ids, keep = estimators.response_inputs(row["prompt_ids"], resp, self.device)
        out = {}
        if "groundtruth" in methods:
            fam = self.members_logits("family", self.family, ids, keep)[:, :-1]
            out["groundtruth"] = estimators.TokenScores(resp, divergence.mutual_information(fam).cpu())
        if "tokur" in methods:
            tok = self.members_logits("tokur", self.tokur_members(q_index), ids, keep)[:, :-1]
            out["tokur"] = estimators.TokenScores(resp, divergence.mutual_information(tok).cpu())
        if "entropy" in methods:
            out["entropy"] = estimators.TokenScores(resp, divergence.entropy(self.target_logits(ids, keep)[:-1]).cpu())
        labels = [m for m in methods if m in self.drafts]
        if labels:
            p = self.proxy_logits(ids, keep)[:-1]
            for lab in labels:
                ens = self.drafts[lab]
                q = self.forward(lab, ens.runner, ens.names, ids, keep)[:, :-1, : ens.vocab]
                terms = divergence.eu_decomposition(q, p[..., : ens.vocab])
                out[lab] = estimators.TokenScores(resp, terms.total.cpu(), terms.variance.cpu(), terms.bias.cpu())
        return out


def question_index(rows: list[dict]) -> dict[str, int]:
    """qid -> its index among the distinct questions of ``rows`` (in order)."""
    return {q: i for i, q in enumerate(dict.fromkeys(r["qid"] for r in rows))}


def score_jobs(cfg: ExperimentConfig, rows: list[dict]) -> list[tuple[int, list[str], list[dict]]]:
    """(trial, methods, answers) to score: trial 0 every method on every answer; later trials the
    redrawn methods on the fidelity answers."""
    jobs = [(0, ["groundtruth", "tokur", "entropy"] + ensembles(cfg), rows)]
    fid = fidelity_rows(rows, cfg.eval.fidelity_questions)
    for t in range(1, cfg.eval.trials):
        jobs.append((t, ["groundtruth", "tokur"] + trial_labels(cfg, t), fid))
    return jobs


def stage_score(cfg: ExperimentConfig, run: Path) -> dict:
    rows = eval_rows(run)
    path = run / "eval" / "token_eu.jsonl"
    key = _hash(cfg.target, cfg.noise, cfg.drafts, cfg.eval.family_size, cfg.eval.tokur_size, cfg.eval.trials,
                cfg.eval.retrain_per_trial, cfg.eval.fidelity_questions, cfg.seed)
    meta = run / "eval" / "token_eu.meta.json"
    if meta.exists() and runio.json_load(meta).get("config_hash") != key:
        raise DraftEUError(f"{path} was scored under a different config; delete {run / 'eval'} "
                           "(keeping eval/samples) or use another --run directory")
    if not meta.exists():
        runio.write_json(meta, {"config_hash": key})
    done = {(r["key"], r["method"], r["trial"]) for r in runio.read_jsonl(path, repair=True)}
    jobs = score_jobs(cfg, rows)
    total = sum(len(rs) for _, _, rs in jobs)
    todo = [(t, ms, rs) for t, ms, rs in jobs if any((key_of(r), m, t) not in done for r in rs for m in ms)]
    if not todo:
        return {"answers": len(rows), "scored": 0}
    scorer = Scorer(cfg, run, rows)
    n_done = total - sum(len(rs) for _, _, rs in todo)
    with progress("score", total=total, completed=n_done) as bar:
        for trial, methods, rs in todo:
            scorer.set_trial(trial, [m for m in methods if m not in ("groundtruth", "tokur", "entropy")])
            qidx = question_index(rs)
            for row in rs:
                missing = [m for m in methods if (key_of(row), m, trial) not in done]
                if missing:
                    res = scorer.score(row, missing, qidx[row["qid"]])
                    runio.append_jsonl(path, [
                        {"key": key_of(row), "qid": row["qid"], "method": m, "trial": trial, "eu": _round(s.eu),
                         "variance": _round(s.variance), "bias": _round(s.bias)} for m, s in res.items()])
                bar.update(advance=1, info=f"trial {trial}")
    return {"answers": len(rows), "scored": total - n_done}


def token_eu(run: Path) -> dict[tuple[str, str, int], dict]:
    """(answer key, method, trial) -> the stored row of eval/token_eu.jsonl."""
    return {(r["key"], r["method"], r["trial"]): r for r in runio.read_jsonl(run / "eval" / "token_eu.jsonl")}


# ---------------------------------------------------------------------------------------------
# The pipeline.

TRAINING_STAGES = ("draft_base", "drafts", "proxy")


def _eval_stage(name: str, fn, keys, cfg: ExperimentConfig, run: Path):
    """Run an evaluation stage unless eval/<name>.json was made from the same config sections."""
    path = run / "eval" / f"{name}.json"
    key = _hash(*keys, runio.json_load(run / "eval" / "token_eu.meta.json") if
                (run / "eval" / "token_eu.meta.json").exists() else None)
    if _fresh(path, key):
        return None
    result = fn(cfg, run)
    runio.write_json(path, {"config_hash": key, **result})
    return result


def run(cfg: ExperimentConfig, run_dir: Path, *, log=print) -> dict:
    """Every stage in order; returns the run manifest (stage -> seconds, skipped or not)."""
    from drafteu import report
    from drafteu.evaluate import stages

    run_dir = Path(run_dir)
    device = hardware.resolve_device(cfg.device)  # a bad device is an error before any work
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
        ("score", lambda: stage_score(cfg, run_dir)),
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
