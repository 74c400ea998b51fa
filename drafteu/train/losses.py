"""Training losses over hidden states, a chunk of positions at a time: no (B, T, V) tensor.

A trainer's model returns its last hidden states at the response window (``batches.window_hidden``);
the output head is applied here, ``CHUNK_ELEMENTS`` logits at a time, and each chunk is reduced to its
share of the loss at once.  For training, each chunk's gradient - with respect to its hidden states and,
where the head trains, the head's weight - is computed in the same pass (``torch.autograd.grad`` on the
chunk) and kept: a (positions, H) tensor and at most one head-sized one, never the logits.  The backward
then scales what was kept by the incoming gradient.  This is Liger-Kernel's fused-linear-loss design
(``LigerFusedLinearDistillationBase``: gradients computed in the forward, chunk by chunk), written for
drafteu's shapes: K teachers (the OSD proxy's fresh noise members; the draft base's one target), each with
its own head; soft-capping where the model has it; a loss mask whose masked positions are never fed to the
head at all; the vocabulary range a target and a sibling share.

Losses (``KINDS``), each a per-token value averaged over teachers then over the masked tokens:
``ce`` (cross-entropy on the target ids: the drafts' SFT), ``forward_kl`` KL(p_teacher || q) (the draft
base and the OSD proxy), ``reverse_kl`` KL(q || p_teacher), ``jsd`` (beta-weighted Jensen-Shannon).
The numbers and gradients equal the full logits' computation to float rounding (tests/test_losses.py);
the head runs in the precision autocast would give it (bf16 under bf16 autocast), the divergences in
float32, as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from drafteu import divergence
from drafteu.sources import CHUNK_ELEMENTS, MIN_CHUNK_POSITIONS, Hidden, reduce_chunks, unwrap

KINDS = ("ce", "forward_kl", "reverse_kl", "jsd")


@dataclass
class Head:
    """An output head as plain tensors: logits = softcap(h W^T + b), cut to the first ``vocab``
    columns.  ``cap``: the model's final-logit soft-capping (Gemma), None when it has none."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None
    cap: float | None = None
    vocab: int | None = None

    def __call__(self, h: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        w = self.weight if weight is None else weight
        out = F.linear(h.to(w.dtype), w, None if self.bias is None else self.bias.to(w.dtype))
        if self.cap:
            out = torch.tanh(out / self.cap) * self.cap
        return out if self.vocab is None else out[..., : self.vocab]

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    @staticmethod
    def of(model) -> Head | None:
        """The head of a transformers model (under PEFT / a runner) when it is a plain linear layer
        (``sources.HiddenSource.head`` checked that it reproduces the model's logits), else None."""
        hf = unwrap(model)
        lm_head = hf.get_output_embeddings()
        if type(lm_head) is not torch.nn.Linear:
            return None
        config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        return Head(lm_head.weight, lm_head.bias, getattr(config, "final_logit_softcapping", None))


@dataclass
class Window:
    """One model's response window: ``states`` (B, W, H) - or (K, B, W, H) for K adapters of one
    mixed-adapter batch - and the head that maps them to logits.  ``head`` None: ``states`` are the
    model's logits already (a head the hidden states cannot reproduce; ``vocab`` cuts them)."""

    states: torch.Tensor
    head: Head | None
    vocab: int | None = None

    def cut(self, vocab: int | None) -> Window:
        """The same window with its logits cut to the first ``vocab`` columns (None: unchanged)."""
        if vocab is None:
            return self
        if self.head is None:
            return Window(self.states, None, vocab if self.vocab is None else min(vocab, self.vocab))
        head = Head(self.head.weight, self.head.bias, self.head.cap,
                    vocab if self.head.vocab is None else min(vocab, self.head.vocab))
        return Window(self.states, head)

    def members(self) -> torch.Tensor:
        """States as (K, B, W, X): a single model's window is one member."""
        return self.states if self.states.dim() == 4 else self.states.unsqueeze(0)

    def logits(self) -> torch.Tensor:
        """The whole window's logits (tests and small inputs: this is the tensor the losses avoid)."""
        if self.head is None:
            return self.states if self.vocab is None else self.states[..., : self.vocab]
        return self.head(self.states)

    def hidden(self, mask: torch.Tensor) -> Hidden:
        """The masked positions as a scoring ``Hidden`` (rows = members), for ``reduce_chunks``."""
        keep = mask.reshape(-1) > 0
        states = self.members().flatten(1, 2)[:, keep]
        if self.head is None:
            return Hidden(states, [int(keep.sum())], _identity, states.shape[-1], self.vocab)
        return Hidden(states, [int(keep.sum())], self.head, self.head.width, self.head.vocab)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def per_token(kind: str, student: torch.Tensor, teachers: torch.Tensor | None, targets: torch.Tensor | None,
              beta: float = 0.5) -> torch.Tensor:
    """(n,) loss per position from (n, V) student logits, (K, n, V) teacher logits or (n,) target ids;
    float32, averaged over the K teachers."""
    s = student.float()
    if kind == "ce":
        return F.cross_entropy(s, targets, reduction="none")
    t = teachers.float()
    if kind == "forward_kl":
        return divergence.kl(t, s).mean(0)
    if kind == "reverse_kl":
        return divergence.kl(s, t).mean(0)
    if kind == "jsd":
        ls, lt = torch.log_softmax(s, -1).expand_as(t), torch.log_softmax(t, -1)
        m = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
        jsd = beta * (lt.exp() * (lt - m)).sum(-1) + (1 - beta) * (ls.exp() * (ls - m)).sum(-1)
        return jsd.clamp_min(0.0).mean(0)
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(KINDS)}")


