"""KV caches for decoding, and the KV-cache argument every forward passes.

- ``PrefixCache`` (decoding): one growing sequence; a new prompt re-uses the longest cached prefix
  it shares, rejected speculative proposals are rolled back by cropping.
- ``StaticPrefixCache`` (decoding, compiled): the same on preallocated KV tensors (transformers'
  ``StaticCache``); rollback is a position reset, and the few-token steps of decoding (1 token,
  gamma + 1 to verify) run through ``torch.compile`` — with CUDA graphs on CUDA, where a decode
  step is otherwise bound by kernel launches.  ``decoding_cache`` picks one of the two.
Scoring has its own batch-shaped prefix caches (``drafteu.sources.HiddenSource``: the shared
prefix per adapter, a batch's prompts once for their answers); ``generate.HFBackend`` keeps one
prefix expanded to a left-padded batch; both share ``lcp`` and ``cache_kw`` from here.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from drafteu.errors import DraftEUError


@functools.cache
def cache_arg() -> str:
    """The name of a model's KV-cache argument and output: ``cache`` since transformers 5.24
    (``past_key_values`` warns there and is removed from ``forward`` in 5.40, from ``generate`` in
    6.0); only ``past_key_values`` before 5.24, which the CPU build of vLLM (``make test-vllm``)
    still pins.  Every forward and ``generate`` drafteu makes passes its cache through
    ``cache_kw`` and reads it back with ``output_cache``."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("transformers").split(".")[:2])
    return "cache" if (major, minor) >= (5, 24) else "past_key_values"


def cache_kw(cache) -> dict:
    """``{cache_arg(): cache}``: the KV cache as a keyword argument of ``forward`` / ``generate``."""
    return {cache_arg(): cache}


def output_cache(output):
    """The KV cache a forward returned."""
    return getattr(output, cache_arg())


def lcp(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of ``seqs`` (0 for none)."""
    if not seqs:
        return 0
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def shared_prefix(prompts: Sequence[Sequence[int]]) -> int:
    """The prefix the scoring passes cache once for a batch of prompts: their longest common prefix when
    there are several (a shared system prompt, the worked examples), else 0 (one prompt shares nothing)."""
    return lcp(prompts) if len(prompts) > 1 else 0


def sliding_window(config) -> int | None:
    """The attention window of a model's sliding-window layers (None when every layer sees everything)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or (types is not None and "sliding_attention" not in types):
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


class PrefixCache:
    """A model plus its KV cache and the sequence tokens the cache holds.

    Kept across generations, it is a prompt cache: a new prompt re-uses the longest cached
    prefix it starts with (a shared system prompt or worked examples are computed once)."""

    def __init__(self, model, names: list[str] | None = None):
        self.model, self.names = model, names
        self.cache, self.ids = None, []
        self.window = sliding_window(model.config) if hasattr(model, "config") else None
        self.last = 0  # tokens fed by the last forward (what a sliding-window cache can give back)

    @property
    def fed(self) -> int:
        return len(self.ids)

    def reuse(self, seq: Sequence[int]) -> None:
        """Keep the longest cached prefix of ``seq`` (leaving at least its last token to feed)."""
        n, limit = 0, min(len(self.ids), len(seq) - 1)
        while n < limit and self.ids[n] == seq[n]:
            n += 1
        self.rollback(n)

    @torch.no_grad()
    def feed(self, seq: list[int], extra: Sequence[int], keep: int, device) -> torch.Tensor:
        """Feed ``(seq + extra)[fed:]``; returns (B, keep, V) logits of the last ``keep`` inputs."""
        full = list(seq) + list(extra)
        if len(full) <= self.fed:
            raise RuntimeError("nothing to feed: the cache already holds the whole sequence")
        b = len(self.names) if self.names else 1
        self._prepare(len(full), b, device)
        inp = full[self.fed:]
        ids = torch.tensor([inp], device=device).expand(b, -1)
        kw = {"adapter_names": self.names} if self.names else {}
        logits = self._forward(ids, min(keep, len(inp)), kw)
        self.ids = full
        return logits

    def _prepare(self, length: int, batch: int, device) -> None:
        """Make room for ``length`` positions of ``batch`` rows (a dynamic cache grows by itself)."""

    def _forward(self, ids: torch.Tensor, keep: int, kw: dict) -> torch.Tensor:
        if self.cache is None and self.window:
            # sliding-window layers keep only the window: recording the last forward's states lets
            # a rollback remove that forward's rejected tokens (transformers' past recording)
            from transformers import DynamicCache

            self.cache = DynamicCache(config=self.model.config)
            self.cache.activate_past_recording()
        elif self.cache is not None and self.window:
            self.cache.crop(0)  # what the previous forward kept past the window is no longer needed
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep, **cache_kw(self.cache), **kw)
        self.cache = output_cache(out)
        self.last = ids.shape[1]
        return out.logits

    def rollback(self, valid: int) -> None:
        """Keep the first ``valid`` cached tokens (the rest were rejected proposals).  A sliding-window
        cache can only give back tokens of its last forward; further back it starts again (the next
        feed recomputes the sequence: the same numbers, more work)."""
        if self.fed > valid:
            if valid == 0 or (self.window and self.fed - valid > self.last):
                self.cache, self.ids = None, []
                return
            self.cache.crop(valid - self.fed)  # a negative count: remove that many (all transformers 5.x)
            self.last -= self.fed - valid
            self.ids = self.ids[:valid]


