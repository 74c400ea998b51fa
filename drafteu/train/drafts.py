"""Draft ensembles: DDD / IDD / FDD (LoRA SFT on target samples), untrained and K-only.

Paper Sec. 4.3, App. B.2, B.6; docs/method.md §6-7.  Every draft is a PEFT adapter on one shared base
(so K drafts run in one batched forward); a method directory holds

    manifest.json   method, S, M, base (model dir), adapters, partitions, timings
    s<i>_m<j>/      one PEFT adapter per draft (+ trainer/checkpoint.pt while training)

- ddd:       S disjoint partitions by question x M drafts per partition (seeds differ).
- idd:       S*M drafts on all the data, each started from its own initialization noise.
- fdd:       both.
- untrained: S*M noise copies (sigma, docs/method.md §7) of the base; no training.
- gkd, minillm: S*M on-policy TRL drafts on all the data, each from its own noise (baselines.py).
- konly:     one trained draft (the ddd s0_m0 adapter, trained here as ``draft/`` if not given) plus
             K = S*M noise copies of it, each one adapter (App. B.6 "K only"); the manifest's
             ``perturbs`` names the trained draft.

Initialization noise (IDD/FDD).  docs/method.md §7 merges a low-rank noise draw (sigma 0.5, q_proj
and v_proj, the §2 scheme) into the draft before training.  Here that noise is the adapter's
*initial value* instead: for q_proj/v_proj the first r_noise LoRA components start at
B = U, A = eps / scaling, so that scaling * B @ A = U @ eps exactly (the other components start
at B = 0, as in LoRA).  The starting point is identical; the draft stays a pure adapter on the
shared base, so IDD/FDD ensembles keep the one-forward batched evaluation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu import adapters, contract, fileio, models
from drafteu.errors import DraftEUError
from drafteu.generate import partition, partition_stats
from drafteu.hardware import DEVICE_HELP
from drafteu.methods import DRAFT_METHODS, named
from drafteu.posterior import NoiseConfig, NoisyModel, apply_init_noise, member_seed
from drafteu.train.batches import window_hidden
from drafteu.train.draft_base import split_heldout
from drafteu.train.loop import TrainConfig, collate, examples_from_rows, fit
from drafteu.train.losses import window_loss

METHODS = tuple(DRAFT_METHODS)


@dataclass(kw_only=True)
class DraftSettings:
    """How every draft of an ensemble is trained: shared by `drafteu train-drafts` and the drafts
    section of an experiment config (paper Table 8)."""

    partitions: int = field(default=2, metadata={"help": "S: disjoint data partitions"})
    per_partition: int = field(default=3, metadata={"help": "M: drafts per partition"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout"})
    lora_modules: str = field(default="all-linear", metadata={"help": "LoRA target modules "
                                                                      "(comma-separated or all-linear)"})
    lora_layers: int | None = field(default=None, metadata={
        "help": "LoRA on the top N decoder layers only (None: every layer); the K drafts then share the layers "
                "below, which run once for all of them (docs/method.md §15)"})
    max_new_tokens: int = field(default=400, metadata={"help": "gkd/minillm: length of on-policy samples (paper: 400)"})
    heldout: float | None = field(default=None, metadata={
        "help": "fraction of the draft data's questions held out from every draft: with train.eval_every, the "
                "SFT loss on them is measured during training, which stops on its plateau (the manifest keeps "
                "each draft's curve); null: no held-out data"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=7e-5, epochs=1.0, batch_size=8, grad_accum=2,
                                                                   warmup_steps=150))

    optional_fields = ("lora_layers", "heldout")  # off: the identity of ensembles made before the options existed

    def __post_init__(self):
        fileio.require_finite(self)
        if self.partitions < 1 or self.per_partition < 1:
            raise DraftEUError("partitions (S) and per_partition (M) must be >= 1")
        adapters.check_lora(self.lora_r, self.lora_alpha, self.lora_dropout)
        if self.max_new_tokens < 1:
            raise DraftEUError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.heldout is not None and not 0 < self.heldout < 1:
            raise DraftEUError(f"heldout must be in (0, 1) (or null: nothing held out), got {self.heldout}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise DraftEUError(f"lora_layers must be >= 1 (or null: every layer), got {self.lora_layers}")


@dataclass(kw_only=True)
class DraftsConfig(DraftSettings):
    """`drafteu train-drafts`: an S x M draft ensemble."""

    samples: Path = field(metadata={"help": "samples.jsonl of target answers (drafteu generate)"})
    out: Path = field(metadata={"help": "drafts root; the ensemble goes to OUT/<method>/"})
    base: str = field(metadata={"help": "draft base: a model dir (train-draft-base output), hub id or .gguf"})
    target: str = field(default="embedded", metadata={"help": "target model (vocabulary check)"})
    method: str = field(default=named("proposed"), metadata={"help": ", ".join(DRAFT_METHODS)})
    init_noise: NoiseConfig = field(default_factory=lambda: NoiseConfig(sigma=0.5),
                                    metadata={"help": "IDD/FDD initialization noise"})
    noise: NoiseConfig = field(default_factory=lambda: NoiseConfig(sigma=0.1),
                               metadata={"help": "untrained / K-only / GKD / MiniLLM noise"})
    seed: int = field(default=0, metadata={"help": "seed of partitions, LoRA init and data order"})
    konly_from: Path | None = field(default=None, metadata={"help": "konly: the trained draft adapter to perturb "
                                    "(a DDD ensemble's s0_m0 of the same data and "
                                    "seed; default: trained into OUT/konly/draft)"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    def __post_init__(self):
        super().__post_init__()
        self.samples, self.out = Path(self.samples), Path(self.out)
        self.konly_from = Path(self.konly_from) if self.konly_from is not None else None
        if self.method not in METHODS:
            raise DraftEUError(f"unknown draft method {self.method!r}; choose one of {', '.join(METHODS)}")

    # where inputs and outputs live: not part of what the ensemble is (a moved run is the same run)
    location_fields = ("samples", "out", "base", "konly_from", "device")

    def identity(self) -> dict:
        """The settings, the content of the samples file and what the base is (``contract.base_identity``)."""
        path = Path(self.samples)
        return fileio.fields_identity(self) | {"base": contract.base_identity(self.base),
                                              "samples_sha256": fileio.file_digest(path) if path.is_file() else None}

    @property
    def size(self) -> int:
        return self.partitions * self.per_partition


def adapter_names(cfg: DraftsConfig) -> list[str]:
    return [f"s{s}_m{m}" for s in range(cfg.partitions) for m in range(cfg.per_partition)]


def _sft_loss(model, batch, reduction: str = "mean"):
    """Cross-entropy on the target's tokens of the response window (no (B, W, V) logits)."""
    return window_loss(window_hidden(model, batch), batch["loss_mask"], kind="ce", targets=batch["targets"],
                       reduction=reduction)


