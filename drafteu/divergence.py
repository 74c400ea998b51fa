"""The EU math: pure tensor functions over next-token distributions (paper Sec. 3).

Every function takes *unnormalized logits* of any float dtype (bf16, fp16, fp32) with the
vocabulary on the last axis, normalizes them with a float32 log-softmax, and returns float32
tensors with the leading shape.  Log-probabilities are valid logits too (log-softmax is idempotent).

Numerics:
- Logits of magnitude up to ~1e4 are exact: log-softmax subtracts the row max before exp.
- ``-inf`` entries (a masked vocabulary) have probability 0 and contribute 0 to every sum
  (0 * log 0 = 0, never NaN); a mixture entry is ``-inf`` only when every member masks it.
- Divergences are computed in the "sum p (log p - log q)" form, never as a difference of two
  entropies, so that nearly identical distributions give nearly zero instead of a cancellation
  error of order 1e-6 * log V.  Quantities that are non-negative by theory are clamped at 0 to
  remove rounding noise of order 1e-7.
- Memory: positions (all leading axes, flattened) are processed in chunks so that the float32
  intermediates never exceed ``chunk_elements`` entries per tensor, whatever K x T x V is.
- NaN (or +inf, or a row that masks the whole vocabulary) raises ``ValueError``.

Two implementations of ``mutual_information`` / ``eu_decomposition`` (inference; the grad path
is always eager):
- *eager, chunked* (CPUs): in-place kernels on chunk-sized buffers, a few passes over memory; on a
  CPU allocation, not arithmetic, is the cost (docs/benchmarks.md).
- *compiled* (CUDA): one ``torch.compile``d function per chunk of up to ``COMPILED_CHUNK_ELEMENTS``
  entries, which inductor fuses into a handful of reductions over the vocabulary.  A GPU runs the
  eager version's many small kernels launch-bound (measured 4.4x slower than a naive one-shot
  version); the compiled one reads the logits a few times and launches a few kernels per chunk.
  ``DRAFTEU_DIVERGENCE=compiled`` (or ``eager``) overrides the choice, e.g. to test the compiled
  path on a CPU; it needs a C++ compiler there.  ``DRAFTEU_DIVERGENCE=fused`` runs the compiled
  path's function without compiling it: the same formula on any machine (the tests compare it with
  the eager kernels everywhere, and with its compiled form where a compiler exists).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

__all__ = [
    "EUTerms",
    "entropy",
    "kl",
    "mixture",
    "mutual_information",
    "jsd",
    "eu_decomposition",
    "log_softmax",
]

# Largest number of float32 entries one intermediate tensor may hold (4M entries = 16 MiB: below glibc's 32 MiB
# mmap threshold, so chunk buffers are reused instead of page-faulted in afresh).
DEFAULT_CHUNK_ELEMENTS = 1 << 22
# Compiled path: the fused kernels keep few full-size intermediates, so chunks can be large (2^28
# float32 entries = 1 GiB; a chunk is ~150 positions at K = 6, V = 128256).
COMPILED_CHUNK_ELEMENTS = 1 << 28


class EUTerms(NamedTuple):
    """Theorem 3.4, Eq. 1: ``total = variance + bias``, each float32 with the leading shape."""

    variance: torch.Tensor  # JSD(q_1..q_K) = E_k KL(q_k || q_mix)
    bias: torch.Tensor  # KL(q_mix || p)
    total: torch.Tensor  # E_k KL(q_k || p)


# ---------------------------------------------------------------------------------------------
# Kernels on one chunk.  They work in place on chunk-sized float32 buffers: on a CPU, allocating
# fresh (page-faulting) memory costs more than the arithmetic, so each chunk allocates a few
# buffers of at most ``chunk_elements`` entries and reuses them.


def _check_floating(logits: torch.Tensor) -> None:
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got dtype {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary axis (V = 0)")


def _diagnose(*inputs: torch.Tensor) -> None:
    """Raise the ValueError that explains a NaN result (called only when one appeared)."""
    for x in inputs:
        if torch.isnan(x).any():
            raise ValueError("logits contain NaN; check the model's forward pass or the input dtype")
        if torch.isposinf(x).any():
            raise ValueError("logits contain +inf; mask tokens with -inf, never +inf")
    raise ValueError(
        "a distribution masks every vocabulary entry (all logits -inf); at least one token must stay allowed"
    )


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Float32 log-probabilities of ``logits`` (..., V); raises ValueError on NaN / +inf rows."""
    _check_floating(logits)
    return _log_softmax(logits)


