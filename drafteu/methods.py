"""What drafteu knows about each draft method and each EU estimator, in one place.

The pipeline, the trial logic, cost accounting, the report and config validation read these
registries; adding a method is an entry here plus its implementation (``train/drafts.py`` for a
draft method, ``estimators.py`` for an estimator).  No module lists method names elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftMethod:
    """A way to build a K-draft ensemble (paper Sec. 4.3, App. B.2-B.6; docs/method.md §6-7)."""

    name: str
    label: str
    trained: bool        # trained on target samples: retrained per trial only with retrain_per_trial;
                         # untrained ensembles (noise only) are redrawn in every trial instead
    partitions: bool     # drafts see disjoint partitions of the questions (S of them)
    init_noise: bool     # each draft starts from its own initialization noise
    trainer: str         # "sft" (own loop), "trl" (TRL baseline), "noise" (no training), "konly"
    role: str = ""       # "proposed": the paper's method, which its claims are about (DDD);
                         # "baseline drafts": the no-training ensemble it is compared with


DRAFT_METHODS: dict[str, DraftMethod] = {m.name: m for m in (
    DraftMethod("untrained", "Untrained (noisy copies of the draft base)", False, False, False, "noise", "baseline drafts"),
    DraftMethod("ddd", "DDD (data-diverse drafts)", True, True, False, "sft", "proposed"),
    DraftMethod("idd", "IDD (initialization-diverse drafts)", True, False, True, "sft"),
    DraftMethod("fdd", "FDD (data- and initialization-diverse)", True, True, True, "sft"),
    # K only: one trained draft (DDD s0_m0) plus K noisy copies of it, redrawn per trial
    DraftMethod("konly", "K only (noisy copies of one trained draft)", False, True, False, "konly"),
    DraftMethod("gkd", "GKD (TRL, on-policy generalized JSD)", True, False, True, "trl"),
    DraftMethod("minillm", "MiniLLM (TRL, reverse-KL policy gradient)", True, False, True, "trl"),
)}


def draft_method(name: str) -> DraftMethod:
    """The registry entry of ``name`` (a KeyError names the known ones)."""
    if name not in DRAFT_METHODS:
        raise KeyError(f"unknown draft method {name!r}; known: {', '.join(DRAFT_METHODS)}")
    return DRAFT_METHODS[name]


@dataclass(frozen=True)
class EstimatorKind:
    """An EU estimator scored on every evaluated answer (docs/method.md §2-3, §11-12)."""

    name: str
    label: str
    uses_drafts: bool
    redrawn: bool        # re-scored in every trial (its randomness is redrawn)
    # parameter-equivalent passes per token: f(k_target, k_drafts) -> (target passes, draft passes)
    passes: Callable[[int, int], tuple[int, int]]
    # "truth": what the estimates are measured against; "reference": the target-ensemble EU the
    # paper's cost and detection claims compare the drafts with (TokUR); "baseline": a cheap
    # non-EU score; "estimate": a draft ensemble
    role: str


ESTIMATORS: dict[str, EstimatorKind] = {e.name: e for e in (
    EstimatorKind("groundtruth", "ground truth (MI of a fixed target family)", False, True, lambda kt, kd: (kt, 0),
                  "truth"),
    EstimatorKind("tokur", "TokUR (MI of fresh noisy targets)", False, True, lambda kt, kd: (kt, 0), "reference"),
    EstimatorKind("entropy", "predictive entropy of the target", False, False, lambda kt, kd: (1, 0), "baseline"),
    # a draft ensemble: K draft passes + one proxy pass (the proxy is the target + an adapter)
    EstimatorKind("drafts", "draft ensemble: JSD + KL(q_mix || p_mix)", True, False, lambda kt, kd: (1, kd),
                  "estimate"),
)}

TARGET_ONLY = tuple(n for n, e in ESTIMATORS.items() if not e.uses_drafts)


def named(role: str) -> str:
    """The one draft method or estimator with ``role`` (the stages and the report ask by role)."""
    found = [m.name for m in DRAFT_METHODS.values() if m.role == role]
    found += [e.name for e in ESTIMATORS.values() if e.role == role]
    if len(found) != 1:
        raise KeyError(f"{len(found)} registry entries have the role {role!r}")
    return found[0]


def label(name: str) -> str:
    """A method or estimator name as the report writes it (the registry's label)."""
    if name in DRAFT_METHODS:
        return DRAFT_METHODS[name].label
    if name in ESTIMATORS:
        return ESTIMATORS[name].label
    return name
