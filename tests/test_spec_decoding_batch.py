"""Speculative decoding of several requests together (``spec_decoding_batch``): each request's answer, EU and
logprobs those of the request decoded alone; cancellation; the sampling distribution; adaptive gamma; the
benchmark's batched modes."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from drafteu.errors import DraftEUError
from drafteu.generate import greedy_answer
from drafteu.spec_decoding import plain_greedy

from .spec_support import (
    QUESTIONS,
    build_ensembles,
    exact_pairs,
    prompt_of,
    small_vocab_setup,
    spec_decoder,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ensembles(tmp_path_factory, tiny_dir):
    """The tiny target's 'far' and 'near' draft ensembles and a proxy (``spec_support.build_ensembles``)."""
    return build_ensembles(tmp_path_factory, tiny_dir)


def _batched(ens, **kw):
    from drafteu.spec_decoding_batch import BatchedSpeculativeDecoder

    return BatchedSpeculativeDecoder.from_ensemble(ens, ens.target, **kw)


@pytest.mark.parametrize("kind", ["far", "near"])
@pytest.mark.parametrize("gamma", [1, 3])
def test_batched_requests_equal_each_decoded_alone(ensembles, tiny_dir, kind, gamma):
    """Prompts of different lengths, different limits and an EOS in one batch: each answer is the target's
    greedy answer token for token, its EU and logprobs those of the request decoded alone (to float
    rounding), every token streamed once in order; rows leave the batch as they finish."""
    from drafteu.spec_decoding_batch import Request

    lm, ens, single = spec_decoder(ensembles, tiny_dir, kind, proxy_on=True, gamma=gamma, bias="proxy")
    batched = _batched(ens, gamma=gamma, bias="proxy")
    prompts = [prompt_of(lm, q) for q in QUESTIONS + ["Add 12 and 30.", QUESTIONS[0]]]
    limits = [20, 7, 16, 3]
    eos = {lm.tokenizer.eos_token_id}
    streamed = [[] for _ in prompts]
    requests = [Request(p, n, logprobs=2, on_tokens=lambda ids, v, b, lps, out=s: out.extend(ids))
                for p, n, s in zip(prompts, limits, streamed, strict=True)]
    results = batched.generate(requests, eos_ids=eos)
    accepted = 0
    for p, n, res, s in zip(prompts, limits, results, streamed, strict=True):
        alone = single.generate(p, n, eos_ids=eos, logprobs=2)
        with ens.base_target():
            assert res.token_ids == alone.token_ids == greedy_answer(lm.model, lm.tokenizer, p, n)
        assert s == res.token_ids and res.finish == alone.finish
        assert torch.allclose(res.variance, alone.variance, atol=1e-4)
        assert torch.allclose(res.bias, alone.bias, atol=1e-4)
        assert res.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
        assert [[t for t, _ in top] for top in res.top] == [[t for t, _ in top] for top in alone.top]
        assert res.rounds == alone.rounds and res.accepted == alone.accepted
        accepted += res.accepted
    if kind == "near":
        assert accepted > 0  # the accept path and the bonus token are exercised


def test_batched_eu_off_and_target_bias(ensembles, tiny_dir):
    from drafteu.spec_decoding_batch import Request

    lm, ens, _ = spec_decoder(ensembles, tiny_dir, "near")
    prompts = [prompt_of(lm, q) for q in QUESTIONS]
    eos = {lm.tokenizer.eos_token_id}
    off = _batched(ens, gamma=2, eu=False).generate([Request(p, 12) for p in prompts], eos_ids=eos)
    on = _batched(ens, gamma=2, bias="target").generate([Request(p, 12) for p in prompts], eos_ids=eos)
    for p, a, b in zip(prompts, off, on, strict=True):
        assert a.variance is None and a.token_ids == b.token_ids == plain_greedy(lm.model, p, 12, eos)
        score = ens.score(p, b.token_ids)  # no proxy: the bias against the raw target, as offline
        assert torch.allclose(b.variance, score.variance, atol=1e-4) and torch.allclose(b.bias, score.bias, atol=1e-4)


def test_batched_cancellation_ends_one_request_mid_decoding(ensembles, tiny_dir):
    """A request cancelled after its first streamed tokens ends at the next round ("cancelled"), the
    others go on unchanged."""
    from drafteu.spec_decoding_batch import Request

    lm, ens, _ = spec_decoder(ensembles, tiny_dir, "far")
    prompts = [prompt_of(lm, q) for q in QUESTIONS]
    eos = {lm.tokenizer.eos_token_id}
    seen = []
    requests = [Request(prompts[0], 20, on_tokens=lambda ids, v, b: seen.extend(ids), cancelled=lambda: len(seen) >= 2),
                Request(prompts[1], 20)]
    first, second = _batched(ens, gamma=1, bias="target").generate(requests, eos_ids=eos)
    assert first.finish == "cancelled" and 2 <= len(first.token_ids) < 20
    assert second.token_ids == plain_greedy(lm.model, prompts[1], 20, eos)


