"""What drafteu knows about each draft method and each EU estimator, in one place.

The pipeline, the trial logic, cost accounting, the report, config validation and ``drafteu score``
read these registries; adding a method is an entry here plus its implementation, which the entry
names (``component``: an estimator class, a TRL baseline's recipe) and every caller builds through
the entry.  No other module branches on a method's name (tests/test_architecture.py scans the
package); docs/architecture.md "How to add ..." walks through it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def component(path: str):
    """The object named by ``"package.module:attribute"`` (imported on first use, so this registry stays
    import-light and below every module it names)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class DraftMethod:
    """A way to build a K-draft ensemble (paper Sec. 4.3, App. B.2-B.6; docs/method.md §6-7)."""

    name: str
    label: str
    trained: bool        # trained on target samples: retrained per trial only with retrain_per_trial;
                         # untrained ensembles (noise only) are redrawn in every trial instead
    partitions: bool     # drafts see disjoint partitions of the questions (S of them)
    init_noise: bool     # each draft starts from its own initialization noise
    trainer: str         # "sft" (own loop), "trl" (TRL baseline), "noise" (no training),
                         # "copies" (noisy copies of one trained draft of ``copies_of``)
    role: str = ""       # "proposed": the paper's method, which its claims are about (DDD);
                         # "baseline drafts": the no-training ensemble it is compared with
    recipe: str = ""     # trainer "trl": the function giving its TRL trainer, dataset and arguments
    copies_of: str = ""  # trainer "copies": the method whose first draft (s0_m0) the copies perturb
    default: bool = True  # in an experiment's default methods (the TRL baselines need an extra: opt-in)


DRAFT_METHODS: dict[str, DraftMethod] = {m.name: m for m in (
    DraftMethod("untrained", "Untrained (noisy copies of the draft base)", False, False, False, "noise",
                "baseline drafts"),
    DraftMethod("ddd", "DDD (data-diverse drafts)", True, True, False, "sft", "proposed"),
    DraftMethod("idd", "IDD (initialization-diverse drafts)", True, False, True, "sft"),
    DraftMethod("fdd", "FDD (data- and initialization-diverse)", True, True, True, "sft"),
    # K only: one trained draft (DDD s0_m0) plus K noisy copies of it, redrawn per trial
    DraftMethod("konly", "K only (noisy copies of one trained draft)", False, True, False, "copies",
                copies_of="ddd"),
    DraftMethod("gkd", "GKD (TRL, on-policy generalized JSD)", True, False, True, "trl",
                recipe="drafteu.train.baselines:gkd_recipe", default=False),
    DraftMethod("minillm", "MiniLLM (TRL, reverse-KL policy gradient)", True, False, True, "trl",
                recipe="drafteu.train.baselines:minillm_recipe", default=False),
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
    # "truth": what the estimates are measured against; "reference": the target-ensemble EU the
    # paper's cost and detection claims compare the drafts with (TokUR); "baseline": a cheap
    # non-EU score; "estimate": a draft ensemble
    role: str
    component: str       # its class ("module:Class"); every caller builds it through ``build``
    size_setting: str | None = None  # the evaluation setting giving its member count (an MI of K copies)

    def build(self, ctx):
        """The estimator from ``ctx`` (an ``estimators.BuildContext``), with the member count its size
        setting names there; what it costs is the estimator's own ``passes()``."""
        return component(self.component).build(ctx, ctx.size(self.size_setting))

    @property
    def help(self) -> str:
        """How ``--method`` help describes it."""
        return f"{self.name}: {self.label}{' (needs --drafts)' if self.uses_drafts else ''}"


ESTIMATORS: dict[str, EstimatorKind] = {e.name: e for e in (
    # K_T target passes each
    EstimatorKind("groundtruth", "ground truth (MI of a fixed target family)", False, True, "truth",
                  "drafteu.estimators:GroundTruth", "family_size"),
    EstimatorKind("tokur", "TokUR (MI of fresh noisy targets)", False, True, "reference",
                  "drafteu.estimators:TokUR", "tokur_size"),
    EstimatorKind("entropy", "predictive entropy of the target", False, False, "baseline",  # one target pass
                  "drafteu.estimators:PredictiveEntropy"),
    # a draft ensemble: K draft passes + one proxy pass (the proxy is the target + an adapter); K from its directory
    EstimatorKind("drafts", "draft ensemble: JSD + KL(q_mix || p_mix)", True, False, "estimate",
                  "drafteu.estimators:DraftEnsemble"),
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