def heldout_ce(examples, pad_id: int, batch_size: int = 8, share_prefix: bool = False):
    """model -> the mean per-token SFT loss on held-out ``examples`` (``fit``'s held-out measure)."""
    def measure(model) -> float:
        device = next(model.parameters()).device
        total, count = 0.0, 0.0
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i : i + batch_size], pad_id, device, share_prefix)
            total += float(_sft_loss(model, batch, reduction="sum"))
            count += float(batch["loss_mask"].sum())
        return total / max(count, 1.0)
    return measure


def train_one(cfg: DraftsConfig, base_dir: str, rows: list[dict], name: str, seed: int, init_noise: bool,
              directory: Path, tokenizer, held: list[dict] | None = None) -> dict:
    """LoRA SFT of one draft on ``rows``; saves the adapter to ``directory``.  ``held``: held-out rows
    whose loss ``fit`` measures every ``train.eval_every`` steps (its plateau stops training)."""
    from peft import get_peft_model

    torch.manual_seed(seed)  # LoRA A init
    base = models.load(base_dir, device=cfg.device).model
    peft_model = get_peft_model(base,
                                adapters.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_modules,
                                                           adapters.top_layers(base, cfg.lora_layers), base),
                                adapter_name=name)
    if init_noise:
        apply_init_noise(peft_model, name, cfg.init_noise, seed)
    examples = examples_from_rows(rows, tokenizer.eos_token_id)
    held_ex = examples_from_rows(held or [], tokenizer.eos_token_id)
    stats = fit(peft_model, examples, _sft_loss, cfg.train, directory.with_name(directory.name + ".trainer"),
                pad_id=tokenizer.pad_token_id, seed=seed, desc=f"{cfg.method} {name}",
                heldout=heldout_ce(held_ex, tokenizer.pad_token_id, share_prefix=bool(cfg.train.share_prefix))
                if held_ex else None)
    adapters.save_adapter(peft_model, name, directory)
    return stats


