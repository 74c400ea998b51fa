"""Quantized self-drafts: the target itself at 8 or 4 bits, through torchao (docs/method.md §15).

A draft base made this way is close to the target by construction (int8 per channel: KL ~0.002
nats/token on the embedded model's answers) where a truncated one is not (~2.6).  The base is a
*recipe* - the target's spec and how to quantize it - written to ``quantized.json`` in the draft
base directory; ``models.load`` of that directory loads the target and quantizes it, so the drafts,
``score``, ``speculate`` and the cost stage run the quantized model as it is (its int8 / int4
tensors and their kernels), never a float copy.  Round-to-nearest quantization is deterministic, so
the recipe gives the same weights on every load.

Why torchao: it quantizes any ``nn.Linear`` in place (``quantize_``), its int8 and int4 tensors
work under PEFT's LoRA (``TorchaoLoraLinear``: training, mixed-adapter batches, and drafteu's fused
K-adapter forward all run on them, tested), and it has the low-bit kernels on CUDA (int8
weight-only and int4 tinygemm matmuls for decoding).  Measured on this project's 2-core CPU
(docs/results): torchao's int8 weight-only is the most accurate of the options (KL to the target
0.007 on random text vs bitsandbytes' LLM.int8 0.047, torch's dynamic int8 1.1), while no option
ran a 135M model's forward faster than float32 there - eager torchao converts the int8 weights per
matmul on a CPU (``KERNELS`` says what runs where).

Schemes: ``weight-only`` (int8 per output channel, or per group of ``group_size``; int4 per group,
symmetric) and ``dynamic`` (int8 weights and per-token int8 activations: the int8 GEMM path).
Embeddings and the output head stay in float, as in the measurements the method cites.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from drafteu.errors import DraftEUError

RECIPE = "quantized.json"
SCHEMES = ("weight-only", "dynamic")


@dataclass
class QuantizeSettings:
    """How the target is quantized into a draft base (``draft_base.model: quantize``)."""

    bits: int = field(default=8, metadata={"help": "8 or 4"})
    group_size: int | None = field(default=None, metadata={
        "help": "weights sharing one scale along the input dimension (None: one per output channel at 8 bits, "
                "64 at 4 bits)"})
    scheme: str = field(default="weight-only", metadata={
        "help": "weight-only (low-bit weights, float activations) or dynamic (int8 weights and per-token int8 "
                "activations; 8 bits only)"})

    def __post_init__(self):
        if self.bits not in (8, 4):
            raise DraftEUError(f"bits must be 8 or 4, got {self.bits}")
        if self.scheme not in SCHEMES:
            raise DraftEUError(f"scheme must be one of {', '.join(SCHEMES)}, got {self.scheme!r}")
        if self.scheme == "dynamic" and self.bits != 8:
            raise DraftEUError("scheme dynamic is int8 only; use bits: 8 or scheme: weight-only")
        if self.group_size is not None and (self.group_size < 1 or self.group_size & (self.group_size - 1)):
            raise DraftEUError(f"group_size must be a power of 2 (or null), got {self.group_size}")

    @property
    def groups(self) -> int | None:
        """The group size used: the configured one, else 64 at 4 bits and per channel at 8."""
        return self.group_size if self.group_size is not None else (64 if self.bits == 4 else None)

    @property
    def name(self) -> str:
        return f"int{self.bits} {self.scheme}, " + (f"groups of {self.groups}" if self.groups else "per channel")


def require_torchao():
    """torchao's quantization API (its import-time notes about CUDA-only parts: ``drafteu.KNOWN_NOISE``)."""
    try:
        import torchao.quantization as tq
        from torchao.quantization.granularity import PerGroup, PerRow
    except ImportError as e:
        raise DraftEUError(f"a quantized draft base needs torchao: pip install 'torchao>=0.16' ({e})") from None
    return tq, PerGroup, PerRow


def torchao_config(q: QuantizeSettings):
    """The torchao ``quantize_`` config of a recipe."""
    tq, PerGroup, PerRow = require_torchao()
    granularity = PerGroup(q.groups) if q.groups else PerRow()
    if q.scheme == "dynamic":
        return tq.Int8DynamicActivationInt8WeightConfig(granularity=granularity)
    if q.bits == 8:
        return tq.Int8WeightOnlyConfig(granularity=granularity)
    return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(q.groups))


def _quantized_linear(module: torch.nn.Module, fqn: str) -> bool:
    """Every linear layer of the decoder; the output head and embeddings stay float."""
    return isinstance(module, torch.nn.Linear) and fqn.rsplit(".", 1)[-1] != "lm_head"


