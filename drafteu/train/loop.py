"""The one training loop every stage shares: batching of target samples, accelerate, resume.

Examples, batches and the response window's logits are ``train.batches``' (re-exported here).

Steps: one optimizer step averages the gradients of ``grad_accum`` micro-batches (the loop
reads: for each step, for each micro-batch, forward + backward; then one ``optimizer.step()``).
Every step is whole: with ``epochs``, a count of micro-batches that does not fill the last step is
completed with the first micro-batches of the next shuffle, so no gradient is ever computed and
dropped, and every step sees ``grad_accum`` micro-batches.

Resume: every ``save_every`` optimizer steps the trainable weights, optimizer, scheduler, step
and every random state the rest of training draws from (torch's CPU and device generators,
Python's and NumPy's, on every process) are written atomically to ``<dir>/checkpoint.pt``; a rerun
continues from there and skips the micro-batches already consumed (the batch order is a function
of the seed only), so a killed and resumed run gives the same weights bit for bit.  A loss that
draws randomness of its own derives it from ``batch["micro"]``, the micro-batch's index.
Several processes (``accelerate launch`` or ``torchrun``; gloo on CPUs): process r takes global
micro-batches r, r + P, ..., every process runs the same number of steps, DDP averages the
gradients, and only the main process writes checkpoints and adapters.

Memory: the losses never hold a (B, T, V) tensor (``train.losses``); what a micro-batch still holds is its
activations, every decoder layer's, kept for the backward.  ``activation_checkpointing`` keeps only each
layer's input and recomputes the layer in the backward (transformers' own checkpointing, non-reentrant):
the same gradients for about a third more compute, the activations' memory of one layer instead of all.

Precision: ``mixed_precision: auto`` is bf16 autocast only where bf16 is native
(``drafteu.hardware``); each stage enters a fresh accelerate state (``accelerate_stage``), so a
TRL baseline's settings never leak into the next stage.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu import fileio, hardware
from drafteu.errors import DraftEUError
from drafteu.progress import note, progress
from drafteu.train.batches import Example, collate, examples_from_rows, window_hidden, window_logits

__all__ = ["Example", "TrainConfig", "collate", "examples_from_rows", "fit", "window_hidden", "window_logits"]

# The held-out plateau (TrainConfig.eval_every): training stops once PLATEAU_PATIENCE measurements in a
# row have not improved on the best by PLATEAU_TOLERANCE (relative).
PLATEAU_PATIENCE, PLATEAU_TOLERANCE = 2, 0.01


@dataclass
class TrainConfig:
    """Optimizer and schedule (paper App. B, Tables 7 and 8)."""

    lr: float = field(default=7e-5, metadata={"help": "peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps (capped "
                                                             "at 10% of training when larger)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="linear", metadata={"help": "linear or cosine decay after warm-up"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast where the hardware has "
                                 "native bf16: CUDA with bf16, CPUs with AMX or "
                                 "AVX512-BF16; float32 elsewhere), bf16, or no"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})
    eval_every: int | None = field(default=None, metadata={
        "help": "with held-out data: measure the held-out loss every N optimizer steps and stop once it stops "
                f"improving ({PLATEAU_PATIENCE} measurements in a row without a {PLATEAU_TOLERANCE:.0%} gain on the "
                "best); null: train for the configured steps, measured at the end"})

    # how often progress is saved (resume is exact) and whether activations are recomputed (the same
    # gradients): how it is trained, not what
    location_fields = ("save_every", "activation_checkpointing")
    share_prefix: bool | None = field(default=None, metadata={
        "help": "run the prompts' common prefix (system prompt, worked examples) once per micro-batch and continue "
                "every sequence from its KV cache: the same loss to float rounding, a fraction of the prompt's "
                "compute; null or false: every sequence whole"})

    activation_checkpointing: bool | None = field(default=None, metadata={
        "help": "keep only each decoder layer's input in the forward and recompute the layer in the backward: the "
                "same gradients for about a third more compute, the activations' memory of one layer instead of all "
                "(docs/benchmarks.md, training memory); with share_prefix the prefix's cache is replayed for the "
                "recomputed layers; null or false: keep every layer's activations"})

    optional_fields = ("eval_every", "share_prefix")  # unset: the identity of runs made before the option existed

    def __post_init__(self):
        fileio.require_finite(self)
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise DraftEUError("lr must be > 0, batch_size and grad_accum >= 1")
        if not self.epochs > 0:
            raise DraftEUError(f"epochs must be > 0 (max_steps, when given, overrides it), got {self.epochs}")
        if self.scheduler not in ("linear", "cosine"):
            raise DraftEUError(f"scheduler must be linear or cosine, got {self.scheduler!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise DraftEUError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise DraftEUError(f"max_steps must be >= 1 (or null: train for `epochs`), got {self.max_steps}")
        if self.warmup_steps < 0 or self.save_every < 1 or self.weight_decay < 0:
            raise DraftEUError("warmup_steps and weight_decay must be >= 0, save_every >= 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise DraftEUError(f"eval_every must be >= 1 (or null), got {self.eval_every}")


def warmup_steps(cfg: TrainConfig, total: int) -> int:
    """Warm-up steps actually used: ``cfg.warmup_steps``, capped at 10% of the ``total`` steps."""
    return min(cfg.warmup_steps, max(1, total // 10)) if cfg.warmup_steps > 0 else 0


def lr_factor(cfg: TrainConfig, total: int):
    """step -> learning-rate multiplier: linear warm-up, then linear or cosine decay to 0."""
    warm = warmup_steps(cfg, total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.scheduler == "cosine" else max(0.0, 1 - frac)

    return f


def _atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file; a failed write (torch reports a full disk as a
    RuntimeError from its zip writer) leaves no temporary file and is an OSError naming the path."""
    import errno
    import shutil

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, RuntimeError):
            free = shutil.disk_usage(path.parent).free
            code = errno.ENOSPC if free < 64 << 20 else errno.EIO
            raise OSError(code, f"{os.strerror(code)} while saving a training checkpoint "
                          f"({free >> 20} MiB free)", str(path)) from e
        raise


