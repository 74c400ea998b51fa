"""The EU math against float64 references and the paper's identities (Sec. 3, Thm 3.2, 3.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from drafteu import divergence as D


def ref_logp(x: torch.Tensor) -> np.ndarray:
    return torch.log_softmax(x.double(), -1).numpy()


def ref_entropy(x):
    lp = ref_logp(x)
    p = np.exp(lp)
    return -np.where(p > 0, p * np.where(p > 0, lp, 0), 0).sum(-1)


def ref_kl(x, y):
    lp, lq = ref_logp(x), ref_logp(y)
    p = np.exp(lp)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (lp - lq), 0).sum(-1)


def ref_mixture(xs):
    p = np.exp(ref_logp(xs)).mean(0)
    with np.errstate(divide="ignore"):
        return np.log(p)


def ref_mi(xs):
    p = np.exp(ref_logp(xs))
    mix = p.mean(0)
    h = lambda q: -np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(-1)  # noqa: E731
    return h(mix) - h(p).mean(0)


def rand(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def test_entropy_kl_mixture_mi_match_float64_reference():
    x = rand(4, 5, 7, 33)
    y = rand(5, 7, 33, seed=1)
    np.testing.assert_allclose(D.entropy(x[0]).numpy(), ref_entropy(x[0]), atol=1e-5)
    np.testing.assert_allclose(D.kl(x[0], y).numpy(), ref_kl(x[0], y), atol=1e-5)
    np.testing.assert_allclose(D.mixture(x).numpy(), ref_mixture(x), atol=1e-5)
    np.testing.assert_allclose(D.mutual_information(x).numpy(), ref_mi(x), atol=1e-5)
    assert D.entropy(x[0]).dtype == torch.float32 and D.entropy(x[0]).shape == (5, 7)


def test_kl_of_identical_is_zero_and_kl_nonnegative():
    x = rand(10, 50)
    assert torch.equal(D.kl(x, x), torch.zeros(10))
    assert (D.kl(x, rand(10, 50, seed=3)) > 0).all()
    # a shift of the logits does not change the distribution
    assert torch.allclose(D.kl(x, x + 123.0), torch.zeros(10), atol=1e-6)


def test_mi_identities():
    x = rand(3, 6, 40)
    mi = D.mutual_information(x)
    assert (mi >= 0).all() and (mi > 1e-3).all()
    # MI = H(mix) - mean_k H(p_k)
    h_mix = D.entropy(D.mixture(x))
    assert torch.allclose(mi, h_mix - D.entropy(x).mean(0), atol=1e-5)
    # identical members and K = 1 give exactly zero
    same = x[:1].expand(5, -1, -1)
    assert torch.equal(D.mutual_information(same), torch.zeros(6))
    assert torch.equal(D.mutual_information(x[:1]), torch.zeros(6))
    assert D.jsd is D.mutual_information


def test_theorem_3_4_bias_variance_decomposition():
    q = rand(6, 4, 9, 64)
    p = rand(4, 9, 64, seed=5)
    terms = D.eu_decomposition(q, p)
    mean_kl = torch.stack([D.kl(q[k], p) for k in range(6)]).mean(0)
    assert torch.allclose(terms.total, mean_kl, atol=1e-5, rtol=1e-5)
    assert torch.allclose(terms.variance, D.mutual_information(q), atol=1e-6)
    assert torch.allclose(terms.bias, D.kl(D.mixture(q), p), atol=1e-6)
    assert torch.equal(terms.total, terms.variance + terms.bias)
    # K = 1: no variance, bias is the plain KL
    one = D.eu_decomposition(q[:1], p)
    assert torch.equal(one.variance, torch.zeros(4, 9))
    assert torch.allclose(one.bias, D.kl(q[0], p), atol=1e-6)


def test_theorem_3_2_upper_bound():
    # E_theta KL(p_theta || q_mix) = EU + KL(p_T || q_mix), p_T the family mean.
    fam = rand(5, 8, 30)
    q = rand(3, 8, 30, seed=7)
    q_mix = D.mixture(q)
    lhs = torch.stack([D.kl(fam[k], q_mix) for k in range(5)]).mean(0)
    rhs = D.mutual_information(fam) + D.kl(D.mixture(fam), q_mix)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    assert (lhs >= D.mutual_information(fam) - 1e-6).all()


def test_large_logits_are_exact():
    x = rand(3, 4, 100, scale=1e4)
    y = rand(4, 100, seed=2, scale=1e4)
    np.testing.assert_allclose(D.entropy(x[0]).numpy(), ref_entropy(x[0]), atol=1e-5)
    np.testing.assert_allclose(D.mutual_information(x).numpy(), ref_mi(x), atol=1e-4)
    terms = D.eu_decomposition(x, y)
    assert torch.isfinite(terms.variance).all()
    assert torch.isfinite(D.entropy(x)).all()


def test_masked_vocabulary():
    x = rand(3, 2, 20)
    x[:, :, :5] = -math.inf  # masked by every member
    x[0, :, 5] = -math.inf  # masked by one member only
    for fn in (D.entropy, lambda t: D.kl(t, t)):
        assert not torch.isnan(fn(x[0])).any()
    mix = D.mixture(x)
    assert torch.isinf(mix[:, :5]).all() and torch.isfinite(mix[:, 5:]).all()
    np.testing.assert_allclose(D.mutual_information(x).numpy(), ref_mi(x), atol=1e-5)
    np.testing.assert_allclose(D.entropy(x[0]).numpy(), ref_entropy(x[0]), atol=1e-5)
    p = rand(2, 20, seed=9)
    terms = D.eu_decomposition(x, p)
    assert torch.isfinite(terms.total).all()
    # KL is +inf where q masks a token p allows
    assert torch.isinf(D.kl(x[1], x[0])).all()
    # a distribution that masks everything but one token has zero entropy
    one = torch.full((1, 10), -math.inf)
    one[0, 3] = 0.0
    assert D.entropy(one).item() == 0.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_posinf_raise(bad):
    x = rand(2, 3, 10)
    x[1, 2, 4] = bad
    for fn in (D.mutual_information, lambda t: D.eu_decomposition(t, t[0]), lambda t: D.entropy(t)):
        with pytest.raises(ValueError, match="NaN|inf"):
            fn(x)


def test_fully_masked_row_raises():
    with pytest.raises(ValueError, match="masks every"):
        D.entropy(torch.full((2, 5), -math.inf))


def test_shape_errors():
    with pytest.raises(ValueError, match="must be"):
        D.eu_decomposition(rand(3, 4, 10), rand(5, 10))
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        D.kl(rand(4, 10), rand(4, 11))
    with pytest.raises(ValueError, match="K = 0"):
        D.mutual_information(torch.empty(0, 3, 10))


def test_chunked_equals_unchunked():
    q = rand(4, 3, 37, 50)
    p = rand(3, 37, 50, seed=4)
    big = D.eu_decomposition(q, p, chunk_elements=1 << 30)
    small = D.eu_decomposition(q, p, chunk_elements=1)  # one position per chunk
    odd = D.eu_decomposition(q, p, chunk_elements=4 * 50 * 7)  # 7 positions, ragged last chunk
    for a, b in ((big, small), (big, odd)):
        for f in ("variance", "bias", "total"):
            assert torch.allclose(getattr(a, f), getattr(b, f), atol=1e-5)
    assert torch.allclose(D.entropy(p, chunk_elements=1), D.entropy(p), atol=1e-6)
    assert torch.allclose(D.mixture(q, chunk_elements=1), D.mixture(q), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_dtypes(dtype):
    q = rand(3, 5, 64).to(dtype)
    p = rand(5, 64, seed=1).to(dtype)
    terms = D.eu_decomposition(q, p)
    ref = D.eu_decomposition(q.float(), p.float())
    for f in ("variance", "bias", "total"):
        out = getattr(terms, f)
        assert out.dtype == torch.float32
        assert torch.allclose(out, getattr(ref, f), atol=1e-5)


def test_integer_logits_rejected():
    with pytest.raises(ValueError, match="floating"):
        D.entropy(torch.ones(3, 4, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(1, 6),
    n=st.integers(1, 5),
    v=st.integers(2, 40),
    scale=st.sampled_from([0.1, 1.0, 10.0, 300.0]),
    seed=st.integers(0, 10_000),
    chunk=st.integers(1, 2000),
)
def test_properties(k, n, v, scale, seed, chunk):
    q = rand(k, n, v, scale=scale, seed=seed)
    p = rand(n, v, scale=scale, seed=seed + 1)
    t = D.eu_decomposition(q, p, chunk_elements=chunk)
    assert (t.variance >= 0).all() and (t.bias >= 0).all()
    mean_kl = torch.stack([D.kl(q[i], p) for i in range(k)]).mean(0)
    assert torch.allclose(t.total, mean_kl, atol=1e-4, rtol=1e-4)
    # JSD is bounded by log K
    assert (t.variance <= math.log(k) + 1e-5).all()
    np.testing.assert_allclose(D.mutual_information(q).numpy(), ref_mi(q), atol=1e-4)


def test_gradients_match_autograd_of_the_naive_formula():
    # Training losses call these functions: they must be differentiable and give the same grads.
    q = rand(3, 4, 16).requires_grad_()
    p = rand(4, 16, seed=2).requires_grad_()
    terms = D.eu_decomposition(q, p, chunk_elements=3 * 16)  # several chunks
    (terms.total.sum() + D.kl(p, q[0]).sum() + D.entropy(p).sum() + D.mixture(q).logsumexp(-1).sum()).backward()
    g_q, g_p = q.grad.clone(), p.grad.clone()

    q2, p2 = q.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    lq, lp = torch.log_softmax(q2, -1), torch.log_softmax(p2, -1)
    total = (lq.exp() * (lq - lp)).sum(-1).mean(0)  # Theorem 3.4: total = E_k KL(q_k || p)
    kl_pq = (lp.exp() * (lp - lq[0])).sum(-1)
    ent = -(lp.exp() * lp).sum(-1)
    mix = torch.logsumexp(lq, 0) - math.log(3)
    (total.sum() + kl_pq.sum() + ent.sum() + mix.logsumexp(-1).sum()).backward()
    assert torch.allclose(g_q, q2.grad, atol=1e-5)
    assert torch.allclose(g_p, p2.grad, atol=1e-5)
    # without grad the in-place path gives the same values
    with torch.no_grad():
        assert torch.allclose(D.eu_decomposition(q, p).total, terms.total, atol=1e-6)


@pytest.mark.parametrize("mode", ["fused", pytest.param("compiled", marks=pytest.mark.slow)])
def test_compiled_path_equals_eager_and_references(monkeypatch, mode):
    """The compiled kernels' formula (CUDA's default; forced here on the CPU) gives the eager numbers on
    random, large, masked and bf16 logits, across chunk sizes, and raises the same errors: run as is
    ('fused') on every machine, and compiled where a C++ compiler lets inductor build it."""
    from drafteu.hardware import has_cxx_compiler

    if mode == "compiled" and not has_cxx_compiler():
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    masked = rand(3, 2, 40)
    masked[:, :, :5] = -math.inf  # every member masks these
    masked[0, :, 5] = -math.inf  # one member only
    p_masked = rand(2, 40, seed=9)
    p_masked[:, 6] = -math.inf  # the proxy masks a token the mixture allows: bias = +inf
    cases = [(rand(4, 3, 37, 50), rand(3, 37, 50, seed=4)), (rand(3, 5, 64, scale=1e4), rand(5, 64, seed=2)),
             (rand(6, 9, 70).bfloat16(), rand(9, 70, seed=3).bfloat16()), (masked, p_masked)]
    eager = []
    for q, p in cases:
        eager.append((D.eu_decomposition(q, p), D.mutual_information(q)))
    monkeypatch.setenv("DRAFTEU_DIVERGENCE", mode)
    for (q, p), (e_terms, e_mi) in zip(cases, eager, strict=True):
        for chunk in (None, q.shape[0] * q.shape[-1] * 4):  # one chunk; 3-4 positions per chunk
            terms = D.eu_decomposition(q, p, chunk_elements=chunk)
            for f in ("variance", "bias", "total"):
                assert torch.allclose(getattr(terms, f), getattr(e_terms, f), atol=1e-5, equal_nan=False), f
            assert torch.allclose(D.mutual_information(q, chunk_elements=chunk), e_mi, atol=1e-5)
        np.testing.assert_allclose(D.mutual_information(q).numpy().reshape(-1),
                                   ref_mi(q.float().reshape(q.shape[0], -1, q.shape[-1])), atol=1e-4)
    assert torch.isinf(D.eu_decomposition(masked, p_masked).bias).all()
    x = rand(2, 3, 10)
    x[1, 2, 4] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        D.eu_decomposition(x, x[0])
    with pytest.raises(ValueError, match="masks every"):
        D.mutual_information(torch.full((2, 1, 5), -math.inf))
