"""The one training loop every stage shares: batching of target samples, accelerate, resume.

Examples are (prompt ids, response ids).  Batches are *left*-padded with explicit position ids
(as in generation and scoring, so every token sits at the position it has there) and the
forward keeps only the last ``max response length + 1`` logits: every response token of the
batch is predicted inside that window, and the (B, L, V) prompt logits are never built.

Resume: every ``save_every`` optimizer steps the trainable weights, optimizer, scheduler and
step are written atomically to ``<dir>/checkpoint.pt``; a rerun continues from there and skips
the micro-batches already consumed (the batch order is a function of the seed only).
Several processes (``accelerate launch`` or ``torchrun``; gloo on CPUs): process r takes global
micro-batches r, r + P, ..., every process runs the same number of steps, DDP averages the
gradients, and only the main process writes checkpoints and adapters.

Precision: ``mixed_precision: auto`` is bf16 autocast only where bf16 is native
(``drafteu.hardware``); each stage enters a fresh accelerate state (``accelerate_stage``), so a
TRL baseline's settings never leak into the next stage.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu.errors import DraftEUError
from drafteu.progress import note, progress


@dataclass
class TrainConfig:
    """Optimizer and schedule (paper App. B, Tables 7 and 8)."""

    lr: float = field(default=7e-5, metadata={"help": "peak learning rate"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the data (fractions allowed)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps; overrides epochs"})
    batch_size: int = field(default=8, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=2, metadata={"help": "micro-batches per optimizer step"})
    warmup_steps: int = field(default=150, metadata={"help": "linear warm-up steps (capped at 10% of training when larger)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    scheduler: str = field(default="linear", metadata={"help": "linear or cosine decay after warm-up"})
    mixed_precision: str = field(default="auto", metadata={"help": "auto (bf16 autocast where the hardware has "
                                 "native bf16: CUDA with bf16, CPUs with AMX or AVX512-BF16; float32 elsewhere), "
                                 "bf16, or no"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise DraftEUError("lr must be > 0, batch_size and grad_accum >= 1")
        if self.epochs <= 0 and not self.max_steps:
            raise DraftEUError("epochs must be > 0 (or give max_steps)")
        if self.scheduler not in ("linear", "cosine"):
            raise DraftEUError(f"scheduler must be linear or cosine, got {self.scheduler!r}")
        if self.mixed_precision not in ("auto", "bf16", "no"):
            raise DraftEUError(f"mixed_precision must be auto, bf16 or no, got {self.mixed_precision!r}")


@dataclass
class Example:
    prompt_ids: list[int]
    response_ids: list[int]


def examples_from_rows(rows: list[dict], eos_id: int | None) -> list[Example]:
    """Training examples from samples.jsonl rows; responses that ended with EOS keep it."""
    out = []
    for r in rows:
        resp = list(r["response_ids"])
        if r.get("finish") == "eos" and eos_id is not None:
            resp.append(eos_id)
        if resp:
            out.append(Example(list(r["prompt_ids"]), resp))
    return out


def collate(batch: list[Example], pad_id: int, device) -> dict:
    """Left-padded ids, mask, position ids, and the response window.

    ``targets`` (B, W) are the ids predicted by the kept logits (B, W, V), W = max response
    length; ``loss_mask`` (B, W) marks response tokens.  Call the model with
    ``logits_to_keep = W + 1`` and drop the last logit.
    """
    seqs = [e.prompt_ids + e.response_ids for e in batch]
    width = max(len(s) for s in seqs)
    win = max(len(e.response_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    loss_mask = torch.zeros((len(batch), win), dtype=torch.float32)
    for i, (s, e) in enumerate(zip(seqs, batch, strict=True)):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
        loss_mask[i, win - len(e.response_ids):] = 1.0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return {
        "input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
        "targets": ids[:, width - win:].to(device), "loss_mask": loss_mask.to(device), "keep": win + 1,
    }


def window_logits(model, batch: dict) -> torch.Tensor:
    """(B, W, V) logits predicting the response window of ``batch``."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=batch["keep"])
    return out.logits[:, :-1]


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def _schedule(cfg: TrainConfig, total: int):
    warm = min(cfg.warmup_steps, max(1, total // 10)) if cfg.warmup_steps > 0 else 0

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * frac)) if cfg.scheduler == "cosine" else max(0.0, 1 - frac)

    return f


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    tmp.replace(path)


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


