"""The scoring stage of `drafteu reproduce`: token EU of every estimator on every evaluated answer.

The numbers come from the estimator classes a user calls (``drafteu.estimators``: ``GroundTruth``,
``TokUR``, ``PredictiveEntropy``, ``DraftEnsemble``), set up once per trial on one loaded target:
the noise members, the proxy and the target share one PEFT model, the draft ensembles share one
loaded draft base (``DraftBases``), every source re-uses the KV cache of the prompts' shared prefix
(system + worked examples) and runs a question's prompt once for its several answers (positions
unchanged, so the numbers equal full forwards), and the proxy's pass is computed once per batch for
all draft ensembles.  Answers are scored ``eval.score_batch`` at a time (``score_batch``: padded
batches, logits reduced a chunk of positions at a time).
Output: ``eval/token_eu.jsonl``, one row per (answer, method label, trial), appended one batch at a
time (a killed run resumes; TokUR's draws depend on (seed, prompt) only, so a resumed run draws
the same).  Whether the rows are current is the stage contract's business (``drafteu.pipeline``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from drafteu import estimators, fileio, models
from drafteu.kvcache import shared_prefix
from drafteu.methods import ESTIMATORS, TARGET_ONLY, named
from drafteu.posterior import NoisyModel, family_seeds
from drafteu.progress import progress
from drafteu.rundir import (
    TOKEN_EU,
    EnsembleSpec,
    draft_dir,
    ensembles,
    eval_rows,
    fidelity_rows,
    key_of,
    proxy_adapter,
    rounded,
    trial_ensembles,
)
from drafteu.sources import HiddenSource


class TrialEstimators:
    """Every estimator of one trial, on one loaded target (with its noise members and the proxy).

    ``shared=False`` runs full forwards (no prefix cache, no prompt shared between answers) and gives
    every draft ensemble its own proxy pass (the paper's accounting: every method pays for every
    token it needs)."""

    def __init__(self, cfg, run: Path, rows: list[dict] | None = None, shared: bool = True):
        self.cfg, self.run = cfg, Path(run)
        self.lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
        self.device = next(self.lm.model.parameters()).device
        self.noisy = NoisyModel(self.lm.model, cfg.noise)
        self.noisy.set_members("family", family_seeds(cfg.seed, cfg.eval.family_size))  # makes it a PeftModel
        # p_mix on the target: one pass per batch for every ensemble; on the draft base: a row of each
        # ensemble's own pass (DraftEnsemble reads the proxy's manifest)
        self.proxy_in_drafts = estimators.proxy_on_draft_base(proxy_adapter(run)) is not None
        if not self.proxy_in_drafts:
            self.noisy.model.load_adapter(proxy_adapter(run), adapter_name="proxy")
        self.noisy.model.eval()
        self.tokenizer_only = models.load(cfg.target, tokenizer_only=True)
        self.shared = shared
        self.prefix_len = shared_prefix([r["prompt_ids"] for r in rows]) if shared else 0
        self.proxy = None if self.proxy_in_drafts else \
            HiddenSource(self.noisy.model, ["proxy"], prefix_len=self.prefix_len, share_prompts=shared)
        self.bases = estimators.DraftBases()  # the ensembles of a trial share one loaded draft base
        self.estimators: dict[str, estimators.Estimator] = {}
        self.trial: int | None = None

    def set_trial(self, trial: int, specs: list[EnsembleSpec], target_only: list[str] | None = None) -> None:
        """Draw the trial's family and TokUR seeds; load the trial's draft ensembles ``specs``
        (``target_only``: the target-only estimators to build, by name; None: all)."""
        cfg, e, plen, share = self.cfg, self.cfg.eval, self.prefix_len, self.shared
        self.trial = trial
        previous = list(self.estimators.values())
        if self.proxy is not None:
            self.proxy.invalidate()
        built = {name: kind for name, kind in ESTIMATORS.items()
                 if not kind.uses_drafts and (target_only is None or name in target_only)}
        sizes = {kind.size_setting: getattr(e, kind.size_setting) for kind in built.values() if kind.size_setting}
        ctx = estimators.BuildContext(noisy=self.noisy, seed=cfg.seed + trial, prefix_len=plen, share_prompts=share,
                                      sizes=sizes, target=self.tokenizer_only, bases=self.bases, device=self.device,
                                      kernel=cfg.eval.draft_kernel)
        # the target-only estimators, each built by its registry entry (reading only the sizes they use: a
        # stage's reads are the keys it declares)
        self.estimators = {name: kind.build(ctx) for name, kind in built.items()}
        drafts = ESTIMATORS[named("estimate")]
        for spec in specs:  # the trial's draft ensembles: p from one pass shared by all (or a row of theirs)
            if self.proxy_in_drafts:
                proxy = {"proxy": proxy_adapter(self.run)}
            else:
                proxy = {"proxy_source": self.proxy if share else HiddenSource(self.noisy.model, ["proxy"],
                                                                               share_prompts=False)}
            self.estimators[spec.label] = drafts.build(dataclasses.replace(
                ctx, drafts=draft_dir(self.run, cfg, spec, trial), **proxy))
        for est in previous:  # the previous trial's adapters leave the shared base
            est.close()

    def score(self, rows: list[dict], methods: list[str]) -> dict[str, list[estimators.TokenScores]]:
        """TokenScores per method label for every answer of ``rows`` (one batched pass per method)."""
        pairs = [(r["prompt_ids"], r["response_ids"]) for r in rows]
        return {m: self.estimators[m].score_batch(pairs) for m in methods}


def score_jobs(cfg, rows: list[dict]) -> list[tuple[int, list[str], list[dict]]]:
    """(trial, method labels, answers) to score: trial 0 every method on every answer; later trials
    the redrawn methods on the fidelity answers (docs/method.md §5)."""
    jobs = [(0, list(TARGET_ONLY) + [s.label for s in ensembles(cfg)], rows)]
    fid = fidelity_rows(rows, cfg.eval.fidelity_questions)
    redrawn = [m for m in TARGET_ONLY if ESTIMATORS[m].redrawn]
    for t in range(1, cfg.eval.trials):
        jobs.append((t, redrawn + [s.label for s in trial_ensembles(cfg, t)], fid))
    return jobs


def _processes() -> tuple[int, int]:
    """(rank, world size) under ``accelerate launch`` / ``torchrun``; (0, 1) in one process."""
    import os

    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def part_path(run: Path, rank: int) -> Path:
    """Process ``rank``'s share of the token EU while the stage runs (merged at its end)."""
    return Path(run) / TOKEN_EU.with_name(f"token_eu.part{rank}.jsonl")


