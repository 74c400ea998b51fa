"""The proxy on the draft base (``proxy.base: draft_base``): p_mix as one more LoRA on a self-draft,
row K of the drafts' fused pass.  Fused == PEFT with adapters of other ranks and modules, the
estimator's proxy row == the draft base + the proxy adapter alone, OSD training it, a proxy on
another base refused, and `drafteu reproduce` scoring with it (the stage's numbers == the estimator
classes', the cost stage counting K + 1 draft passes and no target pass)."""

from __future__ import annotations

import pytest
import torch
import yaml

from drafteu import divergence, estimators, fileio, models, pipeline, rundir
from drafteu.config import load_experiment
from drafteu.errors import DraftEUError
from drafteu.fused import FusedDrafts
from drafteu.quantize import QuantizeSettings
from drafteu.train import draft_base, drafts, proxy
from drafteu.train.loop import TrainConfig

from .conftest import make_model, tiny_answers
from .test_pipeline import _token_eu_equals_the_estimators, tiny_config

pytestmark = pytest.mark.integration


def _random_lora(model, name: str, config, seed: int):
    """Add adapter ``name`` with random A and B (LoRA's B starts at zero: a no-op is no test)."""
    model.add_adapter(name, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_fused_equals_peft_with_a_proxy_of_another_rank_and_modules():
    """K drafts (all linear layers, rank 4, top layer only) and a proxy (q/v, rank 8, every layer) in one
    fused forward give PEFT's mixed-adapter batch; a module an adapter lacks adds nothing to its rows."""
    from peft import LoraConfig, get_peft_model

    from drafteu import adapters

    base = make_model(96, layers=3, seed=1)
    drafts_cfg = adapters.lora_config(4, 8, 0.0, "all-linear", adapters.top_layers(base, 1), base)
    model = get_peft_model(base, drafts_cfg, adapter_name="d0")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".d0." in n:
                p.normal_(0, 0.2)
    _random_lora(model, "d1", drafts_cfg, 1)
    _random_lora(model, "proxy", LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 2)
    model.eval()
    names = ["d0", "d1", "proxy"]
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(3))
    rows = ids.repeat(3, 1)
    per_row = [n for n in names for _ in range(2)]
    fused = FusedDrafts(model, names)
    assert fused.trunk == 0  # the proxy has LoRA on the first layers: nothing is shared
    with torch.no_grad():
        want = model(input_ids=rows, adapter_names=per_row).logits
        got = fused(rows, adapter_names=per_row).logits
    assert torch.allclose(got, want, atol=1e-5)
    # every row is its adapter alone
    for k, name in enumerate(names):
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.allclose(got[2 * k: 2 * k + 2], model(input_ids=ids).logits, atol=1e-5), name


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir):
    """Target answers, an int8 self-draft of the tiny target, DDD drafts on it, and a proxy trained on it."""
    root = tmp_path_factory.mktemp("proxy_on_drafts")
    samples = tiny_answers(root, tiny_dir)
    draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=root / "int8", target=str(tiny_dir),
                                              kind="quantize", quantize=QuantizeSettings(bits=8), heldout=0.25))
    fast = TrainConfig(lr=1e-2, max_steps=3, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1)
    drafts.run(drafts.DraftsConfig(samples=samples, out=root / "drafts", base=str(root / "int8"), target=str(tiny_dir),
                                   method="ddd", partitions=2, per_partition=1, train=fast))
    m = proxy.run(proxy.ProxyConfig(samples=[samples], out=root / "proxy", target=str(tiny_dir), base="draft_base",
                                    draft_base=str(root / "int8"), heldout=0.25, reference_size=3, lora_r=8,
                                    lora_alpha=16, train=fast))
    return root, m


