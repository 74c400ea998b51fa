"""Speculative decoding whose drafts are the EU ensemble: every emitted token carries its EU.

One round (batch 1):

1. *Draft.*  ``propose="mix"``: the K drafts run together (one mixed-adapter batch of K rows) for
   gamma steps and each proposal comes from their mixture q_mix; the K distributions at every
   position are a by-product, so the variance term JSD(q_1..q_K) costs no extra draft pass.
   ``propose=k``: draft k alone (its adapter merged into a copy of the base: no LoRA overhead)
   proposes gamma tokens; with EU on, the K drafts then score the gamma + 1 positions in one
   parallel pass (like the target's verification).
2. *Verify.*  The target runs the pending tokens and the gamma proposals in one forward.  Greedy:
   the longest prefix of proposals equal to the target's argmax is kept, then the target's own
   token.  Sampling: the standard speculative-sampling rule (accept x with probability
   min(1, p(x) / r(x)), else sample from norm(max(0, p - r)); all accepted: sample the bonus from
   p), which leaves the target's distribution unchanged.
3. *EU.*  For each emitted token: variance = JSD of the drafts at that position, bias =
   KL(q_mix || p).  ``bias="proxy"`` (the default when the drafts come with an OSD proxy) takes p =
   p_mix, the method's estimate of the target's Bayesian model average (closer to it than the raw
   target, Table 4), computed in the *same* verification forward: the proxy is an adapter on the
   target and the batch holds two rows, ``__base__`` (verification) and ``proxy`` (bias).
   ``bias="target"`` takes p = the verifying target's distribution, already computed, so the bias
   costs nothing; it is the paper's "bias with the raw target" variant.

Structure: a proposer (``MixtureProposer`` or ``SingleDraftProposer``) and a ``Verifier``, each
owning its named caches (``SpeculativeDecoder.caches``: target, drafts, designated); the options
(``SpeculateOptions``, which `drafteu speculate`'s ``speculate.SpeculateConfig`` extends) are validated once.

KV caches: each model keeps a cache and the sequence tokens it holds; after a round every cache is
cropped to the longest prefix that agrees with the accepted sequence (rejected proposals rolled
back) and the next forward feeds only what the cache lacks.  The caches outlive a generation: the
next prompt re-uses the prefix it shares with the cached one (``prefix_cache``), so few-shot
examples or a system prompt are computed once per decoder, not once per question.  The numbers are
those of offline ``drafteu score --method drafts`` on the same tokens (tested to 1e-4).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from drafteu.errors import DraftEUError
from drafteu.kvcache import PrefixCache, decoding_cache
from drafteu.spec_rounds import (  # noqa: F401  (SpeculateOptions, SpecResult: re-exported for the library's users)
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


def plain_greedy(model, prompt_ids: Sequence[int], max_new_tokens: int, eos_ids: set[int],
                 cache: PrefixCache | None = None, compile: str | bool = "auto") -> list[int]:
    """Plain greedy decoding of ``model`` with a KV cache, one token per forward (the baseline).
    Pass the same ``cache`` (``kvcache.decoding_cache(model)``) to later calls to re-use shared
    prompt prefixes; without one, ``compile`` (``hardware.resolve_compile``) picks the cache."""
    from drafteu.hardware import resolve_compile

    dev = next(model.parameters()).device
    m = cache if cache is not None else decoding_cache(model, compile=resolve_compile(compile, dev), device=dev)
    m.reuse(prompt_ids)
    seq, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        tok = int(m.feed(seq, [], 1, dev)[0, -1].argmax())
        if tok in eos_ids:
            break
        seq.append(tok)
        out.append(tok)
    return out


# ---------------------------------------------------------------------------------------------
# Proposers: who drafts the gamma tokens of a round.  Each owns its named caches; ``scorer`` is the
# cache of the K-draft ensemble whose distributions the EU needs.


class MixtureProposer:
    """The K drafts together (one batch of K rows); each proposal comes from their mixture q_mix, and
    the K distributions it needs are the ones the EU's variance term reads (no extra pass)."""

    def __init__(self, drafts: PrefixCache):
        self.caches = {"drafts": drafts}
        self.scorer = drafts

    def propose(self, st: Generation, gamma: int, eu: bool) -> tuple[list[int], list[torch.Tensor]]:
        props: list[int] = []
        r_probs: list[torch.Tensor] = []
        for _ in range(gamma):
            logits, first = st.feed(self.scorer, props)  # (K, n, V)
            st.keep_drafts(logits, first)
            q = logits[:, -1]
            if st.temperature == 0:
                tok = int(torch.softmax(q.float(), -1).mean(0).argmax())
            else:
                r_probs.append(st.tempered(q).mean(0))
                tok = st.sample(r_probs[-1])
            props.append(tok)
        return props, r_probs


