"""K LoRA drafts in one forward with batched matmuls: a faster equivalent of PEFT's mixed-adapter batch.

PEFT's mixed batch (``adapter_names=[...]``) loops, in every LoRA module, over the adapters,
gathering each one's rows, applying its A and B, and scattering the result back.  With K drafts
on one base that is K small gathers, matmul pairs and scatters per module, which dominates a
decoding step on a CPU.  Here the batch is laid out adapter-major (rows k*b .. k*b + b - 1 belong
to draft k, the layout ``DraftEnsemble`` and the speculative decoder already use), so each
module adds all K low-rank updates with two batched matmuls: (K, bL, in) x (K, in, r) x (K, r, out).
The numbers equal PEFT's (tested); dropout is off (inference only).

The per-module forwards are built once, so ``torch.compile`` traces the same functions on every
call (``compiled``: the static-cache decoding step of ``kvcache.StaticPrefixCache``).
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager

import torch

from drafteu.errors import DraftEUError


class FusedDrafts:
    """Call like the PeftModel with ``adapter_names`` = each of ``names`` repeated b times, in order.

    A name may be PEFT's ``"__base__"`` (that row runs the base model, as in PEFT's mixed batch):
    the target verifying proposals in the same forward as its proxy adapter uses
    ``["__base__", "proxy"]``, and ``["__base__"]`` alone runs the base model with every adapter
    off (no LoRA work at all).  Adapters may differ in rank and modules (K drafts and a proxy on the
    draft base: K + 1 rows): a module an adapter lacks adds nothing to its rows."""

    def __init__(self, peft_model, names: list[str]):
        self.model, self.names, self.k = peft_model, list(names), len(names)
        self.config = peft_model.config
        real = [n for n in self.names if n != "__base__"]
        self.layers = []  # (module, forward)
        others = []  # LoRA modules carrying only other adapters (another ensemble on a shared base): base only
        for module in peft_model.modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or not len(lora_a):
                continue
            if not real or not any(n in lora_a for n in real):  # base rows only: skip the LoRA update
                (self.layers if not real else others).append((module, self._base_forward(module)))
                continue
            if any(n in getattr(module, "lora_variant", {}) for n in real):
                raise DraftEUError("fused drafts support plain LoRA only (no DoRA or other variants)")
            a, b = _stacked(module, self.names)
            self.layers.append((module, self._lora_forward(module, a, b)))
        if not self.layers:
            raise DraftEUError("no LoRA modules carry the drafts' adapters")
        self._others = others
        self._call = peft_model
        # The shared trunk: when every adapter leaves the first s decoder layers alone (LoRA on the top
        # layers only, ``drafts.lora_layers``), those layers are the same for the K drafts and run once.
        lora_layers = {int(m.group(1)) for name, mod in peft_model.named_modules()
                       if mod in {mo for mo, _ in self.layers} and (m := re.search(r"\.layers\.(\d+)\.", name))}
        decoder = _decoder_layers(peft_model)
        self.trunk = min(lora_layers) if real and lora_layers and decoder is not None else 0
        self._expand = decoder[self.trunk] if self.trunk else None
        self._top = list(decoder)[self.trunk:] if self.trunk else []

    def _lora_forward(self, module, a: torch.Tensor, b: torch.Tensor):
        base, k = module.base_layer, self.k

        def forward(x, *args, **kwargs):
            out = base(x, *args, **kwargs)
            xs = x.reshape(k, -1, x.shape[-1]).to(a.dtype)
            delta = torch.bmm(torch.bmm(xs, a), b)
            return out + delta.reshape(*out.shape).to(out.dtype)
        return forward

    @staticmethod
    def _base_forward(module):
        base = module.base_layer

        def forward(x, *args, **kwargs):
            return base(x, *args, **kwargs)
        return forward

    def parameters(self):
        return self.model.parameters()

    def compiled(self, **compile_kwargs) -> FusedDrafts:
        """The same drafts, their forward run through ``torch.compile(**compile_kwargs)`` (a new
        object: this one stays eager, e.g. for scoring's variable-length forwards)."""
        other = copy.copy(self)
        other._call = torch.compile(self.model, **compile_kwargs)
        return other

    @contextmanager
    def _fused(self):
        for module, forward in self.layers + self._others:
            module.forward = forward
        try:
            yield
        finally:
            for module, _ in self.layers + self._others:
                del module.forward  # back to the class's (PEFT's) forward

    def _shares_trunk(self, input_ids: torch.Tensor, kwargs: dict) -> bool:
        """The trunk runs once per sequence when the K row blocks are the same b sequences (every
        scoring and decoding call: the adapter-major layout of one batch) and the KV cache grows per
        layer (a static cache holds one batch size for every layer)."""
        from transformers import StaticCache

        cache = next((v for k, v in kwargs.items() if k in ("cache", "past_key_values")), None)
        if self._expand is None or isinstance(cache, StaticCache):
            return False
        blocks = input_ids.reshape(self.k, -1, input_ids.shape[-1])
        return bool((blocks == blocks[:1]).all())

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, adapter_names: list[str] | None = None, **kwargs):
        rows = input_ids.shape[0]
        if rows % self.k:
            raise ValueError(f"{rows} rows are not {self.k} drafts x a batch")
        per = rows // self.k
        if adapter_names is not None and adapter_names != [n for n in self.names for _ in range(per)]:
            raise ValueError("fused drafts need the adapter-major layout: each name repeated per row, in order")
        with self._fused():
            if not self._shares_trunk(input_ids, kwargs):
                return self._call(input_ids=input_ids, **kwargs)
            # b rows through layers < trunk, then K blocks of them through the rest: every layer from
            # the trunk on tiles its b-row inputs (hidden states, mask, position embeddings) K times
            k = self.k

            def tile(x):
                if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == per:
                    return x.repeat(k, *([1] * (x.dim() - 1)))
                if isinstance(x, tuple):
                    return tuple(tile(y) for y in x)
                return x

            def expand(module, args, kw):
                return tuple(tile(a) for a in args), {key: tile(v) for key, v in kw.items()}

            sliced = {key: (v[:per] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == rows else v)
                      for key, v in kwargs.items()}
            handles = [layer.register_forward_pre_hook(expand, with_kwargs=True) for layer in self._top]
            try:
                return self._call(input_ids=input_ids[:per], **sliced)
            finally:
                for h in handles:
                    h.remove()


def _stacked(module, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, in, r) A and (K, r, out) scaled B of one LoRA module, one slab per name.  A row whose adapter
    is not on this module (``"__base__"``, or an adapter on other modules: the proxy's q/v LoRA among
    all-linear drafts) gets zeros, and ranks are padded with zeros to the largest: exact, as a zero
    update adds nothing."""
    lora_a, lora_b = module.lora_A, module.lora_B
    present = [n for n in names if n in lora_a]
    rank = max(lora_a[n].weight.shape[0] for n in present)
    like = lora_a[present[0]].weight
    d_in, d_out = like.shape[1], lora_b[present[0]].weight.shape[0]
    with torch.no_grad():
        a = torch.zeros(len(names), d_in, rank, dtype=like.dtype, device=like.device)
        b = torch.zeros(len(names), rank, d_out, dtype=lora_b[present[0]].weight.dtype, device=like.device)
        for k, n in enumerate(names):
            if n in lora_a:
                r = lora_a[n].weight.shape[0]
                a[k, :, :r] = lora_a[n].weight.T
                b[k, :r] = (lora_b[n].weight * module.scaling[n]).T
    return a, b


def _decoder_layers(model):
    """The decoder's layer list (``model.model.layers`` under any PEFT wrapping), or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "model", None), "layers", None)
