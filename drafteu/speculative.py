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
from dataclasses import dataclass, field

import torch

from drafteu import divergence
from drafteu.errors import DraftEUError
from drafteu.kvcache import PrefixCache, decoding_cache


@dataclass
class SpecResult:
    """Emitted token ids (EOS excluded), per-token EU terms, and decoding statistics."""

    token_ids: list[int]
    variance: torch.Tensor | None
    bias: torch.Tensor | None
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    seconds: float = 0.0
    finish: str = "length"
    timings: dict = field(default_factory=dict)

    @property
    def eu(self) -> torch.Tensor | None:
        return None if self.variance is None else self.variance + self.bias

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


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


class SpeculativeDecoder:
    """Speculative decoding with per-token EU (see the module docstring).

    ``target``: the target model, or a PeftModel holding the proxy adapter ``proxy`` (then
    ``bias="proxy"`` is available).  ``drafts``: a PeftModel with the K draft adapters ``names``.
    ``vocab``: the number of logit columns target and drafts share.
    """

    def __init__(self, target, drafts, names: list[str], vocab: int, *, gamma: int = 4, propose: str | int = "mix",
                 bias: str = "target", eu: bool = True, designated=None, prefix_cache: bool = True,
                 fused: bool = True, compile: str | bool = "auto"):
        if gamma < 1:
            raise DraftEUError(f"gamma must be >= 1 (proposals per round), got {gamma}")
        if propose != "mix" and not (isinstance(propose, int) and 0 <= propose < len(names)):
            raise DraftEUError(f"propose must be 'mix' or a draft index 0..{len(names) - 1}, got {propose!r}")
        if bias not in ("target", "proxy"):
            raise DraftEUError(f"bias must be 'target' or 'proxy', got {bias!r}")
        if eu and bias == "proxy" and "proxy" not in getattr(target, "peft_config", {}):
            raise DraftEUError("bias='proxy' needs the proxy adapter on the target (train one with drafteu "
                               "train-proxy, or use bias='target')")
        if propose != "mix" and designated is None:
            raise DraftEUError("propose=k needs the designated draft model (SpeculativeDecoder.from_ensemble builds it)")
        self.target, self.drafts, self.names, self.vocab = target, drafts, names, vocab
        self.gamma, self.propose, self.bias, self.eu = gamma, propose, bias, eu
        self.designated = designated
        self.device = next(target.parameters()).device
        self.prefix_cache = prefix_cache
        # Verification + proxy rows in one forward; fused: the proxy's LoRA as batched matmuls
        # (adapters.k_adapter_model) rather than PEFT's mixed-adapter gather/scatter.
        from peft import PeftModel

        from drafteu.adapters import k_adapter_model
        from drafteu.hardware import resolve_compile

        self.compile = resolve_compile(compile, self.device)
        with_proxy = eu and bias == "proxy"
        verify_names = ["__base__", "proxy"] if with_proxy else (["__base__"] if isinstance(target, PeftModel) else None)
        self.verifier = target
        if verify_names and (fused or self.compile):  # never verify with an adapter on
            self.verifier = k_adapter_model(target, verify_names)
        if self.compile and not hasattr(drafts, "compiled") and isinstance(drafts, PeftModel):
            raise DraftEUError("compiled steps need the fused drafts (fused=True): PEFT's mixed-adapter batch "
                               "does not compile")

        def cache(model, names=None):
            return decoding_cache(model, names, compile=self.compile, device=self.device)

        # (target, ensemble, designated) caches, kept across generations
        self._caches = (cache(self.verifier, verify_names),
                        cache(drafts, names) if (propose == "mix" or eu) else None,
                        None if propose == "mix" else cache(designated))

    @classmethod
    def from_ensemble(cls, ens, target, fused: bool = True, **kw) -> SpeculativeDecoder:
        """From an ``estimators.DraftEnsemble`` (drafts) and the target model (with the proxy
        adapter when the ensemble has one); builds the merged designated draft when needed.
        ``fused`` runs the K drafts with batched LoRA matmuls (drafteu.fused) instead of PEFT's
        mixed-adapter batch: same numbers, fewer small ops per step."""
        designated = None
        propose = kw.get("propose", "mix")
        if propose != "mix":
            if not (isinstance(propose, int) and 0 <= propose < len(ens.names)):
                raise DraftEUError(f"propose must be 'mix' or a draft index 0..{len(ens.names) - 1}, got {propose!r}")
            designated = merged_draft(ens, ens.names[propose])
        drafts = ens.runner if fused else ens.drafts
        return cls(target, drafts, ens.names, ens.vocab, designated=designated, fused=fused, **kw)

    # -- one generation: draft -> verify -> accept -> stop -> emit EU, each a method ------------------

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0, seed: int = 0,
                 eos_ids: set[int] | frozenset = frozenset(),
                 on_tokens: Callable[[list[int], torch.Tensor | None, torch.Tensor | None], None] | None = None,
                 ) -> SpecResult:
        """Decode up to ``max_new_tokens``; ``on_tokens(ids, variance, bias)`` streams each round's
        finished tokens (EU known) as they come."""
        if not prompt_ids:
            raise DraftEUError("the prompt is empty")
        if max_new_tokens < 1:
            raise DraftEUError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if temperature < 0:
            raise DraftEUError(f"temperature must be >= 0, got {temperature}")
        for c in self._caches:  # a prompt cache: keep what the previous answer's prompt shares with this one
            if c is not None and self.prefix_cache:
                c.reuse(prompt_ids)
            elif c is not None:
                c.rollback(0)
        st = _Generation(seq=list(prompt_ids), prompt_len=len(prompt_ids), temperature=temperature,
                         gen=torch.Generator().manual_seed(seed))
        t0 = time.perf_counter()
        while len(st.seq) - st.prompt_len < max_new_tokens:
            base = len(st.seq)
            props, r_probs = self._timed(st, "draft_s", self._draft, st)
            n_acc, nxt = self._timed(st, "verify_s", self._verify, st, props, r_probs)
            self._accept(st, base, props, n_acc, nxt)
            done = self._stop(st, eos_ids, max_new_tokens)
            self._timed(st, "eu_s", self._emit, st, done, on_tokens)
            if done:
                break
        res = st.res
        res.token_ids = st.seq[st.prompt_len:]
        if self.eu:
            res.variance, res.bias = torch.tensor(st.var_out), torch.tensor(st.bias_out)
        res.seconds = time.perf_counter() - t0
        res.timings = st.timings
        return res

    @staticmethod
    def _timed(st: _Generation, key: str, fn, *args):
        t = time.perf_counter()
        out = fn(*args)
        st.timings[key] += time.perf_counter() - t
        return out

    def _feed(self, st: _Generation, c: PrefixCache, extra: list[int]) -> tuple[torch.Tensor, int]:
        """Logits of every needed input position (never the prompt's interior) and the sequence
        position the first of them predicts."""
        total = len(st.seq) + len(extra)
        keep = total - max(c.fed, st.prompt_len - 1)
        return c.feed(st.seq, extra, keep, self.device)[..., : self.vocab], total - keep + 1

    def _draft(self, st: _Generation) -> tuple[list[int], list[torch.Tensor]]:
        """gamma proposals (from q_mix or draft k) and, when sampling, their proposal distributions."""
        _, ens, one = self._caches
        props: list[int] = []
        r_probs: list[torch.Tensor] = []
        for _ in range(self.gamma):
            if self.propose == "mix":
                logits, first = self._feed(st, ens, props)  # (K, n, V)
                for j in range(logits.shape[1]):
                    st.q_at[first + j] = logits[:, j]
                q = logits[:, -1]
                if st.temperature == 0:
                    tok = int(torch.softmax(q.float(), -1).mean(0).argmax())
                else:
                    r_probs.append(st.tempered(q).mean(0))
                    tok = st.sample(r_probs[-1])
            else:
                q = self._feed(st, one, props)[0][0, -1]
                if st.temperature == 0:
                    tok = int(q.argmax())
                else:
                    r_probs.append(st.tempered(q))
                    tok = st.sample(r_probs[-1])
            props.append(tok)
        if self.propose != "mix" and self.eu:  # the K drafts score the gamma + 1 positions in one pass
            logits, first = self._feed(st, ens, props)
            for j in range(logits.shape[1]):
                st.q_at[first + j] = logits[:, j]
        return props, r_probs

    def _verify(self, st: _Generation, props: list[int], r_probs: list[torch.Tensor]) -> tuple[int, int]:
        """One target forward over what its cache lacks + the proposals: (accepted count, next token)."""
        out, first = self._feed(st, self._caches[0], props)  # (B, n, V); the last gamma + 1 predict base ..
        p_rows = out[0, -(self.gamma + 1):]
        if self.eu:
            src = out[1] if self.bias == "proxy" else out[0]
            for j in range(out.shape[1]):
                st.p_at[first + j] = src[j]
        n_acc, nxt = 0, None
        for i, tok in enumerate(props):
            if st.temperature == 0:
                if int(p_rows[i].argmax()) != tok:
                    break
            else:
                p, r = st.tempered(p_rows[i]), r_probs[i]
                if float(torch.rand((), generator=st.gen)) >= min(1.0, float(p[tok] / r[tok])):
                    resid = torch.clamp(p - r, min=0)
                    nxt = st.sample(resid / resid.sum() if float(resid.sum()) > 0 else p)
                    break
            n_acc += 1
        if nxt is None:
            nxt = int(p_rows[n_acc].argmax()) if st.temperature == 0 else st.sample(st.tempered(p_rows[n_acc]))
        return n_acc, nxt

    def _accept(self, st: _Generation, base: int, props: list[int], n_acc: int, nxt: int) -> None:
        """Append the accepted proposals and the target's token; roll caches and stale distributions back."""
        st.res.proposed += self.gamma
        st.res.accepted += n_acc
        st.res.rounds += 1
        st.seq += props[:n_acc] + [nxt]
        for c in self._caches:
            if c is not None:
                c.rollback(base + n_acc)
        for d in (st.q_at, st.p_at):  # distributions computed after a rejected proposal are stale
            for j in [j for j in d if j > base + n_acc]:
                del d[j]

    @staticmethod
    def _stop(st: _Generation, eos_ids, max_new_tokens: int) -> bool:
        """Cut at EOS / the length limit; True when the generation is finished."""
        emitted = st.seq[st.prompt_len:]
        stop = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
        if stop is not None:
            del st.seq[st.prompt_len + stop:]
            st.res.finish = "eos"
        elif len(emitted) > max_new_tokens:
            del st.seq[st.prompt_len + max_new_tokens:]
        return stop is not None or len(st.seq) - st.prompt_len >= max_new_tokens

    def _emit(self, st: _Generation, done: bool, on_tokens) -> None:
        """EU of every emitted token whose drafts' distributions are known; stream them."""
        seq, plen = st.seq, st.prompt_len
        if self.eu and done and len(seq) - plen > st.streamed and (len(seq) - 1) not in st.q_at:
            last = seq.pop()  # the bonus token's drafts' distributions: one more draft forward
            logits, first = self._feed(st, self._caches[1], [])
            seq.append(last)
            st.q_at[first + logits.shape[1] - 1] = logits[:, -1]
        ready = st.streamed
        while plen + ready < len(seq) and (not self.eu or plen + ready in st.q_at):
            ready += 1
        if ready <= st.streamed:
            return
        ids = seq[plen + st.streamed: plen + ready]
        var = bias = None
        if self.eu:
            pos = range(plen + st.streamed, plen + ready)
            terms = divergence.eu_decomposition(torch.stack([st.q_at.pop(j) for j in pos], dim=1),
                                                torch.stack([st.p_at.pop(j) for j in pos]))
            var, bias = terms.variance.cpu(), terms.bias.cpu()
            st.var_out += var.tolist()
            st.bias_out += bias.tolist()
        if on_tokens is not None:
            on_tokens(ids, var, bias)
        st.streamed = ready


