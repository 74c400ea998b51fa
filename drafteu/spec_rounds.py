"""One speculative round's state and rules, shared by the single-request decoder (``spec_decoding``) and the
decoder of several requests (``spec_decoding_batch``): the options (``SpeculateOptions``, validated once), a
generation's state (``Generation``) and result (``SpecResult``), which target rows verify (``verifier_rows``),
the acceptance rule, the next round's gamma, stopping, and the EU of emitted tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from drafteu import divergence
from drafteu.errors import DraftEUError
from drafteu.hardware import COMPILE_HELP
from drafteu.kvcache import PrefixCache


@dataclass(kw_only=True)
class SpeculateOptions:
    """How the decoder proposes, verifies and scores: shared by `drafteu speculate` and the
    library (``SpeculativeDecoder.from_ensemble``); validated here, once."""

    gamma: int = field(default=4, metadata={"help": "tokens proposed per round (on a CPU 1-2 is fastest: verifying "
                                            "more tokens is not free there, docs/benchmarks.md)"})
    propose: str | int = field(default="mix", metadata={
        "help": "who proposes: 'mix' (the drafts' mixture q_mix; EU comes free with drafting) or a draft index k "
                "(draft k alone; the K drafts then score the round in one parallel pass)"})
    bias: str = field(default="auto", metadata={"help": "p of the bias term KL(q_mix || p): 'proxy' (p_mix, in the "
                                                "verification batch), 'target' (the verifying target, free), or "
                                                "'auto' (proxy when there is one)"})
    adaptive: bool = field(default=False, metadata={
        "help": "gamma adapts every round: +2 after a round whose proposals were all accepted, -1 after one with a "
                "rejection, within 1..gamma_max (transformers' assisted-generation heuristic); off: gamma fixed"})
    gamma_max: int = field(default=8, metadata={"help": "with adaptive: the most tokens proposed in a round"})
    eu: bool = field(default=True, metadata={"help": "compute per-token EU (off: plain speculative decoding)"})
    compile: str = field(default="auto", metadata={"help": COMPILE_HELP})

    def __post_init__(self):
        if self.gamma < 1:
            raise DraftEUError(f"gamma must be >= 1 (tokens proposed per round), got {self.gamma}")
        if self.adaptive and self.gamma_max < self.gamma:
            raise DraftEUError(f"gamma_max ({self.gamma_max}) must be >= gamma ({self.gamma}): gamma starts there")
        if self.propose != "mix":
            try:
                self.propose = int(self.propose)
            except (TypeError, ValueError):
                raise DraftEUError(f"propose must be 'mix' or a draft index, got {self.propose!r}") from None
            if self.propose < 0:
                raise DraftEUError(f"propose must be 'mix' or a draft index >= 0, got {self.propose}")
        if self.bias not in ("auto", "proxy", "target"):
            raise DraftEUError(f"bias must be auto, proxy or target, got {self.bias!r}")
        if self.compile not in ("auto", "on", "off") and not isinstance(self.compile, bool):
            raise DraftEUError(f"compile must be auto, on or off, got {self.compile!r}")


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
    # with ``logprobs`` asked for: the raw target's log-probability of each token, and its top ones
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None

    @property
    def eu(self) -> torch.Tensor | None:
        return None if self.variance is None else self.variance + self.bias

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


def verifier_rows(target, options: SpeculateOptions) -> tuple[SpeculateOptions, list[str] | None, int]:
    """(``options`` with ``bias`` resolved, the target's rows in the verifying forward, p's row among them):
    never verify with an adapter on (the target row is PEFT's ``"__base__"``); with EU against the proxy
    (``bias="proxy"``, the default when ``target`` holds the adapter ``proxy``) p_mix is a second row."""
    from peft import PeftModel

    has_proxy = "proxy" in getattr(target, "peft_config", {})
    bias = options.bias if options.bias != "auto" else ("proxy" if has_proxy else "target")
    if options.eu and bias == "proxy" and not has_proxy:
        raise DraftEUError("bias='proxy' needs the proxy adapter on the target (train one with drafteu "
                           "train-proxy, or use bias='target')")
    with_proxy = options.eu and bias == "proxy"
    rows = ["__base__", "proxy"] if with_proxy else (["__base__"] if isinstance(target, PeftModel) else None)
    return dataclasses.replace(options, bias=bias), rows, 1 if with_proxy else 0


def check_request(prompt_ids: Sequence[int], max_new_tokens: int, temperature: float) -> None:
    """A generation's arguments, checked before any work."""
    if not prompt_ids:
        raise DraftEUError("the prompt is empty")
    if max_new_tokens < 1:
        raise DraftEUError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise DraftEUError(f"temperature must be >= 0, got {temperature}")


@dataclass
class Generation:
    """The state of one ``SpeculativeDecoder.generate`` call."""

    seq: list[int]
    prompt_len: int
    temperature: float
    gen: torch.Generator
    vocab: int
    device: torch.device
    # keyed by the sequence position of the token the distribution predicts
    q_at: dict[int, torch.Tensor] = field(default_factory=dict)  # (K, V) draft logits
    p_at: dict[int, torch.Tensor] = field(default_factory=dict)  # (V,) logits of p for the bias term
    t_at: dict[int, torch.Tensor] = field(default_factory=dict)  # (V,) the raw target's logits (logprobs)
    logprobs: int | None = None  # how many top logprobs per token (None: no logprobs)
    gamma: int = 1  # tokens proposed in the next round (``next_gamma`` when adaptive)
    var_out: list[float] = field(default_factory=list)
    bias_out: list[float] = field(default_factory=list)
    streamed: int = 0
    res: SpecResult = field(default_factory=lambda: SpecResult([], None, None))
    timings: dict = field(default_factory=lambda: {"draft_s": 0.0, "verify_s": 0.0, "eu_s": 0.0})

    def tempered(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float() / self.temperature, dim=-1)

    def sample(self, probs: torch.Tensor) -> int:
        return int(torch.multinomial(probs, 1, generator=self.gen))

    def feed(self, cache: PrefixCache, extra: list[int]) -> tuple[torch.Tensor, int]:
        """Logits of every needed input position of ``seq + extra`` (never the prompt's interior)
        and the sequence position the first of them predicts."""
        total = len(self.seq) + len(extra)
        keep = total - max(cache.fed, self.prompt_len - 1)
        return cache.feed(self.seq, extra, keep, self.device)[..., : self.vocab], total - keep + 1

    def keep_drafts(self, logits: torch.Tensor, first: int) -> None:
        """Store the K drafts' (K, n, V) logits by the position each predicts."""
        for j in range(logits.shape[1]):
            self.q_at[first + j] = logits[:, j]


def accept_rule(st: Generation, p_rows: torch.Tensor, props: list[int], r_probs: list[torch.Tensor]) -> tuple[int, int]:
    """(accepted count, next token) of one round from the target's (gamma + 1, V) logits ``p_rows`` at the
    proposals' positions: greedy keeps the longest prefix equal to the target's argmax; sampling applies
    the speculative-sampling rule against the proposal distributions ``r_probs``."""
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


def next_gamma(gamma: int, n_acc: int, options: SpeculateOptions) -> int:
    """The next round's gamma after ``n_acc`` of ``gamma`` proposals were accepted: fixed, or (``adaptive``)
    +2 after a fully accepted round and -1 after a rejection, within 1..gamma_max."""
    if not options.adaptive:
        return options.gamma
    return min(options.gamma_max, gamma + 2) if n_acc == gamma else max(1, gamma - 1)


def accept(st: Generation, base: int, props: list[int], n_acc: int, nxt: int, options: SpeculateOptions) -> None:
    """Append a round's accepted proposals and the target's token to ``st``; drop the distributions computed
    after a rejected proposal (stale); set the next round's gamma.  The caches' rollback is the caller's."""
    gamma = len(props)
    st.gamma = next_gamma(gamma, n_acc, options)
    st.res.proposed += gamma
    st.res.accepted += n_acc
    st.res.rounds += 1
    st.seq += props[:n_acc] + [nxt]
    for d in (st.q_at, st.p_at):
        for j in [j for j in d if j > base + n_acc]:
            del d[j]


def needs_bonus(st: Generation, done: bool) -> bool:
    """Whether a finished generation's last token lacks its drafts' distributions (it was the target's bonus
    token after every proposal was accepted): one more draft forward gives them."""
    return done and len(st.seq) - st.prompt_len > st.streamed and (len(st.seq) - 1) not in st.q_at


def emit(st: Generation, eu: bool, on_tokens, hold: int = 0) -> None:
    """EU of every emitted token of ``st`` whose drafts' distributions are known (but the last ``hold``);
    stream them with ``on_tokens``."""
    seq, plen = st.seq, st.prompt_len
    ready = st.streamed
    while plen + ready < len(seq) - hold and (not eu or plen + ready in st.q_at):
        ready += 1
    if ready <= st.streamed:
        return
    ids = seq[plen + st.streamed: plen + ready]
    var = bias = None
    if eu:
        pos = range(plen + st.streamed, plen + ready)
        terms = divergence.eu_decomposition(torch.stack([st.q_at.pop(j) for j in pos], dim=1),
                                            torch.stack([st.p_at.pop(j) for j in pos]))
        var, bias = terms.variance.cpu(), terms.bias.cpu()
        st.var_out += var.tolist()
        st.bias_out += bias.tolist()
    lps = None
    if st.logprobs is not None:
        logp = torch.log_softmax(torch.stack([st.t_at.pop(j) for j in range(plen + st.streamed, plen + ready)])
                                 .float(), dim=-1).cpu()
        chosen = logp.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()
        values, indices = logp.topk(st.logprobs, dim=-1) if st.logprobs else (logp[:, :0], logp[:, :0].long())
        tops = [list(zip(i.tolist(), v.tolist(), strict=True)) for v, i in zip(values, indices, strict=True)]
        st.res.logprobs += chosen
        st.res.top += tops
        lps = list(zip(chosen, tops, strict=True))
    if on_tokens is not None:
        on_tokens(ids, var, bias, *([lps] if lps is not None else []))
    st.streamed = ready


def stop_at(st: Generation, eos_ids, max_new_tokens: int, stops=None) -> bool:
    """Cut at EOS / a stop string / the length limit; True when the generation is finished."""
    emitted = st.seq[st.prompt_len:]
    stop = next((i for i, t in enumerate(emitted) if t in eos_ids), None)
    if stops:
        at = stops.cut(emitted[:stop])
        stop = at if at is not None else stop
    if stop is not None:
        del st.seq[st.prompt_len + stop:]
        st.res.finish = "eos"
    elif len(emitted) > max_new_tokens:
        del st.seq[st.prompt_len + max_new_tokens:]
    return stop is not None or len(st.seq) - st.prompt_len >= max_new_tokens