class StaticPrefixCache(PrefixCache):
    """A ``PrefixCache`` on preallocated KV tensors, its short steps compiled.

    transformers' ``StaticCache`` writes each layer's keys and values at a position counter
    (``cumulative_length``) and attends over its whole capacity under a causal mask, so entries past
    the current position are never read: rolling back is setting the counter, and the next write
    overwrites the rejected entries.  Inputs of at most ``step_tokens`` tokens (decode steps and
    verifications) run through one ``torch.compile``d forward per input shape; longer ones (prompts)
    run eager, so prompt lengths never trigger recompilation.  The capacity starts at ``capacity``
    tokens and doubles when a sequence needs more (the cached prefix is copied; compiled steps
    recompile once for the new shape).  Logits equal ``PrefixCache``'s to float rounding (tested)."""

    step_tokens = 8

    def __init__(self, model, names: list[str] | None = None, *, compile: bool = True, capacity: int = 1024,
                 mode: str | None = None):
        super().__init__(model, names)
        self.capacity, self.compiled = capacity, compile
        self.config = model.config
        if compile:
            _allow_recompiles()
            kw = {"mode": mode, "dynamic": False}
            self._step = model.compiled(**kw) if hasattr(model, "compiled") else torch.compile(model, **kw)
        else:
            self._step = model

    def _prepare(self, need: int, batch: int, device) -> None:
        """A cache holding at least ``need`` positions for ``batch`` rows, keeping the cached prefix."""
        from transformers import StaticCache

        old = self.cache
        if old is not None and need <= self.capacity and old.layers[0].keys.shape[0] == batch:
            return
        while self.capacity < need:
            self.capacity *= 2
        cache = StaticCache(config=self.config, max_cache_len=self.capacity)
        if old is not None and old.layers[0].keys.shape[0] == batch:
            cache.early_initialization(batch, old.layers[0].keys.shape[1], old.layers[0].keys.shape[-1],
                                       old.layers[0].keys.dtype, old.layers[0].keys.device)
            for new_layer, old_layer in zip(cache.layers, old.layers, strict=True):
                new_layer.keys[:, :, : self.fed] = old_layer.keys[:, :, : self.fed]
                new_layer.values[:, :, : self.fed] = old_layer.values[:, :, : self.fed]
                new_layer.cumulative_length.fill_(self.fed)
        else:
            self.ids = []
        self.cache = cache

    def _forward(self, ids: torch.Tensor, keep: int, kw: dict) -> torch.Tensor:
        n = ids.shape[1]
        pos = torch.arange(self.fed, self.fed + n, device=ids.device)
        short = n <= self.step_tokens and self.fed > 0
        out = (self._step if short else self.model)(input_ids=ids, use_cache=True, cache_position=pos,
                                                    logits_to_keep=keep, **cache_kw(self.cache), **kw)
        # compiled with CUDA graphs, the output buffer is overwritten by the next replay
        return out.logits.clone() if (short and self.compiled) else out.logits

    def rollback(self, valid: int) -> None:
        if self.fed > valid:
            for layer in self.cache.layers:
                layer.cumulative_length.fill_(valid)
            self.ids = self.ids[:valid]


