"""Draft base, draft ensembles (every method), the OSD proxy and the DraftEnsemble estimator."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from typer.testing import CliRunner

from drafteu import (
    adapters,
    diagnostics,
    divergence,
    estimators,
    fileio,
    generate,
    models,
    posterior,
)
from drafteu.cli import app
from drafteu.errors import DraftEUError
from drafteu.train import draft_base, drafts, loop, proxy
from drafteu.train.loop import TrainConfig

from .conftest import make_model, make_tokenizer

pytestmark = pytest.mark.integration
FAST = dict(lr=1e-3, max_steps=3, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_dir):
    """Target samples, teacher samples and a 2-layer draft base, built once for the module."""
    root = tmp_path_factory.mktemp("train")
    common = dict(target=str(tiny_dir), questions=8, max_new_tokens=6, batch_size=8)
    generate.run(generate.GenerateConfig(out=root / "data", samples=2, **common))
    for k in range(2):
        generate.run(generate.GenerateConfig(out=root / f"teacher{k}", samples=1, member=k, **common))
    draft_base.run(draft_base.DraftBaseConfig(samples=root / "data" / "samples.jsonl", out=root / "base",
                                              target=str(tiny_dir), layers=2, heldout=0.25,
                                              train=TrainConfig(**FAST)))
    return root


def test_draft_base_is_a_truncated_distilled_model(workdir, tiny_dir):
    m = fileio.json_load(workdir / "base" / "manifest.json")
    assert m["layers"] == 2 and m["train"]["steps"] == 3
    assert 0 <= m["top1_agreement_before"] <= 1 and 0 <= m["top1_agreement_after"] <= 1
    base = models.load(str(workdir / "base"))
    assert base.model.config.num_hidden_layers == 2
    # a second run with the same recipe is skipped (outputs complete); another recipe is refused
    same = dict(samples=workdir / "data" / "samples.jsonl", out=workdir / "base", target=str(tiny_dir), layers=2,
                heldout=0.25, train=TrainConfig(**FAST | {"save_every": 2}))  # how often it saves is not the recipe
    assert draft_base.run(draft_base.DraftBaseConfig(**same))["started"] == m["started"]
    with pytest.raises(DraftEUError, match=r"holds a draft base made from other inputs \(layers: 2 -> 3\)"):
        draft_base.run(draft_base.DraftBaseConfig(**same | {"layers": 3}))


def test_distillation_lowers_the_kl_to_the_target(tiny_dir, workdir):
    """The draft base's own objective (draft_base.distill_loss), measured on all the data, falls
    well below its value for the untrained truncation."""
    lm = models.load(str(tiny_dir))
    rows = fileio.read_jsonl(workdir / "data" / "samples.jsonl")
    ex = loop.examples_from_rows(rows, lm.tokenizer.eos_token_id)
    draft = models.truncate_layers(lm.model, 2)
    everything = loop.collate(ex, lm.tokenizer.pad_token_id, "cpu")

    def mean_kl():
        with torch.no_grad():
            return float(draft_base.distill_loss(lm.model, draft, everything))

    before = mean_kl()
    loop.fit(draft, ex, functools.partial(draft_base.distill_loss, lm.model),
             TrainConfig(lr=3e-3, max_steps=25, batch_size=8, grad_accum=1, warmup_steps=1, mixed_precision="no"),
             workdir / "kl", pad_id=lm.tokenizer.pad_token_id)
    assert mean_kl() < 0.7 * before


@pytest.mark.parametrize("method", ["ddd", "idd", "fdd", "untrained", "konly"])
def test_every_method_builds_a_working_ensemble(workdir, tiny_dir, method):
    out = workdir / "drafts"
    cfg = drafts.DraftsConfig(samples=workdir / "data" / "samples.jsonl", out=out, base=str(workdir / "base"),
                              target=str(tiny_dir), method=method, partitions=2, per_partition=2,
                              train=TrainConfig(**FAST))
    m = drafts.run(cfg)
    assert m["adapters"] == ["s0_m0", "s0_m1", "s1_m0", "s1_m1"]
    for n in m["adapters"]:
        assert (out / method / n / "adapter_model.safetensors").exists()
    if method in ("ddd", "fdd"):
        qsets = json.loads((out / method / "partitions.json").read_text())["qids"]
        assert len(qsets) == 2 and not set(qsets[0]) & set(qsets[1])
        assert [p["questions"] for p in m["partitions"]] == [4, 4]
    target = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(out / method, target)
    prompt, response = [5, 6, 7, 8, 9, 10], [11, 12, 13, 14]
    s = ens.score(prompt, response)
    assert torch.allclose(s.eu, s.variance + s.bias, atol=1e-6)
    assert (s.variance > 0).all() and (s.bias > 0).all()
    ens.batched = False
    loop_s = ens.score(prompt, response)
    assert torch.allclose(loop_s.eu, s.eu, atol=1e-5) and torch.allclose(loop_s.variance, s.variance, atol=1e-5)


def test_init_noise_is_the_adapters_starting_value(workdir):
    from peft import get_peft_model

    cfg = drafts.DraftsConfig(samples=workdir / "data" / "samples.jsonl", out=workdir / "x", base=str(workdir / "base"))
    model = get_peft_model(models.load(str(workdir / "base")).model,
                           adapters.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_modules),
                           adapter_name="d")
    posterior.apply_init_noise(model, "d", cfg.init_noise, seed=3)
    for name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "d" in mod.lora_A:
            delta = mod.get_delta_weight("d")
            if name.endswith(("q_proj", "v_proj")):
                from drafteu.posterior import NoiseConfig, draw_noise

                u, eps = draw_noise(NoiseConfig(sigma=0.5, rank=8), 3, name, mod.get_base_layer().weight)
                assert torch.allclose(delta, u @ eps, atol=1e-5)
            else:
                assert torch.equal(delta, torch.zeros_like(delta))  # plain LoRA init elsewhere


@pytest.mark.parametrize("stage", ["train-drafts", "train-proxy", "train-draft-base"])
def test_a_training_killed_mid_way_resumes_to_the_same_bytes(workdir, tiny_dir, monkeypatch, stage):
    """Killed after its second optimizer step (checkpoints every step) and resumed, each training
    gives the weights of an uninterrupted run bit for bit - with the default LoRA dropout: the
    checkpoint carries every random state, the proxy draws its teachers from the micro-batch index."""
    from safetensors.torch import load_file

    train = TrainConfig(lr=1e-3, max_steps=4, batch_size=2, grad_accum=2, warmup_steps=1, save_every=1)
    samples = workdir / "data" / "samples.jsonl"

    def run(out):
        if stage == "train-drafts":  # lora_dropout: the default 0.1
            return drafts.run(drafts.DraftsConfig(samples=samples, base=str(workdir / "base"), target=str(tiny_dir),
                                                  method="ddd", partitions=1, per_partition=1, train=train, out=out))
        if stage == "train-proxy":
            return proxy.run(proxy.ProxyConfig(samples=[workdir / "teacher0" / "samples.jsonl",
                                                        workdir / "teacher1" / "samples.jsonl"],
                                               target=str(tiny_dir), heldout=0.0, train=train, out=out))
        return draft_base.run(draft_base.DraftBaseConfig(samples=samples, target=str(tiny_dir), layers=2,
                                                         heldout=0.0, train=train, out=out))

    full = workdir / f"{stage}-full"
    run(full)
    real, calls = loop.collate, {"n": 0}

    def dying(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 5:  # the first micro-batch of step 3
            raise KeyboardInterrupt
        return real(*a, **kw)

    killed = workdir / f"{stage}-killed"
    monkeypatch.setattr(loop, "collate", dying)
    with pytest.raises(KeyboardInterrupt):
        run(killed)
    monkeypatch.setattr(loop, "collate", real)
    checkpoint = next(killed.rglob("checkpoint.pt"))
    assert torch.load(checkpoint, weights_only=False)["step"] == 2
    m = run(killed)
    stats = m["train"] if stage != "train-drafts" else m["train"]["s0_m0"]
    assert stats["steps"] == 4 and stats["resumed_from"] == 2
    weights = sorted(p.relative_to(full) for p in full.rglob("*.safetensors"))
    assert weights and weights == sorted(p.relative_to(killed) for p in killed.rglob("*.safetensors"))
    for rel in weights:
        assert (full / rel).read_bytes() == (killed / rel).read_bytes(), rel
        a, b = load_file(full / rel), load_file(killed / rel)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_proxy_osd(workdir, tiny_dir):
    cfg = proxy.ProxyConfig(samples=[workdir / "teacher0" / "samples.jsonl", workdir / "teacher1" / "samples.jsonl"],
                            out=workdir / "proxy", target=str(tiny_dir), heldout=0.25, reference_size=3,
                            train=TrainConfig(**{**FAST, "grad_accum": 1}))
    m = proxy.run(cfg)
    assert (workdir / "proxy" / "adapter" / "adapter_config.json").exists()
    h = m["heldout"]
    assert h["tokens"] > 0 and h["kl_ref_mean_to_proxy"] > 0 and h["kl_ref_mean_to_target"] > 0
    # the proxy is the target + its adapter; it differs from the raw target
    target = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(workdir / "drafts" / "untrained", target, workdir / "proxy" / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with ens.base_target():
        raw = ens.target(input_ids=ids).logits
    assert not torch.allclose(ens.proxy_hidden([([5], [6, 7, 8, 9])]).logits(slice(None))[0], raw[0, :4])


def test_osd_loss_is_the_mean_forward_kl_to_freshly_drawn_teachers(tiny_dir, workdir):
    """proxy.osd_loss draws N teachers from (seed, micro-batch index) and returns the mean over them
    of KL(p_teacher || p_mix) on the response tokens; another micro-batch index, other teachers."""
    from peft import LoraConfig

    lm = models.load(str(tiny_dir))
    rows = fileio.read_jsonl(workdir / "data" / "samples.jsonl")[:4]
    batch = loop.collate(loop.examples_from_rows(rows, lm.tokenizer.eos_token_id), lm.tokenizer.pad_token_id, "cpu")
    noisy = posterior.NoisyModel(lm.model, posterior.NoiseConfig(sigma=0.3))
    teachers = noisy.set_members("teacher", [1, 2])
    noisy.model.add_adapter(proxy.PROXY, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in noisy.model.named_parameters():  # a proxy that is not the target (LoRA B starts at 0)
        if ".proxy." in n and "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    noisy.model.set_adapter(proxy.PROXY)
    with torch.no_grad():
        got = float(proxy.osd_loss(noisy, teachers, 7, noisy.model, batch | {"micro": 4}))
        other = float(proxy.osd_loss(noisy, teachers, 7, noisy.model, batch | {"micro": 5}))
        student = loop.window_logits(noisy.model.eval(), batch)
        # the teachers by hand: noise members drawn from the seeds the loss promises
        reference = posterior.NoisyModel(models.load(str(tiny_dir)).model, posterior.NoiseConfig(sigma=0.3))
        kls = []
        for k in range(2):
            reference.set_member("t", posterior.member_seed("osd", 7, 5, k))
            reference.model.set_adapter("t")
            kls.append(divergence.kl(loop.window_logits(reference.model, batch), student))
        mask = batch["loss_mask"]
        expected = float(((kls[0] + kls[1]) / 2 * mask).sum() / mask.sum())
    assert got == pytest.approx(expected, rel=1e-4) and got > 0
    assert other != pytest.approx(got, rel=1e-3)


def test_the_osd_objective_is_minimized_by_the_teachers_mean():
    """The forward KL against stacked teachers (the objective osd_loss returns, ``losses.window_loss``):
    gradient descent on a free student reaches the teachers' mixture (the Bayesian model average), not
    any one teacher."""
    from drafteu.train.losses import Window, window_loss

    teachers = torch.randn(2, 1, 3, 10) * 2
    mask = torch.ones(1, 3)
    q = torch.zeros(1, 3, 10, requires_grad=True)
    opt = torch.optim.Adam([q], lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        window_loss(Window(q, None), mask, kind="forward_kl", teachers=Window(teachers, None)).backward()
        opt.step()
    assert torch.allclose(torch.softmax(q, -1), divergence.mixture(teachers).exp(), atol=1e-3)


def test_the_proxy_is_closer_to_the_family_mean_than_the_raw_target(workdir, tiny_dir):
    """The paper's claim for OSD (Sec. 3.4, Table 4) on held-out answers: KL from the mean of a fixed
    reference family to p_mix is below its KL to the raw target."""
    cfg = proxy.ProxyConfig(samples=[workdir / "teacher0" / "samples.jsonl", workdir / "teacher1" / "samples.jsonl"],
                            out=workdir / "proxy-long", target=str(tiny_dir), heldout=0.25, reference_size=8,
                            noise=posterior.NoiseConfig(sigma=0.3), n_teacher=4, lora_dropout=0.0,
                            train=TrainConfig(lr=1e-2, max_steps=40, batch_size=4, grad_accum=1, warmup_steps=2,
                                              save_every=40, mixed_precision="no"))
    h = proxy.run(cfg)["heldout"]
    assert h["tokens"] > 0 and h["kl_ref_mean_to_proxy"] < 0.8 * h["kl_ref_mean_to_target"]


def test_the_plateau_rule():
    assert not loop.plateau([]) and not loop.plateau([(1, 1.0), (2, 1.0)])  # too few to tell
    assert loop.plateau([(1, 1.0), (2, 0.995), (3, 1.2)])  # neither of the last 2 beats 1.0 by 1%
    assert not loop.plateau([(1, 1.0), (2, 0.995), (3, 0.98)])  # the last one does
    assert not loop.plateau([(1, 2.0), (2, 1.0), (3, 0.5)])


def test_training_stops_on_a_held_out_plateau_and_says_whether_it_got_there(tiny_dir, workdir, tmp_path):
    """eval_every: the held-out loss is measured every N steps; training stops once it stops
    improving, and says so; a falling loss runs the schedule out and says it never flattened."""
    lm = models.load(str(tiny_dir))
    ex = loop.examples_from_rows(fileio.read_jsonl(workdir / "data" / "samples.jsonl"), lm.tokenizer.eos_token_id)
    cfg = TrainConfig(lr=1e-3, max_steps=12, batch_size=4, grad_accum=1, warmup_steps=0, mixed_precision="no",
                      eval_every=2)
    flat = iter([1.0, 0.999, 0.998] + [0.5] * 10)  # flat after the first measurement
    stats = loop.fit(models.truncate_layers(lm.model, 1), ex, drafts._sft_loss, cfg, tmp_path / "flat",
                     pad_id=lm.tokenizer.pad_token_id, heldout=lambda m: next(flat))
    assert stats["steps"] == 6 and stats["plateau"] is True  # measured at 2, 4, 6: stopped
    assert stats["heldout_curve"] == [[2, 1.0], [4, 0.999], [6, 0.998]]
    falling = iter([1.0 / (k + 1) for k in range(10)])
    stats = loop.fit(models.truncate_layers(lm.model, 1), ex, drafts._sft_loss, cfg, tmp_path / "falling",
                     pad_id=lm.tokenizer.pad_token_id, heldout=lambda m: next(falling))
    assert stats["steps"] == 12 and stats["plateau"] is False and len(stats["heldout_curve"]) == 6
    # a resumed run continues the curve where the checkpoint left it (and stops at once on a plateau)
    again = loop.fit(models.truncate_layers(lm.model, 1), ex, drafts._sft_loss, cfg, tmp_path / "flat",
                     pad_id=lm.tokenizer.pad_token_id, heldout=lambda m: 0.1)
    assert again["steps"] == 6 and again["heldout_curve"] == [[2, 1.0], [4, 0.999], [6, 0.998]]
    with pytest.raises(DraftEUError, match="eval_every"):
        TrainConfig(eval_every=0)
    assert "eval_every" not in fileio.identity(TrainConfig())  # unset: old runs keep their identity


def test_drafts_hold_out_questions_and_stop_on_their_plateau(workdir, tiny_dir):
    """drafts.heldout: the held-out questions are in no partition; each draft's SFT loss on them is
    measured every eval_every steps (its curve in the manifest), the last point being that loss on the
    saved adapter."""
    from peft import PeftModel

    cfg = drafts.DraftsConfig(samples=workdir / "data" / "samples.jsonl", out=workdir / "drafts-held",
                              base=str(workdir / "base"), target=str(tiny_dir), method="ddd", partitions=2,
                              per_partition=1, heldout=0.25, lora_dropout=0.0,
                              train=TrainConfig(**FAST | {"max_steps": 4, "eval_every": 2}))
    m = drafts.run(cfg)
    parts = json.loads((workdir / "drafts-held" / "ddd" / "partitions.json").read_text())
    held = set(parts["heldout"])
    assert held and m["heldout_questions"] == len(held) and not held & {q for p in parts["qids"] for q in p}
    rows = [r for r in fileio.read_jsonl(workdir / "data" / "samples.jsonl") if r["qid"] in held]
    base = models.load(str(workdir / "base"))
    examples = loop.examples_from_rows(rows, base.tokenizer.eos_token_id)
    for name in m["adapters"]:
        train = m["train"][name]
        assert [s for s, _ in train["heldout_curve"]][-1] == train["steps"] and train["eval_every"] == 2
        assert train["plateau"] is loop.plateau([tuple(c) for c in train["heldout_curve"]])  # the rule on its curve
        draft = PeftModel.from_pretrained(models.load(str(workdir / "base")).model,
                                          str(workdir / "drafts-held" / "ddd" / name))
        bf16 = train["mixed_precision"] == "bf16"  # measured as it trained (bf16 autocast where bf16 is native)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ce = drafts.heldout_ce(examples, base.tokenizer.pad_token_id)(draft.eval())
        assert train["heldout_curve"][-1][1] == pytest.approx(ce, rel=1e-4)
    fit = diagnostics.draft_fit(workdir / "drafts-held" / "ddd")  # the report's line
    curves = [m["train"][n]["heldout_curve"] for n in m["adapters"]]
    assert fit["count"] == 2 and fit["questions"] == len(held)
    assert fit["last"] == pytest.approx(sum(c[-1][1] for c in curves) / 2) and fit["plateau"] <= 2
    assert fit["best"] == pytest.approx(sum(min(v for _, v in c) for c in curves) / 2) and fit["best"] <= fit["first"]
    assert diagnostics.draft_fit(workdir / "drafts" / "ddd") is None  # nothing held out
    with pytest.raises(DraftEUError, match="heldout must be in"):
        drafts.DraftSettings(heldout=1.0)


def test_the_proxys_held_out_check_keeps_what_does_not_train(workdir, tiny_dir):
    """HeldoutCheck computes the reference family and the raw target once: after the proxy's weights
    change, a kept check gives the numbers of one computed from scratch."""
    from peft import LoraConfig

    lm = models.load(str(tiny_dir))
    rows = fileio.read_jsonl(workdir / "data" / "samples.jsonl")[:6]
    ex = loop.examples_from_rows(rows, lm.tokenizer.eos_token_id)
    noisy = posterior.NoisyModel(lm.model, posterior.NoiseConfig(sigma=0.3))
    ref = noisy.set_members("ref", [11, 12, 13])
    noisy.model.add_adapter(proxy.PROXY, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    noisy.model.eval()
    kept = proxy.HeldoutCheck(noisy, ex, lm.tokenizer.pad_token_id, ref, batch_size=4)
    first = kept()
    for n, p in noisy.model.named_parameters():
        if ".proxy." in n and "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3)
    again, fresh = kept(), proxy.HeldoutCheck(noisy, ex, lm.tokenizer.pad_token_id, ref, cache_bytes=0)()
    assert kept._refs is not None and len(kept._refs) == 2  # 6 answers in batches of 4
    assert again == pytest.approx(fresh, rel=1e-6)
    assert first["kl_ref_mean_to_proxy"] == pytest.approx(first["kl_ref_mean_to_target"], rel=1e-5)  # LoRA B = 0
    assert again["kl_ref_mean_to_proxy"] != pytest.approx(first["kl_ref_mean_to_proxy"], rel=1e-2)


def test_the_bias_diagnostic_checks_the_proxys_fit():
    v, b = torch.tensor([0.2]), torch.tensor([0.2])
    good = {"kl_to_family_mean": 0.02, "raw_target_kl": 0.1, "plateau": True}
    assert estimators.bias_diagnostic(v, b, 0.01, good)["warning"] is None
    far = {"kl_to_family_mean": 0.08, "raw_target_kl": 0.1, "plateau": None}
    assert "0.080 nats/token from the family mean" in estimators.bias_diagnostic(v, b, 0.01, far)["warning"]
    short = {"kl_to_family_mean": 0.02, "raw_target_kl": 0.1, "plateau": False}
    assert "before the held-out KL stopped improving" in estimators.bias_diagnostic(v, b, 0.01, short)["warning"]
    assert estimators.proxy_fit(None) is None


def test_training_steps_are_whole_and_follow_the_schedule(tiny_dir, workdir, tmp_path):
    """Epochs that do not fill the last step: every optimizer step still averages grad_accum
    micro-batches (the last group is completed from the next shuffle) and each one changes the
    weights; the learning rate of each step is the configured warm-up + linear / cosine decay."""
    lm = models.load(str(tiny_dir))
    rows = fileio.read_jsonl(workdir / "data" / "samples.jsonl")[:10]
    ex = loop.examples_from_rows(rows, lm.tokenizer.eos_token_id)
    draft = models.truncate_layers(lm.model, 1)
    calls, steps = [], []

    def loss_fn(model, batch):
        calls.append(batch["micro"])
        return drafts._sft_loss(model, batch)

    weight = draft.model.layers[0].mlp.up_proj.weight

    def on_step(step, lr, loss):
        steps.append((step, lr, weight.detach().clone()))

    # 10 examples / batch 2 = 5 micro-batches; grad_accum 2 -> 3 whole steps = 6 micro-batches
    cfg = TrainConfig(lr=1e-3, epochs=1.0, batch_size=2, grad_accum=2, warmup_steps=0, mixed_precision="no")
    stats = loop.fit(draft, ex, loss_fn, cfg, tmp_path / "a", pad_id=lm.tokenizer.pad_token_id, on_step=on_step)
    assert stats["steps"] == 3 == loop.optimizer_steps(len(ex), cfg) and calls == [0, 1, 2, 3, 4, 5]
    assert all(not torch.equal(a[2], b[2]) for a, b in zip(steps, steps[1:], strict=False))  # every step applied
    assert [lr for _, lr, _ in steps] == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3])  # linear to 0
    order = loop.micro_order(len(ex), cfg, 1, seed=0)
    assert sorted(i for b in order[:5] for i in b) == list(range(10)) and len(order) == 6  # epoch 1 + 1 of epoch 2

    # 5 steps, 1 warm-up step: linear 1, 1, .75, .5, .25 and cosine 1, 1, .854, .5, .146
    for scheduler, factors in (("linear", [1, 1, 0.75, 0.5, 0.25]), ("cosine", [1, 1, 0.853553, 0.5, 0.146447])):
        lrs = []
        cfg = TrainConfig(lr=2e-3, max_steps=5, batch_size=4, grad_accum=1, warmup_steps=1, scheduler=scheduler,
                          mixed_precision="no")
        loop.fit(models.truncate_layers(lm.model, 1), ex, drafts._sft_loss, cfg, tmp_path / scheduler,
                 pad_id=lm.tokenizer.pad_token_id, on_step=lambda s, lr, loss, lrs=lrs: lrs.append(lr))
        assert lrs == pytest.approx([2e-3 * f for f in factors], rel=1e-5), scheduler
    # warm-up is linear from 1/warm and capped at 10% of the steps
    f = loop.lr_factor(TrainConfig(lr=1.0, max_steps=40, warmup_steps=8), 40)
    assert [f(s) for s in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_clear_errors_before_training(workdir, tiny_dir, tmp_path):
    base = dict(samples=workdir / "data" / "samples.jsonl", out=tmp_path, base=str(workdir / "base"),
                target=str(tiny_dir))
    with pytest.raises(DraftEUError, match="cannot make 9 partitions from 8 questions"):
        drafts.run(drafts.DraftsConfig(method="ddd", partitions=9, **base))
    with pytest.raises(DraftEUError, match="unknown draft method"):
        drafts.DraftsConfig(method="gkd2", **base)
    other = tmp_path / "other"
    tok = make_tokenizer(corpus=["completely different words here", "zzz yyy"])
    make_model(len(tok)).save_pretrained(other)
    tok.save_pretrained(other)
    with pytest.raises(DraftEUError, match="incompatible"):
        drafts.run(drafts.DraftsConfig(method="ddd", **{**base, "base": str(other)}))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DraftEUError, match="no samples"):
        drafts.run(drafts.DraftsConfig(method="ddd", **{**base, "samples": empty}))
    assert not (tmp_path / "ddd" / "s0_m0").exists()  # nothing was trained


def test_score_cli_with_drafts(workdir, tiny_dir, tmp_path):
    run = tmp_path / "run"
    (run / "drafts").mkdir(parents=True)
    import shutil

    shutil.copytree(workdir / "drafts" / "ddd", run / "drafts" / "ddd")
    shutil.copytree(workdir / "proxy", run / "proxy")
    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "Tom has 3 apples.", "--answer",
                                   "The answer is 7.", "--method", "drafts", "--drafts", str(run), "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    for t in result["tokens"]:
        assert t["eu"] == pytest.approx(t["variance"] + t["bias"], abs=1e-6) and t["variance"] > 0
    bad = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "x", "--method", "drafts",
                                   "--drafts", str(tmp_path)])
    assert bad.exit_code == 2 and "neither a run directory" in bad.output


@pytest.mark.parametrize("method", ["gkd", "minillm"])
def test_trl_baselines(workdir, tiny_dir, method):
    pytest.importorskip("trl")
    out = workdir / "drafts"
    train = TrainConfig(lr=1e-3, max_steps=3, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1,
                        mixed_precision="no", scheduler="cosine")
    cfg = drafts.DraftsConfig(samples=workdir / "data" / "samples.jsonl", out=out, base=str(workdir / "base"),
                              target=str(tiny_dir), method=method, partitions=1, per_partition=2, max_new_tokens=4,
                              train=train)
    m = drafts.run(cfg)
    assert [m["train"][n]["steps"] for n in ("s0_m0", "s0_m1")] == [3, 3]
    # the own loop's schedule, not transformers' (whose warm-up starts at 0): one warm-up step at the full
    # rate, then cosine over the other two (factors 1, 1/2) - each step's rate as the trainer logged it
    assert m["train"]["s0_m0"]["learning_rates"] == pytest.approx([1e-3, 1e-3, 5e-4], abs=1e-9)
    ens = estimators.DraftEnsemble(out / method, models.load(str(tiny_dir)))
    s = ens.score([5, 6, 7, 8], [9, 10, 11])
    assert torch.allclose(s.eu, s.variance + s.bias, atol=1e-6) and (s.variance > 0).all()


def test_train_cli_options_reach_the_config(workdir, tiny_dir, tmp_path):
    res = CliRunner().invoke(app, ["train-drafts", "--samples", str(workdir / "data" / "samples.jsonl"),
                                   "--base", str(workdir / "base"), "--target", str(tiny_dir), "-o", str(tmp_path),
                                   "-S", "1", "-M", "1", "--max-steps", "2", "--batch-size", "2", "--lr", "0.01"])
    assert res.exit_code == 0, res.output
    m = fileio.json_load(tmp_path / "ddd" / "manifest.json")
    assert m["train"]["s0_m0"]["steps"] == 2
    import yaml

    cfg = yaml.safe_load((tmp_path / "ddd" / "config.yaml").read_text())
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["batch_size"] == 2 and cfg["train"]["grad_accum"] == 2
    bad = CliRunner().invoke(app, ["train-drafts", "--samples", str(workdir / "data" / "samples.jsonl"),
                                   "--base", str(workdir / "base"), "-o", str(tmp_path), "--mixed-precision", "fp8"])
    assert bad.exit_code == 2 and "mixed_precision" in bad.output
