"""What every EU estimator shares: its per-token result (``TokenScores``) and sequence aggregation, what it
is built from (``BuildContext``), the forwards it is made of (``Pass``), and the interface (``Estimator``).

The estimators themselves (ground truth, TokUR, predictive entropy, the draft ensemble) are in
``estimators``, which re-exports these names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drafteu.ensembles import DraftBases
from drafteu.errors import DraftEUError
from drafteu.posterior import NoisyModel
from drafteu.sources import HiddenSource

AGGREGATIONS = ("mean", "max", "sum")

@dataclass
class TokenScores:
    """Per-response-token EU (float32, shape (T,)); variance and bias where the method has them."""

    token_ids: list[int]
    eu: torch.Tensor
    variance: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    nll: torch.Tensor | None = None  # the target's -log p(token) (predictive entropy's pass: perplexity for free)

    def aggregate(self, how: str = "mean") -> float:
        """Sequence-level EU: mean, max or sum over response tokens (0 for an empty response)."""
        return aggregate(self.eu, how)


def aggregate(eu: torch.Tensor, how: str = "mean") -> float:
    """Sequence aggregation of token EU (docs/method.md §10): mean, max or sum."""
    if how not in AGGREGATIONS:
        raise DraftEUError(f"unknown aggregation {how!r}; choose one of {AGGREGATIONS}")
    if eu.numel() == 0:
        return 0.0
    return float({"mean": eu.mean, "max": eu.max, "sum": eu.sum}[how]())


def response_inputs(
    prompt_ids: Sequence[int], response_ids: Sequence[int], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, int]:
    """(1, P + T) input ids and ``logits_to_keep`` = T + 1 for a full forward over one answer.

    The kept logits cover positions P-1 .. P+T-1; callers drop the last one (it predicts the token
    after the response).
    """
    check_prompt(prompt_ids)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], dtype=torch.long, device=device)
    return ids, len(response_ids) + 1


def check_prompt(prompt_ids: Sequence[int]) -> None:
    if len(prompt_ids) == 0:
        raise DraftEUError("the prompt is empty: at least one prompt token is needed to score")


@dataclass
class BuildContext:
    """Everything an estimator is built from (``methods.EstimatorKind.build``): a caller fills in what it
    has once and builds every estimator it needs from it, the draft ensemble included.

    ``target``: the loaded target (``models.LoadedModel``; tokenizer-only where the drafts need no target
    weights: a ``proxy_source`` gives p).  ``noisy``: the target's noise members (``NoisyModel``), which
    the target-only estimators draw on.  ``drafts`` / ``proxy``: a drafts directory and the proxy
    adapter's (``rundir.resolve_drafts``); ``proxy_source``: a ready pass of p shared by several
    ensembles; ``bases``: loaded draft bases shared by them.  ``prefix_len``: the prompts' shared prefix
    (``"auto"``: found from the prompts scored).  ``sizes``: member counts by the registry's
    ``size_setting`` name (``{"family_size": 3, "tokur_size": 3}``).  ``target_rows``: the raw target
    rides in p's pass (its logprobs, for a server).  ``kernel``, ``device``, ``dtype``: the drafts'.
    """

    target: Any = None
    noisy: NoisyModel | None = None
    drafts: Path | None = None
    proxy: Path | None = None
    proxy_source: HiddenSource | None = None
    bases: DraftBases | None = None
    prefix_len: int | str = 0
    share_prompts: bool = True
    seed: int = 0
    sizes: Mapping[str, int] = field(default_factory=dict)
    target_rows: bool = False
    kernel: str = "recipe"
    device: Any = None
    dtype: str = "auto"

    def size(self, setting: str | None, default: int = 3) -> int:
        """The member count ``setting`` names (``default`` when this context has none)."""
        return self.sizes.get(setting, default) if setting else 0

    def need_noisy(self, name: str) -> NoisyModel:
        if self.noisy is None:
            raise DraftEUError(f"the {name} method needs the target's weights (its noise members); "
                               "load the target with its model")
        return self.noisy


@dataclass(frozen=True)
class Pass:
    """One forward an estimator's scores are made of: what the cost stage times (``source``, ``rows``
    per scored position) and counts (the paper's accounting: ``passes`` of ``model``'s base parameters,
    the first ``trunk`` layers once for all rows).  ``name``: how the cost table writes it."""

    source: HiddenSource
    rows: int
    model: Any
    passes: int
    name: str
    trunk: int = 0
    note: str = ""


class Estimator(ABC):
    """Scores the tokens of responses.  Every distribution comes from a ``sources.HiddenSource`` (a
    model + adapter rows behind a shared-prefix KV cache, in padded batches, its logits reduced a
    chunk of positions at a time): `drafteu score`, `drafteu serve`, `drafteu reproduce` and the
    evaluation stages all call these classes."""

    name: str
    has_terms = False  # variance and bias terms (the draft ensembles)
    kernel: str | None = None  # what a quantized self-draft's layers score on (None: float weights)

    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> TokenScores:
        """Token EU for ``response_ids`` given ``prompt_ids``."""
        return self.score_batch([(prompt_ids, response_ids)])[0]

    def score_batch(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[TokenScores]:
        """Token EU of every (prompt ids, response ids) pair, computed in padded batches (the numbers
        equal one ``score`` call per pair to float rounding; an empty response scores nothing)."""
        pairs = [(list(p), list(r)) for p, r in pairs]
        for p, _ in pairs:
            check_prompt(p)
        todo = [i for i, (_, r) in enumerate(pairs) if r]
        none = torch.zeros(0)
        out = [TokenScores(token_ids=[], eu=none, variance=none if self.has_terms else None,
                           bias=none if self.has_terms else None) for _ in pairs]
        if todo:
            for i, s in zip(todo, self._score([pairs[i] for i in todo]), strict=True):
                out[i] = s
        return out

    @classmethod
    @abstractmethod
    def build(cls, ctx: BuildContext, size: int) -> Estimator:
        """The estimator from ``ctx`` with ``size`` members where it has a size setting (what
        ``methods.EstimatorKind.build`` calls)."""

    @abstractmethod
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[TokenScores]:
        """``score_batch`` on pairs whose responses are not empty."""

    @abstractmethod
    def passes(self) -> list[Pass]:
        """The forwards its scores are made of (the cost stage times and counts these)."""

    @property
    def method(self) -> str:
        """The name its scores go by (a draft ensemble: its draft method)."""
        return self.name

    def base_target(self):
        """Context: the unperturbed target (every adapter off), e.g. for greedy answers."""
        return nullcontext()

    def forget(self) -> None:
        """Drop every cache (prefix KV, the last batch, draws): the next batch pays its full cost."""
        self.source.invalidate()

    def close(self) -> None:
        """Release what it loaded into shared models (a draft ensemble's adapters); nothing by default."""
        return None