def _allow_recompiles(limit: int = 64) -> None:
    """Each (model, input shape) pair is one compiled graph of the same forward code; a speculative
    decoder has a few models and a few shapes each (1 token, gamma + 1, gamma + 2).  torch's default
    of 8 graphs per code object would silently fall back to eager past that."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, limit)


def decoding_cache(model, names: list[str] | None = None, *, compile: bool = False,
                   device: torch.device | None = None) -> PrefixCache:
    """The decoding cache for ``model``: ``StaticPrefixCache`` with compiled steps when ``compile``
    (``hardware.resolve_compile``), else the eager ``PrefixCache``."""
    if not compile or sliding_window(model.config):  # a static sliding window cannot roll back
        return PrefixCache(model, names)
    from drafteu.hardware import compile_mode

    device = device or next(model.parameters()).device
    return StaticPrefixCache(model, names, compile=True, mode=compile_mode(torch.device(device)))


class RaggedCache:
    """The KV caches of several sequences in one batch, for decoding them together (speculative
    rounds of several requests): B sequences x R adapter rows (``names``), adapter-major (row
    k * B + b is sequence b under adapter k, ``fused.FusedDrafts``' layout).

    Each forward feeds every sequence what its cache lacks - any number of tokens, right-aligned in
    the window with masked padding on its left - so rows never wait on one another.  A rollback is a
    count until the next forward, which first gathers each row's kept columns right-aligned again
    (one copy of the cache, only when some row rolled back).  Positions are each sequence's own, so the
    numbers equal one sequence decoded alone to float rounding.  Full-attention models only: a
    sliding-window cache drops the columns a rollback would gather (``sliding_window``: decode those one
    sequence at a time)."""

    def __init__(self, model, names: list[str] | None, batch: int):
        if hasattr(model, "config") and sliding_window(model.config):
            raise DraftEUError("a sliding-window model decodes one sequence at a time (its cache cannot be "
                               "realigned per row)")
        self.model, self.names = model, names
        self.rows = len(names) if names else 1
        self.cache = None
        self.ids: list[list[int]] = [[] for _ in range(batch)]
        self.cols: list[list[int]] = [[] for _ in range(batch)]  # the cache columns holding each sequence's tokens

    @property
    def batch(self) -> int:
        return len(self.ids)

    def fed(self, b: int) -> int:
        return len(self.ids[b])

    def rollback(self, b: int, valid: int) -> None:
        """Keep the first ``valid`` cached tokens of sequence ``b``."""
        del self.ids[b][valid:], self.cols[b][valid:]

    def keep(self, seqs: list[int]) -> None:
        """Keep only sequences ``seqs`` (in that order): the others finished."""
        if self.cache is not None and seqs != list(range(self.batch)):
            index = torch.tensor([k * self.batch + b for k in range(self.rows) for b in seqs], dtype=torch.long,
                                 device=self._device())
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        self.ids = [self.ids[b] for b in seqs]
        self.cols = [self.cols[b] for b in seqs]

    def _device(self):
        return next(self.model.parameters()).device

    def _align(self) -> int:
        """Gather every row's kept columns right-aligned; the cache's new length."""
        kept = [len(c) for c in self.cols]
        width = max(kept, default=0)
        length = self.cache.layers[0].keys.shape[2] if self.cache is not None else 0
        if all(c == list(range(length - n, length)) for c, n in zip(self.cols, kept, strict=True)) and width == length:
            return length
        device = self._device()
        index = torch.zeros(self.batch, width, dtype=torch.long)
        for b, c in enumerate(self.cols):
            if c:
                index[b, width - len(c):] = torch.tensor(c)
        index = index.repeat(self.rows, 1).to(device)  # adapter-major rows
        for layer in self.cache.layers:
            g = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys, layer.values = layer.keys.gather(2, g), layer.values.gather(2, g)
        self.cols = [list(range(width - n, width)) for n in kept]
        return width

    @torch.no_grad()
    def feed(self, fulls: list[list[int]], keep: int) -> torch.Tensor:
        """Feed sequence b ``fulls[b][fed(b):]`` (nothing for a sequence whose cache holds all of it);
        returns (R * B, keep, V) logits of the window's last ``keep`` positions: sequence b's last
        ``keep`` inputs when it fed at least that many."""
        for b, full in enumerate(fulls):
            if full[: self.fed(b)] != self.ids[b]:
                raise RuntimeError("a sequence's cached tokens are not a prefix of what it feeds; roll back first")
        length = self._align()
        new = [list(full[self.fed(b):]) for b, full in enumerate(fulls)]
        n = max(map(len, new))
        if n == 0:
            raise RuntimeError("nothing to feed: every cache holds its whole sequence")
        device = self._device()
        ids = torch.zeros(self.batch, n, dtype=torch.long)
        pos = torch.zeros(self.batch, n, dtype=torch.long)
        mask = torch.zeros(self.batch, length + n, dtype=torch.long)
        for b, tokens in enumerate(new):
            c, m = self.fed(b), len(tokens)
            if m:
                ids[b, n - m:] = torch.tensor(tokens)
                pos[b, n - m:] = torch.arange(c, c + m)
            mask[b, length - c: length] = 1
            mask[b, length + n - m:] = 1
        ids, mask, pos = (t.repeat(self.rows, 1).to(device) for t in (ids, mask, pos))  # adapter-major rows
        kw = {"adapter_names": [name for name in self.names for _ in range(self.batch)]} if self.names else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=keep,
                         **cache_kw(self.cache), **kw)
        self.cache = output_cache(out)
        for b, tokens in enumerate(new):
            self.cols[b] += list(range(length + n - len(tokens), length + n))
            self.ids[b] = list(fulls[b])
        return out.logits
