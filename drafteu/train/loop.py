"""The one training loop every stage shares: batching of target samples, accelerate, resume.

Examples are (prompt ids, response ids).  Batches are *left*-padded with explicit position ids
(as in generation and scoring, so every token sits at the position it has there) and the
forward keeps only the last ``max response length + 1`` logits: every response token of the
batch is predicted inside that window, and the (B, L, V) prompt logits are never built.

Resume: every ``save_every`` optimizer steps the trainable weights, optimizer, scheduler and
step are written atomically to ``<dir>/checkpoint.pt``; a rerun continues from there and skips
the micro-batches already consumed (the batch order is a function of the seed only).
Multi-GPU: under ``accelerate launch`` each process takes every P-th micro-batch and accelerate
averages the gradients; nothing else changes.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu.errors import DraftEUError
from drafteu.progress import progress


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
    mixed_precision: str = field(default="bf16", metadata={"help": "bf16 autocast or no"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N optimizer steps"})

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1:
            raise DraftEUError("lr must be > 0, batch_size and grad_accum >= 1")
        if self.epochs <= 0 and not self.max_steps:
            raise DraftEUError("epochs must be > 0 (or give max_steps)")
        if self.scheduler not in ("linear", "cosine"):
            raise DraftEUError(f"scheduler must be linear or cosine, got {self.scheduler!r}")
        if self.mixed_precision not in ("bf16", "no"):
            raise DraftEUError(f"mixed_precision must be bf16 or no, got {self.mixed_precision!r}")


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
    """Train the parameters of ``model`` that require grad; returns steps, loss, tokens/s, time."""
    from accelerate import Accelerator
    if not examples:
        raise DraftEUError(f"{desc}: no training examples (empty partition or empty data)")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DraftEUError(f"{desc}: the model has no trainable parameters")
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision="no")
    per_epoch = math.ceil(len(examples) / cfg.batch_size)
    micro_total = cfg.max_steps * cfg.grad_accum if cfg.max_steps else max(cfg.grad_accum, round(per_epoch * cfg.epochs))
    steps_total = math.ceil(micro_total / cfg.grad_accum)
    order: list[list[int]] = []
    epoch = 0
    while len(order) < micro_total:
        idx = list(range(len(examples)))
        random.Random(f"{seed}:{epoch}").shuffle(idx)
        order += [idx[i : i + cfg.batch_size] for i in range(0, len(idx), cfg.batch_size)]
        epoch += 1
    order = order[:micro_total]

    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, steps_total))
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt = ckpt_dir / "checkpoint.pt"
    step, tokens, loss_ema = 0, 0, None
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

    def save():
        if acc.is_main_process:
            own = dict(unwrapped.named_parameters())
            _atomic_save({"params": {n: own[n].detach().cpu() for n in names},
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "step": step, "tokens": tokens, "loss": loss_ema}, ckpt)

    model.train()
    autocast = torch.autocast(acc.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    t0, tokens_at_start = time.time(), tokens
    with progress(f"{desc} steps", total=steps_total, completed=step, enabled=acc.is_main_process) as bar:
        for micro in range(step * cfg.grad_accum, micro_total):
            if micro % acc.num_processes != acc.process_index:
                continue
            batch = collate([examples[i] for i in order[micro]], pad_id, acc.device)
            with acc.accumulate(model), autocast:
                loss = loss_fn(model, batch)
                acc.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            tokens += int(batch["loss_mask"].sum()) + int(batch["attention_mask"].sum())
            value = float(loss.detach())
            if not math.isfinite(value):
                raise DraftEUError(f"{desc}: the loss became {value} at step {step}; lower the learning rate")
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            if (micro + 1) % cfg.grad_accum == 0 or micro + 1 == micro_total:
                step += 1
                rate = (tokens - tokens_at_start) / max(time.time() - t0, 1e-9)
                bar.update(completed=step, info=f"loss {loss_ema:.4f}  {rate:.0f} tok/s")
                if step % cfg.save_every == 0:
                    save()
    save()
    model.eval()
    seconds = time.time() - t0
    return {"steps": step, "loss": loss_ema, "seconds": round(seconds, 2),
            "tokens_per_s": (tokens - tokens_at_start) / max(seconds, 1e-9)}
