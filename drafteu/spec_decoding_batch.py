"""Speculative decoding of several requests together, each token with its EU.

``spec_decoding.SpeculativeDecoder`` decodes one prompt; ``BatchedSpeculativeDecoder.generate`` decodes
several in lockstep rounds: the K drafts propose gamma tokens for every live request (each step one
forward of K x B rows, the fused K-adapter layout), the target verifies every request's proposals in
one forward (with the proxy's row for p_mix), and each request then accepts, stops, streams its EU and
leaves the batch on its own.  Decoding on a CPU is bound by reading the weights, so B requests per
forward cost little more than one.

The caches are ``kvcache.RaggedCache``s: every request feeds what its cache lacks, its own positions,
its rollback its own.  Each request keeps its own generator, so its answer does not depend on what it
was batched with: greedy answers equal the target's greedy answer (and the single-request decoder's);
sampled ones keep the target's distribution.  Proposals from the drafts' mixture (``propose="mix"``);
dynamic caches (a request's cache lives for its generation: no prompt cache across calls).  Per-round
rules (acceptance, stopping, the EU of emitted tokens) are the single-request decoder's functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from drafteu.errors import DraftEUError
from drafteu.kvcache import RaggedCache, sliding_window
from drafteu.spec_rounds import (
    Generation,
    SpecResult,
    SpeculateOptions,
    accept,
    accept_rule,
    check_request,
    emit,
    needs_bonus,
    stop_at,
    verifier_rows,
)


@dataclass
class Request:
    """One generation of a batch: its prompt and how it decodes (``SpeculativeDecoder.generate``'s
    arguments): ``on_tokens(ids, variance, bias[, logprobs])`` streams its finished tokens, ``stops`` a
    ``data.TextStops``, ``logprobs`` a top count (None: none), ``cancelled`` asked every round."""

    prompt_ids: Sequence[int]
    max_new_tokens: int
    temperature: float = 0.0
    seed: int = 0
    on_tokens: Callable[..., None] | None = None
    stops: object = None
    logprobs: int | None = None
    cancelled: Callable[[], bool] | None = None


@dataclass(eq=False)  # rows compared by identity
class _Row:
    req: Request
    st: Generation
    props: list[int] = field(default_factory=list)
    r_probs: list[torch.Tensor] = field(default_factory=list)


class BatchedSpeculativeDecoder:
    """K drafts (``drafts``: a ``FusedDrafts`` or PeftModel with the adapters ``names``) proposing from their
    mixture for a ``target`` (a PeftModel holding the proxy adapter ``proxy`` when ``bias="proxy"``)."""

    def __init__(self, target, drafts, names: list[str], vocab: int, options: SpeculateOptions | None = None,
                 **option_fields):
        from peft import PeftModel

        from drafteu.adapters import k_adapter_model

        options, self.target_rows, self.bias_row = verifier_rows(target, options or SpeculateOptions(**option_fields))
        if options.propose != "mix":
            raise DraftEUError("several requests decode together with the drafts' mixture proposing (propose='mix'); "
                               "propose=k decodes one request at a time")
        for model in (target, drafts):
            config = getattr(model, "config", None)
            if config is not None and sliding_window(config):
                raise DraftEUError("a sliding-window model decodes one request at a time")
        self.options, self.gamma, self.eu, self.bias = options, options.gamma, options.eu, options.bias
        self.vocab, self.names = vocab, list(names)
        self.drafts = k_adapter_model(drafts, names) if isinstance(drafts, PeftModel) else drafts
        self.target = k_adapter_model(target, self.target_rows) if self.target_rows else target
        self.device = next(target.parameters()).device

    @classmethod
    def from_ensemble(cls, ens, target, options: SpeculateOptions | None = None, **option_fields):
        """From an ``estimators.DraftEnsemble`` and the target model (with the proxy adapter when the
        ensemble has one): its K drafts' fused runner proposes (without a proxy row of theirs)."""
        return cls(target, ens.draft_runner(), ens.names, ens.vocab, options, **option_fields)

    @torch.no_grad()
    def generate(self, requests: list[Request], eos_ids: set[int] | frozenset = frozenset()) -> list[SpecResult]:
        """Decode every request; each result as ``SpeculativeDecoder.generate``'s for that request alone."""
        rows = []
        for r in requests:
            check_request(r.prompt_ids, r.max_new_tokens, r.temperature)
            st = Generation(seq=list(r.prompt_ids), prompt_len=len(r.prompt_ids), temperature=r.temperature,
                            gen=torch.Generator().manual_seed(r.seed), vocab=self.vocab, device=self.device,
                            logprobs=r.logprobs, gamma=self.gamma)
            if r.logprobs is not None:
                st.res.logprobs, st.res.top = [], []
            rows.append(_Row(r, st))
        drafts = RaggedCache(self.drafts, self.names, len(rows))
        target = RaggedCache(self.target, self.target_rows, len(rows))
        live, t0 = list(rows), time.perf_counter()
        while live:
            done = [row for row in live if row.req.cancelled is not None and row.req.cancelled()]
            for row in done:
                row.st.res.finish = "cancelled"
            live = self._leave(live, done, drafts, target)
            if not live:
                break
            t = [time.perf_counter()]
            self._propose(live, drafts)
            t.append(time.perf_counter())
            self._verify(live, target, drafts)
            t.append(time.perf_counter())
            finished = [row for row in live if stop_at(row.st, eos_ids, row.req.max_new_tokens, row.req.stops)]
            bonus = [row for row in finished if self.eu and needs_bonus(row.st, True)]
            if bonus:
                self._bonus(live, bonus, drafts)
            for row in live:
                st, stops = row.st, row.req.stops
                hold = 0 if row in finished or not stops else stops.held(st.seq[st.prompt_len:])
                emit(st, self.eu, row.req.on_tokens, hold)
            t.append(time.perf_counter())
            for row in live:  # the round's time, split evenly between the requests it decoded
                for key, a, b in zip(("draft_s", "verify_s", "eu_s"), t, t[1:], strict=False):
                    row.st.timings[key] += (b - a) / len(live)
            live = self._leave(live, finished, drafts, target)
        out = []
        for row in rows:
            res = row.st.res
            res.token_ids = row.st.seq[row.st.prompt_len:]
            if self.eu:
                res.variance, res.bias = torch.tensor(row.st.var_out), torch.tensor(row.st.bias_out)
            res.seconds, res.timings = time.perf_counter() - t0, row.st.timings
            out.append(res)
        return out

    @staticmethod
    def _leave(live: list[_Row], gone: list[_Row], *caches: RaggedCache) -> list[_Row]:
        if not gone:
            return live
        keep = [b for b, row in enumerate(live) if row not in gone]
        for c in caches:
            c.keep(keep)
        return [live[b] for b in keep]

    def _feed(self, cache: RaggedCache, live: list[_Row], fulls: list[list[int]]) -> list[tuple[torch.Tensor, int]]:
        """Each live row's (R, n, V) logits of its needed new positions (never its prompt's interior) and the
        sequence position the first of them predicts (``Generation.feed`` for a batch)."""
        keeps = [len(f) - max(cache.fed(b), row.st.prompt_len - 1) if len(f) > cache.fed(b) else 0
                 for b, (row, f) in enumerate(zip(live, fulls, strict=True))]
        logits = cache.feed(fulls, max(keeps))[..., : self.vocab]
        rows, n = cache.rows, len(live)
        out = []
        for b, (f, k) in enumerate(zip(fulls, keeps, strict=True)):
            own = logits[[r * n + b for r in range(rows)]]
            out.append((own[:, own.shape[1] - k:], len(f) - k + 1))
        return out

    def _propose(self, live: list[_Row], drafts: RaggedCache) -> None:
        """Each row's gamma proposals from the drafts' mixture (a row whose gamma is reached feeds nothing
        more); the K distributions kept for the EU."""
        for row in live:
            row.props, row.r_probs = [], []
        for step in range(max(row.st.gamma for row in live)):
            fed = self._feed(drafts, live, [row.st.seq + row.props if step < row.st.gamma else drafts.ids[b]
                                            for b, row in enumerate(live)])
            for row, (logits, first) in zip(live, fed, strict=True):
                if step >= row.st.gamma:
                    continue
                row.st.keep_drafts(logits, first)
                q = logits[:, -1]
                if row.st.temperature == 0:
                    tok = int(torch.softmax(q.float(), -1).mean(0).argmax())
                else:
                    row.r_probs.append(row.st.tempered(q).mean(0))
                    tok = row.st.sample(row.r_probs[-1])
                row.props.append(tok)

    def _verify(self, live: list[_Row], target: RaggedCache, drafts: RaggedCache) -> None:
        """The target over every row's pending tokens and proposals; each row accepts on its own."""
        fed = self._feed(target, live, [row.st.seq + row.props for row in live])
        for b, (row, (out, first)) in enumerate(zip(live, fed, strict=True)):
            st = row.st
            if self.eu:
                for j in range(out.shape[1]):
                    st.p_at[first + j] = out[self.bias_row, j]
            if st.logprobs is not None:
                for j in range(out.shape[1]):
                    st.t_at[first + j] = out[0, j]
            base = len(st.seq)
            n_acc, nxt = accept_rule(st, out[0, -(len(row.props) + 1):], row.props, row.r_probs)
            accept(st, base, row.props, n_acc, nxt, self.options)
            for cache in (drafts, target):
                cache.rollback(b, base + n_acc)

    def _bonus(self, live: list[_Row], bonus: list[_Row], drafts: RaggedCache) -> None:
        """The drafts' distributions of finished rows' last tokens (the target's bonus after a fully accepted
        round): one draft forward of those rows (the others feed nothing)."""
        fulls = [row.st.seq[:-1] if row in bonus else drafts.ids[b] for b, row in enumerate(live)]
        fed = self._feed(drafts, live, fulls)
        for row, (logits, first) in zip(live, fed, strict=True):
            if row in bonus:
                row.st.q_at[first + logits.shape[1] - 1] = logits[:, -1]