class SingleDraftProposer:
    """Draft k alone (its adapter merged into a copy of the base: no LoRA work) proposes; with EU on,
    the K drafts then score the gamma + 1 positions in one parallel pass."""

    def __init__(self, designated: PrefixCache, drafts: PrefixCache | None):
        self.caches = {"designated": designated} | ({"drafts": drafts} if drafts is not None else {})
        self.designated, self.scorer = designated, drafts

    def propose(self, st: Generation, gamma: int, eu: bool) -> tuple[list[int], list[torch.Tensor]]:
        props: list[int] = []
        r_probs: list[torch.Tensor] = []
        for _ in range(gamma):
            q = st.feed(self.designated, props)[0][0, -1]
            if st.temperature == 0:
                tok = int(q.argmax())
            else:
                r_probs.append(st.tempered(q))
                tok = st.sample(r_probs[-1])
            props.append(tok)
        if eu:
            st.keep_drafts(*st.feed(self.scorer, props))
        return props, r_probs


class Verifier:
    """The target: one forward over what its cache lacks + the proposals.  With the proxy row
    (``bias="proxy"``) the batch holds two rows, ``__base__`` (verification) and ``proxy`` (p_mix for
    the bias term); otherwise p is the verifying target itself."""

    def __init__(self, cache: PrefixCache, bias_row: int):
        self.cache, self.bias_row = cache, bias_row

    def verify(self, st: Generation, props: list[int], r_probs: list[torch.Tensor], gamma: int,
               eu: bool) -> tuple[int, int]:
        """(accepted count, next token): greedy keeps the longest prefix equal to the target's argmax;
        sampling applies the speculative-sampling rule (the target's distribution is kept)."""
        out, first = st.feed(self.cache, props)  # (B, n, V); the last gamma + 1 predict base ..
        p_rows = out[0, -(gamma + 1):]
        if eu:
            for j in range(out.shape[1]):
                st.p_at[first + j] = out[self.bias_row, j]
        if st.logprobs is not None:  # row 0 is the raw target (verification)
            for j in range(out.shape[1]):
                st.t_at[first + j] = out[0, j]
        return accept_rule(st, p_rows, props, r_probs)


