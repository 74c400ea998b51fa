"""The proxy p_mix by Online Stochastic Distillation (paper Sec. 3.4, App. B.1; docs/method.md §8).

p_mix = the target + a LoRA adapter (q_proj, v_proj; r 16, alpha 32).  At every micro-batch,
N_teacher *fresh* noise members (sigma 0.1, the §2 scheme) are drawn into the teacher, and the
loss is the mean over teachers of the forward KL(p_teacher || p_mix) over response tokens.  Its
minimizer is the teachers' mean (the BMA), which is why forward, not reverse, KL.

Teacher and student share one copy of the target's weights: the noise members and the proxy are
adapters on the same PEFT model (teachers run in one mixed-adapter batch, eval mode, no grad).

With ``base: draft_base`` the adapter sits on the draft base instead (a self-draft: the target
quantized; docs/method.md §8): the student is the draft base + LoRA, the teachers are still noise
members of the float target, and at scoring time p_mix is one more row of the drafts' fused pass -
K + 1 rows over one set of base weights, no target pass (the paper's cost accounting).

Outputs ``<out>/adapter/`` (a PEFT adapter on the target, or on the draft base), ``config.yaml``,
``manifest.json`` (including the held-out check below; ``base`` and, on a draft base, its identity).

Held-out check (Table 4's question, in its simplest form): on held-out responses, the mean
per-token KL(p_ref || p) from the mean p_ref of a fixed reference family (K_ref members, seeds
disjoint from training) to p = the proxy, against p = the raw target.  With ``train.eval_every`` the
same KL is measured during training and OSD stops on its plateau (``loop.plateau``); the manifest
keeps the curve and whether the plateau was reached.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu import adapters, contract, divergence, fileio, models
from drafteu.errors import DraftEUError
from drafteu.hardware import DEVICE_HELP
from drafteu.posterior import NoiseConfig, NoisyModel, family_seeds, member_seed
from drafteu.train.batches import window_hidden
from drafteu.train.draft_base import split_heldout
from drafteu.train.loop import TrainConfig, collate, examples_from_rows, fit, optimizer_steps
from drafteu.train.losses import Window, reduce_window, window_loss

PROXY = "proxy"
BASES = ("target", "draft_base")  # what the proxy's adapter sits on


@dataclass(kw_only=True)
class ProxySettings:
    """How p_mix is trained by OSD (paper Table 7): shared by `drafteu train-proxy` and the proxy
    section of an experiment config."""

    n_teacher: int = field(default=2, metadata={"help": "N_teacher: fresh noise members per batch"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of the proxy"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the proxy"})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout of the proxy"})
    lora_modules: tuple[str, ...] = field(default=("q_proj", "v_proj"), metadata={"help": "proxy LoRA modules"})
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        lr=3e-4, epochs=12, batch_size=8, grad_accum=8, warmup_steps=0, weight_decay=0.01, scheduler="linear"))
    warmup_ratio: float = field(default=0.1, metadata={"help": "warm-up as a fraction of the "
                                                               "steps (when warmup_steps is 0)"})
    heldout: float = field(default=0.1, metadata={"help": "fraction of questions held out for the KL check (0: none)"})
    reference_size: int = field(default=8, metadata={"help": "K_ref of the held-out reference family"})
    lora_layers: int | None = field(default=None, metadata={
        "help": "LoRA on the top N decoder layers only (None: every layer); on the draft base, the drafts' "
                "drafts.lora_layers keeps the trunk below them shared by all K + 1 rows"})
    base: str = field(default="target", metadata={
        "help": "what p_mix's LoRA sits on: 'target' (the paper: one target pass per scored token) or 'draft_base' "
                "(a self-draft base: p_mix is one more row of the drafts' fused pass, no target pass)"})

    optional_fields = ("lora_layers",)  # unset: the identity of proxies made before the option existed

    def __post_init__(self):
        fileio.require_finite(self)
        if self.base not in BASES:
            raise DraftEUError(f"proxy base must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.n_teacher < 1:
            raise DraftEUError(f"n_teacher must be >= 1, got {self.n_teacher}")
        if not 0 <= self.heldout < 1:
            raise DraftEUError(f"heldout must be in [0, 1), got {self.heldout}")
        adapters.check_lora(self.lora_r, self.lora_alpha, self.lora_dropout)
        if not 0 <= self.warmup_ratio < 1:
            raise DraftEUError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.reference_size < 1:
            raise DraftEUError(f"reference_size must be >= 1, got {self.reference_size}")
        if self.lora_layers is not None and self.lora_layers < 1:
            raise DraftEUError(f"proxy lora_layers must be >= 1 (or null: every layer), got {self.lora_layers}")

    def identity(self) -> dict:
        """The settings (``base`` only when it is not the target: runs made before the option keep
        their identity)."""
        return fileio.fields_identity(self, skip=("base",) if self.base == "target" else ())


@dataclass(kw_only=True)
class ProxyConfig(ProxySettings):
    """`drafteu train-proxy`: OSD for p_mix."""

    samples: list[Path] = field(metadata={"help": "samples.jsonl files of noisy-teacher answers (mixed equally)"})
    out: Path = field(metadata={"help": "output directory (a PEFT adapter on the target, or on the draft base)"})
    target: str = field(default="embedded", metadata={"help": "target model"})
    noise: NoiseConfig = field(default_factory=NoiseConfig, metadata={"help": "the fresh teachers' noise"})
    seed: int = field(default=0, metadata={"help": "seed of teachers, data order and held-out split"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    draft_base: str | None = field(default=None, metadata={
        "help": "with --base draft_base: the draft base (a train-draft-base directory, a quantized self-draft, "
                "or a sibling's hub id / directory)"})

    location_fields = ("samples", "out", "device", "draft_base")  # where the run lives: not part of its identity

    def __post_init__(self):
        super().__post_init__()
        self.samples = [Path(p) for p in (self.samples if isinstance(self.samples, (list, tuple)) else [self.samples])]
        self.out = Path(self.out)
        if (self.base == "draft_base") != (self.draft_base is not None):
            raise DraftEUError("--base draft_base needs --draft-base DIR (and --draft-base needs --base draft_base)")

    def identity(self) -> dict:
        """The settings and the content of the samples files and of the draft base (not where they are)."""
        out = super().identity() | {"samples_sha256": [_content(p) for p in self.samples]}
        return out | ({"draft_base": contract.base_identity(self.draft_base)} if self.draft_base is not None else {})


def _content(path: Path) -> str | None:
    return fileio.file_digest(path) if Path(path).is_file() else None


def _mix_equally(files: list[Path], seed: int) -> list[dict]:
    """Rows of every file, each file cut to the smallest one's size (equal thirds for 3 teachers)."""
    import random

    sets = []
    for f in files:
        rows = fileio.read_samples(f, "run drafteu generate --member K first")
        sets.append(rows)
    n = min(len(s) for s in sets)
    out = []
    for i, rows in enumerate(sets):
        rows = list(rows)
        random.Random(f"mix:{seed}:{i}").shuffle(rows)
        out += rows[:n]
    return out


