"""Token-level EU estimators over (prompt, response) sharing one interface.

Positions (docs/method.md §1): for a prompt of P tokens and a response y_1..y_T, the estimate for y_t
uses the next-token distributions given (prompt, y_<t), i.e. the logits at sequence position
P + t - 2.  Prompt positions are never scored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from abc import abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch

from drafteu import divergence
from drafteu.diagnostics import (  # noqa: F401  (re-exported: score, speculate and tests use estimators.*)
    BASE_KL_WARN,
    BIAS_WARN_SHARE,
    PROXY_FIT_WARN,
    bias_diagnostic,
    proxy_fit,
    proxy_fit_warning,
)
from drafteu.ensembles import (  # noqa: F401  (re-exported: the stages, score and tests use estimators.*)
    DraftBases,
    check_proxy_base,
    load_adapter,
    manifest_base,
    proxy_on_draft_base,
    read_drafts_manifest,
    rebuild,
)
from drafteu.errors import DraftEUError
from drafteu.estimator_base import (  # noqa: F401  (re-exported: every caller uses estimators.*)
    AGGREGATIONS,
    BuildContext,
    Estimator,
    Pass,
    TokenScores,
    aggregate,
    check_prompt,
    response_inputs,
)
from drafteu.methods import ESTIMATORS
from drafteu.posterior import NoisyModel, family_seeds, member_seed
from drafteu.sources import Hidden, HiddenSource, chunk_slices, reduce_chunks


class _FamilyMI(Estimator):
    """Mutual information of K noise members of the target (the family's generalized JSD)."""

    prefix: str

    def __init__(self, noisy: NoisyModel, size: int = 3, seed: int = 0, batched: bool = True,
                 prefix_len: int = 0, share_prompts: bool = True):
        if size < 1:
            raise DraftEUError(f"family size must be >= 1, got {size}")
        self.noisy, self.size, self.seed = noisy, size, seed
        # the members' source; its model is set once members exist (NoisyModel wraps the target in
        # PEFT on its first member)
        self.source = HiddenSource(None, [], prefix_len=prefix_len, batched=batched, share_prompts=share_prompts)

    @classmethod
    def build(cls, ctx, size):
        return cls(ctx.need_noisy(cls.name), size, ctx.seed, prefix_len=ctx.prefix_len, share_prompts=ctx.share_prompts)

    def passes(self) -> list[Pass]:
        return [Pass(self.source, self.size, self.noisy.model, self.size, "target")]

    def base_target(self):
        return self.noisy.base()

    @abstractmethod
    def slots(self, pairs) -> list[list[str]]:
        """Each pair's noise members (fixed for a family, drawn per prompt for TokUR)."""

    def member_hidden(self, pairs) -> Hidden:
        """The members' hidden states (K rows) at the response positions of ``pairs``."""
        slots = self.slots(pairs)
        return self.source.hidden(pairs, slots)

    def _score(self, pairs) -> list[TokenScores]:
        h = self.member_hidden(pairs)
        (mi,) = reduce_chunks(lambda q: (divergence.mutual_information(q),), h)  # (K, n, V) -> (n,)
        return [TokenScores(token_ids=r, eu=e) for (_, r), e in zip(pairs, h.split(mi), strict=True)]


class GroundTruth(_FamilyMI):
    """Ground-truth EU: MI of a fixed noise-perturbed target family (docs/method.md §2, Sec. 4.1)."""

    name = "groundtruth"
    prefix = "family"

    def __init__(self, noisy, size=3, seed=0, batched=True, prefix_len=0, share_prompts=True):
        super().__init__(noisy, size, seed, batched, prefix_len, share_prompts)
        self.member_names = noisy.set_members(self.prefix, family_seeds(seed, size))
        self.source.model = noisy.model
        self.source.set_names(self.member_names)

    def slots(self, pairs):
        return [self.member_names] * len(pairs)


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
    sharing a prompt also share the draw (and its KV cache).  A batch holds one draw per distinct
    prompt, side by side: slot j's members ``tokur{j}_0..`` hold the j-th prompt's draw, re-drawn
    in place only when the slot's prompt changes.
    """

    name = "tokur"
    prefix = name

    def __init__(self, noisy, size=3, seed=0, batched=True, prefix_len=0, share_prompts=True):
        super().__init__(noisy, size, seed, batched, prefix_len, share_prompts)
        self.held: list[str | None] = []  # slot j -> the prompt key its members were drawn for
        self.draws = 0

    def slots(self, pairs):
        keys = list(dict.fromkeys(prompt_key(p) for p, _ in pairs))
        names: dict[str, list[str]] = {}
        fresh = False
        for j, key in enumerate(keys):
            slot = f"{self.prefix}{j}_"
            if j >= len(self.held):
                self.held.append(None)
            if self.held[j] != key:
                seeds = [member_seed(self.name, self.seed, key, k) for k in range(self.size)]
                self.noisy.set_members(slot, seeds)
                self.held[j], self.draws, fresh = key, self.draws + 1, True
            names[key] = [f"{slot}{k}" for k in range(self.size)]
        self.source.model = self.noisy.model
        if fresh:
            self.source.invalidate()  # re-drawn in place: cached prefixes are stale
        return [names[prompt_key(p)] for p, _ in pairs]

    def forget(self) -> None:
        super().forget()
        self.held = []

    @property
    def drawn_for(self) -> str | None:
        """The prompt key of the first slot's draw (the last single prompt scored)."""
        return self.held[0] if self.held else None


class PredictiveEntropy(Estimator):
    """The target's own predictive entropy per token (a cheap baseline, not an EU)."""

    name = "entropy"
    size = 1

    def __init__(self, noisy: NoisyModel, prefix_len: int = 0, share_prompts: bool = True):
        self.noisy = noisy
        self.source = HiddenSource(noisy.model, None, prefix_len=prefix_len, context=noisy.base,
                                   share_prompts=share_prompts)

    @classmethod
    def build(cls, ctx, size):
        return cls(ctx.need_noisy(cls.name), prefix_len=ctx.prefix_len, share_prompts=ctx.share_prompts)  # no members

    def passes(self) -> list[Pass]:
        return [Pass(self.source, 1, self.noisy.model, 1, "target")]

    def base_target(self):
        return self.noisy.base()

    def _score(self, pairs) -> list[TokenScores]:
        self.source.model = self.noisy.model  # NoisyModel wraps its model in PEFT on its first member
        h = self.source.hidden(pairs)
        tokens = torch.tensor([t for _, r in pairs for t in r], dtype=torch.long, device=h.states.device)
        ent, nll = [], []
        for sl in chunk_slices(h):  # the entropy and the answer's own token's -log p, a chunk at a time
            logits = h.logits(sl)[0]
            ent.append(divergence.entropy(logits).float().cpu())
            nll.append(-divergence.log_softmax(logits).gather(-1, tokens[sl, None])[:, 0].float().cpu())
        ent, nll = torch.cat(ent), torch.cat(nll)
        return [TokenScores(token_ids=r, eu=e, nll=n)
                for (_, r), e, n in zip(pairs, h.split(ent), h.split(nll), strict=True)]


METHODS = tuple(ESTIMATORS)  # the estimators' names, in the registry's order


def build(method: str, noisy: NoisyModel, *, size: int = 3, seed: int = 0, prefix_len: int = 0,
          share_prompts: bool = True) -> Estimator:
    """The target-only estimator named ``method`` on the target held by ``noisy``, ``size`` members where
    it has them (its registry entry builds it; ``BuildContext`` for the rest)."""
    if method not in ESTIMATORS:
        raise DraftEUError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    kind = ESTIMATORS[method]
    ctx = BuildContext(noisy=noisy, seed=seed, prefix_len=prefix_len, share_prompts=share_prompts,
                       sizes={kind.size_setting: size} if kind.size_setting else {})
    return kind.build(ctx)


class DraftEnsemble(Estimator):
    """EU = JSD(q_1..q_K) + KL(q_mix || p) per response token (Theorem 3.4, Eq. 1; docs/method.md §3).

    The K drafts are PEFT adapters on one base draft, evaluated in one forward
    (``adapters.k_adapter_model``: fused batched LoRA, else PEFT's mixed batch) or one forward
    each (``batched=False``); p is the OSD proxy (target + proxy adapter) when given, else the raw
    target.  ``proxy_source``: a ready ``HiddenSource`` for p, shared by several ensembles on one
    target (the scoring stage: p is computed once per batch).  ``bases``: loaded draft bases shared
    with other ensembles (``DraftBases``).  ``prefix_len``: the prompts' shared prefix (``"auto"``: found
    from the prompts scored, for a server).  Logits are cut to the vocabulary range the models share
    and reduced a chunk of positions at a time.  ``dtype`` is the drafts' (``models.load``'s
    choices); divergences are always computed in float32.  ``device``: the drafts' device (default:
    the target's).  ``kernel`` (``hardware.SCORING_KERNELS``): what an int8 self-draft's members score
    on - the weights they trained on, or int8 dynamic activations (``quantize.for_scoring``); the
    choice made is ``self.kernel``.
    """

    name = "drafts"
    has_terms = True

    @classmethod
    def build(cls, ctx, size):
        """The ensemble of ``ctx.drafts`` (its K from the directory: ``size`` unused)."""
        if ctx.drafts is None:
            raise DraftEUError("the drafts method needs --drafts DIR (a run directory or a drafts directory)")
        return cls(ctx.drafts, ctx.target, ctx.proxy, device=ctx.device, dtype=ctx.dtype, prefix_len=ctx.prefix_len,
                   proxy_source=ctx.proxy_source, bases=ctx.bases, share_prompts=ctx.share_prompts,
                   target_rows=ctx.target_rows, kernel=ctx.kernel)

    def __init__(self, drafts_dir: Path, target, proxy_dir: Path | None = None, *, device=None,
                 batched: bool = True, dtype: str = "auto", prefix_len: int | str = 0,
                 proxy_source: HiddenSource | None = None, bases: DraftBases | None = None,
                 share_prompts: bool = True, target_rows: bool = False, kernel: str = "recipe"):

        from drafteu import adapters, models

        manifest = read_drafts_manifest(Path(drafts_dir))
        self.adapters = list(manifest["adapters"])
        self.drafts_dir, self.dtype = Path(drafts_dir), dtype
        self.base_spec = manifest_base(manifest, self.drafts_dir)
        base_manifest = Path(self.base_spec) / "manifest.json"
        try:  # a drafteu-built base records its measured KL to the target
            self.base_kl = json.loads(base_manifest.read_text(encoding="utf-8")).get("kl_to_target")
        except (OSError, ValueError, AttributeError):
            self.base_kl = None
        if device is None:  # next to the target, else where ``device: auto`` puts models
            device = next(target.model.parameters()).device if target.model is not None else "auto"
        self.bases = bases or DraftBases()
        model, base, tag = self.bases.get(self.base_spec, dtype, device, kernel)
        self.kernel = base.kernel  # a quantized self-draft: what its layers score on (None: a float base)
        self.vocab = models.shared_vocab_size(target, base)
        self.names = [f"{tag}{n}" for n in self.adapters]
        for n, name in zip(self.adapters, self.names, strict=True):
            model = load_adapter(model, Path(drafts_dir) / n, name)
        self.proxy_fit = proxy_fit(proxy_dir)
        on_base = proxy_on_draft_base(proxy_dir)
        self.proxy_in_drafts = on_base is not None
        rows = list(self.names)
        if on_base is not None:  # p_mix: one more adapter on the drafts' base, row K of their pass
            check_proxy_base(on_base, self.base_spec, proxy_dir)
            rows.append(f"{tag}proxy")
            model = load_adapter(model, Path(proxy_dir), rows[-1])
        self.bases.put(self.base_spec, dtype, device, model, kernel)
        self.drafts = model.eval()
        self.rows = rows  # the drafts' pass: the K drafts, then p_mix when it is on their base
        self.runner = adapters.k_adapter_model(self.drafts, rows)
        self._method = manifest.get("method", "drafts")
        self.source = HiddenSource(self.runner, rows, prefix_len=prefix_len, share_prompts=share_prompts)
        self.batched = batched
        self.target = target.model  # None for a tokenizer-only target: draft_hidden only
        if proxy_dir is not None and self.target is None and not self.proxy_in_drafts:
            raise DraftEUError("a proxy needs the target's weights; load the target with its model")
        if proxy_dir is not None and not self.proxy_in_drafts:
            self.target = load_adapter(self.target, Path(proxy_dir), "proxy")
            self.target.set_adapter("proxy")
        if self.target is not None:
            self.target.eval()
        self.has_proxy = proxy_dir is not None or proxy_source is not None
        if self.proxy_in_drafts:
            self.proxy_source = None  # p is in the drafts' pass
        elif proxy_source is not None:
            self.proxy_source = proxy_source
        elif self.target is None:
            self.proxy_source = None
        elif proxy_dir is not None:  # with ``target_rows`` the raw target rides in p's pass (its logprobs)
            names = ["__base__", "proxy"] if target_rows else ["proxy"]
            self.proxy_source = HiddenSource(self.target, names, prefix_len=prefix_len, share_prompts=share_prompts)
        else:  # the raw target (its adapters, if any, off)
            self.proxy_source = HiddenSource(self.target, None, prefix_len=prefix_len, context=self.base_target,
                                             share_prompts=share_prompts)

    @property
    def method(self) -> str:
        return self._method

    @property
    def size(self) -> int:
        """K, the drafts."""
        return len(self.names)

    def draft_runner(self):
        """The K drafts' batched forward (``adapters.k_adapter_model``) without the proxy's row: what a speculative
        decoder proposes with.  The ensemble's own runner when p is not a row of it."""
        if not self.proxy_in_drafts:
            return self.runner
        if getattr(self, "_draft_runner", None) is None:
            from drafteu import adapters

            self._draft_runner = adapters.k_adapter_model(self.drafts, self.names)
        return self._draft_runner

    def passes(self) -> list[Pass]:
        out = [Pass(self.source, len(self.rows), self.drafts, len(self.rows), "draft",
                    trunk=getattr(self.runner, "trunk", 0),
                    note=f"the proxy is row {len(self.rows)} on the draft base" if self.proxy_in_drafts else "")]
        if self.proxy_source is not None:
            out.append(Pass(self.proxy_source, len(self.proxy_source.names or [None]), self.proxy_source.model, 1,
                            "proxy"))
        return out

    def forget(self) -> None:
        super().forget()
        if self.proxy_source is not None:
            self.proxy_source.invalidate()

    @property
    def _rows(self) -> tuple[int | None, int]:
        """(the raw target's row in p's pass or None, p's row)."""
        if self.proxy_in_drafts:
            return None, len(self.names)
        names = self.proxy_source.names if self.proxy_source is not None else None
        if names and "proxy" in names:
            return (names.index("__base__") if "__base__" in names else None), names.index("proxy")
        return (None if self.has_proxy else 0), 0

    @torch.no_grad()
    def target_logprobs(self, pairs, top: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The raw target's log-probability of every response token and its ``top`` most likely tokens
        ((T,), (T, top) values, (T, top) ids per pair; responses of >= 1 token), from p's pass when it
        carries the raw target (no proxy, or ``target_rows``): right after ``score_batch`` of the same
        pairs no forward runs."""
        pairs = [(list(p), list(r)) for p, r in pairs]
        row, _ = self._rows
        if row is None:  # the proxy's pass lacks the raw target: one pass of its own
            if getattr(self, "_target_source", None) is None:
                self._target_source = HiddenSource(self.target, None, context=self.base_target,
                                                   prefix_len=(self.proxy_source or self.source).prefix_len)
            h, row = self._target_source.hidden(pairs), 0
        else:
            h = self.proxy_source.hidden(pairs)
        t = Hidden(states=h.states[row: row + 1], lengths=h.lengths, head=h.head, width=h.width)
        ids = torch.tensor([tok for _, r in pairs for tok in r])
        chosen, values, indices = [], [], []
        for sl in chunk_slices(t):
            logp = torch.log_softmax(t.logits(sl)[0].float(), dim=-1).cpu()
            chosen.append(logp.gather(1, ids[sl, None])[:, 0])
            top_v, top_i = logp.topk(top, dim=-1) if top else (logp[:, :0], logp[:, :0].long())
            values.append(top_v)
            indices.append(top_i)
        parts = [t.split(torch.cat(x)) for x in (chosen, values, indices)]
        return list(zip(*parts, strict=True))

    def close(self) -> None:
        """Remove this ensemble's adapters from the shared base (the next trial loads its own)."""
        config = getattr(self.drafts, "peft_config", {})
        if not set(config) - set(self.rows):
            return  # the base's only adapters: they go with the model
        # another ensemble's adapter active first: PEFT warns when the active adapter is deleted
        self.drafts.set_adapter(next(n for n in config if n not in self.rows))
        for name in self.rows:
            if name in config:
                self.drafts.delete_adapter(name)
        self.source.invalidate()

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
        from peft import PeftModel

        return self.target.disable_adapter() if isinstance(self.target, PeftModel) else nullcontext()

    def _drafts_pass(self, pairs, rows: slice) -> Hidden:
        """Rows ``rows`` of the drafts' pass (a copy: the source's memo stays as it is)."""
        h = self.source.hidden(pairs)
        return dataclasses.replace(h, states=h.states[rows], vocab=self.vocab)

    def draft_hidden(self, pairs) -> Hidden:
        """The drafts' hidden states (K rows) at the response positions of ``pairs``."""
        return self._drafts_pass(pairs, slice(0, len(self.names)))

    def proxy_hidden(self, pairs) -> Hidden:
        """p's hidden states (one row: the proxy, or the raw target) at the response positions of ``pairs``."""
        if self.proxy_in_drafts:  # row K of the drafts' pass: no forward when the drafts already ran
            return self._drafts_pass(pairs, slice(len(self.names), len(self.names) + 1))
        if self.proxy_source is None:
            raise DraftEUError("this ensemble was loaded without the target's weights: no proxy / target logits")
        h = self.proxy_source.hidden(pairs)
        row = self._rows[1]
        return dataclasses.replace(h, states=h.states[row: row + 1], vocab=self.vocab)

    def _score(self, pairs) -> list[TokenScores]:
        q, p = self.draft_hidden(pairs), self.proxy_hidden(pairs)

        def terms(ql, pl):
            t = divergence.eu_decomposition(ql, pl[0])
            return t.total, t.variance, t.bias

        total, variance, bias = reduce_chunks(terms, q, p)
        return [TokenScores(token_ids=r, eu=e, variance=v, bias=b)
                for (_, r), e, v, b in zip(pairs, q.split(total), q.split(variance), q.split(bias), strict=True)]
