"""Training on a shared prefix (``train.share_prefix``): the prompts' common prefix run once per
micro-batch gives the whole sequences' loss, gradients, teachers and weights."""

from __future__ import annotations

import pytest
import torch

from drafteu import fileio
from drafteu.train import drafts, loop
from drafteu.train.loop import TrainConfig

from .conftest import make_gemma3, make_model


def _shared_prefix_examples(seed: int = 1, vocab: int = 64):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (12,), generator=g).tolist()  # a "system prompt" of 12 tokens
    return [loop.Example(prefix + torch.randint(3, vocab, (n,), generator=g).tolist(),
                         torch.randint(3, vocab, (r,), generator=g).tolist())
            for n, r in [(3, 5), (7, 2), (1, 6), (4, 4)]]


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_shared_prefix_gives_the_whole_sequences_loss_gradient_and_teachers(arch):
    """share_prefix runs the common prefix once and continues every sequence from its KV cache: the
    window logits, the loss, every LoRA gradient and a mixed-adapter teacher batch equal the whole
    sequences' (left-padded) to float rounding - also on Gemma 3's sliding window (6 tokens, crossed
    by the 12-token prefix)."""
    from peft import LoraConfig, get_peft_model

    model = make_gemma3(64) if arch == "gemma3" else make_model(64, layers=2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    peft = get_peft_model(model, lora, adapter_name="s0")
    peft.add_adapter("s1", lora)
    peft.set_adapter("s0")
    ex = _shared_prefix_examples()
    got = {}
    for share in (False, True):
        batch = loop.collate(ex, 0, "cpu", share_prefix=share)
        assert ("prefix_ids" in batch) is share and batch["keep"] == 7
        peft.train()
        peft.zero_grad()
        loss = drafts._sft_loss(peft, batch)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in peft.parameters() if p.grad is not None])
        with torch.no_grad():
            window = loop.window_logits(peft, batch) * batch["loss_mask"][..., None]
            peft.eval()
            teachers = loop.window_logits(peft, batch, adapters=["s0", "s1"]) * batch["loss_mask"][..., None]
        got[share] = (float(loss.detach()), grads, window, teachers, batch["targets"] * batch["loss_mask"].long())
    (l0, g0, w0, t0, y0), (l1, g1, w1, t1, y1) = got[False], got[True]
    assert l1 == pytest.approx(l0, rel=1e-5) and torch.equal(y0, y1)
    assert g0.abs().max() > 0.01 and torch.allclose(g1, g0, atol=1e-5)
    assert torch.allclose(w1, w0, atol=1e-4) and t1.shape == (2, 4, 6, 64) and torch.allclose(t1, t0, atol=1e-4)
    assert not torch.allclose(t1[0], t1[1], atol=1e-2)  # the two adapters' rows differ


def test_a_shared_prefix_trains_to_the_same_weights(tmp_path):
    """fit with train.share_prefix reaches the weights of whole-sequence training (no dropout), with
    activation checkpointing too (the prefix's cache replayed), and a batch whose prompts share too
    little is laid out whole."""
    from peft import LoraConfig, get_peft_model

    ex = _shared_prefix_examples(seed=2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    weights = []
    for share, recompute in ((None, None), (True, None), (True, True)):
        torch.manual_seed(0)
        peft = get_peft_model(make_model(64, layers=2), lora, adapter_name="d")
        cfg = TrainConfig(lr=1e-2, max_steps=4, batch_size=2, grad_accum=2, warmup_steps=0, mixed_precision="no",
                          share_prefix=share, activation_checkpointing=recompute)
        loop.fit(peft, ex, drafts._sft_loss, cfg, tmp_path / f"{share}-{recompute}", pad_id=0)
        weights.append(torch.cat([p.detach().flatten() for n, p in peft.named_parameters() if "lora_" in n]))
    assert (weights[0] - weights[1]).abs().max() < 1e-4 and weights[0].abs().max() > 0.01
    assert (weights[2] - weights[1]).abs().max() < 1e-6
    short = [loop.Example([5] * 7 + [9], [4]), loop.Example([5] * 7 + [8], [4])]  # 7 shared tokens: too few
    assert "prefix_ids" not in loop.collate(short, 0, "cpu", share_prefix=True)
    assert "share_prefix" not in fileio.identity(TrainConfig())  # unset: old runs keep their identity
