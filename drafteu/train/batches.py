"""Training examples, their batches and the hidden states of their response windows.

Examples are (prompt ids, response ids).  Batches are *left*-padded with explicit position ids
(as in generation and scoring, so every token sits at the position it has there) and the
forward keeps only the last ``max response length + 1`` positions' hidden states: every response
token of the batch is predicted inside that window; the output head is applied by the losses a
chunk of positions at a time (``train.losses``), so no (B, W, V) logits tensor is built.

Shared prefix (``TrainConfig.share_prefix``): the prompts of a micro-batch that start with the same
tokens (a system prompt, worked examples) run that prefix once; its KV cache is repeated for every
sequence, whose rest follows right-padded (so a sliding window sees the same tokens as in a whole
sequence), and the response window is gathered from the last hidden states before the output head.
The loss and its gradient equal the whole sequences' to float rounding (the repeat's backward sums
the rows' gradients into the one prefix); LoRA dropout draws one mask for the prefix.

With activation checkpointing on (``TrainConfig.activation_checkpointing``), the prefix's forward
keeps its activations (one row) and fills the cache as before; the continuation's layers are
recomputed in the backward, so each cache layer is made replayable: before every update it returns to
its state after the prefix, and a recomputed layer attends to exactly what its first run did.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers.modeling_layers import GradientCheckpointingLayer

from drafteu.errors import DraftEUError
from drafteu.kvcache import cache_kw, lcp, output_cache
from drafteu.sources import HiddenSource
from drafteu.train.losses import Head, Window


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


# share_prefix: the shortest common prefix worth a forward of its own
MIN_SHARED_PREFIX = 8


def collate(batch: list[Example], pad_id: int, device, share_prefix: bool = False) -> dict:
    """Left-padded ids, mask, position ids, and the response window.

    ``targets`` (B, W) are the ids predicted at the window's positions, W = max response length;
    ``loss_mask`` (B, W) marks response tokens.  Call the model with ``logits_to_keep = W + 1`` and
    drop the last position (``window_hidden`` does).

    ``share_prefix``: when the prompts share at least MIN_SHARED_PREFIX leading tokens, the batch is
    laid out for ``window_logits`` to run them once (``prefix_ids`` (1, P); ``input_ids`` the rest,
    right-padded; ``gather`` (B, W) the rest's position predicting each window slot).
    """
    if share_prefix:
        shared = _shared_layout(batch, pad_id, device)
        if shared is not None:
            return shared
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


def shared_prefix_len(prompts: list[list[int]]) -> int:
    """Tokens a batch's prompts share at the start, each prompt keeping its last token (it predicts
    the first response token)."""
    return min(lcp(prompts), min(len(p) for p in prompts) - 1)


def _shared_layout(batch: list[Example], pad_id: int, device) -> dict | None:
    """``collate``'s shared-prefix layout, or None when the prompts share too little."""
    prompts = [e.prompt_ids for e in batch]
    plen = shared_prefix_len(prompts)
    if plen < MIN_SHARED_PREFIX:
        return None
    rests = [e.prompt_ids[plen:] + e.response_ids for e in batch]
    width, win = max(len(r) for r in rests), max(len(e.response_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), plen + width), dtype=torch.long)
    mask[:, :plen] = 1
    targets = torch.full((len(batch), win), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(batch), win), dtype=torch.float32)
    gather = torch.zeros((len(batch), win), dtype=torch.long)
    for i, (r, e) in enumerate(zip(rests, batch, strict=True)):
        n = len(e.response_ids)
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, plen: plen + len(r)] = 1
        targets[i, win - n:] = torch.tensor(e.response_ids)
        loss_mask[i, win - n:] = 1.0
        # response token j is predicted at rest position len(prompt) - 1 - plen + j
        gather[i, win - n:] = torch.arange(n) + len(e.prompt_ids) - 1 - plen
    pos = torch.arange(plen, plen + width).expand(len(batch), -1)
    return {
        "prefix_ids": torch.tensor([prompts[0][:plen]], device=device),
        "input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": pos.to(device),
        "targets": targets.to(device), "loss_mask": loss_mask.to(device), "gather": gather.to(device),
        "keep": win + 1,
    }