def _noise_adapters(base_model, names: list[str], noise: NoiseConfig, seeds: list[int], out: Path) -> None:
    noisy = NoisyModel(base_model, noise)
    for name, seed in zip(names, seeds, strict=True):
        noisy.set_member(name, seed)
        adapters.save_adapter(noisy.model, name, out / name)


def run(cfg: DraftsConfig) -> dict:
    """Train (or build) every draft of the ensemble that is not complete yet; write the manifest.
    One process writes OUT/<method> at a time."""
    with fileio.locked(cfg.out / cfg.method, f"{cfg.method} ensemble"):
        return _run(cfg)


def _run(cfg: DraftsConfig) -> dict:
    started = time.time()
    out = cfg.out / cfg.method
    rows = fileio.read_samples(cfg.samples)
    contract.claim(out, fileio.identity(cfg), what=f"a {cfg.method} ensemble")
    names = adapter_names(cfg)
    # All checks before any training: vocabulary, partitions.
    target_tok = models.load(cfg.target, tokenizer_only=True)
    base_lm = models.load(cfg.base, device=cfg.device)
    models.shared_vocab_size(target_tok, base_lm)
    method = DRAFT_METHODS[cfg.method]
    rows, held = split_heldout(rows, cfg.heldout or 0.0, cfg.seed)  # held out from every draft
    needs_parts = method.partitions
    parts = partition(rows, cfg.partitions, seed=cfg.seed) if needs_parts else [rows] * cfg.partitions
    stats = partition_stats(parts) if needs_parts else []
    out.mkdir(parents=True, exist_ok=True)
    fileio.write_config(out, cfg)

    timings, extra = BUILDERS[method.trainer](cfg, out, names, rows, parts, base_lm, held)
    base_dir = cfg.base
    fileio.barrier()  # under accelerate launch: every adapter is saved before the manifest says so
    manifest = fileio.write_manifest(
        out, "drafts", cfg, started, method=cfg.method, S=cfg.partitions, M=cfg.per_partition,
        # a local base is stored relative to the ensemble directory, so a copied or moved run keeps
        # loading its own base; hub ids and 'embedded' stay as they are
        base=os.path.relpath(Path(base_dir).resolve(), out.resolve()) if Path(base_dir).exists() else base_dir,
        base_is_path=Path(base_dir).exists(),
        base_absolute=str(Path(base_dir).resolve()) if Path(base_dir).exists() else None,
        target=cfg.target, adapters=names, partitions=stats, train=timings,
        **({"heldout_questions": len({r["qid"] for r in held})} if held else {}), **extra,
    )
    if fileio.is_main_process():
        (out / "partitions.json").write_text(json.dumps(
            {"seed": cfg.seed, "qids": [sorted({r["qid"] for r in p}) for p in parts] if needs_parts else None}
            | ({"heldout": sorted({r["qid"] for r in held})} if held else {})))
    return manifest


# -- one builder per kind of method (methods.DraftMethod.trainer); each returns (timings, more manifest fields)


def _untrained(cfg, out, names, rows, parts, base_lm, held):
    """S*M noise copies of the draft base (sigma = cfg.noise)."""
    seeds = [member_seed(cfg.method, cfg.seed, k) for k in range(cfg.size)]
    _noise_adapters(base_lm.model, names, cfg.noise, seeds, out)
    return {}, {}


def _konly(cfg, out, names, rows, parts, base_lm, held):
    """One trained draft (``konly_from``: DDD's s0_m0; else trained here as DDD's s0_m0 would be, into
    ``OUT/konly/draft``) plus K = S*M noise copies of it (``konly_adapters``), on the unchanged base."""
    timings = {}
    ddd_dir = cfg.konly_from
    if ddd_dir is None or not (ddd_dir / "adapter_model.safetensors").exists():
        ddd_dir = out / "draft"
        if not (ddd_dir / "adapter_model.safetensors").exists():
            timings["s0_m0"] = train_one(cfg, cfg.base, parts[0], "s0_m0", member_seed("draft", cfg.seed, 0, 0),
                                         False, ddd_dir, base_lm.tokenizer, held)
    seeds = [member_seed(cfg.method, cfg.seed, k) for k in range(cfg.size)]
    konly_adapters(base_lm.model, ddd_dir, names, cfg.noise, seeds, out)
    # the trained draft the members perturb (relative: a moved run keeps finding it), for the perturbation stage
    return timings, {"perturbs": os.path.relpath(Path(ddd_dir).resolve(), out.resolve())}


