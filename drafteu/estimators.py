"""Token-level EU estimators over (prompt, response) sharing one interface.

Positions (METHOD.md §1): for a prompt of P tokens and a response y_1..y_T, the estimate for y_t
uses the next-token distributions given (prompt, y_<t), i.e. the logits at sequence position
P + t - 2.  Prompt positions are never scored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

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


METHODS = ("groundtruth", "tokur", "entropy")


def build(method: str, noisy: NoisyModel, *, size: int = 3, seed: int = 0) -> Estimator:
    """The estimator named ``method`` on the target held by ``noisy``."""
    if method == "groundtruth":
        return GroundTruth(noisy, size=size, seed=seed)
    if method == "tokur":
        return TokUR(noisy, size=size, seed=seed)
    if method == "entropy":
        return PredictiveEntropy(noisy)
    raise DraftEUError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
