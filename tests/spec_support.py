"""Shared by the speculative-decoding tests (one request, several): two draft ensembles on the tiny target
and a proxy (the ``ensembles`` fixture), decoders built from them, prompts, and a small-vocabulary setup
whose exact next-two-token distribution can be enumerated."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from drafteu import data, estimators, generate, models
from drafteu.spec_decoding import SpeculativeDecoder
from drafteu.train import draft_base, drafts, proxy
from drafteu.train.loop import TrainConfig

from .conftest import make_model

FAST = dict(lr=1e-3, max_steps=2, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1)
QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?", "What is 6 times 7?"]


def build_ensembles(tmp_path_factory, tiny_dir):
    """Two draft ensembles on the tiny target and a proxy:
    'far' (untrained copies of a 2-layer truncation: mostly rejected proposals) and
    'near' (copies of the target with small noise: mostly accepted, exercises the bonus token)."""
    root = tmp_path_factory.mktemp("spec")
    common = dict(target=str(tiny_dir), questions=6, max_new_tokens=6, batch_size=8)
    generate.run(generate.GenerateConfig(out=root / "data", samples=1, **common))
    samples = root / "data" / "samples.jsonl"
    draft_base.run(draft_base.DraftBaseConfig(samples=samples, out=root / "base", target=str(tiny_dir), layers=2,
                                              heldout=0.0, train=TrainConfig(**FAST)))
    from drafteu.posterior import NoiseConfig

    drafts.run(drafts.DraftsConfig(samples=samples, out=root / "far", base=str(root / "base"), target=str(tiny_dir),
                                   method="untrained", partitions=1, per_partition=3))
    drafts.run(drafts.DraftsConfig(samples=samples, out=root / "near", base=str(tiny_dir), target=str(tiny_dir),
                                   method="untrained", partitions=1, per_partition=3,
                                   noise=NoiseConfig(sigma=0.02)))
    proxy.run(proxy.ProxyConfig(samples=[samples], out=root / "proxy", target=str(tiny_dir), heldout=0.0,
                                train=TrainConfig(**FAST)))
    return root


def spec_decoder(root, tiny_dir, kind, proxy_on=False, **kw):
    lm = models.load(str(tiny_dir))
    ens = estimators.DraftEnsemble(root / kind / "untrained", lm, root / "proxy" / "adapter" if proxy_on else None)
    return lm, ens, SpeculativeDecoder.from_ensemble(ens, ens.target, **kw)


def prompt_of(lm, q):
    return data.format_prompt(lm.tokenizer, q, data.shots_for("score", 0))


def small_vocab_setup():
    """Target and two drafts over an 8-token vocabulary (non-uniform next-token distributions)."""
    target = make_model(8, layers=2, seed=0)
    base = make_model(8, layers=1, seed=1)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False), adapter_name="d0")
    peft.add_adapter("d1", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    return target, peft.eval(), make_model(8, layers=1, seed=2)


def exact_pairs(model, prompt):
    """Target's exact joint distribution of the next two tokens (64 outcomes)."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        rows = torch.tensor([prompt + [a] for a in range(8)])
        p2 = torch.softmax(model(rows).logits[:, -1].double(), -1)
    return (p1[:, None] * p2).flatten()
