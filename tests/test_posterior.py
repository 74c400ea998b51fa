"""Low-rank Gaussian noise adapters: exactness, reproducibility, batched == loop, statistics."""

from __future__ import annotations

import pytest
import torch

from drafteu.errors import DraftEUError
from drafteu.posterior import NoiseConfig, NoisyModel, family_seeds

from .conftest import make_model

V = 120


def ids(b=2, t=11, seed=0):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_sigma_zero_reproduces_target_exactly():
    model = make_model(V)
    with torch.no_grad():
        ref = model(ids()).logits
    noisy = NoisyModel(model, NoiseConfig(sigma=0.0))
    names = noisy.set_members("family", family_seeds(0, 3))
    out = noisy.logits(ids(), names)
    assert out.shape == (3, 2, 11, V)
    assert torch.equal(out, ref.expand(3, -1, -1, -1))


@pytest.mark.parametrize("scheme", ["gaussian", "svd"])
def test_batched_equals_loop_and_base_is_untouched(scheme):
    model = make_model(V)
    with torch.no_grad():
        ref = model(ids()).logits
    noisy = NoisyModel(model, NoiseConfig(sigma=0.3, scheme=scheme))
    names = noisy.set_members("family", family_seeds(0, 4))
    batched = noisy.logits(ids(), names, batched=True)
    loop = noisy.logits(ids(), names, batched=False)
    assert torch.allclose(batched, loop, atol=1e-5)
    assert torch.equal(noisy.base_logits(ids()), ref)
    # members differ from the target and from each other
    assert (batched - ref).abs().amax() > 1e-2
    assert (batched[0] - batched[1]).abs().amax() > 1e-2
    # logits_to_keep keeps the last positions only
    tail = noisy.logits(ids(), names, logits_to_keep=3)
    assert torch.allclose(tail, batched[:, :, -3:], atol=1e-6)


def test_reproducible_from_seed_and_member():
    a = NoisyModel(make_model(V), NoiseConfig(sigma=0.2))
    b = NoisyModel(make_model(V), NoiseConfig(sigma=0.2))
    na = a.set_members("f", family_seeds(7, 3))
    nb = b.set_members("g", family_seeds(7, 3))
    assert torch.equal(a.logits(ids(), na), b.logits(ids(), nb))
    # member k depends on (seed, k) only: a family of 2 is the first 2 of a family of 3
    assert family_seeds(7, 2) == family_seeds(7, 3)[:2]
    assert family_seeds(7, 3) != family_seeds(8, 3)
    # re-drawing a member in place with a new seed changes it
    before = a.logits(ids(), na[:1])
    a.set_member(na[0], 12345)
    assert not torch.equal(before, a.logits(ids(), na[:1]))


@pytest.mark.parametrize("scheme", ["gaussian", "svd"])
def test_noise_is_u_times_eps_with_orthonormal_u(scheme):
    sigma, rank = 0.5, 4
    model = make_model(V, hidden_size=64, intermediate_size=64)
    noisy = NoisyModel(model, NoiseConfig(sigma=sigma, rank=rank, scheme=scheme))
    noisy.set_member("m", 3)
    eps_all, checked = [], 0
    for _name, mod in noisy.model.named_modules():
        if hasattr(mod, "lora_A") and "m" in mod.lora_A:
            a, b = mod.lora_A["m"].weight, mod.lora_B["m"].weight
            assert mod.scaling["m"] == 1.0
            assert torch.allclose(b.T @ b, torch.eye(rank), atol=1e-5)  # orthonormal U
            if scheme == "svd":
                u = torch.linalg.svd(mod.get_base_layer().weight, full_matrices=False).U[:, :rank]
                assert torch.allclose(b.abs(), u.abs(), atol=1e-5)
            eps_all.append(a.flatten())
            checked += 1
    assert checked == 2 * model.config.num_hidden_layers  # q_proj and v_proj in every layer
    eps = torch.cat(eps_all)
    assert abs(eps.std().item() - sigma) < 0.05 * sigma
    assert abs(eps.mean().item()) < 0.05 * sigma


def test_config_validation():
    with pytest.raises(DraftEUError, match="sigma"):
        NoiseConfig(sigma=-1)
    with pytest.raises(DraftEUError, match="rank"):
        NoiseConfig(rank=0)
    with pytest.raises(DraftEUError, match="scheme"):
        NoiseConfig(scheme="uniform")
    with pytest.raises(DraftEUError, match="none of the noise target modules"):
        NoisyModel(make_model(V), NoiseConfig(target_modules=("qkv",)))
    noisy = NoisyModel(make_model(V))
    with pytest.raises(DraftEUError, match="unknown noise members"):
        noisy.logits(ids(), ["nope"])


def test_relative_noise_scales_sigma_by_each_modules_weight_rms():
    """noise.scale: relative - eps has std sigma x RMS(W) on every module, so a model whose weights are
    10x smaller gets 10x smaller noise; absolute (the default) leaves sigma as it is."""
    from drafteu.posterior import draw_noise, noise_std, weight_rms

    w = torch.randn(64, 48) * 0.04
    rel, ab = NoiseConfig(sigma=0.5, scale="relative"), NoiseConfig(sigma=0.5)
    assert noise_std(rel, w) == pytest.approx(0.5 * weight_rms(w)) and noise_std(ab, w) == 0.5
    _, eps_rel = draw_noise(rel, 3, "layer.q_proj", w)
    _, eps_abs = draw_noise(ab, 3, "layer.q_proj", w)
    torch.testing.assert_close(eps_rel, eps_abs * weight_rms(w))  # the same draw, rescaled
    _, eps_big = draw_noise(rel, 3, "layer.q_proj", w * 10)
    torch.testing.assert_close(eps_big, eps_rel * 10)
    assert NoiseConfig(scale="absolute").scale is None  # the default spelt out keeps old runs' identity
    with pytest.raises(DraftEUError, match="noise scale"):
        NoiseConfig(scale="percent")