def _log_softmax(x: torch.Tensor) -> torch.Tensor:
    # dtype= upcasts inside the kernel: one float32 buffer, no separate .float() copy.
    logp = torch.log_softmax(x, dim=-1, dtype=torch.float32)
    # An invalid row (NaN, +inf, or all -inf) has a NaN normalizer, so its max is NaN; a read-only
    # reduction is far cheaper than a full isnan pass.  Later kernels map 0 * log 0 NaNs to 0, so
    # this is the one place where bad input can still be seen.
    if torch.isnan(logp.amax(dim=-1)).any():
        _diagnose(x)
    return logp


def _finite_sum_(terms: torch.Tensor, grad: bool = False) -> torch.Tensor:
    # Terms are p * (log p - log q); a NaN there is 0 * (-inf or nan) at p = 0, which is 0.
    # +inf (p > 0 where q = 0) is kept: that KL is infinite.
    fn = torch.nan_to_num if grad else torch.nan_to_num_
    return fn(terms, nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)


# Each kernel has an in-place path (default: inference, memory-lean) and an out-of-place path
# (grad=True) that autograd can differentiate, used when an input requires grad (training losses).


def _entropy_lp_(logp: torch.Tensor, grad: bool = False) -> torch.Tensor:
    """H from log-probabilities; overwrites ``logp`` unless ``grad``."""
    p = logp.exp()
    return -_finite_sum_(logp * p if grad else logp.mul_(p), grad)


def _kl_lp_(logp, logq, p=None, grad: bool = False) -> torch.Tensor:
    """KL(p || q) summed over V; overwrites ``logp`` unless ``grad``.  ``p`` = exp(logp) if at hand."""
    if p is None:
        p = logp.exp()
    return _finite_sum_((logp - logq) * p if grad else logp.sub_(logq).mul_(p), grad)


def _mixture_lp(logp: torch.Tensor, buf: torch.Tensor | None = None, grad: bool = False) -> torch.Tensor:
    """(K, n, V) log-probabilities -> (n, V) log-probabilities of their uniform mixture.

    log-mean-exp around the per-entry max m: stable for any magnitude, and exact when all
    members agree (exp(0) = 1, so the mixture is m itself and the MI of identical members is
    exactly 0).  Entries every member masks stay -inf.  ``buf`` (K, n, V) is scratch space.
    """
    m = logp.amax(dim=0)
    m = torch.where(m > -math.inf, m, 0.0)
    if grad:
        m = m.detach()  # any shift gives the same mixture; a constant keeps the graph simple
        return (logp - m).exp().mean(dim=0).log() + m
    buf = torch.sub(logp, m, out=buf) if buf is not None else logp - m
    return buf.exp_().mean(dim=0).log_().add_(m)


