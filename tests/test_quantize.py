"""Quantized self-drafts on tiny models: the base builds and its KL is measured, LoRA members of every
method train on it, fused == PEFT on it, the cache key includes the recipe, K-only members equal
the trained draft merged plus its noise, and the bias diagnostic fires on far drafts only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from drafteu import estimators, fileio, models, quantize
from drafteu.cli import app
from drafteu.train import draft_base, drafts
from drafteu.train.loop import TrainConfig

from .conftest import tiny_answers

pytestmark = pytest.mark.integration
FAST = dict(lr=1e-3, max_steps=2, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir):
    """Target answers, an int8 and an int4 self-draft of the tiny target, and a far 1-layer base."""
    root = tmp_path_factory.mktemp("quant")
    samples = tiny_answers(root, tiny_dir)
    bases = {}
    for name, q in (("int8", quantize.QuantizeSettings(bits=8)),
                    ("int4", quantize.QuantizeSettings(bits=4, group_size=16))):
        bases[name] = draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=root / name, target=str(tiny_dir),
                                                                kind="quantize", quantize=q, heldout=0.25))
    bases["far"] = draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=root / "far", target=str(tiny_dir),
                                                             layers=1, heldout=0.25, train=TrainConfig(**FAST)))
    return root, bases


def test_a_quantized_base_builds_and_measures_its_distance_to_the_target(built, tiny_dir):
    root, m = built
    for name in ("int8", "int4"):
        assert m[name]["kind"] == "quantize" and m[name]["heldout_examples"] > 0
        assert "torchao" in m[name]["kernel"]
        lm = models.load(str(root / name))
        assert quantize.is_quantized(lm.model)  # it runs as quantized, not as a float copy
        assert isinstance(lm.model.model.layers[0].mlp.up_proj.weight, torch.Tensor)
        assert not quantize.is_quantized(models.load(str(tiny_dir)).model)
        assert m[name]["weight_bytes"] < m[name]["target_weight_bytes"]
        recipe = json.loads((root / name / quantize.RECIPE).read_text())
        assert recipe["target"] == str(Path(tiny_dir).resolve()) and recipe["quantize"]["bits"] == int(name[-1])
    # int8 is closer to the target than int4, both far closer than a 1-layer truncation
    assert 0 < m["int8"]["kl_to_target"] < m["int4"]["kl_to_target"] < m["far"]["kl_to_target"]
    assert m["int8"]["top1_agreement_after"] >= m["int4"]["top1_agreement_after"] >= m["far"]["top1_agreement_after"]
    assert m["int8"]["kl_to_target"] < 0.01
    # the measured KL is the one the manifest's function computes on the same answers
    target, draft = models.load(str(tiny_dir)), models.load(str(root / "int8"))
    rows = fileio.read_jsonl(root / "data" / "samples.jsonl")
    _, held = draft_base.split_heldout(rows, 0.25, 0)
    ex = draft_base.examples_from_rows(held, target.tokenizer.eos_token_id)
    kl = draft_base.kl_to_target(target.model, draft.model, ex, target.tokenizer.pad_token_id)
    assert kl == pytest.approx(m["int8"]["kl_to_target"], rel=1e-6)
    # one pass of each model gives both numbers: the KL is the draft base's objective (distill_loss) on those
    # tokens, the agreement the manifest's
    batch = draft_base.collate(ex, target.tokenizer.pad_token_id, "cpu")
    with torch.no_grad():
        objective = float(draft_base.distill_loss(target.model, draft.model, batch, reduction="sum"))
    agree, kl_both = draft_base.closeness(target.model, draft.model, ex, target.tokenizer.pad_token_id,
                                          batch_size=len(ex))
    assert kl_both == pytest.approx(objective / float(batch["loss_mask"].sum()), rel=1e-4)
    assert agree == pytest.approx(m["int8"]["top1_agreement_after"], rel=1e-6)


@pytest.mark.parametrize("method", ["ddd", "idd", "untrained", "konly"])
def test_lora_members_train_on_a_quantized_base(built, tiny_dir, method):
    root, _ = built
    cfg = drafts.DraftsConfig(samples=root / "data" / "samples.jsonl", out=root / "drafts", base=str(root / "int8"),
                              target=str(tiny_dir), method=method, partitions=2, per_partition=1,
                              train=TrainConfig(**FAST))
    m = drafts.run(cfg)
    assert m["base"] == "../../int8"  # the quantized base itself: K-only merges nothing into it
    ens = estimators.DraftEnsemble(root / "drafts" / method, models.load(str(tiny_dir)))
    assert quantize.is_quantized(ens.drafts)
    prompt, response = [5, 6, 7, 8, 9, 10], [11, 12, 13, 14]
    fused = ens.score(prompt, response)
    assert type(ens.runner).__name__ == "FusedDrafts"
    assert (fused.variance > 0).all() and torch.allclose(fused.eu, fused.variance + fused.bias, atol=1e-6)
    ens.batched = False  # one PEFT forward per draft: the reference path
    peft = ens.score(prompt, response)
    assert torch.allclose(peft.eu, fused.eu, atol=1e-5) and torch.allclose(peft.variance, fused.variance, atol=1e-5)


def test_k_only_members_are_the_trained_draft_merged_plus_its_noise(built, tiny_dir):
    """A K-only member (one adapter: the trained LoRA and the noise side by side) gives the logits of the
    old construction: the trained draft merged into a float base, then the noise member on top."""
    from peft import PeftModel

    from drafteu.posterior import NoiseConfig, NoisyModel, member_seed

    root, _ = built
    cfg = drafts.DraftsConfig(samples=root / "data" / "samples.jsonl", out=root / "float-drafts", base=str(tiny_dir),
                              target=str(tiny_dir), method="konly", partitions=1, per_partition=2,
                              train=TrainConfig(**FAST), noise=NoiseConfig(sigma=0.3))
    drafts.run(cfg)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    ens = estimators.DraftEnsemble(root / "float-drafts" / "konly", models.load(str(tiny_dir)))
    got = ens.draft_hidden([([5], [6, 7, 8, 9, 10, 11])]).logits(slice(None))  # (K, 6, V): positions 0..5
    merged = PeftModel.from_pretrained(models.load(str(tiny_dir)).model,
                                       root / "float-drafts" / "konly" / "draft").merge_and_unload()
    noisy = NoisyModel(merged, NoiseConfig(sigma=0.3))
    for k in range(2):
        noisy.set_member("m", member_seed("konly", 0, k))
        with torch.no_grad():
            want = noisy.logits(ids, ["m"], logits_to_keep=7)[0]
        assert torch.allclose(got[k], want[0, :6], atol=1e-4), k


def test_the_cache_key_includes_the_recipe(tmp_path, tiny_dir, _test_cache):
    from drafteu import pipeline
    from drafteu.config import load_experiment

    from .test_pipeline import tiny_config

    d = tiny_config(tiny_dir)
    d["draft_base"] = {"model": "quantize", "heldout": 0.25, "quantize": {"bits": 8}}
    paths = {}
    for bits in (8, 4, 8):
        d["draft_base"]["quantize"] = {"bits": bits, "group_size": 16}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
        cfg = load_experiment(tmp_path / "c.yaml")
        run = tmp_path / f"run{len(paths)}"
        pipeline.run(cfg, run, until="data", log=lambda s: None)
        m = pipeline.stage_draft_base(pipeline.context(cfg, run, "draft_base"))
        paths.setdefault(bits, []).append((m["cache"]["path"], m["cache"]["reused"]))
    assert paths[8][0][0] == paths[8][1][0] != paths[4][0][0]
    assert [r for _, r in paths[8]] == [False, True] and Path(paths[4][0][0]).name.startswith("Q4-")


def test_the_bias_diagnostic_fires_on_far_drafts_and_not_on_close_ones(built, tiny_dir, tmp_path):
    """Noisy copies of another random model are far from the target (the bias term is nearly all of
    their EU): warned.  The same on the int8 self-draft (the drafts' disagreement is much of the EU,
    and its measured KL to the target is tiny): quiet.  A 1-layer truncation has a measured KL over
    the base threshold: warned for that reason."""
    from .conftest import make_model

    root, m = built
    stranger = tmp_path / "stranger"
    make_model(len(models.load(str(tiny_dir), tokenizer_only=True).tokenizer), layers=4,
               seed=7).save_pretrained(stranger)
    models.load(str(tiny_dir), tokenizer_only=True).tokenizer.save_pretrained(stranger)
    from drafteu.posterior import NoiseConfig

    # (the far drafts agree with one another - little noise - and are all far from the target)
    for name, base, warned, kl, sigma in (("stranger", stranger, "bias term", None, 0.01),
                                          ("int8", root / "int8", None, m["int8"]["kl_to_target"], 0.1)):
        cfg = drafts.DraftsConfig(samples=root / "data" / "samples.jsonl", out=root / f"diag-{name}", base=str(base),
                                  target=str(tiny_dir), method="untrained", partitions=1, per_partition=3,
                                  noise=NoiseConfig(sigma=sigma))
        drafts.run(cfg)
        out = tmp_path / f"{name}.json"
        res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "Tom has 3 apples and buys 4 more.",
                                       "--answer", "The answer is 7.", "--method", "drafts", "--drafts",
                                       str(root / f"diag-{name}" / "untrained"), "--json", str(out)])
        assert res.exit_code == 0, res.output
        d = json.loads(out.read_text())["diagnostic"]
        assert d["base_kl_to_target"] == (pytest.approx(kl) if kl is not None else None)
        assert (d["warning"] is not None) == bool(warned), d
        assert ("too far from the target" in res.output) == bool(warned)
        assert f"bias term: {d['bias_share']:.0%} of the EU" in res.output
    far = estimators.bias_diagnostic(torch.tensor([0.1]), torch.tensor([0.1]), m["far"]["kl_to_target"])
    assert (far["warning"] is not None) == (m["far"]["kl_to_target"] > estimators.BASE_KL_WARN)


def test_speculative_decoding_on_a_quantized_ensemble_is_the_targets_greedy(built, tiny_dir):
    from drafteu import data
    from drafteu.generate import greedy_answer
    from drafteu.spec_decoding import SpeculativeDecoder

    root, _ = built
    lm = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(root / "drafts" / "ddd", lm)
    prompt = data.format_prompt(lm.tokenizer, "What is 2 + 3?", data.shots_for("score", 0))
    ref = greedy_answer(lm.model, lm.tokenizer, prompt, 16)
    for propose in ("mix", 0):  # draft 0 alone: its adapter on the quantized base (nothing to merge into)
        dec = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2, propose=propose, bias="target")
        res = dec.generate(prompt, 16, eos_ids={lm.tokenizer.eos_token_id})
        assert res.token_ids == ref
        off = ens.score(prompt, res.token_ids)
        assert torch.allclose(res.variance, off.variance, atol=1e-4) and torch.allclose(res.bias, off.bias, atol=1e-4)


def test_members_that_share_the_trunk_run_it_once_with_the_same_numbers(built, tiny_dir):
    """LoRA on the top layer only (drafts.lora_layers: 1): the fused forward runs the layers below once
    (one row) for the K drafts, and gives the logits of PEFT's K-row batch, in scoring (with a shared
    prompt prefix) and in decoding (a KV cache fed, rolled back and fed again)."""
    from drafteu.kvcache import PrefixCache
    from drafteu.sources import HiddenSource

    root, _ = built
    cfg = drafts.DraftsConfig(samples=root / "data" / "samples.jsonl", out=root / "top", base=str(root / "int8"),
                              target=str(tiny_dir), method="ddd", partitions=2, per_partition=1, lora_layers=1,
                              train=TrainConfig(**FAST))
    drafts.run(cfg)
    conf = json.loads((root / "top" / "ddd" / "s0_m0" / "adapter_config.json").read_text())
    assert conf["layers_to_transform"] == [3]  # the tiny target has 4 layers
    ens = estimators.DraftEnsemble(root / "top" / "ddd", models.load(str(tiny_dir)))
    assert ens.runner.trunk == 3
    from drafteu.evaluate import cost

    layers = ens.drafts.get_base_model().model.layers
    assert cost.trunk_parameters(ens.drafts, 3) == sum(cost.parameters(l) for l in layers[:3]) > 0  # noqa: E741
    rows_seen = []
    layer0 = ens.drafts.get_base_model().model.layers[0]
    handle = layer0.register_forward_hook(lambda m, a, out: rows_seen.append((out[0] if isinstance(out, tuple)
                                                                               else out).shape[0]))
    pairs = [([5, 6, 7, 8, 9], [10, 11, 12]), ([5, 6, 7, 8, 13], [14, 15])]
    shared = HiddenSource(ens.runner, ens.names, prefix_len=4).hidden(pairs).logits(slice(None))
    assert set(rows_seen) == {1, 2}  # the trunk ran on one row per sequence: the prefix, then the batch of 2
    handle.remove()
    plain = HiddenSource(ens.drafts, ens.names).hidden(pairs).logits(slice(None))  # PEFT: K rows through every layer
    assert torch.allclose(shared, plain, atol=1e-5)
    fused, ref = PrefixCache(ens.runner, ens.names), PrefixCache(ens.drafts, ens.names)
    seq = [5, 6, 7, 8, 9]
    for extra in ([10, 11], [12], [13, 14, 15]):
        a, b = fused.feed(seq, extra, len(extra), "cpu"), ref.feed(seq, extra, len(extra), "cpu")
        assert torch.allclose(a, b, atol=1e-5)
        fused.rollback(len(seq) + 1)
        ref.rollback(len(seq) + 1)
        seq = seq + extra[:1]
