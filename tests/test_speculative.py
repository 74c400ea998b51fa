"""Speculative decoding with per-token EU: exactness (greedy), distribution (sampling), EU = offline score."""

from __future__ import annotations

import json

import pytest
import torch
from scipy.stats import chisquare
from typer.testing import CliRunner

from drafteu import estimators, models
from drafteu.cli import app
from drafteu.errors import DraftEUError
from drafteu.generate import greedy_answer
from drafteu.kvcache import cache_kw, output_cache
from drafteu.spec_decoding import SpeculativeDecoder, plain_greedy

from .conftest import make_model
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


@pytest.mark.parametrize("kind", ["far", "near"])
@pytest.mark.parametrize("propose", ["mix", 1])
@pytest.mark.parametrize("gamma", [1, 3])
def test_greedy_output_is_the_targets_greedy_output(ensembles, tiny_dir, kind, propose, gamma):
    lm, ens, dec = spec_decoder(ensembles, tiny_dir, kind, gamma=gamma, propose=propose, bias="target")
    eos = {lm.tokenizer.eos_token_id}
    accepted = 0
    for q in QUESTIONS:
        prompt = prompt_of(lm, q)
        with ens.base_target():
            ref = greedy_answer(lm.model, lm.tokenizer, prompt, 24)  # HF generate, plain greedy
        res = dec.generate(prompt, 24, eos_ids=eos)
        assert res.token_ids == ref
        assert plain_greedy(lm.model, prompt, 24, eos) == ref
        assert res.variance.shape == (len(ref),) and res.bias.shape == (len(ref),)
        accepted += res.accepted
    if kind == "near":
        assert accepted > 0  # the accept path (and the bonus token) is exercised


@pytest.mark.parametrize("propose", ["mix", 0])
@pytest.mark.parametrize("bias", ["target", "proxy"])
def test_eu_equals_offline_score(ensembles, tiny_dir, propose, bias):
    for kind in ("far", "near"):
        lm, ens, dec = spec_decoder(ensembles, tiny_dir, kind, proxy_on=bias == "proxy", gamma=3, propose=propose,
                                    bias=bias)
        prompt = prompt_of(lm, QUESTIONS[0])
        streamed = []
        res = dec.generate(prompt, 20, eos_ids={lm.tokenizer.eos_token_id},
                           on_tokens=lambda ids, v, b, out=streamed: out.extend(zip(ids, v.tolist(), b.tolist(),
                                                                                     strict=True)))
        off = ens.score(prompt, res.token_ids)  # offline: full forwards, same drafts and p
        assert torch.allclose(res.variance, off.variance, atol=1e-4)
        assert torch.allclose(res.bias, off.bias, atol=1e-4)
        assert [t for t, _, _ in streamed] == res.token_ids  # every token streamed once, in order


def test_eu_off_gives_the_same_tokens(ensembles, tiny_dir):
    lm, ens, dec = spec_decoder(ensembles, tiny_dir, "near", gamma=2, propose="mix", bias="target", eu=False)
    prompt = prompt_of(lm, QUESTIONS[1])
    res = dec.generate(prompt, 16, eos_ids={lm.tokenizer.eos_token_id})
    assert res.variance is None
    assert res.token_ids == plain_greedy(lm.model, prompt, 16, {lm.tokenizer.eos_token_id})


@pytest.mark.parametrize("propose", ["mix", 0])
def test_sampling_preserves_the_targets_distribution(propose):
    target, drafts_model, designated = small_vocab_setup()
    prompt = [1, 5, 3, 4]
    dec = SpeculativeDecoder.from_models(target, drafts_model, ["d0", "d1"], 8, gamma=2, propose=propose, bias="target",
                                         eu=propose == "mix", designated=designated if propose == 0 else None)
    n = 1500
    counts = torch.zeros(64)
    for seed in range(n):
        toks = dec.generate(prompt, 2, temperature=1.0, seed=seed).token_ids
        counts[toks[0] * 8 + toks[1]] += 1
    exact = exact_pairs(target, prompt)
    keep = exact * n >= 5  # chi-square needs expected counts >= 5; pool the rest
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([exact[keep], exact[~keep].sum()[None]]) * n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    # the same test does reject the drafts' own distribution (it has power)
    qd = exact_pairs(designated, prompt) if propose == 0 else None
    if qd is not None:
        exp_q = torch.cat([qd[keep], qd[~keep].sum()[None]]) * n
        assert chisquare(obs.numpy(), exp_q.numpy() * obs.sum().item() / exp_q.sum().item()).pvalue < 1e-6