class SpeculativeDecoder:
    """Speculative decoding with per-token EU (see the module docstring): a proposer, a verifier, and
    their named caches (``caches``: target, drafts, designated), kept across generations."""

    def __init__(self, proposer: MixtureProposer | SingleDraftProposer, verifier: Verifier, vocab: int,
                 options: SpeculateOptions, *, device, prefix_cache: bool = True):
        self.proposer, self.verifier, self.vocab, self.options = proposer, verifier, vocab, options
        self.device, self.prefix_cache = device, prefix_cache
        self.caches: dict[str, PrefixCache] = {"target": verifier.cache, **proposer.caches}
        self.gamma, self.propose, self.bias, self.eu = options.gamma, options.propose, options.bias, options.eu

    @classmethod
    def from_models(cls, target, drafts, names: list[str], vocab: int, options: SpeculateOptions | None = None, *,
                    designated=None, fused: bool = True, prefix_cache: bool = True, **option_fields
                    ) -> SpeculativeDecoder:
        """``target``: the target model, or a PeftModel holding the proxy adapter ``proxy`` (then
        ``bias="proxy"`` is available).  ``drafts``: a PeftModel with the K draft adapters ``names``
        (or a ``FusedDrafts`` over them).  ``designated``: draft k's merged model when ``propose=k``.
        ``vocab``: the number of logit columns target and drafts share.  Options: ``options`` or
        its fields as keywords."""
        from peft import PeftModel

        from drafteu.adapters import k_adapter_model
        from drafteu.hardware import resolve_compile

        options, rows, bias_row = verifier_rows(target, options or SpeculateOptions(**option_fields))
        device = next(target.parameters()).device
        if options.propose != "mix" and not options.propose < len(names):
            raise DraftEUError(f"propose {options.propose}: the ensemble has drafts 0..{len(names) - 1}; "
                               "give one of them, or 'mix'")
        if options.propose != "mix" and designated is None:
            raise DraftEUError("propose=k needs the designated draft model "
                               "(SpeculativeDecoder.from_ensemble builds it)")
        compiled = resolve_compile(options.compile, device)
        if compiled and not fused:
            raise DraftEUError("compiled steps need the fused drafts (fused=True): PEFT's mixed-adapter batch "
                               "does not compile")
        drafts = k_adapter_model(drafts, names, fused=fused) if isinstance(drafts, PeftModel) else drafts

        def cache(model, rows=None):
            return decoding_cache(model, rows, compile=compiled, device=device)

        verifier = Verifier(cache(k_adapter_model(target, rows, fused=fused or compiled) if rows else target, rows),
                            bias_row=bias_row)
        if options.propose == "mix":
            proposer = MixtureProposer(cache(drafts, names))
        else:
            proposer = SingleDraftProposer(cache(designated), cache(drafts, names) if options.eu else None)
        dec = cls(proposer, verifier, vocab, options, device=device, prefix_cache=prefix_cache)
        dec.compile = compiled
        return dec

    @classmethod
    def from_ensemble(cls, ens, target, options: SpeculateOptions | None = None, *, fused: bool = True,
                      prefix_cache: bool = True, **option_fields) -> SpeculativeDecoder:
        """From an ``estimators.DraftEnsemble`` (drafts) and the target model (with the proxy
        adapter when the ensemble has one); builds the merged designated draft when needed.
        ``fused`` runs the K drafts with batched LoRA matmuls (drafteu.fused) instead of PEFT's
        mixed-adapter batch: same numbers, fewer small ops per step."""
        options = options or SpeculateOptions(**option_fields)
        designated = None
        if options.propose != "mix":
            if not options.propose < len(ens.names):
                raise DraftEUError(f"propose {options.propose}: the ensemble has drafts 0..{len(ens.names) - 1}; "
                                   "give one of them, or 'mix'")
            designated = merged_draft(ens, ens.adapters[options.propose])
        return cls.from_models(target, ens.draft_runner() if fused else ens.drafts, ens.names, ens.vocab, options,
                               designated=designated, fused=fused, prefix_cache=prefix_cache)

    # -- one generation: propose -> verify -> accept -> stop -> emit EU -----------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                 eos_ids: set[int] | frozenset = frozenset(),
                 on_tokens: Callable[..., None] | None = None, stops=None, logprobs: int | None = None,
                 cancelled: Callable[[], bool] | None = None) -> SpecResult:
        """Decode up to ``max_new_tokens``; ``on_tokens(ids, variance, bias)`` streams each round's
        finished tokens (EU known) as they come.  ``stops`` (``data.TextStops``): the answer also ends
        where its text reaches one of them (the plain format's next turn, a request's stop strings),
        cut before it; tokens that could begin one are held back from the stream until it is known.
        ``logprobs`` (a count, 0 for none but the chosen token's): the raw target's log-probabilities
        from the verifying pass (no extra forward) in the result, and ``on_tokens`` gets them as a
        fourth argument ``[(logprob, [(id, logprob), ...]) per token]``.  ``cancelled``: asked each
        round; True ends the generation there (finish "cancelled")."""
        check_request(prompt_ids, max_new_tokens, temperature)
        for c in self.caches.values():  # a prompt cache: keep what the previous prompt shares with this one
            if self.prefix_cache:
                c.reuse(prompt_ids)
            else:
                c.rollback(0)
        st = Generation(seq=list(prompt_ids), prompt_len=len(prompt_ids), temperature=temperature,
                         gen=torch.Generator().manual_seed(seed), vocab=self.vocab, device=self.device,
                         logprobs=logprobs)
        if logprobs is not None:
            st.res.logprobs, st.res.top = [], []
        eu = self.options.eu
        st.gamma = self.options.gamma
        t0 = time.perf_counter()
        while len(st.seq) - st.prompt_len < max_new_tokens:
            if cancelled is not None and cancelled():
                st.res.finish = "cancelled"
                break
            base = len(st.seq)
            gamma = st.gamma
            props, r_probs = _timed(st, "draft_s", self.proposer.propose, st, gamma, eu)
            n_acc, nxt = _timed(st, "verify_s", self.verifier.verify, st, props, r_probs, gamma, eu)
            self._accept(st, base, props, n_acc, nxt)
            done = stop_at(st, eos_ids, max_new_tokens, stops)
            hold = 0 if done or not stops else stops.held(st.seq[st.prompt_len:])
            _timed(st, "eu_s", self._emit, st, done, on_tokens, hold)
            if done:
                break
        res = st.res
        res.token_ids = st.seq[st.prompt_len:]
        if eu:
            res.variance, res.bias = torch.tensor(st.var_out), torch.tensor(st.bias_out)
        res.seconds = time.perf_counter() - t0
        res.timings = st.timings
        return res

    def _accept(self, st: Generation, base: int, props: list[int], n_acc: int, nxt: int) -> None:
        """Append the accepted proposals and the target's token; roll caches and stale distributions back."""
        accept(st, base, props, n_acc, nxt, self.options)
        for c in self.caches.values():
            c.rollback(base + n_acc)

    def _emit(self, st: Generation, done: bool, on_tokens, hold: int = 0) -> None:
        """EU of every emitted token whose drafts' distributions are known (but the last ``hold``);
        stream them."""
        if self.options.eu and needs_bonus(st, done):
            last = st.seq.pop()  # the bonus token's drafts' distributions: one more draft forward
            logits, first = st.feed(self.proposer.scorer, [])
            st.seq.append(last)
            st.q_at[first + logits.shape[1] - 1] = logits[:, -1]
        emit(st, self.options.eu, on_tokens, hold)


def _timed(st: Generation, key: str, fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    st.timings[key] += time.perf_counter() - t
    return out


def merged_draft(ens, name: str):
    """A copy of the ensemble's base with draft ``name``'s adapter (its directory's name) merged in (plain,
    fast model); on a quantized base, which cannot take a merge, the base with that one adapter on."""
    from peft import PeftModel

    from drafteu import models
    from drafteu.quantize import is_quantized

    device = next(ens.drafts.parameters()).device
    base = models.load(ens.base_spec, dtype=ens.dtype, device=device).model
    one = PeftModel.from_pretrained(base, ens.drafts_dir / name)
    return (one if is_quantized(base) else one.merge_and_unload()).eval()
