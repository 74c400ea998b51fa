"""The draft base: a layer-truncated copy of the target warmed up by logit distillation, or the
target itself quantized (``kind: quantize``, ``drafteu.quantize``; no training).

Offline there is no small sibling of the embedded target, so the "off-the-shelf" draft is the
target's first n layers (``models.truncate_layers``), fully fine-tuned to minimize the forward
KL(p_target || q_draft) over the response tokens of target samples.  It plays the role of the
paper's Llama-3.2-1B/3B and is the "Baseline (No Train)" row.  With a real sibling this stage is
skipped (point the drafts stage at the sibling instead).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu import contract, draft_base_kinds, fileio, models
from drafteu.errors import DraftEUError
from drafteu.hardware import DEVICE_HELP
from drafteu.methods import component
from drafteu.quantize import QuantizeSettings
from drafteu.train.batches import window_hidden
from drafteu.train.loop import Example, TrainConfig, collate, examples_from_rows, fit
from drafteu.train.losses import reduce_window, window_loss


@dataclass(kw_only=True)
class DraftBaseSettings:
    """How the draft base is built from the target: shared by `drafteu train-draft-base` and the
    draft_base section of an experiment config."""

    layers: int = field(default=6, metadata={"help": "truncate: decoder layers kept from the target"})
    heldout: float = field(default=0.1, metadata={"help": "fraction of questions held out to measure agreement "
                                                  "(and, for a quantized base, its KL to the target)"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=5e-4, epochs=1.0, batch_size=8, grad_accum=1,
                                                                   warmup_steps=10),
                               metadata={"help": "truncate: the warm-up"})
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings,
                                       metadata={"help": "quantize: the target at low precision"})

    def __post_init__(self):
        if self.layers < 1:
            raise DraftEUError(f"layers must be >= 1, got {self.layers}")
        if not 0 <= self.heldout < 1:
            raise DraftEUError(f"heldout must be in [0, 1), got {self.heldout}")


@dataclass(kw_only=True)
class DraftBaseConfig(DraftBaseSettings):
    """`drafteu train-draft-base`: truncate the target and warm the draft up."""

    samples: Path = field(metadata={"help": "samples.jsonl of target answers (drafteu generate)"})
    out: Path = field(metadata={"help": "output directory (an HF model directory + manifest)"})
    target: str = field(default="embedded", metadata={"help": "target model"})
    kind: str = field(default=draft_base_kinds.DEFAULT, metadata={
        "help": "; ".join(f"{k.name} ({k.help})" for k in draft_base_kinds.KINDS.values())})
    seed: int = field(default=0, metadata={"help": "seed of the data order and the held-out split"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    location_fields = ("samples", "out", "device")  # where the run lives: not part of its identity

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in KINDS:
            raise DraftEUError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def identity(self) -> dict:
        """The recipe and the content of the samples file (not where it is); a kind's unused
        settings are not part of it."""
        path = Path(self.samples)
        return fileio.fields_identity(self, draft_base_kinds.KINDS[self.kind].unused) | {
            "samples_sha256": fileio.file_digest(path) if path.is_file() else None}


KINDS = tuple(draft_base_kinds.KINDS)
MEASURED_ANSWERS = 64  # held-out answers a quantized base's KL and agreement are measured on


def split_heldout(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows, split by question."""
    from drafteu.generate import partition

    if not 0 <= fraction < 1:
        raise DraftEUError(f"held-out fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return rows, []
    parts = partition(rows, max(2, round(1 / fraction)), seed=seed)
    return [r for p in parts[1:] for r in p], parts[0]


@torch.no_grad()
def closeness(target, draft, examples: list[Example], pad_id: int, batch_size: int = 8) -> tuple[float, float]:
    """(top-1 agreement, mean forward KL(p_target || q_draft)) over the response tokens of ``examples``, both
    from one teacher-forced pass of each model per batch (their logits a chunk of positions at a time)."""
    from drafteu import divergence

    device = next(draft.parameters()).device
    agree = kl = total = 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i : i + batch_size], pad_id, device)
        mask = batch["loss_mask"]
        if mask.sum() == 0:
            continue
        same, div = reduce_window(lambda p, q: ((p[0].argmax(-1) == q[0].argmax(-1)).float(),
                                                divergence.kl(p[0].float(), q[0].float())),
                                  mask, window_hidden(target, batch), window_hidden(draft, batch))
        agree += float(same.sum())
        kl += float(div.sum())
        total += float(mask.sum())
    return agree / max(total, 1.0), kl / max(total, 1.0)