def test_batched_sampling_preserves_the_targets_distribution():
    from drafteu.spec_decoding_batch import BatchedSpeculativeDecoder, Request

    target, drafts_model, _ = small_vocab_setup()
    prompt = [1, 5, 3, 4]
    dec = BatchedSpeculativeDecoder(target, drafts_model, ["d0", "d1"], 8, gamma=2, bias="target")
    n, counts = 1500, torch.zeros(64)
    for start in range(0, n, 250):  # 250 requests per batch, each its own seed
        for res in dec.generate([Request(prompt, 2, temperature=1.0, seed=s) for s in range(start, start + 250)]):
            counts[res.token_ids[0] * 8 + res.token_ids[1]] += 1
    exact = exact_pairs(target, prompt)
    keep = exact * n >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([exact[keep], exact[~keep].sum()[None]]) * n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


def test_batched_decoder_refuses_what_it_cannot_do(ensembles, tiny_dir):
    lm, ens, _ = spec_decoder(ensembles, tiny_dir, "far")
    with pytest.raises(DraftEUError, match="propose='mix'"):
        _batched(ens, propose=0)
    with pytest.raises(DraftEUError, match="proxy"):
        _batched(ens, bias="proxy")


def test_speculative_bench_measures_several_requests_at_once(ensembles, tiny_dir):
    """bench/speculative.py --batch: plain batched generate and the speculative decoder of several requests
    side by side on the same prompts; the greedy outputs agree (none differ from plain greedy)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    lm, ens, _ = spec_decoder(ensembles, tiny_dir, "near")
    _, ens_p, _ = spec_decoder(ensembles, tiny_dir, "near", proxy_on=True)

    class Args:
        target, batch, gamma, max_new_tokens, record = str(tiny_dir), 3, [2], 10, {}

    prompts = [prompt_of(lm, q) for q in QUESTIONS + ["Add 12 and 30.", "Name a colour."]]
    table = bench.batched(Args, lm, ens, ens_p, prompts, {lm.tokenizer.eos_token_id})
    modes = Args.record["batched"]["modes"]
    assert set(modes) == {"plain greedy (target), batched generate", "speculative, gamma 2, no EU",
                          "speculative, gamma 2, EU (bias vs p_mix)"}
    assert all(m["outputs_differing_from_plain_greedy"] == 0 and m["tokens_per_s"] > 0 for m in modes.values())
    assert "| speculative, gamma 2, EU (bias vs p_mix) |" in table


def test_adaptive_gamma_follows_acceptance_and_keeps_the_targets_answers(ensembles, tiny_dir):
    """``adaptive``: gamma grows by 2 after a fully accepted round and shrinks by 1 after a rejection (within
    1..gamma_max); the answers stay the target's greedy answers and the EU the offline score's, alone and
    batched (each request its own gamma)."""
    from drafteu.spec_decoding_batch import Request
    from drafteu.spec_rounds import SpeculateOptions, next_gamma

    opts = SpeculateOptions(gamma=2, adaptive=True, gamma_max=5)
    steps = [next_gamma(2, 2, opts), next_gamma(4, 4, opts), next_gamma(2, 0, opts), next_gamma(1, 0, opts)]
    assert steps == [4, 5, 1, 1]
    assert next_gamma(3, 3, SpeculateOptions(gamma=3)) == 3  # fixed
    with pytest.raises(DraftEUError, match="gamma_max"):
        SpeculateOptions(gamma=4, adaptive=True, gamma_max=2)
    eos = set()
    for kind in ("near", "far"):
        lm, ens, single = spec_decoder(ensembles, tiny_dir, kind, proxy_on=True, gamma=2, adaptive=True, gamma_max=5,
                                   bias="proxy")
        fixed = spec_decoder(ensembles, tiny_dir, kind, proxy_on=True, gamma=2, bias="proxy")[2]
        prompts = [prompt_of(lm, q) for q in QUESTIONS]
        batched = _batched(ens, gamma=2, adaptive=True, gamma_max=5, bias="proxy").generate(
            [Request(p, 24) for p in prompts], eos_ids=eos)
        for p, b in zip(prompts, batched, strict=True):
            res = single.generate(p, 24, eos_ids=eos)
            with ens.base_target():  # the target without the proxy adapter its model carries
                ref = plain_greedy(lm.model, p, 24, eos)
            assert res.token_ids == b.token_ids == ref
            off = ens.score(p, res.token_ids)
            for r in (res, b):
                assert torch.allclose(r.variance, off.variance, atol=1e-4)
                assert torch.allclose(r.bias, off.bias, atol=1e-4)
            assert b.proposed == res.proposed and b.rounds == res.rounds  # the same gamma path, batched or alone
            if kind == "near":  # proposals mostly accepted: gamma grows, so fewer rounds than fixed gamma 2
                assert res.rounds < fixed.generate(p, 24, eos_ids=eos).rounds
