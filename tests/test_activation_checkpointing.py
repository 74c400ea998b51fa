"""Training with activation checkpointing (``train.activation_checkpointing``): the decoder layers
recomputed in the backward, the same weights, the model as before after training, the run's identity
unchanged.  The gradients, with and without a shared prefix: tests/test_losses.py; the shared prefix's
weights: tests/test_shared_prefix.py."""

from __future__ import annotations

import torch

from drafteu import fileio
from drafteu.train import drafts, loop
from drafteu.train.loop import TrainConfig

from .conftest import make_model


def test_activation_checkpointing_recomputes_the_layers_and_trains_the_same_weights(tmp_path):
    """train.activation_checkpointing: each decoder layer runs again in the backward (the forward
    keeps only its input), the LoRA trains to the same weights, and the model is back to normal after
    fit."""
    from peft import LoraConfig, get_peft_model

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (8, 11), generator=g).tolist()
    ex = [loop.Example(row[:6], row[6:]) for row in ids]  # 8 examples: 2 micro-batches of 4
    trained, calls = {}, {}
    for on in (False, True):
        torch.manual_seed(0)
        draft = get_peft_model(make_model(64, layers=2), LoraConfig(r=4, target_modules="all-linear"))
        mlp = draft.get_base_model().model.layers[0].mlp  # inside the layer: its recompute calls it again
        calls[on] = 0

        def count(module, _, on=on):
            calls[on] += module.training and torch.is_grad_enabled()  # training passes only

        hook = mlp.register_forward_pre_hook(count)
        cfg = TrainConfig(lr=1e-3, max_steps=2, batch_size=4, grad_accum=1, warmup_steps=0, mixed_precision="no",
                          activation_checkpointing=on)
        loop.fit(draft, ex, drafts._sft_loss, cfg, tmp_path / str(on), pad_id=0)
        hook.remove()
        trained[on] = {n: p.detach().clone() for n, p in draft.named_parameters() if "lora_" in n}
        assert not draft.get_base_model().is_gradient_checkpointing  # off again after training
    assert calls[False] == 2 and calls[True] == 4  # 2 micro-batches; each layer once more in every backward
    assert trained[True].keys() == trained[False].keys()
    for n, w in trained[True].items():
        assert torch.allclose(w, trained[False][n], atol=1e-6), n
    assert not all(torch.equal(w, torch.zeros_like(w)) for n, w in trained[True].items() if "lora_B" in n)
    # how it is trained, not what: the same identity with or without it
    assert fileio.identity(TrainConfig(activation_checkpointing=True)) == fileio.identity(TrainConfig())
