"""What drafteu knows about each kind of draft base it builds from the target, in one place.

``draft_base.model`` is either one of these kinds (the run's ``draft_base`` stage builds it from the
target) or a sibling model (a hub id or a local directory, used as it is: no entry).  The pipeline
(what the stage reads, what it waits for, its product, its cache entry), ``drafteu train-draft-base``
(the builder, the settings a kind ignores), preflight (the kind's checks, the depth its LoRA layers
are checked against), the run directory and the report ask the entry; no other module branches on a
kind's name (tests/test_architecture.py).  Adding a kind is an entry here plus its builder
(docs/architecture.md, "How to add ...").  Import-light: builders and checks import what they need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class DraftBaseKind:
    """A draft base made from the target (docs/method.md §14-15)."""

    name: str
    help: str              # how --help and the config docs describe it
    reads: tuple[str, ...]  # the draft_base stage's config keys (its identity); its own data's keys are added
    unused: tuple[str, ...]  # DraftBaseSettings fields it ignores (not part of its identity)
    product: str           # the file a complete built base has (beside its manifest.json)
    trains: bool           # trained on target answers (its held-out questions come out of the draft data)
    own_data: bool         # may answer questions of its own to train on (``draft_base.data``)
    builder: str           # "module:function" (cfg, rows, started) -> manifest, in train/draft_base.py
    label: Callable        # (section) -> the cache entry's prefix
    depth: Callable        # (section, target depth) -> its decoder layers
    describe: Callable     # (section) -> the report's words for it
    check: Callable = lambda section, target, depth: None  # preflight, before any work


def _check_truncate(section, target: str, depth: int) -> None:
    from drafteu.errors import DraftEUError

    if section.layers > depth:
        raise DraftEUError(f"draft_base.layers is {section.layers}, but the target ({target}) has {depth} layers; "
                           f"choose 1..{depth}")


def _check_quantize(section, target: str, depth: int) -> None:
    from drafteu.quantize import require_torchao

    require_torchao()  # torchao importable, before any work


KINDS: dict[str, DraftBaseKind] = {k.name: k for k in (
    DraftBaseKind(
        "truncate", "the target's first LAYERS layers, warmed up by logit distillation",
        reads=("target", "seed", "draft_base.model", "draft_base.layers", "draft_base.heldout", "draft_base.train",
               "draft_base.data"),
        unused=("quantize",), product="config.json", trains=True, own_data=True,
        builder="drafteu.train.draft_base:truncated",
        label=lambda s: f"L{s.layers}", depth=lambda s, depth: s.layers,
        describe=lambda s: f"the target's first {s.layers} layers, warmed up by logit distillation",
        check=_check_truncate),
    DraftBaseKind(
        "quantize", "the target itself at 8 or 4 bits (torchao): no training; docs/method.md §15",
        # measured on the run's held-out answers; no training, no data of its own
        reads=("target", "seed", "draft_base.model", "draft_base.quantize", "draft_base.heldout"),
        unused=("layers", "train"), product="quantized.json", trains=False, own_data=False,
        builder="drafteu.train.draft_base:quantized",
        label=lambda s: f"Q{s.quantize.bits}", depth=lambda s, depth: depth,
        describe=lambda s: f"the target itself, quantized ({s.quantize.name}, torchao)",
        check=_check_quantize),
)}

MODEL_HELP = "sibling model (hub id / local dir), or built from the target: " + "; ".join(
    f"'{k.name}' ({k.help})" for k in KINDS.values())


def kind(model: str) -> DraftBaseKind | None:
    """The entry of ``draft_base.model``, or None for a sibling model (used as it is)."""
    return KINDS.get(model)

DEFAULT = "truncate"  # draft_base.model when a config does not say
