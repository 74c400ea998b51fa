"""The model passes behind every EU number: hidden states in padded batches, logits a chunk at a time.

EU needs one float per token, but a naive scorer holds (rows, T, V) logits per model: with K drafts,
a 262k vocabulary and a long answer that is gigabytes.  Here a ``HiddenSource`` runs a model (one
batch row per adapter) over a batch of (prompt, response) pairs and keeps only the *last hidden
state* at each scored position ((rows, N, H), N = the pairs' response tokens); the output head is
applied later, a chunk of positions at a time, by whoever reduces the logits to numbers
(``reduce_chunks``), so no (rows, T, V) tensor ever exists - Liger-Kernel's fused linear
cross-entropy / JSD idea, on inference.

Work computed once per batch:
- *the shared prefix* (system prompt + worked examples, ``prefix_len`` tokens every prompt starts
  with): its KV cache per adapter, computed on first use and reused by every later batch;
- *a prompt's tokens for its several answers*: the distinct prompts of a batch run once (right
  padded), then every answer continues from its prompt's rows of that KV cache, with an attention
  mask over the padding and explicit position ids (positions are unchanged, so the numbers equal
  full forwards to float rounding; tested).  Models with sliding-window layers share prompts only
  when every sequence fits in the window (the window counts cache slots, padding included);
- long inputs run in pieces of at most ``token_budget`` rows x positions, the KV cache growing, so
  a forward's activations stay bounded whatever the answer's length.

Positions (docs/method.md §1): the estimate for response token y_t uses the model's next-token
distribution given (prompt, y_<t), the hidden state at sequence position P + t - 2.  The last
response token is never fed.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from drafteu.kvcache import cache_kw, lcp, output_cache, sliding_window

# Float entries of one chunk of logits (all rows of every model being reduced together): 2^24
# float32 = 64 MiB; a chunk keeps at least MIN_CHUNK_POSITIONS positions so the head's matmul
# reads its weight for a useful number of rows.
CHUNK_ELEMENTS = 1 << 24
MIN_CHUNK_POSITIONS = 8
# Rows x positions of one forward (activations scale with it, the KV cache with the whole input).
TOKEN_BUDGET = 2048
# ``prefix_len="auto"``: the shortest prefix worth a KV cache of its own.
MIN_AUTO_PREFIX = 8

Pair = tuple[Sequence[int], Sequence[int]]


@dataclass
class Hidden:
    """Last hidden states of one source at the scored positions of a batch, and its output head.

    ``states`` (rows, N, H): every pair's response positions, packed in pair order; ``lengths``: the
    response length of each pair (they sum to N); ``head`` maps (..., H) hidden states to ``width``
    logits;
    ``vocab``: logits kept (the vocabulary range the models share; None keeps all)."""

    states: torch.Tensor
    lengths: list[int]
    head: Callable[[torch.Tensor], torch.Tensor]
    width: int  # logits per position, before the cut to ``vocab``
    vocab: int | None = None

    @property
    def columns(self) -> int:
        return min(self.width, self.vocab or self.width)

    @property
    def rows(self) -> int:
        return self.states.shape[0]

    @torch.no_grad()
    def logits(self, sl: slice) -> torch.Tensor:
        """(rows, n, V) logits at the packed positions ``sl`` (inference: no autograd graph)."""
        out = self.head(self.states[:, sl])
        return out if self.vocab is None else out[..., : self.vocab]

    def split(self, values: torch.Tensor) -> list[torch.Tensor]:
        """(N,) per-position values -> one (T_i,) tensor per pair."""
        return list(torch.split(values, self.lengths))


def chunk_slices(*hidden: Hidden, chunk_elements: int | None = None) -> list[slice]:
    """Slices of the packed positions such that one chunk's logits of every source together hold
    about ``chunk_elements`` (default ``CHUNK_ELEMENTS``) entries, and at least MIN_CHUNK_POSITIONS."""
    n = hidden[0].states.shape[1]
    vocab = max(h.columns for h in hidden)
    rows = sum(h.rows for h in hidden)
    step = max(MIN_CHUNK_POSITIONS, (chunk_elements or CHUNK_ELEMENTS) // max(1, rows * vocab))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


@torch.no_grad()
def reduce_chunks(fn: Callable[..., tuple[torch.Tensor, ...]], *hidden: Hidden,
                  chunk_elements: int | None = None) -> list[torch.Tensor]:
    """Apply ``fn`` to the logits of every source, a chunk of positions at a time (``chunk_slices``).

    ``fn`` receives one (rows, n, V) logits tensor per source (on the first source's device) and
    returns (n,) tensors; the result is each of them over all N positions (float32, CPU)."""
    device = hidden[0].states.device
    parts: list[list[torch.Tensor]] = []
    for sl in chunk_slices(*hidden, chunk_elements=chunk_elements):
        out = fn(*[h.logits(sl).to(device) for h in hidden])
        if not parts:
            parts = [[] for _ in out]
        for acc, r in zip(parts, out, strict=True):
            acc.append(r.float().cpu())
    if not parts:
        raise ValueError("no positions to reduce")
    return [torch.cat(acc) for acc in parts]


def unwrap(model):
    """The transformers model under a ``FusedDrafts`` runner and / or a PEFT wrapper."""
    model = getattr(model, "model", model) if type(model).__name__ == "FusedDrafts" else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _identity(x, *args, **kwargs):
    return x


class HiddenSource:
    """A model, the adapter rows it runs and its shared-prefix KV cache; ``hidden`` scores batches.

    ``names``: one batch row per adapter (PEFT adapter names, or a ``FusedDrafts`` runner's names);
    None runs the model as it is (one row).  A call may instead give each pair its own adapter row
    names (TokUR: a fresh draw per prompt).  ``context`` wraps every forward (e.g. adapters off).
    ``prefix_len``: tokens every prompt starts with, their KV cache computed once per adapter;
    ``"auto"`` finds it from the traffic (a server: the system prompt and worked examples every
    request shares): the longest prefix shared by the batch's prompts and the cached one, re-made
    when a batch shares less.
    ``batched=False`` runs one forward per adapter (``set_adapter``), without prefix caches: a
    reference path.  ``padding_side``: where a batch's shorter inputs are padded (right by default;
    left is there to test that padding changes no number).  ``share_prompts``: answers of one prompt
    continue from its KV cache (off: every pair is one full sequence after the prefix).
    The last batch's hidden states are kept, so estimators sharing a source (the proxy under several
    draft ensembles) pay one pass per batch.  ``fed`` counts the row-positions run through the model
    (padding and prefixes included): the cost stage's measure of the work done.
    """

    def __init__(self, model, names: Sequence[str] | None = None, *, prefix_len: int | str = 0,
                 context: Callable[[], AbstractContextManager] | None = None, batched: bool = True,
                 padding_side: str = "right", share_prompts: bool = True, token_budget: int = TOKEN_BUDGET):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be left or right, got {padding_side!r}")
        self.model, self.prefix_len, self.context, self.batched = model, prefix_len, context, batched
        self.padding_side, self.share_prompts, self.token_budget = padding_side, share_prompts, token_budget
        self.names = list(names) if names is not None else None
        self._prefix = None  # (prefix token ids, adapter names, DynamicCache)
        self._memo = None  # (key, Hidden)
        self._head = None  # (model, head fn, whether hidden states can be read)
        self.fed = 0

    @property
    def rows(self) -> int:
        return len(self.names) if self.names else 1

    def set_names(self, names: Sequence[str] | None) -> None:
        """Run other adapters from now on (or the same, re-drawn in place): the caches are stale."""
        self.names = list(names) if names is not None else None
        self.invalidate()

    def invalidate(self) -> None:
        """Forget the prefix cache and the last batch (call after changing the model's weights)."""
        self._prefix, self._memo = None, None

    # -- the output head -----------------------------------------------------------------------------

    def head(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], bool, int]:
        """(hidden -> logits, whether the forward can return hidden states, logits per position):
        checked once per model by comparing the model's own logits with the head applied to its
        hidden states."""
        if self._head is not None and self._head[0] is self.model:
            return self._head[1:]
        hf = unwrap(self.model)
        lm_head = hf.get_output_embeddings()
        config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
        cap = getattr(config, "final_logit_softcapping", None)

        def apply(h: torch.Tensor) -> torch.Tensor:
            logits = lm_head(h.contiguous())
            if cap:
                logits = torch.tanh(logits / cap) * cap
            return logits

        ids = torch.tensor([[1, 2]], device=next(hf.parameters()).device)
        with torch.no_grad():
            want = hf(input_ids=ids, logits_to_keep=1).logits
        ok = lm_head is not None and getattr(lm_head, "lora_A", None) is None
        if ok:  # a model whose forward does more after its head (a scale, ...) keeps its logits
            with torch.no_grad():
                with self.hidden_out():
                    states = hf(input_ids=ids, logits_to_keep=1).logits
                got = apply(states)
            ok = want.shape == got.shape and torch.allclose(want.float(), got.float(), rtol=1e-3, atol=1e-3)
        self._head = (self.model, apply if ok else _identity, ok, want.shape[-1])
        return self._head[1:]

    @contextlib.contextmanager
    def hidden_out(self):
        """The model's forward returns its last hidden states where it would return logits (its head
        an identity, a soft-capping of the logits off: ``head`` applies both)."""
        hf = unwrap(self.model)
        lm_head = hf.get_output_embeddings()
        saved = lm_head.__dict__.get("forward")
        cap = getattr(hf.config, "final_logit_softcapping", None)
        lm_head.forward = _identity
        if cap:
            hf.config.final_logit_softcapping = None
        try:
            yield
        finally:
            if saved is None:
                del lm_head.forward
            else:
                lm_head.forward = saved
            if cap:
                hf.config.final_logit_softcapping = cap

    def _ctx(self):
        return self.context() if self.context else nullcontext()

    def _call(self, ids, row_names, **kw):
        self.fed += ids.numel()
        kw = kw | ({"adapter_names": list(row_names)} if row_names is not None else {})
        return self.model(input_ids=ids, **kw)

    # -- scoring -------------------------------------------------------------------------------------

    @torch.no_grad()
    def hidden(self, pairs: Sequence[Pair], slots: Sequence[Sequence[str]] | None = None) -> Hidden:
        """Hidden states at the response positions of every pair (responses of >= 1 token; prompts of
        >= 1 token).  ``slots``: each pair's adapter names (one per row), default ``names``."""
        pairs = [(list(p), list(r)) for p, r in pairs]
        if any(not p or not r for p, r in pairs):
            raise ValueError("every pair needs a prompt and a response of at least one token")
        key = (tuple((tuple(p), tuple(r)) for p, r in pairs), None if slots is None else tuple(map(tuple, slots)))
        if self._memo is not None and self._memo[0] == key:
            return self._memo[1]
        head, hidden_ok, width = self.head()
        lengths = [len(r) for _, r in pairs]
        if slots is None:
            slots = [self.names] * len(pairs) if self.names else None
        with self._ctx(), (self.hidden_out() if hidden_ok else nullcontext()):
            if not self.batched and slots:  # one pair and one adapter at a time
                per_pair = []
                for pair, names in zip(pairs, slots, strict=True):
                    rows = []
                    for name in names:
                        self.model.set_adapter(name)
                        rows.append(self._batch([pair], None, use_prefix=False)[0])
                    per_pair.append(torch.stack(rows))
                states = torch.cat(per_pair, dim=1)
            else:
                states = self._batches(pairs, slots, use_prefix=True)
        out = Hidden(states=states, lengths=lengths, head=head, width=width)
        self._memo = (key, out)
        return out

    def _batches(self, pairs, slots, use_prefix: bool) -> torch.Tensor:
        """(rows, N, H): the pairs in batches whose KV cache (rows x tokens) fits twice the token budget."""
        rows = len(slots[0]) if slots else 1
        limit = 2 * self.token_budget
        out, start = [], 0
        while start < len(pairs):
            end, tokens = start, 0
            while end < len(pairs) and (end == start or tokens + rows * sum(map(len, pairs[end])) <= limit):
                tokens += rows * sum(map(len, pairs[end]))
                end += 1
            out.append(self._batch(pairs[start:end], slots[start:end] if slots else None, use_prefix))
            start = end
        return torch.cat(out, dim=1)

    def _usable_prefix(self, pairs) -> int:
        """The cached prefix length usable for every pair (0 when some prompt does not start with it)."""
        if self.prefix_len == "auto":
            return self._auto_prefix([p for p, _ in pairs])
        plen = self.prefix_len
        if plen <= 0 or any(len(p) <= plen for p, _ in pairs):
            return 0
        first = pairs[0][0][:plen]
        return plen if all(p[:plen] == first for p, _ in pairs) else 0

    def _auto_prefix(self, prompts: list[list[int]]) -> int:
        """The cached prefix when every prompt extends it, else the longest prefix the prompts (and the
        cached one) share - one prompt alone: all of it but its last token; 0 when that is short."""
        cached = self._prefix[0] if self._prefix is not None else None
        if cached and all(len(p) > len(cached) and p[: len(cached)] == cached for p in prompts):
            return len(cached)
        candidates = prompts + ([cached] if cached else [])
        n = lcp(candidates) if len(candidates) > 1 else len(prompts[0])
        n = min(n, min(len(p) for p in prompts) - 1)
        return n if n >= MIN_AUTO_PREFIX else 0

    def _prefix_cache(self, prefix: list[int], names: list[str] | None):
        """A KV cache of ``prefix`` for the rows ``names`` (the cached one when it covers them)."""
        if self._prefix is not None and self._prefix[0] == prefix and (
                names is None or all(n in self._prefix[1] for n in names)):
            return self._prefix
        rows = len(names) if names else 1
        ids = torch.tensor([prefix], device=self._device()).expand(rows, -1)
        cache = None
        for s in range(0, len(prefix), max(1, self.token_budget // rows)):
            e = min(len(prefix), s + max(1, self.token_budget // rows))
            pos = torch.arange(s, e, device=ids.device).expand(rows, -1)
            out = self._call(ids[:, s:e], names, position_ids=pos, use_cache=True, logits_to_keep=1,
                             **({} if cache is None else cache_kw(cache)))
            cache = output_cache(out)
        self._prefix = (prefix, list(names) if names else [None], cache)
        return self._prefix

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch(self, pairs, slots, use_prefix: bool) -> torch.Tensor:
        """(rows, sum T, H) for one batch: the prefix's KV cache, the distinct prompts once (when that
        saves tokens), then every answer."""
        device = self._device()
        b, rows = len(pairs), (len(slots[0]) if slots else 1)
        plen = self._usable_prefix(pairs) if use_prefix else 0
        unique = list(dict.fromkeys(n for s in slots for n in s)) if slots else None

        def row_names(per_seq):  # adapter-major: row k * n + i is slot k of sequence i
            return None if slots is None else [per_seq[i][k] for k in range(rows) for i in range(len(per_seq))]

        cache, past = None, 0
        if plen:
            _, names, pcache = self._prefix_cache(pairs[0][0][:plen], unique)
            cache, past = pcache, plen
            src = {n: i for i, n in enumerate(names)}
            src_rows = len(names)
        groups: dict[tuple, int] = {}
        gid = [groups.setdefault(tuple(p), len(groups)) for p, _ in pairs]
        first = {g: gid.index(g) for g in range(len(groups))}
        parts = [list(p)[plen:-1] for p in groups]  # the prompt minus its last token (fed with the answer)
        saved = sum((gid.count(g) - 1) * len(parts[g]) for g in range(len(groups)))
        window = sliding_window(unwrap(self.model).config)
        longest = max(len(p) + len(r) for p, r in pairs)
        share = self.share_prompts and saved > 0 and (window is None or longest <= window)
        if share:
            g_slots = [slots[first[g]] for g in range(len(groups))] if slots else None
            g_names = row_names(g_slots)
            if cache is not None:
                cache = _select(cache, self._index(g_names, src, src_rows, len(groups), rows), len(groups))
            width = max(len(x) for x in parts)
            if width:
                ids, mask, pos = self._pad(parts, past, [past] * len(groups), rows)
                cache = self._feed(ids, mask, pos, cache, g_names)[1]
                mask1 = mask
            else:
                mask1 = torch.ones(len(groups) * rows, past, dtype=torch.long, device=device)
            # every answer continues from its prompt's rows
            idx = torch.tensor([k * len(groups) + gid[i] for k in range(rows) for i in range(b)], device=device)
            if cache is not None:
                cache = _select(cache, idx, b, trunk_idx=torch.tensor(gid, device=device))
            inputs = [[p[-1]] + list(r[:-1]) for p, r in pairs]
            starts = [len(p) - 1 for p, _ in pairs]
            ids, mask2, pos = self._pad(inputs, 0, starts, rows)
            mask = torch.cat([mask1[idx], mask2], dim=1)
            offsets = [0] * b
        else:
            if cache is not None:
                cache = _select(cache, self._index(row_names(slots), src, src_rows, b, rows), b)
            inputs = [list(p)[plen:] + list(r[:-1]) for p, r in pairs]
            ids, mask, pos = self._pad(inputs, past, [past] * b, rows)
            offsets = [len(p) - 1 - plen for p, _ in pairs]
            if self.padding_side == "right" and all(len(x) == ids.shape[1] for x in inputs):
                mask = None  # no padding: causal attention alone
        hidden = self._feed(ids, mask, pos, cache, row_names(slots))[0]  # (rows * b, L, H)
        hidden = hidden.reshape(rows, b, *hidden.shape[1:])
        left = self.padding_side == "left"
        out = []
        for i, (_, r) in enumerate(pairs):
            o = offsets[i] + (ids.shape[1] - len(inputs[i]) if left else 0)
            out.append(hidden[:, i, o: o + len(r)])
        return torch.cat(out, dim=1)

    def _index(self, names, src: dict, src_rows: int, n: int, rows: int) -> torch.Tensor:
        """Rows of the prefix cache for the batch's rows (adapter-major)."""
        device = self._device()
        if names is None or src_rows == 1:
            return torch.zeros(rows * n, dtype=torch.long, device=device)
        return torch.tensor([src[x] for x in names], device=device)

    def _pad(self, seqs: list[list[int]], past: int, starts: list[int], rows: int):
        """Padded (rows * n, L) ids, their (rows * n, past + L) attention mask and (rows * n, L) positions
        (each sequence's positions count from its ``start``)."""
        device = self._device()
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), past + width, dtype=torch.long)
        mask[:, :past] = 1
        pos = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            at = width - len(s) if self.padding_side == "left" else 0
            ids[i, at: at + len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, past + at: past + at + len(s)] = 1
            pos[i, at: at + len(s)] = torch.arange(starts[i], starts[i] + len(s))
            pos[i, :at] = starts[i]
            pos[i, at + len(s):] = starts[i] + len(s) - 1
        rep = (rows, 1)
        return ids.repeat(*rep).to(device), mask.repeat(*rep).to(device), pos.repeat(*rep).to(device)

    def _feed(self, ids, mask, pos, cache, row_names):
        """Feed ``ids`` in pieces of the token budget, the cache growing: ((R, L, H) outputs, cache)."""
        rows, width = ids.shape
        step = max(1, self.token_budget // rows)
        past = mask.shape[1] - width if mask is not None else (cache.get_seq_length() if cache is not None else 0)
        outs = []
        for s in range(0, width, step):
            e = min(width, s + step)
            kw = {"position_ids": pos[:, s:e], "use_cache": True, "logits_to_keep": 0}
            if mask is not None:
                kw["attention_mask"] = mask[:, : past + e]
            if cache is not None:
                kw |= cache_kw(cache)
            out = self._call(ids[:, s:e], row_names, **kw)
            cache = output_cache(out)
            outs.append(out.logits)
        return torch.cat(outs, dim=1), cache


def _select(cache, idx: torch.Tensor, n: int, trunk_idx: torch.Tensor | None = None):
    """A new cache holding the rows ``idx`` of ``cache`` (the original is left as it is).

    A ``FusedDrafts`` shared trunk stores its layers once per sequence (not per adapter): those layers
    take ``trunk_idx`` (the source sequence of each of the ``n`` sequences), or row 0 repeated."""
    new = copy.copy(cache)
    new.layers = []
    full = max(layer.keys.shape[0] for layer in cache.layers if layer.keys is not None)
    for layer in cache.layers:
        lay = copy.copy(layer)
        if layer.keys is not None and layer.keys.numel():
            if layer.keys.shape[0] == full:
                rows = idx
            elif trunk_idx is not None and layer.keys.shape[0] > 1:
                rows = trunk_idx
            else:
                rows = torch.zeros(n, dtype=torch.long, device=idx.device)
            lay.keys, lay.values = layer.keys[rows], layer.values[rows]
        new.layers.append(lay)
    return new