def top1_agreement(target, draft, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Fraction of response positions where draft and target (teacher-forced) agree on the argmax."""
    return closeness(target, draft, examples, pad_id, batch_size)[0]


def distill_loss(target, draft, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The draft base's objective: forward KL(p_target || q_draft) on the response tokens of ``batch``
    (chunked: ``losses.window_loss``)."""
    with torch.no_grad():
        teacher = window_hidden(target, batch)
    return window_loss(window_hidden(draft, batch), batch["loss_mask"], kind="forward_kl", teachers=teacher,
                       reduction=reduction)


def run(cfg: DraftBaseConfig) -> dict:
    """Truncate, distil, save; returns the manifest (agreement before/after, timings).  One process
    writes OUT at a time."""
    with fileio.locked(cfg.out, "draft base"):
        return _run(cfg)


def kl_to_target(target, draft, examples: list[Example], pad_id: int, batch_size: int = 8) -> float:
    """Mean per-token forward KL(p_target || q_draft) over the response tokens of ``examples``."""
    return closeness(target, draft, examples, pad_id, batch_size)[1]


def _portable(spec: str) -> str:
    """A model spec a recipe can name from anywhere: a local path made absolute; ids as given."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def quantized(cfg: DraftBaseConfig, rows: list[dict], started: float) -> dict:
    """A quantized self-draft: its recipe, and its KL and top-1 agreement to the target measured on
    held-out answers (all answers when nothing is held out), as ``models.load`` runs it."""
    from drafteu import quantize

    out = Path(cfg.out)
    lm = models.load(cfg.target, device=cfg.device)
    eos, pad = lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id
    _, held_rows = split_heldout(rows, cfg.heldout, cfg.seed)
    held = examples_from_rows(held_rows or rows, eos)[:MEASURED_ANSWERS]
    import torchao

    fileio.write_json(out / quantize.RECIPE, {"target": _portable(cfg.target), "quantize": fileio.plain(cfg.quantize),
                                             "library": f"torchao {torchao.__version__}"})
    draft = models.load(str(out), device=cfg.device).model
    device = next(draft.parameters()).device
    agree, kl = closeness(lm.model, draft, held, pad)
    fileio.write_config(out, cfg)
    return fileio.write_manifest(
        out, "draft_base", cfg, started, kind=cfg.kind, target=cfg.target, quantize=cfg.quantize.name,
        kernel=quantize.kernel(cfg.quantize, device), parameters=sum(p.numel() for p in draft.parameters()),
        weight_bytes=quantize.weight_bytes(draft), target_weight_bytes=quantize.weight_bytes(lm.model),
        heldout_examples=len(held), kl_to_target=kl, top1_agreement_after=agree, top1_agreement_before=None)


def _run(cfg: DraftBaseConfig) -> dict:
    started = time.time()
    out = Path(cfg.out)
    rows = fileio.read_samples(cfg.samples)
    contract.claim(out, fileio.identity(cfg), what="a draft base")
    kind = draft_base_kinds.KINDS[cfg.kind]
    if (out / "manifest.json").exists() and (out / kind.product).exists():
        return fileio.json_load(out / "manifest.json")  # complete, from the same inputs: skip
    return component(kind.builder)(cfg, rows, started)


def truncated(cfg: DraftBaseConfig, rows: list[dict], started: float) -> dict:
    """The target's first ``cfg.layers`` layers, warmed up by logit distillation on ``rows``."""
    out = Path(cfg.out)
    lm = models.load(cfg.target, device=cfg.device)
    target = lm.model.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    eos = lm.tokenizer.eos_token_id
    pad = lm.tokenizer.pad_token_id
    train_rows, held_rows = split_heldout(rows, cfg.heldout, cfg.seed)
    train_ex, held_ex = examples_from_rows(train_rows, eos), examples_from_rows(held_rows, eos)

    draft = models.truncate_layers(target, cfg.layers)
    for p in draft.parameters():
        p.requires_grad_(True)
    before = top1_agreement(target, draft, held_ex, pad) if held_ex else None

    loss_fn = functools.partial(distill_loss, target)
    stats = fit(draft, train_ex, loss_fn, cfg.train, out / "trainer", pad_id=pad, seed=cfg.seed, desc="draft base")
    after, after_kl = closeness(target, draft, held_ex, pad) if held_ex else (None, None)
    draft.save_pretrained(out)
    lm.tokenizer.save_pretrained(out)
    fileio.write_config(out, cfg)
    return fileio.write_manifest(
        out, "draft_base", cfg, started, kind=cfg.kind, layers=cfg.layers, target=cfg.target, kl_to_target=after_kl,
        parameters=sum(p.numel() for p in draft.parameters()), train_examples=len(train_ex),
        heldout_examples=len(held_ex), top1_agreement_before=before, top1_agreement_after=after, train=stats,
    )


# ---------------------------------------------------------------------------------------------
# The machine cache (``draft_base.cache``): a recipe built once per machine, copied into each run.


class CachedBase:
    """A draft base built once in ``home``: ``home/model`` (the model and its manifest) and
    ``home/files.json`` (its files' digests when it was made, checked before every reuse).  Where
    ``home`` lies and what keys it is the caller's (the pipeline: the target and the stage's digest)."""

    def __init__(self, home: Path):
        self.home, self.model, self.files = home, home / "model", home / "files.json"

    def verified(self) -> bool:
        """Whether the entry is complete and its files are the ones it was made with; a damaged
        entry is said and removed, so it is rebuilt (the entry's data is kept)."""
        import shutil

        from drafteu.progress import note

        if not (self.model / "manifest.json").exists() or not self.files.exists():
            return False
        try:
            expected = fileio.json_load(self.files)
            found = fileio.files_digest(self.model, skip=("trainer",))
        except (OSError, ValueError):
            expected, found = None, {}
        if found == expected:
            return True
        bad = sorted(k for k in set(found) | set(expected or {}) if (expected or {}).get(k) != found.get(k))
        note(f"the cached draft base {self.model} is damaged ({', '.join(bad[:3]) or 'files.json'} differs from when "
             "it was made): rebuilding it")
        shutil.rmtree(self.model, ignore_errors=True)
        self.files.unlink(missing_ok=True)
        return False

    def build(self, cfg: DraftBaseConfig, reused: bool) -> dict:
        """``run(cfg)`` into the entry's model directory (a complete entry is not redone) under the entry's
        lock: two runs building one recipe, one trains and the other waits."""
        with fileio.locked(self.home, "cached draft base"):
            manifest = run(dataclasses.replace(cfg, out=self.model))
            if fileio.is_main_process() and not reused:  # what the entry is checked against before reuse
                fileio.write_json(self.files, fileio.files_digest(self.model, skip=("trainer",)))
        return manifest

    def copy_to(self, out: Path, manifest: dict) -> None:
        """The entry's model, without its trainer state, as ``out`` with ``manifest``; atomic: a killed
        copy leaves no half-written draft base (the copy keeps runs relocatable)."""
        import shutil

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.model, tmp, ignore=shutil.ignore_patterns("trainer"))
        fileio.write_json(tmp / "manifest.json", manifest)
        shutil.rmtree(out, ignore_errors=True)  # an incomplete earlier attempt
        tmp.rename(out)