def positions_per_chunk(rows: int, vocab: int, chunk_elements: int | None = None) -> int:
    """Positions of one chunk: ``rows`` logits rows (student + teachers) of ``vocab`` columns hold
    about ``chunk_elements`` (default ``sources.CHUNK_ELEMENTS``) entries."""
    return max(MIN_CHUNK_POSITIONS, (chunk_elements or CHUNK_ELEMENTS) // max(1, rows * vocab))


def _head_dtype(device: torch.device, weight: torch.Tensor) -> torch.dtype:
    """The precision the head's matmul runs in: autocast's where it is on, else the weight's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _teacher_logits(teachers: Window | None, t_states: torch.Tensor | None, weight: torch.Tensor | None,
                    sl: slice) -> torch.Tensor | None:
    if teachers is None:
        return None
    with torch.no_grad():
        chunk = t_states[:, sl]
        return chunk if teachers.head is None else teachers.head(chunk, weight)


class _FusedHeadLoss(torch.autograd.Function):
    """loss = sum over chunks of (per-token loss x weight) of head(h[chunk]); the gradients with
    respect to ``h`` and a trainable head weight are computed chunk by chunk in the forward and scaled
    in the backward (the logits of a chunk exist only while it is reduced)."""

    @staticmethod
    def forward(ctx, h, weight, spec):
        head, dtype, step = spec["head"], spec["dtype"], spec["step"]
        train_weight = weight.requires_grad
        cast = weight if train_weight else weight.detach().to(dtype)  # a frozen head is cast once
        t_weight = spec["t_weight"]
        grad_h = torch.zeros_like(h)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if train_weight else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], step):
            sl = slice(start, start + step)
            t = _teacher_logits(spec["teachers"], spec["t_states"], t_weight, sl)
            with torch.enable_grad():
                hc = h[sl].detach().requires_grad_()
                w = cast.to(dtype) if train_weight else cast  # the cast in the graph: its gradient reaches weight
                logits = head(hc, w)
                y = None if spec["targets"] is None else spec["targets"][sl]
                loss = (per_token(spec["kind"], logits, t, y, spec["beta"]) * spec["w"][sl]).sum()
                wanted = [hc, weight] if train_weight else [hc]
                grads = torch.autograd.grad(loss, wanted)
            grad_h[sl] = grads[0]
            if train_weight:
                grad_w += grads[1].float()
            total += loss.detach()
        ctx.save_for_backward(grad_h, *([grad_w] if train_weight else []))
        ctx.train_weight, ctx.weight_dtype = train_weight, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        grad_h = saved[0] * grad_out.to(saved[0].dtype)
        grad_w = (saved[1] * grad_out).to(ctx.weight_dtype) if ctx.train_weight else None
        return grad_h, grad_w, None


def window_loss(student: Window, mask: torch.Tensor, *, kind: str, targets: torch.Tensor | None = None,
                teachers: Window | None = None, beta: float = 0.5, reduction: str = "mean",
                chunk_elements: int | None = None) -> torch.Tensor:
    """The ``kind`` loss of ``student``'s window over the ``mask``ed positions (B, W): per token,
    averaged over the teachers, then the mask-weighted mean (``reduction="mean"``) or sum (``"sum"``).
    ``targets`` (B, W): the ids ``ce`` predicts; ``teachers``: a window of one model (B, W, H) or K
    members (K, B, W, H), each position's distributions computed from its own head.  Differentiable
    in the student's states (and its head weight where it trains), with no (B, W, V) tensor."""
    if kind not in KINDS:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(KINDS)}")
    if (kind == "ce") != (targets is not None) or (kind != "ce") != (teachers is not None):
        raise ValueError(f"loss {kind!r}: ce takes targets, the divergences take teachers")
    keep = mask.reshape(-1) > 0
    weights = mask.reshape(-1)[keep].float()
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1.0)
    elif reduction != "sum":
        raise ValueError(f"reduction must be mean or sum, got {reduction!r}")
    h = student.states.reshape(-1, student.states.shape[-1])[keep]
    y = None if targets is None else targets.reshape(-1)[keep]
    t_states = None if teachers is None else teachers.members().flatten(1, 2)[:, keep]
    k = 0 if teachers is None else t_states.shape[0]
    if student.head is None:  # logits already: the same reduction, over the whole window at once
        t = _teacher_logits(teachers, t_states, None, slice(None))
        s = h if student.vocab is None else h[..., : student.vocab]
        return (per_token(kind, s, t, y, beta) * weights).sum()
    head = student.head
    dtype = _head_dtype(h.device, head.weight)
    t_head = None if teachers is None else teachers.head
    t_weight = None if t_head is None else t_head.weight.detach().to(_head_dtype(h.device, t_head.weight))
    spec = {"head": head, "dtype": dtype, "kind": kind, "beta": beta, "w": weights, "targets": y,
            "teachers": teachers, "t_states": t_states, "t_weight": t_weight,
            "step": positions_per_chunk(1 + k, head.vocab or head.width, chunk_elements)}
    if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
        return _FusedHeadLoss.apply(h, head.weight, spec)
    with torch.no_grad():  # a measurement: the same chunks, no gradients
        w = head.weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], spec["step"]):
            sl = slice(start, start + spec["step"])
            t = _teacher_logits(teachers, t_states, t_weight, sl)
            total += (per_token(kind, head(h[sl], w), t, None if y is None else y[sl], beta) * weights[sl]).sum()
        return total


def reduce_window(fn: Callable[..., tuple[torch.Tensor, ...]], mask: torch.Tensor, *windows: Window,
                  chunk_elements: int | None = None) -> list[torch.Tensor]:
    """``sources.reduce_chunks`` over the masked positions of windows: ``fn`` gets each window's
    (members, n, V) logits a chunk at a time and returns (n,) values; no gradient (measurements)."""
    return reduce_chunks(fn, *[w.hidden(mask) for w in windows], chunk_elements=chunk_elements)