@dataclass
class _Generation:
    """The state of one ``SpeculativeDecoder.generate`` call."""

    seq: list[int]
    prompt_len: int
    temperature: float
    gen: torch.Generator
    # keyed by the sequence position of the token the distribution predicts
    q_at: dict[int, torch.Tensor] = field(default_factory=dict)  # (K, V) draft logits
    p_at: dict[int, torch.Tensor] = field(default_factory=dict)  # (V,) logits of p for the bias term
    var_out: list[float] = field(default_factory=list)
    bias_out: list[float] = field(default_factory=list)
    streamed: int = 0
    res: SpecResult = field(default_factory=lambda: SpecResult([], None, None))
    timings: dict = field(default_factory=lambda: {"draft_s": 0.0, "verify_s": 0.0, "eu_s": 0.0})

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def sample(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))


def merged_draft(ens, name: str):
    """A copy of the ensemble's base with draft ``name``'s adapter merged in (plain, fast model)."""
    from peft import PeftModel

    from drafteu import models

    device = next(ens.drafts.parameters()).device
    base = models.load(ens.base_spec, dtype=ens.dtype, device=device).model
    return PeftModel.from_pretrained(base, ens.drafts_dir / name).merge_and_unload().eval()


# ---------------------------------------------------------------------------------------------
# The `drafteu speculate` stage.