def apply(model: torch.nn.Module, q: QuantizeSettings) -> torch.nn.Module:
    """Quantize ``model``'s decoder linear layers in place (round to nearest, symmetric)."""
    import warnings

    # PEFT warns that LoRA on these weights cannot be merged: drafteu never merges into them
    warnings.filterwarnings("ignore", message=".*instantiated without `get_apply_tensor_subclass`.*")
    tq, _, _ = require_torchao()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.in_features % (q.groups or 1):
            raise DraftEUError(f"draft_base.quantize.group_size {q.groups} does not divide a layer's input size "
                               f"{m.in_features}; choose a smaller power of 2")
    tq.quantize_(model, torchao_config(q), filter_fn=_quantized_linear)
    model._drafteu_quantized = q
    return model


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model a PEFT wrapper holds) carries low-bit weights."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return any(isinstance(p, TorchAOBaseTensor) for p in model.parameters())


def kernel(q: QuantizeSettings, device: torch.device) -> str:
    """What runs each quantized matmul on ``device`` (the report says it next to the cost)."""
    if q.scheme == "dynamic":
        return "int8 x int8 GEMM (torch._int_mm) with per-token activation scales (torchao Int8Tensor)"
    if device.type == "cuda" and q.bits == 8:
        return "int8 weight-only matmul (torchao Int8Tensor; fused into the GEMM under torch.compile)"
    if q.bits == 8:
        return ("int8 weights converted to the activation dtype per matmul, then a float GEMM "
                "(torchao Int8Tensor, eager)")
    return ("int4 weights (stored in int8) dequantized per matmul, then a float GEMM (torchao IntxUnpackedToInt8Tensor)"
            + ("" if device.type == "cuda" else "; torchao 0.18 has no int4 CPU kernel"))


def for_scoring(q: QuantizeSettings, wanted: str, device: torch.device) -> tuple[QuantizeSettings, str, bool]:
    """(the recipe a self-draft is *scored* with under ``wanted`` (``hardware.SCORING_KERNELS``), a line
    saying what runs, whether its weights are then dequantized to float).  int8 weight-only becomes int8
    dynamic (the same per-channel int8 weights, activations quantized per token: torchao's int8 GEMM)
    when asked, or under ``auto`` when ``hardware.scoring_kernel`` measured it faster; a weight-only
    recipe's weights are dequantized once to float (``dequantize``: float GEMMs on the recipe's weights,
    equal to its numbers to float rounding) when asked, or under ``auto`` where the per-matmul conversion
    measured slower than float weights.  Anything else stays as trained.  Members never *train* on
    these: torchao's dynamic linear passes no gradient to its input, and training keeps the recipe's
    memory."""
    import dataclasses

    from drafteu import hardware

    choice, why = hardware.scoring_kernel(wanted, device)
    if choice == "dynamic" and q.bits == 8 and q.scheme == "weight-only" and q.groups is None:
        q = dataclasses.replace(q, scheme="dynamic")
        return q, f"{q.name} ({why}): {kernel(q, device)}", False
    if choice == "float" and q.scheme == "weight-only":
        return q, (f"{q.name}, dequantized once to float ({why}): float GEMMs on the recipe's weights "
                   "(4x their memory)"), True
    if choice == "dynamic" and wanted != "auto" and q.scheme != "dynamic":
        why = f"{why}, but only an int8 per-channel weight-only recipe has it; kept"
    elif choice == "float" and wanted != "auto":
        why = f"{why}, but a {q.scheme} recipe quantizes its activations too; kept"
    return q, f"{q.name} ({why}): {kernel(q, device)}", False


def dequantize(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every low-bit weight of ``model`` by its float value (torchao's ``dequantize``), in
    place: the same weights on float GEMMs (for scoring only; nothing trains on them here)."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return model
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, TorchAOBaseTensor):
            module.weight = torch.nn.Parameter(weight.dequantize(), requires_grad=False)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters occupy as stored (low-bit data + scales for quantized ones)."""
    total = 0
    for p in model.parameters():
        parts = [getattr(p, name) for name in ("qdata", "scale", "zero_point") if isinstance(getattr(p, name, None),
                                                                                           torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in parts) if parts else p.numel() * p.element_size()
    return total


__all__ = ["QuantizeSettings", "RECIPE", "apply", "dequantize", "for_scoring", "is_quantized", "kernel",
           "torchao_config", "weight_bytes"]