def test_bad_arguments_are_clear_errors(ensembles, tiny_dir):
    lm = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(ensembles / "far" / "untrained", lm)
    with pytest.raises(DraftEUError, match="gamma"):
        SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=0)
    with pytest.raises(DraftEUError, match="the ensemble has drafts 0..2"):
        SpeculativeDecoder.from_ensemble(ens, ens.target, propose=7)  # the ensemble has drafts 0..2
    with pytest.raises(DraftEUError, match="proxy"):
        SpeculativeDecoder.from_ensemble(ens, ens.target, bias="proxy")


def test_cli_streams_and_writes_the_score_json(ensembles, tiny_dir, tmp_path):
    out = tmp_path / "spec.json"
    res = CliRunner().invoke(app,
                             ["speculate", "--target", str(tiny_dir), "--drafts", str(ensembles / "near" / "untrained"),
                                   "--proxy", str(ensembles / "proxy"), "--question", QUESTIONS[0], "--shots", "0",
                                   "--max-new-tokens", "12", "--gamma", "3", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "acceptance" in res.output and "tokens/s" in res.output
    js = json.loads(out.read_text())
    assert {"answer", "tokens", "sequence", "speculative"} <= set(js)
    sp = js["speculative"]
    assert sp["bias"] == "proxy" and sp["gamma"] == 3 and not sp["adaptive"]
    assert sp["gamma_mean"] == pytest.approx(sp["proposed"] / sp["rounds"]) and 1 <= sp["gamma_mean"] <= 3
    for t in js["tokens"]:
        assert abs(t["eu"] - t["variance"] - t["bias"]) < 1e-5


def test_cli_bf16_drafts_give_the_targets_greedy_answer(ensembles, tiny_dir, tmp_path):
    """--draft-dtype bfloat16: the drafts propose in bf16, the float32 target still decides every token."""
    out = tmp_path / "spec.json"
    res = CliRunner().invoke(app,
                             ["speculate", "--target", str(tiny_dir), "--drafts", str(ensembles / "near" / "untrained"),
                                   "--question", QUESTIONS[1], "--shots", "0", "--max-new-tokens", "12",
                                   "--gamma", "2", "--draft-dtype", "bfloat16", "--json", str(out)])
    assert res.exit_code == 0, res.output
    js = json.loads(out.read_text())
    lm = models.load(str(tiny_dir))
    assert [t["id"] for t in js["tokens"]] == greedy_answer(lm.model, lm.tokenizer, prompt_of(lm, QUESTIONS[1]), 12)
    assert js["speculative"]["draft_dtype"] == "bfloat16"
    ens = estimators.DraftEnsemble(ensembles / "near" / "untrained", lm, dtype="bfloat16")
    off = ens.score(prompt_of(lm, QUESTIONS[1]), [t["id"] for t in js["tokens"]])  # same dtype offline
    assert torch.allclose(torch.tensor([t["variance"] for t in js["tokens"]]), off.variance, atol=2e-2)
    bad = CliRunner().invoke(app,
                             ["speculate", "--target", str(tiny_dir), "--drafts", str(ensembles / "near" / "untrained"),
                                   "--question", QUESTIONS[1], "--draft-dtype", "half-ish"])
    assert bad.exit_code == 2 and "unknown dtype" in bad.output


@pytest.mark.parametrize("args, message", [
    (["--gamma", "0"], "gamma"),
    (["--propose", "9"], "drafts 0..2"),
    (["--max-new-tokens", "5000"], "context"),
    (["--bias", "proxy"], "needs a proxy"),
])
def test_cli_bad_input(ensembles, tiny_dir, args, message):
    res = CliRunner().invoke(app,
                             ["speculate", "--target", str(tiny_dir), "--drafts", str(ensembles / "far" / "untrained"),
                                   "--question", "What is 2 + 2?", *args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_cli_rejects_drafts_with_another_vocabulary(ensembles, tmp_path, tiny_dir):
    from .conftest import make_tokenizer

    other_tok = make_tokenizer(vocab_size=280, corpus=["completely different words here"] * 5)
    other = make_model(len(other_tok), layers=2, seed=5)
    d = tmp_path / "other"
    other.save_pretrained(d)
    other_tok.save_pretrained(d)
    res = CliRunner().invoke(app, ["speculate", "--target", str(d), "--drafts", str(ensembles / "far" / "untrained"),
                                   "--question", "What is 2 + 2?"])
    assert res.exit_code == 2 and "incompatible" in res.output


@pytest.mark.parametrize("kind", ["far", "near"])
def test_stops_at_eos_anywhere_in_a_round(ensembles, tiny_dir, kind):
    """EOS as a proposal, as the corrected token, or as the first token after a bonus: the answer
    stops before it and every emitted token still has its EU (equal to offline scoring)."""
    lm, ens, dec = spec_decoder(ensembles, tiny_dir, kind, gamma=3, propose="mix", bias="target")
    prompt = prompt_of(lm, QUESTIONS[0])
    ref = plain_greedy(lm.model, prompt, 24, set())
    for cut in range(1, 8):
        eos = {ref[cut]}
        res = dec.generate(prompt, 24, eos_ids=eos)
        want = ref[: ref.index(ref[cut])]
        assert res.token_ids == want and res.finish == "eos"
        assert res.variance.shape == (len(want),)
        if want:
            off = ens.score(prompt, want)
            assert torch.allclose(res.variance, off.variance, atol=1e-4)
            assert torch.allclose(res.bias, off.bias, atol=1e-4)


def check_fused_equals_peft(device: str = "cpu", atol: float = 1e-5):
    """FusedDrafts (3 LoRA adapters, all linear layers) equals PEFT's mixed batch on ``device``,
    without and with a KV cache; returns (fused, rows, adapter names) for further checks."""
    from peft import LoraConfig, get_peft_model

    from drafteu.fused import FusedDrafts

    base = make_model(50, layers=2, seed=3).to(device)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(base, LoraConfig(**cfg), adapter_name="d0")
    for n in ("d1", "d2"):
        peft.add_adapter(n, LoraConfig(**cfg))
    peft.eval()
    names = ["d0", "d1", "d2"]
    fused = FusedDrafts(peft, names)
    rows = torch.randint(0, 50, (2, 7), device=device).repeat(3, 1)
    an = [n for n in names for _ in range(2)]
    with torch.no_grad():
        ref = peft(input_ids=rows, adapter_names=an).logits
        out = fused(rows, adapter_names=an).logits
        assert out.device.type == torch.device(device).type
        assert torch.allclose(out, ref, atol=atol)
        # incremental decoding with a KV cache gives the same last logits
        first = fused(rows[:, :5], adapter_names=an, use_cache=True)
        step = fused(rows[:, 5:], adapter_names=an, **cache_kw(output_cache(first)), use_cache=True)
        assert torch.allclose(step.logits, ref[:, 5:], atol=atol)
        # PEFT's own path still works afterwards (the fused forward is only swapped in per call)
        assert torch.allclose(peft(input_ids=rows, adapter_names=an).logits, ref)
    return fused, rows, an


def test_fused_drafts_equal_peft_mixed_batch_with_and_without_cache():
    fused, rows, an = check_fused_equals_peft()
    with pytest.raises(ValueError, match="adapter-major"):
        fused(rows, adapter_names=list(reversed(an)))


def test_fused_base_row_equals_peft_base_and_proxy_rows():
    """The verifier's [__base__, proxy] batch: row 0 is the plain model, row 1 the adapter, as PEFT gives."""
    from peft import LoraConfig, get_peft_model

    from drafteu.fused import FusedDrafts

    base = make_model(50, layers=2, seed=4)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False), adapter_name="proxy").eval()
    names = ["__base__", "proxy"]
    ids = torch.randint(0, 50, (1, 6)).expand(2, -1)
    with torch.no_grad():
        ref = peft(input_ids=ids, adapter_names=names).logits
        out = FusedDrafts(peft, names)(ids, adapter_names=names).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids[:1]).logits
    assert torch.allclose(out, ref, atol=1e-5)
    assert torch.allclose(out[0], plain[0], atol=1e-5)
    assert not torch.allclose(out[1], plain[0], atol=1e-3)  # the adapter really acts on row 1
    with torch.no_grad():  # base rows only: the plain model, no LoRA work
        only = FusedDrafts(peft, ["__base__"])(ids[:1], adapter_names=["__base__"]).logits
    assert torch.allclose(only[0], plain[0], atol=1e-5)
    with pytest.raises(DraftEUError, match="no LoRA modules"):
        FusedDrafts(make_model(50, layers=1), ["__base__"])  # a model without LoRA layers


@pytest.mark.parametrize("propose", ["mix", 0])
def test_prompt_cache_across_generations(ensembles, tiny_dir, propose):
    """One decoder answering several prompts (sharing the system prompt, and once the same prompt
    twice) gives the tokens and EU of a fresh decoder per prompt; plain greedy likewise."""
    lm, ens, dec = spec_decoder(ensembles, tiny_dir, "near", proxy_on=True, gamma=2, propose=propose, bias="proxy")
    eos = {lm.tokenizer.eos_token_id}
    prompts = [prompt_of(lm, q) for q in (QUESTIONS[0], QUESTIONS[1], QUESTIONS[1])]
    shared = next(i for i, (a, b) in enumerate(zip(prompts[0], prompts[1], strict=False)) if a != b)
    assert shared > 10  # the system prompt is a shared prefix the cache re-uses
    from drafteu.kvcache import PrefixCache

    plain_cache = PrefixCache(lm.model)
    for prompt in prompts:
        res = dec.generate(prompt, 12, eos_ids=eos)
        fresh = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2, propose=propose, bias="proxy",
                                                 prefix_cache=False).generate(prompt, 12, eos_ids=eos)
        assert res.token_ids == fresh.token_ids
        assert torch.allclose(res.variance, fresh.variance, atol=1e-5)
        assert torch.allclose(res.bias, fresh.bias, atol=1e-5)
        assert dec.caches["target"].ids[:len(prompt)] == prompt  # the cache holds this prompt now
        with ens.base_target():
            assert plain_greedy(lm.model, prompt, 12, eos, cache=plain_cache) == plain_greedy(lm.model, prompt, 12, eos)