def run(cfg, on_pieces=None) -> dict:
    """Load target and drafts, decode the answer speculatively, return (and optionally write) the
    JSON of `drafteu score` plus a ``speculative`` block (acceptance, tokens/s, settings).
    ``on_pieces(texts, variance, bias)`` streams each round's finished tokens as text."""
    from pathlib import Path

    from drafteu import data, estimators, models, rundir
    from drafteu.estimators import TokenScores
    from drafteu.runio import write_json
    from drafteu.score import StreamPieces, to_json, token_pieces

    if cfg.json is not None and Path(cfg.json).is_dir():
        raise DraftEUError(f"--json {cfg.json} is a directory; give a file path")
    drafts_dir, proxy_dir = rundir.resolve_drafts(cfg.drafts, cfg.proxy)
    bias = cfg.bias if cfg.bias != "auto" else ("proxy" if proxy_dir is not None else "target")
    if bias == "proxy" and proxy_dir is None:
        raise DraftEUError("--bias proxy needs a proxy: pass a run directory with proxy/, or --proxy DIR")
    lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    use_proxy = cfg.eu and bias == "proxy"
    ens = estimators.DraftEnsemble(drafts_dir, lm, proxy_dir if use_proxy else None, device=cfg.device,
                                   dtype=cfg.draft_dtype)
    if isinstance(cfg.propose, int) and not 0 <= cfg.propose < len(ens.names):
        raise DraftEUError(f"--propose {cfg.propose}: the ensemble has drafts 0..{len(ens.names) - 1}")
    dec = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=cfg.gamma, propose=cfg.propose, bias=bias, eu=cfg.eu,
                                           compile=cfg.compile)
    prompt_ids = data.format_prompt(lm.tokenizer, cfg.question, data.shots_for("score", cfg.shots))
    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context and len(prompt_ids) + cfg.max_new_tokens + cfg.gamma > context:
        raise DraftEUError(
            f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {cfg.max_new_tokens} + --gamma {cfg.gamma} "
            f"exceeds the model's context of {context} tokens; shorten the question or lower --max-new-tokens")
    eos = models.eos_ids(lm.model, lm.tokenizer)
    on_tokens = None
    if on_pieces is not None:
        pieces_of = StreamPieces(lm.tokenizer)

        def on_tokens(ids, var, bias):
            on_pieces(pieces_of(ids), var, bias)
    res = dec.generate(prompt_ids, cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed, eos_ids=eos,
                       on_tokens=on_tokens)
    answer = lm.tokenizer.decode(res.token_ids, skip_special_tokens=True)
    pieces = token_pieces(lm.tokenizer, res.token_ids)
    method = f"speculative (drafts {ens.method}, bias: {bias})"
    if cfg.eu:
        result = to_json(cfg.question, answer, method, cfg.target,
                         TokenScores(res.token_ids, res.eu, res.variance, res.bias), pieces)
    else:
        result = {"question": cfg.question, "answer": answer, "method": method, "target": cfg.target,
                  "tokens": [{"id": int(t), "text": p} for t, p in zip(res.token_ids, pieces, strict=True)]}
    result["speculative"] = {
        "gamma": cfg.gamma, "propose": cfg.propose, "bias": bias, "eu": cfg.eu, "temperature": cfg.temperature,
        "draft_dtype": cfg.draft_dtype, "compiled": dec.compile,
        "proposed": res.proposed, "accepted": res.accepted, "acceptance": res.acceptance, "rounds": res.rounds,
        "tokens": len(res.token_ids), "seconds": res.seconds, "tokens_per_s": res.tokens_per_s,
        "finish": res.finish, **res.timings,
    }
    if cfg.json is not None:
        write_json(cfg.json, result)
    return result
