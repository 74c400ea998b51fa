"""Token-level EU estimators over (prompt, response) sharing one interface.

Positions (docs/method.md §1): for a prompt of P tokens and a response y_1..y_T, the estimate for y_t
uses the next-token distributions given (prompt, y_<t), i.e. the logits at sequence position
P + t - 2.  Prompt positions are never scored.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from drafteu import divergence
from drafteu.errors import DraftEUError
from drafteu.kvcache import LogitsSource
from drafteu.methods import ESTIMATORS
from drafteu.posterior import NoisyModel, family_seeds, member_seed

AGGREGATIONS = ("mean", "max", "sum")
# When the drafts are too far from the target for their EU to be epistemic (docs/method.md §15): the
# bias term is over this share of the estimate (a truncated 6-layer base: 0.99+; the int8
# self-draft's DDD: 0.89), or the draft base's measured KL to the target is over this many nats per
# token (the truncated base: 2.6; int8: 0.003).
BIAS_WARN_SHARE = 0.95
BASE_KL_WARN = 0.5


def bias_diagnostic(variance: torch.Tensor, bias: torch.Tensor, base_kl: float | None = None) -> dict:
    """How much of a draft-ensemble estimate is its bias term KL(q_mix || p), the draft base's
    measured KL to the target (a drafteu-built base records it), and a plain warning when either
    says the drafts are too far from the target (docs/method.md §15)."""
    total = float(variance.sum() + bias.sum())
    share = float(bias.sum()) / total if total > 0 else 0.0
    why = []
    if share > BIAS_WARN_SHARE:
        why.append(f"the bias term is {share:.0%} of this EU")
    if base_kl is not None and base_kl > BASE_KL_WARN:
        why.append(f"the draft base's KL to the target is {base_kl:.2f} nats/token")
    warning = None
    if why:
        warning = (f"{' and '.join(why)}: these drafts are too far from the target for their EU to be epistemic "
                   "(docs/method.md §15); a closer draft base - the target quantized (draft_base.model: quantize) "
                   "or a sibling - fixes it")
    return {"bias_share": share, "base_kl_to_target": base_kl, "warn_share_above": BIAS_WARN_SHARE,
            "warn_base_kl_above": BASE_KL_WARN, "warning": warning}


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
    """Sequence aggregation of token EU (docs/method.md §10): mean, max or sum."""
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
    """Scores the tokens of one response.  Every distribution comes from a ``kvcache.LogitsSource``
    (a model + adapter rows behind a shared-prefix KV cache): `drafteu score`, `drafteu reproduce`
    and the evaluation stages all call these classes."""

    name: str

    @abstractmethod
    def score(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> TokenScores:
        """Token EU for ``response_ids`` given ``prompt_ids``."""


def _device(model) -> torch.device:
    return next(model.parameters()).device


class _FamilyMI(Estimator):
    """Mutual information of K noise members of the target (the family's generalized JSD)."""

    prefix: str

    def __init__(self, noisy: NoisyModel, size: int = 3, seed: int = 0, batched: bool = True,
                 prefix_len: int = 0):
        if size < 1:
            raise DraftEUError(f"family size must be >= 1, got {size}")
        self.noisy, self.size, self.seed = noisy, size, seed
        # the members' source; its model is set once members exist (NoisyModel wraps the target in
        # PEFT on its first member)
        self.source = LogitsSource(None, [], prefix_len=prefix_len, batched=batched)

    @abstractmethod
    def _members(self, prompt_ids: Sequence[int]) -> list[str]:
        """Names of the noise members to evaluate (fixed for a family, drawn per prompt for TokUR)."""

    def member_logits(self, prompt_ids, response_ids) -> torch.Tensor:
        """(K, T, V) logits of the members at the response positions."""
        self._members(prompt_ids)
        ids, keep = response_inputs(prompt_ids, response_ids, _device(self.noisy.model))
        return self.source.logits(ids, keep)[:, :-1]

    def score(self, prompt_ids, response_ids) -> TokenScores:
        mi = divergence.mutual_information(self.member_logits(prompt_ids, response_ids))  # (K, T, V) -> (T,)
        return TokenScores(token_ids=list(response_ids), eu=mi.cpu())


class GroundTruth(_FamilyMI):
    """Ground-truth EU: MI of a fixed noise-perturbed target family (docs/method.md §2, Sec. 4.1)."""

    name = "groundtruth"
    prefix = "family"

    def __init__(self, noisy, size=3, seed=0, batched=True, prefix_len=0):
        super().__init__(noisy, size, seed, batched, prefix_len)
        self.member_names = noisy.set_members(self.prefix, family_seeds(seed, size))
        self.source.model = noisy.model
        self.source.set_names(self.member_names)

    def _members(self, prompt_ids):
        return self.member_names


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """A stable short key of a prompt's token ids (TokUR's draw key)."""
    return hashlib.sha256(",".join(map(str, prompt_ids)).encode()).hexdigest()[:16]


class TokUR(_FamilyMI):
    """TokUR (Zhang et al., 2025): MI of K *freshly sampled* noisy copies of the target.

    Seeding rule (docs/method.md §12): the K members scoring an answer are drawn from
    (seed, prompt): every answer to the same prompt is scored by the same draw, different prompts
    get independent draws, and the numbers do not depend on the order answers are scored in,
    how work is split, or whether a run was resumed.  `drafteu score --method tokur --seed s` and
    the TokUR column of a `reproduce` trial with seed s therefore agree answer by answer.  Answers
    sharing a prompt also share the draw's prefix KV cache.
    """

    name = "tokur"
    prefix = "tokur"

    def __init__(self, noisy, size=3, seed=0, batched=True, prefix_len=0):
        super().__init__(noisy, size, seed, batched, prefix_len)
        self.drawn_for: str | None = None
        self.draws = 0

    def _members(self, prompt_ids):
        key = prompt_key(prompt_ids)
        if key != self.drawn_for:
            seeds = [member_seed("tokur", self.seed, key, k) for k in range(self.size)]
            names = self.noisy.set_members(self.prefix, seeds)
            self.source.model = self.noisy.model
            self.source.set_names(names)  # re-drawn in place: the cached prefix is stale
            self.drawn_for, self.draws = key, self.draws + 1
        return self.source.names


class PredictiveEntropy(Estimator):
    """The target's own predictive entropy per token (a cheap baseline, not an EU)."""

    name = "entropy"

    def __init__(self, noisy: NoisyModel, prefix_len: int = 0):
        self.noisy = noisy
        self.source = LogitsSource(noisy.model, None, prefix_len=prefix_len, context=noisy.base)

    def score(self, prompt_ids, response_ids) -> TokenScores:
        self.source.model = self.noisy.model  # NoisyModel wraps its model in PEFT on its first member
        ids, keep = response_inputs(prompt_ids, response_ids, _device(self.noisy.model))
        logits = self.source.logits(ids, keep)
        return TokenScores(token_ids=list(response_ids), eu=divergence.entropy(logits[0, :-1]).cpu())


METHODS = tuple(ESTIMATORS)  # groundtruth, tokur, entropy, drafts


def build(method: str, noisy: NoisyModel, *, size: int = 3, seed: int = 0, prefix_len: int = 0) -> Estimator:
    """The target-only estimator named ``method`` on the target held by ``noisy``."""
    if method == "groundtruth":
        return GroundTruth(noisy, size=size, seed=seed, prefix_len=prefix_len)
    if method == "tokur":
        return TokUR(noisy, size=size, seed=seed, prefix_len=prefix_len)
    if method == "entropy":
        return PredictiveEntropy(noisy, prefix_len=prefix_len)
    if method == "drafts":
        raise DraftEUError("the drafts method needs --drafts DIR (a run directory or a drafts directory)")
    raise DraftEUError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def rebuild(what: str = "it") -> str:
    """The fix for a damaged stage output."""
    return f"delete {what} and re-run (reproduce rebuilds only what is missing; nothing else is lost)"


def read_drafts_manifest(drafts_dir: Path) -> dict:
    """A drafts directory's manifest.json, or a DraftEUError saying what is wrong and how to fix it."""
    path = Path(drafts_dir) / "manifest.json"
    if not path.exists():
        raise DraftEUError(f"{drafts_dir} has no manifest.json: not a drafts directory (drafteu train-drafts "
                           "writes one), or its training did not finish; re-run it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["adapters"], manifest["base"]  # noqa: B018 - the fields every ensemble needs
    except (ValueError, KeyError, TypeError):
        raise DraftEUError(f"{path} is damaged (not a complete drafts manifest); {rebuild(str(path))}") from None
    return manifest


def load_adapter(model, directory: Path, name: str):
    """``model`` with the PEFT adapter in ``directory`` added as ``name`` (a PeftModel), or a
    DraftEUError naming the missing or damaged file."""
    from peft import PeftModel
    from safetensors import SafetensorError

    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / f).is_file():
            raise DraftEUError(f"{directory / f} is missing; {rebuild(str(directory))}")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(directory, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, directory, adapter_name=name)
    except (SafetensorError, ValueError, OSError, KeyError, RuntimeError) as e:
        raise DraftEUError(f"adapter {directory} is damaged ({str(e).splitlines()[0][:120]}); "
                           f"{rebuild(str(directory))}") from None


def manifest_base(manifest: dict, drafts_dir: Path) -> str:
    """The draft base of a drafts manifest: a path relative to the ensemble directory (so whole runs
    can be copied and moved), else - for an ensemble copied on its own - the absolute path it was
    made with; or a hub id / 'embedded'.  Older manifests hold absolute paths."""
    base = manifest["base"]
    if not manifest.get("base_is_path"):
        return base
    relative = (Path(drafts_dir) / base).resolve()
    absolute = manifest.get("base_absolute")
    if not relative.exists() and absolute and Path(absolute).exists():
        return absolute  # the ensemble was copied without its run; the base is where it was made
    return str(relative)


class DraftEnsemble(Estimator):
    """EU = JSD(q_1..q_K) + KL(q_mix || p) per response token (Theorem 3.4, Eq. 1; docs/method.md §3).

    The K drafts are PEFT adapters on one base draft, evaluated in one forward
    (``adapters.k_adapter_model``: fused batched LoRA, else PEFT's mixed batch) or one forward
    each (``batched=False``); p is the OSD proxy (target + proxy adapter) when given, else the raw
    target.  ``proxy_source``: a ready ``LogitsSource`` for p, shared by several ensembles on one
    target (the scoring stage: p is computed once per answer).  Logits are cut to the vocabulary
    range the models share.  ``dtype`` is the drafts' (``models.load``'s choices); divergences are
    always computed in float32.  ``device``: the drafts' device (default: the target's).
    """

    name = "drafts"

    def __init__(self, drafts_dir: Path, target, proxy_dir: Path | None = None, *, device=None,
                 batched: bool = True, dtype: str = "auto", prefix_len: int = 0,
                 proxy_source: LogitsSource | None = None):

        from drafteu import adapters, models

        manifest = read_drafts_manifest(Path(drafts_dir))
        self.names = list(manifest["adapters"])
        self.drafts_dir, self.dtype = Path(drafts_dir), dtype
        self.base_spec = manifest_base(manifest, self.drafts_dir)
        base_manifest = Path(self.base_spec) / "manifest.json"
        try:  # a drafteu-built base records its measured KL to the target
            self.base_kl = json.loads(base_manifest.read_text(encoding="utf-8")).get("kl_to_target")
        except (OSError, ValueError, AttributeError):
            self.base_kl = None
        if device is None:  # next to the target, else where ``device: auto`` puts models
            device = next(target.model.parameters()).device if target.model is not None else "auto"
        base = models.load(self.base_spec, dtype=dtype, device=device)
        self.vocab = models.shared_vocab_size(target, base)
        model = base.model
        for n in self.names:
            model = load_adapter(model, Path(drafts_dir) / n, n)
        self.drafts = model.eval()
        self.runner = adapters.k_adapter_model(self.drafts, self.names)
        self.method = manifest.get("method", "drafts")
        self.source = LogitsSource(self.runner, self.names, prefix_len=prefix_len)
        self.batched = batched
        self.target = target.model  # None for a tokenizer-only target: draft_logits only
        if proxy_dir is not None and self.target is None:
            raise DraftEUError("a proxy needs the target's weights; load the target with its model")
        if proxy_dir is not None:
            self.target = load_adapter(self.target, Path(proxy_dir), "proxy")
            self.target.set_adapter("proxy")
        if self.target is not None:
            self.target.eval()
        self.has_proxy = proxy_dir is not None or proxy_source is not None
        if proxy_source is not None:
            self.proxy_source = proxy_source
        elif self.target is None:
            self.proxy_source = None
        elif proxy_dir is not None:
            self.proxy_source = LogitsSource(self.target, ["proxy"], prefix_len=prefix_len)
        else:  # the raw target (its adapters, if any, off)
            self.proxy_source = LogitsSource(self.target, None, prefix_len=prefix_len, context=self.base_target)

    @property
    def batched(self) -> bool:
        return self.source.batched

    @batched.setter
    def batched(self, value: bool) -> None:
        """True: the K drafts in one forward; False: one forward each (a reference path)."""
        self.source.model = self.runner if value else self.drafts
        self.source.batched = value
        self.source.invalidate()

    def base_target(self):
        """Context: the unperturbed target (the proxy adapter off), e.g. for greedy answers."""
        from contextlib import nullcontext

        from peft import PeftModel

        return self.target.disable_adapter() if isinstance(self.target, PeftModel) else nullcontext()

    @torch.no_grad()
    def draft_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(K, keep, V_shared) logits of the drafts for (1, L) ``ids``."""
        return self.source.logits(ids.to(_device(self.drafts)), keep)[..., : self.vocab]

    @torch.no_grad()
    def proxy_logits(self, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(keep, V_shared) logits of p (the proxy, or the raw target) for (1, L) ``ids``."""
        if self.proxy_source is None:
            raise DraftEUError("this ensemble was loaded without the target's weights: no proxy / target logits")
        return self.proxy_source.logits(ids, keep)[0, :, : self.vocab]

    def score(self, prompt_ids, response_ids) -> TokenScores:
        ids, keep = response_inputs(prompt_ids, response_ids, _device(self.drafts))
        q = self.draft_logits(ids, keep)[:, :-1]  # (K, T, V)
        p = self.proxy_logits(ids.to(_device(self.proxy_source.model)), keep)[:-1].to(q.device)
        terms = divergence.eu_decomposition(q, p)
        return TokenScores(token_ids=list(response_ids), eu=terms.total.cpu(), variance=terms.variance.cpu(),
                           bias=terms.bias.cpu())