def window_hidden(model, batch: dict, adapters: list[str] | None = None) -> Window:
    """The response window of ``batch`` as last hidden states and the model's head (``losses.Window``):
    (B, W, H), or with ``adapters`` (PEFT adapter names, one mixed-adapter batch: eval mode) (K, B, W, H),
    one slab per adapter.  The losses apply the head a chunk of positions at a time.  A model whose
    head its hidden states cannot reproduce (a LoRA on the head, a scale after it) gives its logits."""
    b = batch["input_ids"].shape[0]
    k = len(adapters) if adapters else 1
    rep = (lambda t: t.repeat(k, 1)) if adapters else (lambda t: t)
    names = {"adapter_names": [a for a in adapters for _ in range(b)]} if adapters else {}
    inputs = {"input_ids": rep(batch["input_ids"]), "attention_mask": rep(batch["attention_mask"]),
              "position_ids": rep(batch["position_ids"])}
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    source, hidden_ok = _head_source(inner)
    head = Head.of(inner) if hidden_ok else None
    with source.hidden_out() if head is not None else contextlib.nullcontext():
        if "prefix_ids" in batch:
            checkpointed = _checkpointed(model)
            cache = _prefix_cache(model, batch, adapters, names, checkpointed)
            with _layers_set(checkpointed, _can_checkpoint_with_cache=True):  # the replayable cache
                out = model(**inputs, **names, **cache_kw(cache), use_cache=True, logits_to_keep=0).logits
            out = _gather(out, batch["gather"], k)
        else:
            out = model(**inputs, **names, use_cache=False, logits_to_keep=batch["keep"]).logits[:, :-1]
    return Window(out.reshape(k, b, *out.shape[1:]) if adapters else out, head)


def window_logits(model, batch: dict, adapters: list[str] | None = None) -> torch.Tensor:
    """(B, W, V) logits predicting the response window of ``batch`` ((K, B, W, V) with ``adapters``):
    the whole tensor the losses avoid, for tests and small models."""
    return window_hidden(model, batch, adapters).logits()


def _prefix_cache(model, batch: dict, adapters, names: dict, checkpointed: list[torch.nn.Module]):
    """The prefix's KV cache (one row per adapter), each row repeated for the batch's sequences;
    replayable where the continuation's layers are recomputed in the backward (``checkpointed``)."""
    b = batch["input_ids"].shape[0]
    prefix = batch["prefix_ids"].expand(len(adapters) if adapters else 1, -1)
    pre_names = {"adapter_names": list(adapters)} if adapters else {}
    with _layers_set(checkpointed, gradient_checkpointing=False):  # one row: kept, and it fills its cache
        cache = output_cache(model(input_ids=prefix, **pre_names, use_cache=True, logits_to_keep=1))
    cache.batch_repeat_interleave(b)  # row k * b + i: adapter k, sequence i (adapter-major, as ``names``)
    return _replayable(cache) if checkpointed else cache


def _checkpointed(model) -> list[torch.nn.Module]:
    """The modules transformers' activation checkpointing acts on in this pass (training mode,
    gradients on): the decoder layers it recomputes and the model that turns its cache off; none
    otherwise."""
    if not (model.training and torch.is_grad_enabled()):
        return []
    mods = [m for m in model.modules() if getattr(m, "gradient_checkpointing", None) is True]
    if any(isinstance(m, GradientCheckpointingLayer) for m in mods) and \
            not hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"):
        raise DraftEUError("train.activation_checkpointing with train.share_prefix needs a transformers whose "
                           "checkpointed layers can keep a KV cache (5.2x and later); upgrade transformers or turn "
                           "one of the two off")
    return mods


@contextlib.contextmanager
def _layers_set(layers: list[torch.nn.Module], **values):
    """Set attributes of ``layers`` for the block, then put back what each had."""
    missing = object()
    before = [{k: vars(m).get(k, missing) for k in values} for m in layers]
    for m in layers:
        for k, v in values.items():
            setattr(m, k, v)
    try:
        yield
    finally:
        for m, old in zip(layers, before, strict=True):
            for k, v in old.items():
                if v is missing:
                    delattr(m, k)
                else:
                    setattr(m, k, v)


def _replayable(cache):
    """``cache`` with every layer put back to its present state before each update: the first run of
    a layer appends to the prefix as usual, and its recomputation in the backward sees the prefix
    again, not the prefix and the first run's keys (a layer's update replaces its tensors, never
    writes into them, so the state is its attributes)."""
    for layer in cache.layers:
        state, update = dict(vars(layer)), layer.update

        def replay(*args, _layer=layer, _state=state, _update=update, **kwargs):
            vars(_layer).update(_state)
            return _update(*args, **kwargs)

        layer.update = replay
    return cache


def _gather(values: torch.Tensor, gather: torch.Tensor, k: int) -> torch.Tensor:
    """(k * B, L, X) -> (k * B, W, X): each row's window positions."""
    idx = gather.repeat(k, 1)
    return values.gather(1, idx[..., None].expand(-1, -1, values.shape[-1]))


def _head_source(model) -> tuple[HiddenSource, bool]:
    """(a ``HiddenSource`` of ``model``, whether its hidden states reproduce its logits through its head).
    The check runs once per model, in eval mode (no dropout draws); only its answer is kept on the model:
    a source kept there would reference the model back, a cycle that keeps a trained model - gigabytes -
    alive until Python's cycle collector happens to run (it counts objects, not bytes)."""
    source = HiddenSource(model)
    ok = model.__dict__.get("_drafteu_head_ok")
    if ok is None:
        was = model.training
        model.eval()
        try:
            ok = source.head()[1]
        finally:
            model.train(was)
        model.__dict__["_drafteu_head_ok"] = ok
    return source, ok