def stage_score(cfg, run: Path) -> dict:
    """Score every (answer, method, trial) on every process: process r takes batches r, r + P, ...
    of each trial's answers, appends them to its own part (a killed run resumes each part), and the main
    process merges the parts into ``eval/token_eu.jsonl`` in one canonical order (trial, answer,
    method), so the file is the same however many processes scored it."""
    run = Path(run)
    rank, world = _processes()
    rows = eval_rows(run)
    path = part_path(run, rank)
    done = {(r["key"], r["method"], r["trial"]) for r in fileio.read_jsonl(path, repair=True)}
    jobs = score_jobs(cfg, rows)
    size = cfg.eval.score_batch
    # process r takes batches r, r + P, ... of each trial: the batches (and so every number, to the
    # last bit) are the ones a single process scores
    mine = [(t, ms, [r for b in range(rank * size, len(rs), world * size) for r in rs[b:b + size]])
            for t, ms, rs in jobs]
    total = sum(len(rs) for _, _, rs in mine)
    todo = [(t, ms, rs) for t, ms, rs in mine if any((key_of(r), m, t) not in done for r in rs for m in ms)]
    scored = 0
    if todo:
        trial_est = TrialEstimators(cfg, run, rows)  # every process: the prefix of all answers, the same numbers
        n_done = total - sum(len(rs) for _, _, rs in todo)
        scored = total - n_done
        with progress("score", total=total, completed=n_done, enabled=rank == 0) as bar:
            for trial, methods, rs in todo:
                trial_est.set_trial(trial, [EnsembleSpec.from_label(m) for m in methods if m not in TARGET_ONLY])
                for start in range(0, len(rs), size):
                    batch = rs[start:start + size]
                    _score_batch(trial_est, trial, methods, batch, done, path)
                    bar.update(advance=len(batch),
                               info=f"trial {trial}" + (f", process {rank} of {world}" if world > 1 else ""))
    fileio.barrier()  # every part is complete before the merge
    if rank == 0:
        _merge(run, jobs, world)
    return {"answers": len(rows), "scored": scored, "processes": world}


def _score_batch(trial_est: TrialEstimators, trial: int, methods: list[str], batch: list[dict], done: set,
                 path: Path) -> None:
    """Each method on the answers of ``batch`` it lacks (``done``), in one batched pass, appended to ``path``."""
    for m in methods:
        need = [r for r in batch if (key_of(r), m, trial) not in done]
        if not need:
            continue
        res = trial_est.score(need, [m])[m]
        fileio.append_jsonl(path, [
            {"key": key_of(r), "qid": r["qid"], "method": m, "trial": trial, "eu": rounded(s.eu),
             "variance": rounded(s.variance), "bias": rounded(s.bias)}
            | ({"nll": rounded(s.nll)} if s.nll is not None else {})
            for r, s in zip(need, res, strict=True)])


def _merge(run: Path, jobs, world: int) -> None:
    """The parts as eval/token_eu.jsonl, in the order of (trial, answer, method); parts removed."""
    parts = [part_path(run, r) for r in range(world)]
    found = {(r["key"], r["method"], r["trial"]): r for p in parts for r in fileio.read_jsonl(p)}
    ordered = [found[(key_of(row), m, t)] for t, methods, rows in jobs for row in rows for m in methods]
    fileio.write_text_atomic(run / TOKEN_EU, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    for p in parts:
        p.unlink(missing_ok=True)