def _jsd_lp(logp: torch.Tensor, grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(JSD, log q_mix) of (K, n, V) log-probabilities; overwrites ``logp`` unless ``grad``.

    JSD = E_k KL(q_k || q_mix), summed term by term (each >= 0): no entropy cancellation.
    """
    if grad:
        logmix = _mixture_lp(logp, grad=True)
        return _kl_lp_(logp, logmix, grad=True).mean(0).clamp_min(0.0), logmix
    scratch = torch.empty_like(logp)
    logmix = _mixture_lp(logp, scratch)
    p = torch.exp(logp, out=scratch)
    jsd = _kl_lp_(logp, logmix, p).mean(0).clamp_min_(0.0)
    return jsd, logmix


def _grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------
# Chunking over positions.


def _positions_per_chunk(members: int, vocab: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, members * vocab))


def _chunked(
    fn: Callable[..., tuple[torch.Tensor, ...]],
    stacked: list[torch.Tensor],
    flat: list[torch.Tensor],
    lead: torch.Size,
    chunk_elements: int,
    n_out: int,
) -> list[torch.Tensor]:
    """Apply ``fn`` over position chunks.

    ``stacked`` tensors are (K, N, V), ``flat`` tensors are (N, V); ``fn`` gets float32 slices
    and returns ``n_out`` tensors of shape (n,).  Outputs are reshaped to ``lead``.
    """
    n = (stacked or flat)[0].shape[-2]
    members = max([t.shape[0] for t in stacked] + [1]) + len(flat)
    vocab = (stacked or flat)[0].shape[-1]
    step = _positions_per_chunk(members, vocab, chunk_elements)
    device = (stacked or flat)[0].device
    parts: list[list[torch.Tensor]] = [[] for _ in range(n_out)]
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        for acc, r in zip(parts, fn(*[t[:, sl] for t in stacked], *[t[sl] for t in flat]), strict=True):
            acc.append(r)
    empty = torch.empty(0, dtype=torch.float32, device=device)
    return [(torch.cat(acc) if acc else empty).reshape(lead) for acc in parts]


def _flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


def _flat_members(logits: torch.Tensor, name: str) -> torch.Tensor:
    if logits.dim() < 2:
        raise ValueError(f"{name} must be shaped (K, ..., V); got shape {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{name} has no members (K = 0)")
    return logits.reshape(logits.shape[0], -1, logits.shape[-1])


def _check_vocab(*tensors: torch.Tensor) -> None:
    vocabs = {t.shape[-1] for t in tensors}
    if len(vocabs) != 1:
        raise ValueError(
            f"vocabulary sizes differ ({sorted(vocabs)}); align the models' vocabularies first "
            "(drafteu.models.shared_vocab_size)"
        )


# ---------------------------------------------------------------------------------------------
# The compiled path: the same formulas, out of place, for inductor to fuse.


def _fused_terms(q: torch.Tensor, p: torch.Tensor | None):
    """(variance (n,), bias (n,) or None, invalid-row flag) of (K, n, V) draft and (n, V) proxy
    logits, in the eager kernels' forms (E_k KL; mixture by log-mean-exp; 0 * log 0 = 0)."""
    qf = q.float()
    lse = torch.logsumexp(qf, -1, keepdim=True)  # NaN / +inf / all -inf row: not finite
    bad = (~torch.isfinite(lse)).any()
    logq = qf - lse
    m = logq.amax(0)
    m = torch.where(m > -math.inf, m, 0.0)
    logmix = (logq - m).exp().mean(0).log() + m
    terms = logq.exp() * (logq - logmix)
    variance = torch.where(torch.isnan(terms), 0.0, terms).sum(-1).mean(0).clamp_min(0.0)
    if p is None:
        return variance, None, bad
    pf = p.float()
    lse_p = torch.logsumexp(pf, -1, keepdim=True)
    bad = bad | (~torch.isfinite(lse_p)).any()
    terms = logmix.exp() * (logmix - (pf - lse_p))
    bias = torch.where(torch.isnan(terms), 0.0, terms).sum(-1).clamp_min(0.0)
    return variance, bias, bad


@functools.cache
def _compiled_terms():
    return torch.compile(_fused_terms, dynamic=True)


CHOICES = ("auto", "eager", "compiled", "fused")


def choice() -> str:
    """``DRAFTEU_DIVERGENCE`` (default auto), or a ValueError naming the variable and its values."""
    value = os.environ.get("DRAFTEU_DIVERGENCE", "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"DRAFTEU_DIVERGENCE must be one of {', '.join(CHOICES)}; got {value!r} "
                         "(unset it for the default: compiled kernels on CUDA, eager elsewhere)")
    return value


def _compiled_path(device: torch.device, grad: bool) -> bool:
    """Whether to run the fused kernels: on CUDA unless DRAFTEU_DIVERGENCE=eager; on other
    devices when DRAFTEU_DIVERGENCE=compiled (or fused).  Never for a graph that needs gradients."""
    if grad:
        return False
    c = choice()
    return c in ("compiled", "fused") or (c == "auto" and device.type == "cuda")


def _compiled_terms_chunked(flat_q: torch.Tensor, flat_p: torch.Tensor | None, lead: torch.Size,
                            chunk_elements: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    k, n, v = flat_q.shape
    step = _positions_per_chunk(k + 1, v, chunk_elements or COMPILED_CHUNK_ELEMENTS)
    fn = _fused_terms if choice() == "fused" else _compiled_terms()
    var_parts, bias_parts, bad = [], [], []
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        var, bias, flag = fn(flat_q[:, sl], None if flat_p is None else flat_p[sl])
        var_parts.append(var)
        bias_parts.append(bias)
        bad.append(flag)
    if bad and bool(torch.stack(bad).any()):  # one host sync per call
        _diagnose(flat_q, *([] if flat_p is None else [flat_p]))
    empty = torch.empty(0, dtype=torch.float32, device=flat_q.device)
    variance = (torch.cat(var_parts) if var_parts else empty).reshape(lead)
    if flat_p is None:
        return variance, None
    return variance, (torch.cat(bias_parts) if bias_parts else empty).reshape(lead)


# ---------------------------------------------------------------------------------------------
# Public API.


def entropy(logits: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """H(p) in nats.  logits (..., V) -> (...)."""
    _check_floating(logits)
    lead = logits.shape[:-1]

    g = _grad(logits)

    def fn(x):
        return (_entropy_lp_(_log_softmax(x), g).clamp_min(0.0),)

    return _chunked(fn, [], [_flat(logits)], lead, chunk_elements, 1)[0]


def kl(
    p_logits: torch.Tensor,
    q_logits: torch.Tensor,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """KL(p || q) in nats.  (..., V), (..., V) -> (...); +inf where q masks a token p allows."""
    _check_floating(p_logits)
    _check_floating(q_logits)
    _check_vocab(p_logits, q_logits)
    try:
        p_logits, q_logits = torch.broadcast_tensors(p_logits, q_logits)
    except RuntimeError as e:
        raise ValueError(
            f"kl: shapes {tuple(p_logits.shape)} and {tuple(q_logits.shape)} do not broadcast"
        ) from e
    lead = p_logits.shape[:-1]

    g = _grad(p_logits, q_logits)

    def fn(p, q):
        return (_kl_lp_(_log_softmax(p), _log_softmax(q), grad=g).clamp_min(0.0),)

    return _chunked(fn, [], [_flat(p_logits), _flat(q_logits)], lead, chunk_elements, 1)[0]


def mixture(logits: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """Log-probabilities of the uniform mixture.  (K, ..., V) -> (..., V), float32."""
    _check_floating(logits)
    flat = _flat_members(logits, "logits")
    k, n, v = flat.shape
    g = _grad(logits)
    step = _positions_per_chunk(k, v, chunk_elements)
    parts = [_mixture_lp(_log_softmax(flat[:, s : s + step]), grad=g) for s in range(0, n, step)]
    out = torch.cat(parts) if parts else torch.empty(0, v, dtype=torch.float32, device=logits.device)
    return out.reshape(logits.shape[1:])


def mutual_information(
    logits: torch.Tensor, *, chunk_elements: int | None = None
) -> torch.Tensor:
    """Generalized JSD: H(mean_k p_k) - mean_k H(p_k) = E_k KL(p_k || p_mix).  (K, ..., V) -> (...).

    Ground-truth EU of a target family (docs/method.md §2), TokUR's EU, and the variance proxy of
    Theorem 3.4.  Computed in the E_k KL form (see the module docstring).
    """
    _check_floating(logits)
    flat = _flat_members(logits, "logits")
    lead = logits.shape[1:-1]

    g = _grad(logits)
    if _compiled_path(logits.device, g):
        return _compiled_terms_chunked(flat, None, lead, chunk_elements)[0]

    def fn(x):
        return (_jsd_lp(_log_softmax(x), g)[0],)

    return _chunked(fn, [flat], [], lead, chunk_elements or DEFAULT_CHUNK_ELEMENTS, 1)[0]


jsd = mutual_information


def eu_decomposition(
    draft_logits: torch.Tensor,
    proxy_logits: torch.Tensor,
    *,
    chunk_elements: int | None = None,
) -> EUTerms:
    """Theorem 3.4 (Eq. 1): E_k KL(q_k || p) = JSD(q_1..q_K) + KL(q_mix || p).

    draft_logits (K, ..., V) of the drafts q_k; proxy_logits (..., V) of p (the OSD proxy p_mix,
    or the raw target).  Returns EUTerms(variance, bias, total), each (...) float32.
    """
    _check_floating(draft_logits)
    _check_floating(proxy_logits)
    flat_q = _flat_members(draft_logits, "draft_logits")
    if draft_logits.shape[1:] != proxy_logits.shape:
        raise ValueError(
            f"draft_logits {tuple(draft_logits.shape)} must be (K, *proxy_logits.shape); "
            f"proxy_logits is {tuple(proxy_logits.shape)}"
        )
    lead = proxy_logits.shape[:-1]

    g = _grad(draft_logits, proxy_logits)
    if _compiled_path(draft_logits.device, g):
        _check_vocab(draft_logits, proxy_logits)
        variance, bias = _compiled_terms_chunked(flat_q, _flat(proxy_logits), lead, chunk_elements)
        return EUTerms(variance=variance, bias=bias, total=variance + bias)

    def fn(q, p):
        variance, logmix = _jsd_lp(_log_softmax(q), g)  # (n,), (n, V)
        bias = _kl_lp_(logmix, _log_softmax(p), grad=g).clamp_min(0.0)
        return variance, bias

    variance, bias = _chunked(fn, [flat_q], [_flat(proxy_logits)], lead, chunk_elements or DEFAULT_CHUNK_ELEMENTS, 2)
    return EUTerms(variance=variance, bias=bias, total=variance + bias)
