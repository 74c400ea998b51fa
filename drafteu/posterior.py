"""Low-rank Gaussian weight noise held as PEFT LoRA adapters (paper Sec. 4.1, App. B; TokUR).

What sigma scales (both schemes).  For every targeted linear layer with weight W (out x in) a
noise member adds

    dW = U @ eps,    U: (out x r) with orthonormal columns,    eps: (r x in), eps_ij ~ N(0, sigma^2)

stored as a LoRA adapter with B = U, A = eps and scaling alpha / r = 1.  So sigma is the standard
deviation of the entries of the r x in noise matrix, and ||dW||_F^2 = ||eps||_F^2 has expectation
r * in * sigma^2, independent of the basis.  The schemes differ only in U:

- ``gaussian``: a Haar-random orthonormal basis (QR of a Gaussian matrix), drawn per member;
- ``svd``: the top-r left singular vectors of W (TokUR's scheme: perturb along the weight's
  principal output directions), shared by all members.

``scale: relative`` multiplies sigma by each module's weight RMS, so one setting is the same relative
perturbation on models whose weights differ in scale (Gemma 3 270M's q/v weights have RMS 0.040,
SmolLM2-135M's 0.19); the default, absolute, is the paper's.

A member is reproducible from ``(seed, name_of_module)``: noise is drawn on the CPU from a
generator seeded by a hash of both, so the same seed gives the same weights on any device.
sigma = 0 gives dW = 0 exactly: the member is the target.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from drafteu import fileio
from drafteu.errors import DraftEUError
from drafteu.progress import note

SCHEMES = ("gaussian", "svd")
SCALES = ("absolute", "relative")
SIGMA_WARN = 2.0  # above this a noisy copy is no longer a small perturbation of the model


@dataclass(frozen=True)
class NoiseConfig:
    """Low-rank Gaussian noise for a target family, TokUR, noisy teachers and K-only drafts."""

    sigma: float = field(default=0.1, metadata={"help": "std of the r x in noise matrix eps (dW = U eps)"})
    rank: int = field(default=8, metadata={"help": "rank r of the noise dW"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "linear modules that receive noise"}
    )
    scheme: str = field(
        default="gaussian",
        metadata={"help": "basis U: 'gaussian' (random orthonormal) or 'svd' (TokUR: top-r of W)"},
    )
    scale: str | None = field(
        default=None,
        metadata={"help": "what sigma is: 'absolute' (the default, the paper's: the std of eps) or 'relative' "
                  "(sigma times each module's weight RMS: one setting perturbs models of any weight scale alike)"},
    )
    optional_fields = ("scale",)  # unset (absolute): the identity of runs made before the option existed

    @property
    def relative(self) -> bool:
        """Whether sigma is relative to each module's weight RMS (``scale: relative``)."""
        return self.scale == "relative"

    def __post_init__(self):
        fileio.require_finite(self)
        if not (self.sigma >= 0 and math.isfinite(self.sigma)):
            raise DraftEUError(f"sigma must be a finite number >= 0, got {self.sigma} (the paper uses 0.1)")
        if self.rank < 1:
            raise DraftEUError(f"noise rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise DraftEUError("noise target_modules must name at least one module")
        if self.scheme not in SCHEMES:
            raise DraftEUError(f"unknown noise scheme {self.scheme!r}; choose one of {SCHEMES}")
        if self.scale == "absolute":
            object.__setattr__(self, "scale", None)  # the default, spelt out
        if self.scale is not None and self.scale not in SCALES:
            raise DraftEUError(f"unknown noise scale {self.scale!r}; choose one of {', '.join(SCALES)}")
        if self.sigma > SIGMA_WARN and not self.relative:  # a relative sigma's strength depends on the model: measured
            note(f"note: noise sigma {self.sigma:g} is far above the paper's 0.1: noisy copies then disagree on "
                 "almost every token and the mutual information saturates near ln K")
        object.__setattr__(self, "target_modules", tuple(self.target_modules))


def member_seed(*parts: object) -> int:
    """A stable 63-bit seed from any parts, e.g. (family_seed, k, module_name)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class NoisyModel:
    """A causal LM wrapped in PEFT, holding named noise adapters ("members").

    The base model's own weights are never changed: a member is a LoRA adapter, the unperturbed
    model is ``with noisy.base():``.  The wrapped model is mutated in place (PEFT injects LoRA
    layers), so create one NoisyModel per model and share it between estimators.
    """

    def __init__(self, model: torch.nn.Module, noise: NoiseConfig | None = None):
        self.noise = noise or NoiseConfig()
        self.model = model
        self.members: dict[str, int] = {}  # name -> seed
        self._basis: dict[str, torch.Tensor] = {}  # svd scheme: module name -> U (out, r)
        names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        hits = [n for n in names if n.rsplit(".", 1)[-1] in self.noise.target_modules]
        if not hits:
            raise DraftEUError(
                f"none of the noise target modules {list(self.noise.target_modules)} exist in "
                f"{type(model).__name__}; available linear layers include "
                f"{sorted({n.rsplit('.', 1)[-1] for n in names})[:12]}"
            )

    # -- adapters --------------------------------------------------------------------------

    def _lora_config(self):
        from peft import LoraConfig

        return LoraConfig(
            r=self.noise.rank,
            lora_alpha=self.noise.rank,  # scaling alpha / r = 1: dW = B @ A exactly
            lora_dropout=0.0,
            target_modules=list(self.noise.target_modules),
            init_lora_weights=False,  # PEFT's gaussian init zeroes B; we overwrite A and B below
            bias="none",
        )

    def set_member(self, name: str, seed: int) -> None:
        """Create (or re-draw in place) the noise adapter ``name`` from ``seed``."""
        from peft import PeftModel, get_peft_model

        if not isinstance(self.model, PeftModel):
            self.model = get_peft_model(self.model, self._lora_config(), adapter_name=name)
        elif name not in self.model.peft_config:
            self.model.add_adapter(name, self._lora_config())
        self.model.eval()
        self._fill(name, seed)
        self.members[name] = seed

    def set_members(self, prefix: str, seeds: Sequence[int]) -> list[str]:
        """Create/re-draw members ``prefix0..prefix{K-1}`` from ``seeds``; returns their names."""
        names = [f"{prefix}{k}" for k in range(len(seeds))]
        for name, seed in zip(names, seeds, strict=True):
            self.set_member(name, seed)
        return names

    @torch.no_grad()
    def _fill(self, name: str, seed: int) -> None:
        for mod_name, module in self.model.named_modules():
            lora_a = getattr(module, "lora_A", None)
            if lora_a is None or name not in lora_a:
                continue
            basis = self._svd_basis(mod_name, module) if self.noise.scheme == "svd" else None
            u, eps = draw_noise(self.noise, seed, mod_name, module.get_base_layer().weight, basis)
            lora_a[name].weight.copy_(eps)  # A: (r, in)
            module.lora_B[name].weight.copy_(u)  # B: (out, r)

    def _svd_basis(self, mod_name: str, module) -> torch.Tensor:
        if mod_name not in self._basis:
            self._basis[mod_name] = svd_basis(module.get_base_layer().weight, self.noise.rank)
        return self._basis[mod_name]

    @contextmanager
    def base(self):
        """The unperturbed model (all adapters off)."""
        from peft import PeftModel

        if isinstance(self.model, PeftModel):
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model

    # -- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def logits(
        self,
        input_ids: torch.Tensor,
        members: Sequence[str],
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        batched: bool = True,
    ) -> torch.Tensor:
        """Next-token logits of each member: (B, L) ids -> (K, B, L', V), L' = logits_to_keep or L.

        ``position_ids`` are needed for left-padded batches (training data), as in HF models.

        ``batched`` runs all K members in one forward (PEFT mixed-adapter batch, the inputs
        repeated K times); otherwise one forward per member.  Both give the same numbers.
        """
        unknown = [m for m in members if m not in self.members]
        if unknown:
            raise DraftEUError(f"unknown noise members {unknown}; create them with set_member")
        k, bsz = len(members), input_ids.shape[0]
        if batched:
            ids = input_ids.repeat(k, 1)
            mask = attention_mask.repeat(k, 1) if attention_mask is not None else None
            pos = position_ids.repeat(k, 1) if position_ids is not None else None
            names = [m for m in members for _ in range(bsz)]
            out = self.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names,
                logits_to_keep=logits_to_keep,
            ).logits
            return out.reshape(k, bsz, *out.shape[1:])
        outs = []
        for m in members:
            self.model.set_adapter(m)
            outs.append(
                self.model(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=logits_to_keep,
                ).logits
            )
        return torch.stack(outs)

    @torch.no_grad()
    def base_logits(
        self, input_ids: torch.Tensor, *, attention_mask=None, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Logits of the unperturbed model: (B, L) -> (B, L', V)."""
        with self.base() as m:
            return m(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep
            ).logits


def svd_basis(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` left singular vectors of ``weight`` (out, in) -> (out, rank), float32 CPU."""
    w = weight.dequantize() if hasattr(weight, "dequantize") else weight  # a quantized base's low-bit weight
    u, _, _ = torch.linalg.svd(w.detach().float(), full_matrices=False)
    return u[:, :rank].cpu()


def weight_rms(weight: torch.Tensor) -> float:
    """Root mean square of a linear layer's weight (a quantized base's dequantized)."""
    w = weight.dequantize() if hasattr(weight, "dequantize") else weight
    return float(w.detach().float().pow(2).mean().sqrt())


def noise_std(noise: NoiseConfig, weight: torch.Tensor) -> float:
    """The std of eps on one module: sigma, or sigma x the module's weight RMS (``scale: relative``)."""
    return noise.sigma * weight_rms(weight) if noise.relative else noise.sigma


def draw_noise(
    noise: NoiseConfig, seed: int, module_name: str, weight: torch.Tensor, basis: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, eps) with dW = U @ eps for one linear layer (see the module docstring).

    U (out, r) has orthonormal columns (``basis`` for the svd scheme, Haar-random otherwise);
    eps (r, in) ~ N(0, s^2), s = sigma, or sigma x the weight's RMS with ``scale: relative``.  Drawn
    on the CPU from (seed, module_name): device-independent.
    """
    out_f, in_f = weight.shape
    gen = torch.Generator().manual_seed(member_seed(seed, module_name))
    eps = torch.randn(noise.rank, in_f, generator=gen, dtype=torch.float32) * noise_std(noise, weight)
    if noise.scheme == "svd":
        u = basis if basis is not None else svd_basis(weight, noise.rank)
    else:
        u = torch.linalg.qr(torch.randn(out_f, noise.rank, generator=gen, dtype=torch.float32)).Q
    return u, eps


@dataclass(frozen=True)
class Member:
    """Member ``index`` of a noisy target family: the target plus the noise drawn from ``seed``."""

    noise: NoiseConfig
    seed: int
    index: int


def family_seeds(seed: int, size: int, tag: str = "family") -> list[int]:
    """Seeds of a fixed family of ``size`` members: member k's noise depends on (seed, k) only."""
    return [member_seed(tag, seed, k) for k in range(size)]


@torch.no_grad()
def apply_init_noise(peft_model, adapter: str, noise: NoiseConfig, seed: int) -> int:
    """Start LoRA ``adapter`` at scaling * B @ A = U @ eps on the noise modules (IDD/FDD, GKD/MiniLLM
    initialization noise, docs/method.md §7): for q_proj/v_proj the first r_noise LoRA components start
    at B = U, A = eps / scaling (the rest at B = 0, as in LoRA), so the draft starts from a noise
    draw of the §2 scheme and stays a pure adapter on the shared base."""
    touched = 0
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or adapter not in lora_a or name.rsplit(".", 1)[-1] not in noise.target_modules:
            continue
        a, b = lora_a[adapter].weight, module.lora_B[adapter].weight  # (r, in), (out, r)
        r = min(noise.rank, a.shape[0])
        u, eps = draw_noise(NoiseConfig(sigma=noise.sigma, rank=r, scheme=noise.scheme, scale=noise.scale,
                                        target_modules=noise.target_modules), seed, name,
                                        module.get_base_layer().weight)
        scale = module.scaling[adapter]
        b[:, :r] = u.to(b)
        a[:r] = (eps / scale).to(a)
        touched += 1
    if touched == 0:
        raise DraftEUError(f"initialization noise found none of {noise.target_modules} among the LoRA modules")
    return touched
