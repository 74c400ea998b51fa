"""Token-level EU estimators over (prompt, response) sharing one interface.

Positions (METHOD.md §1): for a prompt of P tokens and a response y_1..y_T, the estimate for y_t
uses the next-token distributions given (prompt, y_<t), i.e. the logits at sequence position
P + t - 2.  Prompt positions are never scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from drafteu import divergence
from drafteu.errors import DraftEUError
from drafteu.posterior import NoisyModel, family_seeds, member_seed

AGGREGATIONS = ("mean", "max", "sum")


@dataclass
class TokenScores:
    """Per-response-token EU (float32, shape (T,)); variance and bias where the method has them."""

    token_ids: list[int]
    eu: torch.Tensor
    variance: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def aggregate(self, how: str = "mean") -> float:
        """Sequence-level EU: mean, max or sum over response tokens (0 for an empty response)."""
        return aggregate(self.eu, how)


def aggregate(eu: torch.Tensor, how: str = "mean") -> float:
    """Sequence aggregation of token EU (METHOD.md §10): mean, max or sum."""
    if how not in AGGREGATIONS:
        raise DraftEUError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    if eu.numel() == 0:
        return 0.0
    return float({"mean": eu.mean, "max": eu.max, "sum": eu.sum}[how]())


def response_inputs(
    prompt_ids: Sequence[int], response_ids: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, int]:
    """(1, P + T) input ids and ``logits_to_keep`` = T + 1 for scoring the response.

    The kept logits cover positions P-1 .. P+T-1; callers drop the last one (it predicts the token
    after the response).
    """
    if len(prompt_ids) == 0:
        raise DraftEUError("the prompt is empty: at least one prompt token is needed to score")
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long, device=device)
    return ids, len(response_ids) + 1


class Estimator(ABC):
    """Scores the tokens of one response."""

    name: str

    @abstractmethod
    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> TokenScores:
        """Token EU for ``response_ids`` given ``prompt_ids``."""


def _device(noisy: NoisyModel) -> torch.device:
    return next(noisy.model.parameters()).device


class _FamilyMI(Estimator):
    """Mutual information of K noise members of the target (the family's generalized JSD)."""

    prefix: str

    def __init__(self, noisy: NoisyModel, size: int = 3, seed: int = 0, batched: bool = True):
        if size < 1:
            raise DraftEUError(f"family size must be >= 1, got {size}")
        self.noisy, self.size, self.seed, self.batched = noisy, size, seed, batched

    @abstractmethod
    def _members(self) -> list[str]:
        """Names of the noise members to evaluate (fixed for a family, fresh for TokUR)."""

    def score(self, prompt_ids, response_ids) -> TokenScores:
        members = self._members()
        ids, keep = response_inputs(prompt_ids, response_ids, _device(self.noisy))
        logits = self.noisy.logits(ids, members, logits_to_keep=keep, batched=self.batched)
        mi = divergence.mutual_information(logits[:, 0, :-1])  # (K, T, V) -> (T,)
        return TokenScores(token_ids=list(response_ids), eu=mi.cpu())


class GroundTruth(_FamilyMI):
    """Ground-truth EU: MI of a fixed noise-perturbed target family (METHOD.md §2, Sec. 4.1)."""

    name = "groundtruth"
    prefix = "family"

    def __init__(self, noisy, size=3, seed=0, batched=True):
        super().__init__(noisy, size, seed, batched)
        self.member_names = noisy.set_members(self.prefix, family_seeds(seed, size))

    def _members(self):
        return self.member_names


class TokUR(_FamilyMI):
    """TokUR (Zhang et al., 2025): MI of K *freshly sampled* noisy copies of the target.

    Every call to ``score`` draws new members from (seed, call index), so repeated calls are
    independent Monte-Carlo estimates, and a rerun with the same seed repeats them exactly.
    """

    name = "tokur"
    prefix = "tokur"

    def __init__(self, noisy, size=3, seed=0, batched=True):
        super().__init__(noisy, size, seed, batched)
        self.calls = 0

    def _members(self):
        seeds = [member_seed("tokur", self.seed, self.calls, k) for k in range(self.size)]
        self.calls += 1
        return self.noisy.set_members(self.prefix, seeds)


class PredictiveEntropy(Estimator):
    """The target's own predictive entropy per token (a cheap baseline, not an EU)."""

    name = "entropy"

    def __init__(self, noisy: NoisyModel):
        self.noisy = noisy

    def score(self, prompt_ids, response_ids) -> TokenScores:
        ids, keep = response_inputs(prompt_ids, response_ids, _device(self.noisy))
        logits = self.noisy.base_logits(ids, logits_to_keep=keep)
        return TokenScores(token_ids=list(response_ids), eu=divergence.entropy(logits[0, :-1]).cpu())


METHODS = ("groundtruth", "tokur", "entropy", "drafts")


def build(method: str, noisy: NoisyModel, *, size: int = 3, seed: int = 0) -> Estimator:
    """The estimator named ``method`` on the target held by ``noisy``."""
    if method == "groundtruth":
        return GroundTruth(noisy, size=size, seed=seed)
    if method == "tokur":
        return TokUR(noisy, size=size, seed=seed)
    if method == "entropy":
        return PredictiveEntropy(noisy)
    if method == "drafts":
        raise DraftEUError("the drafts method needs --drafts DIR (a run directory or a drafts directory)")
    raise DraftEUError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def _stage_of(manifest: Path) -> str | None:
    import json

    try:
        return json.loads(manifest.read_text()).get("stage")
    except (OSError, ValueError):
        return None


def resolve_drafts(path: str | Path, proxy: str | Path | None = None) -> tuple[Path, Path | None]:
    """(drafts dir, proxy adapter dir or None) from a run directory or a drafts directory.

    A run directory (``reproduce`` layout) gives its ``drafts/ddd`` ensemble and ``proxy/adapter``;
    a drafts directory (one with a drafts manifest) gives itself, and the proxy only if ``proxy``
    names one (else the bias term uses the raw target, METHOD.md §3).
    """
    path = Path(path)
    if (path / "drafts" / "ddd" / "manifest.json").exists():
        drafts, run_proxy = path / "drafts" / "ddd", path / "proxy" / "adapter"
        proxy = proxy or (run_proxy if (run_proxy / "adapter_config.json").exists() else None)
    elif (path / "manifest.json").exists() and _stage_of(path / "manifest.json") == "drafts":
        drafts = path
    else:
        raise DraftEUError(f"{path} is neither a run directory (with drafts/ddd) nor a drafts directory; "
                           "train one with drafteu train-drafts")
    if proxy is not None:
        proxy = Path(proxy)
        if (proxy / "adapter" / "adapter_config.json").exists():
            proxy = proxy / "adapter"
        if not (proxy / "adapter_config.json").exists():
            raise DraftEUError(f"{proxy} is not a proxy adapter directory (train one with drafteu train-proxy)")
    return drafts, proxy


class DraftEnsemble(Estimator):
    """EU = JSD(q_1..q_K) + KL(q_mix || p) per response token (Theorem 3.4, Eq. 1; METHOD.md §3).

    The K drafts are PEFT adapters on one base draft, evaluated in one mixed-adapter forward
    (``batched``) or one forward each; p is the OSD proxy (target + proxy adapter) when given,
    else the raw target.  Logits are cut to the vocabulary range the models share.  ``dtype`` is
    the drafts' (``models.load``'s choices); divergences are always computed in float32.
    ``device``: the drafts' device (default: the target's).
    """

    name = "drafts"

    def __init__(self, drafts_dir: Path, target, proxy_dir: Path | None = None, *, device=None,
                 batched: bool = True, dtype: str = "auto"):
        import json

        from peft import PeftModel

        from drafteu import models

        manifest = json.loads((Path(drafts_dir) / "manifest.json").read_text())
        self.names = list(manifest["adapters"])
        self.drafts_dir, self.base_spec, self.dtype = Path(drafts_dir), manifest["base"], dtype
        if device is None:  # next to the target, else where ``device: auto`` puts models
            device = next(target.model.parameters()).device if target.model is not None else "auto"
        base = models.load(manifest["base"], dtype=dtype, device=device)
        self.vocab = models.shared_vocab_size(target, base)
        model = PeftModel.from_pretrained(base.model, Path(drafts_dir) / self.names[0], adapter_name=self.names[0])
        for n in self.names[1:]:
            model.load_adapter(Path(drafts_dir) / n, adapter_name=n)
        self.drafts = model.eval()
        # The K drafts in one forward: batched LoRA matmuls when the adapters allow it (same rank,
        # plain LoRA), else PEFT's mixed-adapter batch; both give the same numbers.
        from drafteu.fused import FusedDrafts

        try:
            self.runner = FusedDrafts(self.drafts, self.names)
        except DraftEUError:
            self.runner = self.drafts
        self.method = manifest.get("method", "drafts")
        self.target = target.model  # None for a tokenizer-only target: draft_logits only
        if proxy_dir is not None and self.target is None:
            raise DraftEUError("a proxy needs the target's weights; load the target with its model")
        if proxy_dir is not None:
            if isinstance(self.target, PeftModel):
                self.target.load_adapter(proxy_dir, adapter_name="proxy")
            else:
                self.target = PeftModel.from_pretrained(self.target, proxy_dir, adapter_name="proxy")
            self.target.set_adapter("proxy")
        if self.target is not None:
            self.target.eval()
        self.has_proxy, self.batched = proxy_dir is not None, batched

    def base_target(self):
        """Context: the unperturbed target (the proxy adapter off), e.g. for greedy answers."""
        from contextlib import nullcontext

        from peft import PeftModel

        return self.target.disable_adapter() if isinstance(self.target, PeftModel) else nullcontext()

    @torch.no_grad()
    def draft_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(K, B, keep, V_shared) logits of the drafts."""
        k, bsz = len(self.names), ids.shape[0]
        if self.batched:
            out = self.runner(input_ids=ids.repeat(k, 1), adapter_names=[n for n in self.names for _ in range(bsz)],
                              logits_to_keep=keep).logits
            out = out.reshape(k, bsz, *out.shape[1:])
        else:
            outs = []
            for n in self.names:
                self.drafts.set_adapter(n)
                outs.append(self.drafts(input_ids=ids, logits_to_keep=keep).logits)
            out = torch.stack(outs)
        return out[..., : self.vocab]

    @torch.no_grad()
    def proxy_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(B, keep, V_shared) logits of p: the proxy, or the raw target."""
        from peft import PeftModel

        if isinstance(self.target, PeftModel) and not self.has_proxy:
            with self.target.disable_adapter():
                out = self.target(input_ids=ids, logits_to_keep=keep).logits
        elif isinstance(self.target, PeftModel):
            n = ids.shape[0]
            out = self.target(input_ids=ids, adapter_names=["proxy"] * n, logits_to_keep=keep).logits
        else:
            out = self.target(input_ids=ids, logits_to_keep=keep).logits
        return out[..., : self.vocab]

    def score(self, prompt_ids, response_ids) -> TokenScores:
        device = next(self.drafts.parameters()).device
        ids, keep = response_inputs(prompt_ids, response_ids, device)
        q = self.draft_logits(ids, keep)[:, 0, :-1]  # (K, T, V)
        p = self.proxy_logits(ids.to(next(self.target.parameters()).device), keep)[0, :-1].to(q.device)
        terms = divergence.eu_decomposition(q, p)
        return TokenScores(token_ids=list(response_ids), eu=terms.total.cpu(), variance=terms.variance.cpu(),
                           bias=terms.bias.cpu())