@torch.no_grad()
def konly_adapters(base_model, trained: Path, names: list[str], noise: NoiseConfig, seeds: list[int],
                   out: Path) -> None:
    """K-only members as single adapters: member k is the trained LoRA and noise draw k side by side,
    W + s B_t A_t + U_k eps_k exactly (the ranks concatenated on the noise modules: A = [A_t; eps],
    B = [s B_t, U], scaling 1).  Nothing is merged into the base, so a quantized base keeps its
    low-bit weights and every member is one more adapter of the ensemble's one batched forward."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from drafteu.posterior import draw_noise

    tcfg = LoraConfig.from_pretrained(str(trained))
    state = load_file(str(Path(trained) / "adapter_model.safetensors"))
    r_t, s_t, r_n = tcfg.r, tcfg.lora_alpha / tcfg.r, noise.rank
    targets = tcfg.target_modules
    if not isinstance(targets, str):
        targets = sorted(set(targets) | set(noise.target_modules))
    wider = {m: r_t + r_n for m in noise.target_modules}
    config = LoraConfig(r=r_t, lora_alpha=r_t, rank_pattern=wider, alpha_pattern=wider, target_modules=targets,
                        lora_dropout=0.0, init_lora_weights=False, bias="none", task_type="CAUSAL_LM")
    peft = get_peft_model(base_model, config, adapter_name=names[0])
    for name, seed in zip(names, seeds, strict=True):
        if name not in peft.peft_config:
            peft.add_adapter(name, config)
        for mod_name, module in peft.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or name not in lora_a:
                continue
            a, b = lora_a[name].weight, module.lora_B[name].weight  # (rank, in), (out, rank)
            a.zero_()
            b.zero_()
            a_t, b_t = state.get(f"{mod_name}.lora_A.weight"), state.get(f"{mod_name}.lora_B.weight")
            if a_t is not None:
                a[:r_t] = a_t.to(a)
                b[:, :r_t] = (b_t * s_t).to(b)
            if mod_name.rsplit(".", 1)[-1] in noise.target_modules:
                u, eps = draw_noise(noise, seed, mod_name, module.get_base_layer().weight)
                a[r_t:r_t + r_n] = eps.to(a)
                b[:, r_t:r_t + r_n] = u.to(b)
        adapters.save_adapter(peft, name, out / name)


def _trl(cfg, out, names, rows, parts, base_lm, held):
    """GKD / MiniLLM drafts through TRL, each from its own noise, on all the data (but ``held``: held
    out, not measured - TRL's trainers run their own loop)."""
    from drafteu.train import baselines

    baselines.require_trl()  # a missing TRL is an error before any work
    timings = {}
    for s in range(cfg.partitions):
        for m in range(cfg.per_partition):
            name = f"s{s}_m{m}"
            if not (out / name / "adapter_model.safetensors").exists():
                timings[name] = baselines.train(cfg.method, cfg, rows, name, member_seed(cfg.method, cfg.seed, s, m),
                                                out / name, base_lm.tokenizer)
    return timings, {}


def _sft(cfg, out, names, rows, parts, base_lm, held):
    """DDD / IDD / FDD: LoRA SFT of draft s_m on partition s (all data without partitions)."""
    timings = {}
    for s in range(cfg.partitions):
        for m in range(cfg.per_partition):
            name = f"s{s}_m{m}"
            if (out / name / "adapter_model.safetensors").exists():
                continue  # complete: skip
            seed = member_seed("draft", cfg.seed, s, m)
            timings[name] = train_one(cfg, cfg.base, parts[s], name, seed, DRAFT_METHODS[cfg.method].init_noise,
                                      out / name, base_lm.tokenizer, held)
    return timings, {}


BUILDERS = {"noise": _untrained, "copies": _konly, "trl": _trl, "sft": _sft}