def wait_for_everyone() -> None:
    """A barrier across ``accelerate launch`` / ``torchrun`` processes (a no-op in one process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _micro_order(n_examples: int, cfg: TrainConfig, processes: int, seed: int) -> tuple[list[list[int]], int]:
    """(global micro-batch order, micro-batches per process).

    One optimizer step consumes ``grad_accum`` micro-batches on each of ``processes`` processes;
    process r takes global micro-batches r, r + P, r + 2P, ...  With ``max_steps`` every process
    runs exactly ``max_steps * grad_accum``; with ``epochs`` the global count is the epochs' and each
    process gets an equal share (rounded up, continuing into the next shuffle), so every process
    calls backward equally often and none waits for a gradient all-reduce that never comes.
    """
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    if cfg.max_steps:
        local = cfg.max_steps * cfg.grad_accum
    else:
        local = math.ceil(max(cfg.grad_accum, round(per_epoch * cfg.epochs)) / processes)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < local * processes:
        idx = list(range(n_examples))
        random.Random(f"{seed}:{epoch}").shuffle(idx)
        order += [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        epoch += 1
    return order[: local * processes], local


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
) -> dict:
    """Train the parameters of ``model`` that require grad; returns steps, loss, tokens/s, time,
    and the resolved mixed precision."""
    if not examples:
        raise DraftEUError(f"{desc}: no training examples (empty partition or empty data)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DraftEUError(f"{desc}: the model has no trainable parameters")
    device = params[0].device
    precision = resolve_precision(cfg, device, desc)
    with accelerate_stage(precision, device, gradient_accumulation_steps=cfg.grad_accum) as acc:
        stats = _fit(acc, model, params, examples, loss_fn, cfg, Path(ckpt_dir), pad_id, seed, desc)
    return stats | {"mixed_precision": precision}


def _fit(acc, model, params, examples, loss_fn, cfg: TrainConfig, ckpt_dir: Path, pad_id: int, seed: int,
         desc: str) -> dict:
    order, local_total = _micro_order(len(examples), cfg, acc.num_processes, seed)
    steps_total = math.ceil(local_total / cfg.grad_accum)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # The scheduler stays outside accelerate: prepared, it would step once per process per
    # optimizer step.  It is stepped below on every real (synchronized) optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_total))
    model, optimizer = acc.prepare(model, optimizer)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "checkpoint.pt"
    step, tokens, loss_ema, seconds_before, resumed_from = 0, 0, None, 0.0, None
    unwrapped = acc.unwrap_model(model)
    names = [n for n, p in unwrapped.named_parameters() if p.requires_grad]
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        own = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for n in names:
                own[n].copy_(state["params"][n])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens, loss_ema = state["step"], state["tokens"], state["loss"]
        # training time before the kill (absent from checkpoints older than this field: None)
        seconds_before, resumed_from = state.get("seconds"), step

    def save():
        if acc.is_main_process:
            own = dict(unwrapped.named_parameters())
            _atomic_save({"params": {n: own[n].detach().cpu() for n in names},
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "step": step, "tokens": tokens, "loss": loss_ema,
                          "seconds": None if seconds_before is None else seconds_before + time.time() - t0}, ckpt)

    model.train()
    t0, tokens_at_start = time.time(), tokens
    with progress(f"{desc} steps", total=steps_total, completed=step, enabled=acc.is_main_process) as bar:
        for local in range(step * cfg.grad_accum, local_total):
            batch = collate([examples[i] for i in order[local * acc.num_processes + acc.process_index]],
                            pad_id, acc.device)
            with acc.accumulate(model), acc.autocast():
                loss = loss_fn(model, batch)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            tokens += int(batch["loss_mask"].sum()) + int(batch["attention_mask"].sum())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DraftEUError(f"{desc}: the loss became {value} at step {step}; lower the learning rate")
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            if (local + 1) % cfg.grad_accum == 0 or local + 1 == local_total:
                scheduler.step()
                step += 1
                rate = (tokens - tokens_at_start) * acc.num_processes / max(time.time() - t0, 1e-9)
                bar.update(completed=step, info=f"loss {loss_ema:.4f}  {rate:.0f} tok/s")
                if step % cfg.save_every == 0:
                    save()
    save()
    wait_for_everyone()
    model.eval()
    seconds = time.time() - t0
    # "seconds": the training time of every step, across kills and resumes (None when an older
    # checkpoint did not record its part); "seconds_this_run": this process's share.
    return {"steps": step, "loss": loss_ema, "processes": acc.num_processes,
            "seconds": None if seconds_before is None else round(seconds_before + seconds, 2),
            "seconds_this_run": round(seconds, 2), "resumed_from": resumed_from,
            "tokens_per_s": (tokens - tokens_at_start) * acc.num_processes / max(seconds, 1e-9)}