# Bytes of the reference family's hidden states kept between held-out checks (beyond it, recomputed each time).
REFERENCE_CACHE_BYTES = 1 << 30


class HeldoutCheck:
    """Mean per-token KL(p_ref_mean || proxy) and KL(p_ref_mean || raw target) on held-out data.

    Neither the reference family nor the raw target trains, so their part - the family members' hidden
    states per batch and the raw target's KL - is computed on the first call and kept while the states fit
    in ``cache_bytes``; every later check (``train.eval_every``) then runs the proxy alone.  Every KL is
    reduced a chunk of positions at a time from hidden states (``losses.reduce_window``): no (B, W, V)
    tensor.  ``student``: the proxy's model when it is not the target's (a draft base + the proxy
    adapter); ``vocab``: the logits the two models share (None: all)."""

    def __init__(self, noisy: NoisyModel, examples, pad_id: int, reference: list[str], batch_size: int = 4,
                 cache_bytes: int = REFERENCE_CACHE_BYTES, share_prefix: bool = False, student=None,
                 vocab: int | None = None):
        self.noisy, self.examples, self.pad_id, self.reference = noisy, examples, pad_id, reference
        self.batch_size, self.cache_bytes, self.share_prefix = batch_size, cache_bytes, share_prefix
        self.student, self.vocab = student, vocab
        self._refs: list[Window] | None = None
        self._target: tuple[float, float] | None = None  # (sum of the raw target's KL, tokens)

    def _proxy(self, batch) -> Window:
        if self.student is None:
            return window_hidden(self.noisy.model, batch, adapters=[PROXY]).cut(self.vocab)
        was = self.student.training
        self.student.eval()
        try:
            return window_hidden(self.student, batch).cut(self.vocab)
        finally:
            self.student.train(was)

    @torch.no_grad()
    def __call__(self) -> dict:
        noisy = self.noisy
        device = next(noisy.model.parameters()).device
        refs, keep, kept, raw_sum, proxy_sum, count = [], self._refs is None, 0, 0.0, 0.0, 0.0
        for n, i in enumerate(range(0, len(self.examples), self.batch_size)):
            batch = collate(self.examples[i : i + self.batch_size], self.pad_id, device, self.share_prefix)
            mask = batch["loss_mask"]
            if self._refs is not None:
                ref = self._refs[n]
            else:
                ref = window_hidden(noisy.model, batch, adapters=self.reference).cut(self.vocab)
                kept += ref.states.numel() * ref.states.element_size()
                keep = keep and kept <= self.cache_bytes
                if keep:
                    refs.append(ref)
                else:
                    refs.clear()  # too large to keep: recomputed next time
            if self._target is None:
                with noisy.base() as m:
                    raw = window_hidden(m, batch).cut(self.vocab)
                raw_sum += float(reduce_window(_kl_to_mean, mask, ref, raw)[0].sum())
            proxy_sum += float(reduce_window(_kl_to_mean, mask, ref, self._proxy(batch))[0].sum())
            count += float(mask.sum())
        if keep and refs:
            self._refs = refs
        if self._target is None:
            self._target = (raw_sum, count)
        count = max(count, 1.0)
        return {"kl_ref_mean_to_proxy": proxy_sum / count, "kl_ref_mean_to_target": self._target[0] / count,
                "tokens": self._target[1]}