def test_a_proxy_trained_on_the_draft_base_is_row_k_of_the_drafts_pass(built, tiny_dir):
    from peft import PeftModel

    root, m = built
    assert m["base"] == "draft_base" and m["draft_base_identity"].startswith("drafteu:")
    h = m["heldout"]
    assert h["tokens"] > 0 and h["kl_ref_mean_to_proxy"] > 0 and h["kl_ref_mean_to_target"] > 0
    target = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(root / "drafts" / "ddd", target, root / "proxy" / "adapter")
    assert ens.proxy_in_drafts and ens.proxy_source is None and len(ens.rows) == 3
    assert type(ens.runner).__name__ == "FusedDrafts"  # drafts r16 all-linear + proxy r8 q/v: one forward
    assert "proxy" not in getattr(ens.target, "peft_config", {})  # nothing added to the target
    pairs = [([5, 6, 7, 8], [9, 10, 11]), ([5, 6, 12], [13, 14])]
    got = ens.score_batch(pairs)
    # by hand: the draft base + the proxy adapter alone, and each draft alone
    base = PeftModel.from_pretrained(models.load(str(root / "int8")).model, root / "proxy" / "adapter").eval()
    ens.batched = False
    single = ens.score_batch(pairs)
    for (p, r), s, one in zip(pairs, got, single, strict=True):
        ids = torch.tensor([p + r])
        with torch.no_grad():
            p_mix = base(input_ids=ids).logits[0, len(p) - 1: len(p) + len(r) - 1]
        q = ens.draft_hidden([(p, r)]).logits(slice(None))
        assert torch.allclose(ens.proxy_hidden([(p, r)]).logits(slice(None))[0], p_mix[:, : ens.vocab], atol=1e-4)
        want = divergence.eu_decomposition(q, p_mix[:, : ens.vocab])
        assert torch.allclose(s.bias, want.bias, atol=1e-5) and torch.allclose(s.eu, want.total, atol=1e-5)
        assert torch.allclose(one.eu, s.eu, atol=1e-5)  # one PEFT forward per adapter: the same numbers
        assert (s.bias > 0).all()
    # the raw target's logprobs (a server's `logprobs`): a target pass of their own, the target untouched
    raw = models.load(str(tiny_dir)).model
    for (p, r), (chosen, _, top_ids) in zip(pairs, ens.target_logprobs(pairs, top=2), strict=True):
        with torch.no_grad():
            logp = torch.log_softmax(raw(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1: -1], -1)
        assert torch.allclose(chosen, logp.gather(1, torch.tensor(r)[:, None])[:, 0], atol=1e-4)
        assert torch.equal(top_ids, logp.topk(2, dim=-1).indices)


def test_speculative_decoding_with_the_proxy_on_the_draft_base_decodes_with_the_k_drafts(built, tiny_dir):
    """An ensemble whose proxy is row K of the drafts' pass (what `serve` loads for such a run): both speculative
    decoders propose from the K drafts alone (the proxy row is not a draft) and give the target's greedy answer."""
    from drafteu.spec_decoding import SpeculativeDecoder, plain_greedy
    from drafteu.spec_decoding_batch import BatchedSpeculativeDecoder, Request

    root, _ = built
    target = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(root / "drafts" / "ddd", target, root / "proxy" / "adapter")
    assert ens.proxy_in_drafts
    prompts = [[5, 6, 7, 8], [5, 6, 12, 13, 14]]
    single = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2)  # no proxy on the target: bias "target"
    batched = BatchedSpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2)
    results = batched.generate([Request(p, 8) for p in prompts])
    for p, b in zip(prompts, results, strict=True):
        want = plain_greedy(target.model, p, 8, set())
        assert single.generate(p, 8).token_ids == b.token_ids == want


def test_drafts_and_proxy_on_the_top_layers_share_the_trunk(built, tiny_dir):
    """Drafts and the proxy with LoRA on the top layer only: the K + 1 rows run the layer below once
    (``FusedDrafts.trunk``), with the numbers of one PEFT forward per adapter."""
    root, _ = built
    samples = root / "data" / "samples.jsonl"
    fast = TrainConfig(lr=1e-2, max_steps=2, batch_size=4, grad_accum=1, warmup_steps=1, save_every=2)
    drafts.run(drafts.DraftsConfig(samples=samples, out=root / "top-drafts", base=str(root / "int8"),
                                   target=str(tiny_dir), method="ddd", partitions=2, per_partition=1, lora_layers=1,
                                   train=fast))
    proxy.run(proxy.ProxyConfig(samples=[samples], out=root / "top-proxy", target=str(tiny_dir), base="draft_base",
                                draft_base=str(root / "int8"), heldout=0.0, lora_layers=1, train=fast))
    ens = estimators.DraftEnsemble(root / "top-drafts" / "ddd", models.load(str(tiny_dir)),
                                   root / "top-proxy" / "adapter")
    depth = ens.drafts.get_base_model().config.num_hidden_layers
    assert ens.proxy_in_drafts and ens.runner.trunk == depth - 1  # every layer below the top one, once
    pairs = [([5, 6, 7, 8], [9, 10, 11]), ([5, 6, 12], [13, 14])]
    fused = ens.score_batch(pairs)
    ens.batched = False
    for a, b in zip(fused, ens.score_batch(pairs), strict=True):
        assert torch.allclose(a.eu, b.eu, atol=1e-5) and torch.allclose(a.bias, b.bias, atol=1e-5)
    with pytest.raises(DraftEUError, match="proxy lora_layers must be >= 1"):
        proxy.ProxyConfig(samples=[samples], out=root / "p", target=str(tiny_dir), lora_layers=0)