@contextmanager
def fresh_accelerate_state():
    """Run one training stage in an accelerate state that does not leak into the next.

    accelerate keeps one process-wide ``AcceleratorState``; a stage that set it (a TRL trainer with
    bf16, say) made every later ``Accelerator`` with another precision raise "AcceleratorState has
    already been initialized".  Every training stage - the own loop and the TRL baselines - runs
    inside this context: the state is reset on entry and on exit.  The process group
    (``PartialState``) is kept, so ``accelerate launch`` / ``torchrun`` runs keep working.
    """
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()

    reset()
    try:
        yield
    finally:
        reset()


@contextmanager
def accelerate_stage(mixed_precision: str, device: torch.device, **kwargs):
    """A fresh ``Accelerator`` for one stage of the own loop (see ``fresh_accelerate_state``)."""
    from accelerate import Accelerator

    with fresh_accelerate_state():
        yield Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu", **kwargs)


def resolve_precision(cfg: TrainConfig, device: torch.device, desc: str) -> str:
    """``cfg.mixed_precision`` resolved on ``device`` ('bf16' or 'no'); says which and why."""
    from drafteu import hardware

    mp, why = hardware.resolve_mixed_precision(cfg.mixed_precision, device)
    note(f"{desc}: mixed precision {mp} on {device} ({why})")
    return mp


def optimizer_steps(n_examples: int, cfg: TrainConfig, processes: int = 1) -> int:
    """Optimizer steps of a training run: ``max_steps``, else the steps the epochs take (each step
    whole: the last is completed from the next shuffle, see the module docstring)."""
    if cfg.max_steps:
        return cfg.max_steps
    micro = math.ceil(max(cfg.grad_accum, round(math.ceil(n_examples / cfg.batch_size) * cfg.epochs)) / processes)
    return math.ceil(micro / cfg.grad_accum)