def _kl_to_mean(members: torch.Tensor, model: torch.Tensor) -> tuple[torch.Tensor]:
    """KL(mean of ``members`` (K, n, V) || ``model`` (1, n, V)) per position."""
    return (divergence.kl(divergence.mixture(members), model[0]),)


def osd_loss(noisy: NoisyModel, teachers: list[str], seed: int, model, batch: dict,
             vocab: int | None = None) -> torch.Tensor:
    """One OSD micro-batch: draw the teachers' noise afresh - from (seed, the micro-batch index), so a
    resumed run draws what an uninterrupted one does - and return the mean over teachers of the
    forward KL(p_teacher || p_mix) on the response tokens (``losses.window_loss``, a chunk of positions
    at a time).  ``model`` is p_mix: the target (``noisy.model``) with the proxy adapter active, or a
    draft base with it (``vocab``: the logits it shares with the target)."""
    for k, name in enumerate(teachers):
        noisy.set_member(name, member_seed("osd", seed, batch["micro"] + 1, k))  # re-drawn in place
    noisy.model.eval()  # PEFT's mixed-adapter batch runs in eval mode only
    with torch.no_grad():
        t = window_hidden(noisy.model, batch, adapters=teachers).cut(vocab)  # (N, B, W, H)
    model.train()
    return window_loss(window_hidden(model, batch).cut(vocab), batch["loss_mask"], kind="forward_kl", teachers=t)


def run(cfg: ProxyConfig) -> dict:
    """Train p_mix by OSD; save the adapter; check it against the raw target on held-out data.  One
    process writes OUT at a time."""
    with fileio.locked(cfg.out, "proxy"):
        return _run(cfg)