@pytest.fixture(scope="module")
def int4_drafts(built, tiny_dir):
    """Untrained drafts on an int4 self-draft of the tiny target: another base than ``built``'s."""
    root, _ = built
    samples = root / "data" / "samples.jsonl"
    draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=root / "int4", target=str(tiny_dir),
                                              kind="quantize", quantize=QuantizeSettings(bits=4, group_size=16),
                                              heldout=0.25))
    drafts.run(drafts.DraftsConfig(samples=samples, out=root / "d4", base=str(root / "int4"),
                                   target=str(tiny_dir), method="untrained", partitions=2, per_partition=1))
    return root / "d4" / "untrained"


def test_a_proxy_on_another_draft_base_is_refused(built, int4_drafts, tiny_dir, tmp_path):
    root, _ = built
    samples = root / "data" / "samples.jsonl"
    with pytest.raises(DraftEUError, match="trained on another draft base"):
        estimators.DraftEnsemble(int4_drafts, models.load(str(tiny_dir)), root / "proxy" / "adapter")
    with pytest.raises(DraftEUError, match="--draft-base"):
        proxy.ProxyConfig(samples=[samples], out=tmp_path / "p", target=str(tiny_dir), base="draft_base")
    with pytest.raises(DraftEUError, match="proxy base must be one of"):
        proxy.ProxyConfig(samples=[samples], out=tmp_path / "p", target=str(tiny_dir), base="drafts")


def test_osd_on_the_draft_base_moves_p_mix_towards_the_family_mean(built, tiny_dir):
    """OSD with the student on the int8 base: the held-out KL to the reference family's mean falls below
    the raw target's (the paper's claim for the proxy, Table 4, with the proxy off the target)."""
    from drafteu import posterior

    root, _ = built
    train = TrainConfig(lr=1e-2, max_steps=40, batch_size=4, grad_accum=1, warmup_steps=2, save_every=40,
                        mixed_precision="no")
    h = proxy.run(proxy.ProxyConfig(
        samples=[root / "data" / "samples.jsonl"], out=root / "proxy-long", target=str(tiny_dir), base="draft_base",
        draft_base=str(root / "int8"), heldout=0.25, reference_size=8, noise=posterior.NoiseConfig(sigma=0.3),
        n_teacher=4, lora_dropout=0.0, train=train))["heldout"]
    assert h["tokens"] > 0 and h["kl_ref_mean_to_proxy"] < 0.8 * h["kl_ref_mean_to_target"]