def micro_order(n_examples: int, cfg: TrainConfig, processes: int, seed: int) -> list[list[int]]:
    """The global micro-batch order: lists of example indices, ``optimizer_steps * grad_accum``
    micro-batches per process; process r takes global micro-batches r, r + P, r + 2P, ...

    Each epoch is a fresh shuffle of the examples from (seed, epoch); the order continues into the
    next shuffle as far as the steps need, so every process calls backward equally often and none
    waits for a gradient all-reduce that never comes."""
    need = optimizer_steps(n_examples, cfg, processes) * cfg.grad_accum * processes
    order: list[list[int]] = []
    epoch = 0
    while len(order) < need:
        idx = list(range(n_examples))
        random.Random(f"{seed}:{epoch}").shuffle(idx)
        order += [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        epoch += 1
    return order[:need]


def _rng_state() -> dict:
    """Every random state training draws from on this process."""
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _all_rng_states(acc) -> list[dict]:
    """Every process's random states, gathered to all (a collective: every process calls it)."""
    mine = _rng_state()
    if acc.num_processes == 1 or not torch.distributed.is_initialized():
        return [mine]
    states: list = [None] * acc.num_processes
    torch.distributed.all_gather_object(states, mine)
    return states


def fit(
    model: torch.nn.Module,
    examples: list[Example],
    loss_fn: Callable[[torch.nn.Module, dict], torch.Tensor],
    cfg: TrainConfig,
    ckpt_dir: Path,
    *,
    pad_id: int,
    seed: int = 0,
    desc: str = "train",
    on_step: Callable[[int, float, float], None] | None = None,
    heldout: Callable[[torch.nn.Module], float] | None = None,
) -> dict:
    """Train the parameters of ``model`` that require grad; returns steps, loss, tokens/s, time,
    and the resolved mixed precision.  ``on_step(step, lr, loss)`` is called after every
    optimizer step with the learning rate that step used.  ``heldout(model)``, a loss on held-out
    data (eval mode, no grad), is measured every ``cfg.eval_every`` steps and at the end; training
    stops on its plateau (``plateau``), and the result carries its curve and whether it got there."""
    if not examples:
        raise DraftEUError(f"{desc}: no training examples (empty partition or empty data)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DraftEUError(f"{desc}: the model has no trainable parameters")
    device = params[0].device
    precision = resolve_precision(cfg, device, desc)
    with accelerate_stage(precision, device) as acc:
        stats = _fit(acc, model, params, examples, loss_fn, cfg, Path(ckpt_dir), pad_id, seed, desc, on_step, heldout)
    hardware.give_back_memory(collect=True)  # what training left (cycles, freed buffers) goes before the next model
    return stats | {"mixed_precision": precision}


@contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool, desc: str = "train"):
    """Within the block, ``model``'s transformers model (under PEFT or not) recomputes each decoder layer
    in the backward instead of keeping its activations (transformers' checkpointing, non-reentrant: the
    same gradients); off again after it, so later passes of the same model run as before."""
    if not enabled:
        yield
        return
    from transformers import PreTrainedModel

    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None or not inner.supports_gradient_checkpointing:
        name = type(inner or model).__name__
        raise DraftEUError(f"{desc}: {name} has no activation checkpointing; set train.activation_checkpointing "
                           "to false (or null) for this model")
    _checkpointing_call(inner, "enable", {"use_reentrant": False})
    try:
        yield
    finally:
        _checkpointing_call(inner, "disable")
        if hasattr(inner, "_require_grads_hook"):  # the enable's hook on the embeddings, left by the disable
            inner.disable_input_require_grads()


def _checkpointing_call(model, action: str, kwargs: dict | None = None) -> None:
    """transformers' ``activation_checkpointing_<action>`` (its name since 5.2x), or the older
    ``gradient_checkpointing_<action>``, which newer versions keep with a FutureWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        name = "activation" if hasattr(model, f"activation_checkpointing_{action}") else "gradient"
        extra = {} if kwargs is None else {f"{name}_checkpointing_kwargs": kwargs}
        getattr(model, f"{name}_checkpointing_{action}")(**extra)


def plateau(curve: list[tuple[int, float]]) -> bool:
    """Whether the last PLATEAU_PATIENCE held-out measurements of ``curve`` [(step, loss)] all fail to
    improve on the best before them by PLATEAU_TOLERANCE (relative)."""
    if len(curve) <= PLATEAU_PATIENCE:
        return False
    best = min(v for _, v in curve[:-PLATEAU_PATIENCE])
    return all(v > best * (1 - PLATEAU_TOLERANCE) for _, v in curve[-PLATEAU_PATIENCE:])


def _fit(acc, model, params, examples, loss_fn, cfg: TrainConfig, ckpt_dir: Path, pad_id: int, seed: int,
         desc: str, on_step, heldout=None) -> dict:
    procs, rank = acc.num_processes, acc.process_index
    order = micro_order(len(examples), cfg, procs, seed)
    steps_total = optimizer_steps(len(examples), cfg, procs)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scheduler stays outside accelerate (prepared, it would step once per process per step).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_total))
    model, optimizer = acc.prepare(model, optimizer)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "checkpoint.pt"
    unwrapped = acc.unwrap_model(model)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    step, tokens, loss_ema, curve, seconds_before, resumed_from = _resume(
        ckpt, unwrapped, names, optimizer, scheduler, procs, rank, desc)

    def save():
        rng = _all_rng_states(acc)  # collective: before the main-process-only write
        if acc.is_main_process:
            own = dict(unwrapped.named_parameters())
            _atomic_save({"params": {n: own[n].detach().cpu() for n in names},
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "step": step, "tokens": tokens, "loss": loss_ema, "rng": rng, "heldout": curve,
                          "seconds": None if seconds_before is None else seconds_before + time.time() - t0}, ckpt)

    def measure():  # in the training's precision: the losses apply the head outside the model's forward
        model.eval()
        with torch.no_grad(), acc.autocast():
            curve.append((step, float(heldout(unwrapped))))
        model.train()

    model.train()
    t0, tokens_at_start = time.time(), tokens
    every = cfg.eval_every if heldout is not None else None
    with (activation_checkpointing(unwrapped, bool(cfg.activation_checkpointing), desc),
          progress(f"{desc} steps", total=steps_total, completed=step, enabled=acc.is_main_process) as bar):
        while step < steps_total and not (every and plateau(curve)):
            lr = scheduler.get_last_lr()[0]
            for value, n_tokens in _accumulate(acc, model, loss_fn, examples, order, step, cfg, pad_id, desc):
                tokens += n_tokens
                loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if on_step is not None:
                on_step(step, lr, loss_ema)
            rate = (tokens - tokens_at_start) * procs / max(time.time() - t0, 1e-9)
            if every and step % every == 0:
                measure()
            held = f"  held-out {curve[-1][1]:.4f}" if curve else ""
            bar.update(completed=step, info=f"loss {loss_ema:.4f}{held}  {rate:.0f} tok/s")
            if step % cfg.save_every == 0 or (every and plateau(curve)):
                save()
    if heldout is not None and (not curve or curve[-1][0] != step):
        measure()
    save()
    fileio.barrier()
    model.eval()
    seconds = time.time() - t0
    # "seconds": the training time of every step, across kills and resumes (None when an older
    # checkpoint did not record its part); "seconds_this_run": this process's share.
    return {"steps": step, "loss": loss_ema, "processes": procs,
            "seconds": None if seconds_before is None else round(seconds_before + seconds, 2),
            "seconds_this_run": round(seconds, 2), "resumed_from": resumed_from,
            "tokens_per_s": (tokens - tokens_at_start) * procs / max(seconds, 1e-9)} | (
        {"heldout_curve": [list(c) for c in curve], "plateau": plateau(curve), "eval_every": every}
        if heldout is not None else {})


def _resume(ckpt: Path, unwrapped, names: list[str], optimizer, scheduler, procs: int, rank: int, desc: str):
    """(step, tokens, loss EMA, held-out curve, seconds trained before, step resumed from) of the
    checkpoint, loaded into the trained parameters, the optimizer, the scheduler and this process's
    RNG; a fresh start's values when there is none."""
    if not ckpt.exists():
        return 0, 0, None, [], 0.0, None
    state = _load_checkpoint(ckpt, desc)
    own = dict(unwrapped.named_parameters())
    with torch.no_grad():
        for n in names:
            own[n].copy_(state["params"][n])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state.get("rng")
    if rng is not None and len(rng) == procs:
        _set_rng_state(rng[rank])
    # training time before the kill: absent from checkpoints older than that field (None)
    return (state["step"], state["tokens"], state["loss"], [tuple(c) for c in state.get("heldout", [])],
            state.get("seconds"), state["step"])


def _accumulate(acc, model, loss_fn, examples, order, step: int, cfg: TrainConfig, pad_id: int, desc: str):
    """One optimizer step's gradients: ``grad_accum`` micro-batches, averaged; yields (loss, tokens)
    of each micro-batch."""
    procs, rank = acc.num_processes, acc.process_index
    for micro in range(cfg.grad_accum):
        local = step * cfg.grad_accum + micro
        batch = collate([examples[i] for i in order[local * procs + rank]], pad_id, acc.device,
                        share_prefix=bool(cfg.share_prefix))
        batch["micro"] = local
        last = micro == cfg.grad_accum - 1
        with (contextlib.nullcontext() if last else acc.no_sync(model)), acc.autocast():
            loss = loss_fn(model, batch)
            acc.backward(loss / cfg.grad_accum)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise DraftEUError(f"{desc}: the loss became {value} at step {step}; lower the learning rate")
        yield value, int(batch["loss_mask"].sum()) + int(batch["attention_mask"].sum())


def _load_checkpoint(path: Path, desc: str) -> dict:
    """A training checkpoint, or a DraftEUError naming the damaged file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a torn or foreign file: torch raises several kinds
        raise DraftEUError(f"{desc}: the checkpoint {path} is damaged ({str(e).splitlines()[0][:120]}); delete it "
                           "to restart this training from step 0") from None