def _run(cfg: ProxyConfig) -> dict:
    from peft import LoraConfig

    started = time.time()
    rows = _mix_equally(cfg.samples, cfg.seed)
    contract.claim(cfg.out, fileio.identity(cfg), what="a proxy")
    if (cfg.out / "manifest.json").exists() and (cfg.out / "adapter" / "adapter_model.safetensors").exists():
        return fileio.json_load(cfg.out / "manifest.json")  # complete, from the same inputs: skip
    lm = models.load(cfg.target, device=cfg.device)
    pad, eos = lm.tokenizer.pad_token_id, lm.tokenizer.eos_token_id
    train_rows, held_rows = split_heldout(rows, cfg.heldout, cfg.seed)
    train_ex, held_ex = examples_from_rows(train_rows, eos), examples_from_rows(held_rows, eos)

    noisy = NoisyModel(lm.model, cfg.noise)
    teachers = noisy.set_members("teacher", [member_seed("osd", cfg.seed, -1, k) for k in range(cfg.n_teacher)])
    # the held-out reference family (seeds disjoint from training), before the proxy: its adapters never train
    reference = noisy.set_members("ref", family_seeds(cfg.seed + 10_000, cfg.reference_size, tag="proxy-ref")) \
        if held_ex else []
    # LoRA's initialization and dropout draw from torch's global generator: seed it, so the proxy
    # does not depend on what the process did before (a resumed `reproduce` starts at another stage)
    torch.manual_seed(member_seed("proxy", cfg.seed))
    def config(model):
        layers = adapters.top_layers(model, cfg.lora_layers, "proxy.lora_layers")
        return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=list(cfg.lora_modules), bias="none", layers_to_transform=layers,
                          layers_pattern="layers" if layers is not None else None)

    student, vocab, extra = _student(cfg, lm, config)
    if student is None:  # the paper's proxy: an adapter on the target, next to the teachers
        noisy.model.add_adapter(PROXY, config(lm.model))
        student = noisy.model
    student.set_adapter(PROXY)  # PEFT: only the active adapter's weights require grad
    for n, p in student.named_parameters():
        p.requires_grad_(f".{PROXY}." in n)
    if student is not noisy.model:
        noisy.model.requires_grad_(False)  # the teachers never train
    loss_fn = functools.partial(osd_loss, noisy, teachers, cfg.seed, vocab=vocab)
    tc = dataclasses.replace(cfg.train)  # a copy: the caller's config is never changed
    steps = optimizer_steps(len(train_ex), tc, int(os.environ.get("WORLD_SIZE", "1")))
    tc.warmup_steps = tc.warmup_steps or max(0, round(cfg.warmup_ratio * steps))

    last: dict = {}  # the latest held-out check: the one after the last step when fit measured it
    check_heldout = HeldoutCheck(noisy, held_ex, pad, reference, share_prefix=bool(tc.share_prefix),
                                 student=None if student is noisy.model else student, vocab=vocab)

    def held_kl(model) -> float:  # the plateau's measure: how far p_mix is from the family mean, held out
        last.update(check_heldout())
        return last["kl_ref_mean_to_proxy"]

    stats = fit(student, train_ex, loss_fn, tc, cfg.out / "trainer", pad_id=pad, seed=cfg.seed, desc="proxy (OSD)",
                heldout=held_kl if held_ex and tc.eval_every else None)
    student.eval()
    # fit measures after the last step unless a resumed checkpoint already had it: computed once
    check = dict(last) or (check_heldout() if held_ex else {})
    adapters.save_adapter(student, PROXY, cfg.out / "adapter")
    fileio.write_config(cfg.out, cfg)
    return fileio.write_manifest(cfg.out, "proxy", cfg, started, target=cfg.target, train_examples=len(train_ex),
                                heldout_examples=len(held_ex), n_teacher=cfg.n_teacher, train=stats, heldout=check,
                                base=cfg.base, **extra)


def _student(cfg: ProxyConfig, target: models.LoadedModel, config):
    """(p_mix's model with the proxy adapter (``config(model)``: its LoRA config), the vocabulary it
    shares with the target, manifest fields)
    for ``base: draft_base``; (None, None, {}) for the target (the adapter goes on it, next to the teachers)."""
    from peft import get_peft_model

    if cfg.base == "target":
        return None, None, {}
    base = models.load(cfg.draft_base, device=cfg.device)
    vocab = models.shared_vocab_size(target, base)
    torch.manual_seed(member_seed("proxy", cfg.seed))  # as on the target: loading may have drawn
    student = get_peft_model(base.model, config(base.model), adapter_name=PROXY)
    return student, vocab, {"draft_base": str(cfg.draft_base),
                            "draft_base_identity": contract.base_identity(cfg.draft_base, resolve=True)}