def test_reproduce_scores_with_the_proxy_in_the_drafts_pass(tmp_path, tiny_dir):
    d = tiny_config(tiny_dir)
    d["draft_base"] = {"model": "quantize", "heldout": 0.25}
    d["drafts"] |= {"methods": ["untrained", "ddd"], "layouts": [], "lora_modules": "all-linear"}
    d["proxy"] |= {"data": "samples", "base": "draft_base"}
    d["eval"] |= {"trials": 1}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = load_experiment(tmp_path / "c.yaml")
    decisions = {x.stage.name: x for x in pipeline.plan(cfg, tmp_path / "run")}
    assert "draft_base" in decisions["proxy"].upstream  # p_mix is trained on the run's draft base
    run = tmp_path / "run"
    pipeline.run(cfg, run, until="cost")
    assert fileio.json_load(run / "proxy" / "manifest.json")["base"] == "draft_base"
    _token_eu_equals_the_estimators(cfg, run)  # the stage's rows == DraftEnsemble with the run's proxy
    assert "weight-only" in fileio.json_load(run / "eval" / "cost.json")["draft_kernel"]
    c = fileio.json_load(run / "eval" / "cost.json")["methods"]["ddd"]
    assert "row 3 on the draft base" in c["passes"]
    ens = estimators.DraftEnsemble(rundir.draft_dir(run, cfg, rundir.EnsembleSpec("ddd"), 0), models.load(cfg.target),
                                   rundir.proxy_adapter(run))
    from drafteu.evaluate import cost

    n_d = cost.parameters(ens.drafts.get_base_model())
    assert c["flops_per_token"] == pytest.approx(2.0 * 3 * n_d)  # K + 1 = 3 draft passes, no target pass
    # eval.draft_kernel reaches every stage's ensembles (and, set, their identity: the scores are redone)
    import dataclasses

    from drafteu.evaluate.scoring_stage import TrialEstimators

    dyn = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, draft_kernel="dynamic"))
    trial = TrialEstimators(dyn, run, rundir.eval_rows(run)[:2])
    trial.set_trial(0, [rundir.EnsembleSpec("ddd")])
    assert "int8 dynamic" in trial.estimators["ddd"].kernel
    redo = {x.stage.name: x.action for x in pipeline.plan(dyn, run)}
    assert redo["score"] == "recompute" and redo["proxy"] == "skip" and redo["drafts"] == "skip"
    robust = fileio.json_load(run / "eval" / "proxy_robustness.json")["estimates"]
    assert {"p_mix", "raw target", "K=1", "K=2"} <= set(robust)
    # the cost stage's two modes: full forwards run every answer whole (padded to the longest), the shared
    # prefix runs fewer positions; FLOPs of the work done = the paper's FLOPs x the positions per scored token
    cst = fileio.json_load(run / "eval" / "cost.json")
    answers = rundir.eval_rows(run)[: cfg.eval.cost_responses]
    tokens = sum(len(r["response_ids"]) for r in answers)
    width = max(len(r["prompt_ids"]) + len(r["response_ids"]) - 1 for r in answers)
    full, shared = cst["modes"]["full forwards"]["methods"], cst["modes"]["prefix shared"]["methods"]
    for m in ("ddd", "tokur", "entropy"):
        assert full[m]["positions_per_token"] == [pytest.approx(len(answers) * width / tokens, abs=1e-4)], m
        assert shared[m]["positions_per_token"][0] < full[m]["positions_per_token"][0], m
    assert full["ddd"]["fed_flops_per_token"] == pytest.approx(c["flops_per_token"] * len(answers) * width / tokens,
                                                               rel=1e-3)
    assert set(cst["modes"]["prefix shared"]["wall_rel_reference"]) == set(full)


def test_proxy_keys_are_checked_against_the_model_they_apply_to(tmp_path, tiny_dir):
    """proxy.lora_layers and proxy.lora_modules name layers and modules of the draft base with
    ``proxy.base: draft_base`` (of the target otherwise): one-line errors before any work."""
    from drafteu import preflight

    d = tiny_config(tiny_dir)
    d["draft_base"] = {"model": "quantize", "heldout": 0.25}
    for patch, message in (({"lora_layers": 99}, "proxy.lora_layers is 99, but the draft base has"),
                           ({"lora_modules": ["bogus_proj"]}, "proxy.lora_modules: bogus_proj is "
                                                              "not a linear module of the draft base")):
        d["proxy"] = tiny_config(tiny_dir)["proxy"] | {"base": "draft_base"} | patch
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
        with pytest.raises(DraftEUError, match=message):
            preflight.modules(load_experiment(tmp_path / "c.yaml"))


