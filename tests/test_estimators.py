"""Estimators: position alignment, agreement with the divergence functions, freshness."""

from __future__ import annotations

import pytest
import torch

from drafteu import divergence as D
from drafteu import estimators
from drafteu.errors import DraftEUError
from drafteu.posterior import NoiseConfig, NoisyModel, family_seeds

from .conftest import make_model

V = 120
PROMPT = [5, 17, 33, 8, 2]
RESPONSE = [44, 12, 90, 7]


def full_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_groundtruth_is_family_mi_at_response_positions():
    noisy = NoisyModel(make_model(V), NoiseConfig(sigma=0.3))
    gt = estimators.GroundTruth(noisy, size=3, seed=1)
    scores = gt.score(PROMPT, RESPONSE)
    assert scores.eu.shape == (4,) and scores.token_ids == RESPONSE
    # manual: full forward of each member in a loop, logits at positions P-1 .. P+T-2
    seq = PROMPT + RESPONSE
    members = []
    for name in gt.member_names:
        noisy.model.set_adapter(name)
        members.append(full_logits(noisy.model, seq)[len(PROMPT) - 1 : len(seq) - 1])
    ref = D.mutual_information(torch.stack(members))
    assert torch.allclose(scores.eu, ref, atol=1e-5)
    assert (scores.eu > 0).all()
    # fixed family: scoring twice gives the same numbers
    assert torch.equal(gt.score(PROMPT, RESPONSE).eu, scores.eu)
    assert family_seeds(1, 3) == [noisy.members[n] for n in gt.member_names]


def test_groundtruth_sigma_zero_is_zero():
    noisy = NoisyModel(make_model(V), NoiseConfig(sigma=0.0))
    eu = estimators.GroundTruth(noisy, size=3).score(PROMPT, RESPONSE).eu
    # zero up to float32 rounding: the K rows of one batched forward can differ in the last bits
    # (BLAS kernels split rows by thread count), so MI is ~1e-9 rather than exactly 0 there
    assert torch.allclose(eu, torch.zeros(4), atol=1e-6)


def test_tokur_draws_fresh_members_per_prompt_reproducibly():
    a = estimators.TokUR(NoisyModel(make_model(V), NoiseConfig(sigma=0.3)), size=3, seed=4)
    other = [9] + PROMPT[1:]
    first = a.score(PROMPT, RESPONSE).eu
    assert a.score(PROMPT, RESPONSE[:2]).eu.shape == (2,) and a.draws == 1  # same prompt: same draw
    drawn = dict(a.noisy.members)
    a.score(other, RESPONSE)
    assert a.draws == 2 and dict(a.noisy.members) != drawn  # another prompt: a fresh draw
    # the draw depends on (seed, prompt) only: not on what was scored before, nor on the instance
    assert torch.equal(a.score(PROMPT, RESPONSE).eu, first) and a.draws == 3
    b = estimators.TokUR(NoisyModel(make_model(V), NoiseConfig(sigma=0.3)), size=3, seed=4)
    assert torch.equal(b.score(PROMPT, RESPONSE).eu, first)
    c = estimators.TokUR(NoisyModel(make_model(V), NoiseConfig(sigma=0.3)), size=3, seed=5)
    assert not torch.allclose(c.score(PROMPT, RESPONSE).eu, first)
    # a TokUR draw is not the ground-truth family
    gt = estimators.GroundTruth(NoisyModel(make_model(V), NoiseConfig(sigma=0.3)), size=3, seed=4)
    assert not torch.allclose(gt.score(PROMPT, RESPONSE).eu, first)


def test_entropy_is_unperturbed_target_entropy():
    model = make_model(V)
    ref = D.entropy(full_logits(model, PROMPT + RESPONSE)[len(PROMPT) - 1 : -1])
    noisy = NoisyModel(model, NoiseConfig(sigma=0.5))
    estimators.GroundTruth(noisy, size=2)  # adapters present must not change the entropy
    got = estimators.PredictiveEntropy(noisy).score(PROMPT, RESPONSE).eu
    assert torch.allclose(got, ref, atol=1e-5)


def test_aggregation_and_errors():
    s = estimators.TokenScores(token_ids=[1, 2, 3], eu=torch.tensor([0.1, 0.5, 0.3]))
    assert s.aggregate("mean") == pytest.approx(0.3)
    assert s.aggregate("max") == pytest.approx(0.5)
    assert s.aggregate("sum") == pytest.approx(0.9)
    assert estimators.aggregate(torch.empty(0)) == 0.0
    with pytest.raises(DraftEUError, match="aggregation"):
        s.aggregate("median")
    noisy = NoisyModel(make_model(V))
    with pytest.raises(DraftEUError, match="unknown method"):
        estimators.build("drafts?", noisy)
    with pytest.raises(DraftEUError, match="family size"):
        estimators.build("tokur", noisy, size=0)
    with pytest.raises(DraftEUError, match="prompt is empty"):
        estimators.build("entropy", noisy).score([], RESPONSE)


def test_the_registry_builds_each_estimator_from_one_context_and_its_passes_say_its_cost():
    """Every target-only estimator is built from one ``BuildContext`` by its registry entry, with the member
    count its size setting names there; its ``passes()`` (what the cost stage counts) follow that count, so
    a sized estimator is costed at its own size."""
    from drafteu.methods import ESTIMATORS

    noisy = NoisyModel(make_model(V), NoiseConfig(sigma=0.3))
    ctx = estimators.BuildContext(noisy=noisy, seed=1, sizes={"family_size": 4, "tokur_size": 5})
    built = {name: kind.build(ctx) for name, kind in ESTIMATORS.items() if not kind.uses_drafts}
    passes = {name: [(p.name, p.passes, p.rows) for p in est.passes()] for name, est in built.items()}
    assert passes == {"groundtruth": [("target", 4, 4)], "tokur": [("target", 5, 5)], "entropy": [("target", 1, 1)]}
    assert all(p.model is noisy.model for est in built.values() for p in est.passes())
    assert built["groundtruth"].size == 4 and built["tokur"].size == 5
    # the built estimators score what their classes built directly score
    direct = estimators.GroundTruth(noisy, size=4, seed=1)
    assert torch.allclose(built["groundtruth"].score(PROMPT, RESPONSE).eu, direct.score(PROMPT, RESPONSE).eu)
    with pytest.raises(DraftEUError, match="needs --drafts"):
        ESTIMATORS["drafts"].build(ctx)
    with pytest.raises(DraftEUError, match="target's weights"):
        ESTIMATORS["tokur"].build(estimators.BuildContext())


def test_empty_response_scores_nothing():
    noisy = NoisyModel(make_model(V))
    s = estimators.build("groundtruth", noisy).score(PROMPT, [])
    assert s.eu.shape == (0,) and s.aggregate("mean") == 0.0