def test_speculative_bench_times_drafteusspec_decoder():
    """bench/speculative.py --gpu's code path (drafteu's SpeculativeDecoder / PrefixCache on random
    weights), on tiny shapes on the CPU."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "speculative.py"
    spec = importlib.util.spec_from_file_location("bench_speculative", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class Args:
        k, gamma, max_new_tokens = 3, [1, 2], 8

    table = bench.step_times(Args, "cpu", "tiny", context=64, reps=2)
    assert "| K = 3 drafts (fused), 1 token |" in table and "| gamma 2, EU bias vs proxy |" in table


def _needs_compiler():
    from drafteu.hardware import has_cxx_compiler

    if not has_cxx_compiler():
        pytest.skip("torch.compile on a CPU needs a C++ compiler")


def test_static_cache_rollback_and_growth_match_dynamic_cache(tiny):
    """StaticPrefixCache (eager) returns PrefixCache's logits through feeds, position-reset
    rollbacks, prompt re-use and a capacity doubling."""
    from drafteu.kvcache import PrefixCache, StaticPrefixCache

    dyn, static = PrefixCache(tiny.model), StaticPrefixCache(tiny.model, compile=False, capacity=16)
    seq = list(range(5, 17))
    steps = [(seq, [], 1), (seq, [3, 4], 2), ("rollback", len(seq) + 1), (seq + [3], [9, 9, 9], 3),
             ("rollback", 4), (seq[:4] + list(range(40, 60)), [], 2)]  # grows past 16 positions
    for step in steps:
        if step[0] == "rollback":
            dyn.rollback(step[1])
            static.rollback(step[1])
            continue
        a, b = dyn.feed(*step, "cpu"), static.feed(*step, "cpu")
        assert torch.allclose(a, b, atol=1e-5), step
        assert dyn.ids == static.ids
    assert static.capacity == 32


@pytest.mark.parametrize("bias", ["target", "proxy"])
def test_compiled_steps_give_the_eager_tokens_and_eu(ensembles, tiny_dir, bias):
    """compile=on (static KV caches + torch.compile; CPU inductor here, CUDA graphs on CUDA) decodes
    the same tokens with the same EU as the eager decoder, across prompts sharing a prefix."""
    _needs_compiler()
    lm, ens, eager = spec_decoder(ensembles, tiny_dir, "near", proxy_on=bias == "proxy", gamma=2, bias=bias,
                              compile="off")
    compiled = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2, bias=bias, compile="on")
    assert compiled.compile and not eager.compile
    eos = {lm.tokenizer.eos_token_id}
    for q in QUESTIONS:
        prompt = prompt_of(lm, q)
        a, b = eager.generate(prompt, 12, eos_ids=eos), compiled.generate(prompt, 12, eos_ids=eos)
        assert a.token_ids == b.token_ids
        assert torch.allclose(a.variance, b.variance, atol=1e-4)
        assert torch.allclose(a.bias, b.bias, atol=1e-4)
    if bias == "target":
        with ens.base_target():
            prompt = prompt_of(lm, QUESTIONS[0])
            assert plain_greedy(lm.model, prompt, 12, eos, compile="on") == plain_greedy(lm.model, prompt, 12, eos,
                                                                                         compile="off")