def test_members_score_on_int8_dynamic_or_float_weights_when_asked_or_measured_faster(built, int4_drafts, tiny_dir,
                                                                                      monkeypatch, tmp_path):
    """``kernel``: an int8 weight-only self-draft's members score with int8 activations (the same int8
    weights; numbers close to, not equal to, the recipe's), ``auto`` follows the machine's measurement,
    and anything else falls back to the recipe with the reason said."""
    from drafteu import hardware, quantize

    root, _ = built
    target = models.load(str(tiny_dir))
    pairs = [([5, 6, 7, 8], [9, 10, 11]), ([5, 6, 12], [13, 14])]
    recipe = estimators.DraftEnsemble(root / "drafts" / "ddd", target, root / "proxy" / "adapter")
    dynamic = estimators.DraftEnsemble(root / "drafts" / "ddd", target, root / "proxy" / "adapter", kernel="dynamic")
    assert "weight-only" in recipe.kernel and "int8 dynamic" in dynamic.kernel and "as asked" in dynamic.kernel
    assert type(dynamic.runner).__name__ == "FusedDrafts"
    def weight(ens):
        return ens.drafts.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight

    # the same int8 weights; the dynamic ones quantize their activations per token
    assert quantize.is_quantized(dynamic.drafts) and torch.equal(weight(dynamic).qdata, weight(recipe).qdata)
    assert weight(dynamic).act_quant_kwargs is not None and weight(recipe).act_quant_kwargs is None
    for a, b in zip(recipe.score_batch(pairs), dynamic.score_batch(pairs), strict=True):
        assert torch.allclose(a.eu, b.eu, atol=0.05, rtol=0.2) and not torch.equal(a.eu, b.eu)
    # float: the recipe's weights dequantized once - plain float tensors, the recipe's numbers to rounding
    floated = estimators.DraftEnsemble(root / "drafts" / "ddd", target, root / "proxy" / "adapter", kernel="float")
    assert "dequantized once to float" in floated.kernel and not quantize.is_quantized(floated.drafts)
    assert torch.equal(weight(floated), weight(recipe).dequantize())
    for a, b in zip(recipe.score_batch(pairs), floated.score_batch(pairs), strict=True):
        assert torch.allclose(a.eu, b.eu, atol=1e-6, rtol=1e-4)
        assert torch.allclose(a.variance, b.variance, atol=1e-6, rtol=1e-4)
    # auto: the measurements decide (int8 dynamic first, then float weights over a slow conversion)
    for dyn, wo, want in ((0.5, 1.3, "int8 dynamic"), (1.3, 1.3, "dequantized once to float"),
                          (1.3, 1.0, "int8 weight-only, per channel (auto"),
                          (None, 1.3, "no int8 dynamic kernel measured")):
        monkeypatch.setattr(hardware, "int8_dynamic_speed", lambda device_type, s=dyn: s)
        monkeypatch.setattr(hardware, "int8_weight_only_speed", lambda device_type, s=wo: s)
        assert want in estimators.DraftEnsemble(root / "drafts" / "ddd", target, kernel="auto").kernel, (dyn, wo)
    monkeypatch.undo()
    for measure in (hardware.int8_dynamic_speed, hardware.int8_weight_only_speed):
        speed = measure("cpu")  # the real measurement: a ratio of two medians
        assert speed is None or speed > 0
        assert measure("cuda") is None
    # an int4 base has no dynamic kernel: kept as trained, and said so; a float base has no kernel
    samples = root / "data" / "samples.jsonl"
    int4 = estimators.DraftEnsemble(int4_drafts, target, kernel="dynamic")
    assert "int4" in int4.kernel and "kept" in int4.kernel
    drafts.run(drafts.DraftsConfig(samples=samples, out=tmp_path / "df", base=str(tiny_dir), target=str(tiny_dir),
                                   method="untrained", partitions=2, per_partition=1))
    assert estimators.DraftEnsemble(tmp_path / "df" / "untrained", target, kernel="dynamic").kernel is None
    with pytest.raises(DraftEUError, match="unknown scoring kernel"):
        hardware.scoring_kernel("fast", torch.device("cpu"))


def test_score_cli_runs_the_drafts_on_the_kernel_asked(built, tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from drafteu.cli import app

    root, _ = built
    base = ["score", "-q", "What is 2 + 3?", "--answer", "5", "--target", str(tiny_dir), "--method", "drafts",
            "--drafts", str(root / "drafts" / "ddd"), "--proxy", str(root / "proxy" / "adapter")]
    res = CliRunner().invoke(app, base + ["--draft-kernel", "bogus"])
    assert res.exit_code == 2 and "--draft-kernel 'bogus'" in res.output
    res = CliRunner().invoke(app, base + ["--draft-kernel", "dynamic", "--json", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    out = fileio.json_load(tmp_path / "o.json")
    assert "int8 dynamic" in out["draft_kernel"] and len(out["tokens"]) >= 1
