"""The batched, chunked scorer: every estimator's ``score_batch`` equals full forwards, one answer
at a time, whatever the padding, the prefix cache, the shared prompts, the forward pieces or the
architecture (a tiny Llama and a tiny Gemma 3 with sliding-window layers a batch crosses)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from drafteu import divergence as D
from drafteu import estimators, models
from drafteu.posterior import NoiseConfig, NoisyModel
from drafteu.sources import HiddenSource

from .conftest import make_gemma3, make_model

SHOTS = [7, 8, 9, 10, 11]  # the prefix every prompt starts with
PAIRS = [
    (SHOTS + [20, 21, 22], [30, 31, 32, 33, 34]),
    (SHOTS + [20, 21, 22], [35, 36]),  # the same prompt: its tokens are computed once
    (SHOTS + [23], [37, 38, 39, 40, 41, 42, 43, 44, 45]),  # longer than the window of the tiny Gemma
    (SHOTS + [24, 25], []),  # an empty response scores nothing
    (SHOTS + [24, 25], [46]),
    ([50, 51], [52, 53, 54]),  # no shared prefix: this batch runs without the prefix cache
]
VARIANTS = [
    dict(),
    dict(padding_side="left"),
    dict(share_prompts=False),
    dict(token_budget=7),  # inputs fed in pieces, the cache growing
    dict(prefix_len=0),
    dict(prefix_len="auto"),  # found from the prompts, as drafteu serve does
]


def full(model, seq, t):
    """(V,)-rows of logits at the T response positions, from one full forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([seq])).logits[0, len(seq) - t - 1: len(seq) - 1]


def configure(est_sources, variant):
    for src in est_sources:
        for k, v in variant.items():
            setattr(src, k, v)
        src.invalidate()


@pytest.fixture(params=["llama", "gemma3"])
def arch(request):
    return request.param


def tiny(arch, seed=0, vocab=120):
    return make_model(vocab, layers=4, seed=seed) if arch == "llama" else make_gemma3(vocab, seed=seed)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_family_estimators_batched_equal_one_full_forward_per_answer(arch, variant):
    noisy = NoisyModel(tiny(arch), NoiseConfig(sigma=0.3))
    gt = estimators.GroundTruth(noisy, size=3, seed=1, prefix_len=len(SHOTS))
    tokur = estimators.TokUR(noisy, size=2, seed=2, prefix_len=len(SHOTS))
    ent = estimators.PredictiveEntropy(noisy, prefix_len=len(SHOTS))
    for est in (gt, tokur, ent):
        configure([est.source], variant)
    got = {e.name: e.score_batch(PAIRS) for e in (gt, tokur, ent)}
    for i, (p, r) in enumerate(PAIRS):
        seq = p + r
        for name in ("groundtruth", "tokur", "entropy"):
            assert got[name][i].token_ids == r and got[name][i].eu.shape == (len(r),)
        if not r:
            continue
        members = []
        for m in gt.member_names:
            noisy.model.set_adapter(m)
            members.append(full(noisy.model, seq, len(r)))
        torch.testing.assert_close(got["groundtruth"][i].eu, D.mutual_information(torch.stack(members)),
                                   atol=2e-5, rtol=1e-4)
        with noisy.base() as base:
            torch.testing.assert_close(got["entropy"][i].eu, D.entropy(full(base, seq, len(r))), atol=2e-5, rtol=1e-4)
        # TokUR: the batch's draw for this prompt equals scoring the answer alone (a fresh draw per prompt)
        alone = estimators.TokUR(NoisyModel(tiny(arch), NoiseConfig(sigma=0.3)), size=2, seed=2).score(p, r)
        torch.testing.assert_close(got["tokur"][i].eu, alone.eu, atol=2e-5, rtol=1e-4)
    assert tokur.draws == len({tuple(p) for p, _ in PAIRS})


def make_ensemble(tmp_path, arch, lora_layers=None, modules=("q_proj", "v_proj", "down_proj"), name="drafts"):
    """A target directory, a drafts directory of 3 random LoRA adapters on it (a self-draft) and a
    random proxy adapter."""
    from .conftest import make_tokenizer

    tok = make_tokenizer()
    target_dir = tmp_path / "target"
    model = tiny(arch, vocab=len(tok))
    model.save_pretrained(target_dir)
    tok.save_pretrained(target_dir)
    drafts_dir = tmp_path / name
    names = ["s0_m0", "s0_m1", "s1_m0"]
    for i, n in enumerate(names):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=list(modules), init_lora_weights=False,
                         layers_to_transform=lora_layers)
        get_peft_model(tiny(arch, vocab=len(tok)), cfg).save_pretrained(drafts_dir / n)
        (drafts_dir / n / "README.md").unlink(missing_ok=True)
    (drafts_dir / "manifest.json").write_text(json.dumps({"adapters": names, "base": str(target_dir)}))
    torch.manual_seed(7)
    proxy_dir = tmp_path / "proxy"
    get_peft_model(tiny(arch, vocab=len(tok)), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False)).save_pretrained(proxy_dir)
    return target_dir, drafts_dir, proxy_dir, names


@pytest.mark.parametrize("trunk", [None, [2, 3]], ids=["every-layer", "shared-trunk"])
def test_draft_ensemble_batched_equals_full_forwards(tmp_path, arch, trunk):
    target_dir, drafts_dir, proxy_dir, names = make_ensemble(tmp_path, arch, trunk)
    target = models.load(str(target_dir))
    ens = estimators.DraftEnsemble(drafts_dir, target, proxy_dir, prefix_len=len(SHOTS))
    if trunk:
        assert ens.runner.trunk == 2  # layers 0-1 run once for the three drafts
    refs = []
    for p, r in PAIRS:
        if not r:
            refs.append(None)
            continue
        q = []
        for n in ens.names:
            ens.drafts.set_adapter(n)
            q.append(full(ens.drafts, p + r, len(r)))
        refs.append(D.eu_decomposition(torch.stack(q)[..., : ens.vocab],
                                       full(ens.target, p + r, len(r))[..., : ens.vocab]))
    for variant in VARIANTS:
        configure([ens.source, ens.proxy_source], variant)
        got = ens.score_batch(PAIRS)
        for s, ref, (_, r) in zip(got, refs, PAIRS, strict=True):
            assert s.eu.shape == s.variance.shape == s.bias.shape == (len(r),)
            if ref is not None:
                torch.testing.assert_close(s.variance, ref.variance, atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(s.bias, ref.bias, atol=2e-5, rtol=1e-4)
                torch.testing.assert_close(s.eu, ref.total, atol=2e-5, rtol=1e-4)
    configure([ens.source, ens.proxy_source], dict(prefix_len="auto"))
    for s, ref in zip([ens.score(*pair) for pair in PAIRS], refs, strict=True):  # a server's traffic:
        if ref is not None:  # one request at a time, the cached prefix kept, extended or cut as prompts come
            torch.testing.assert_close(s.eu, ref.total, atol=2e-5, rtol=1e-4)
    one = ens.score(*PAIRS[0])  # score() is score_batch of one pair
    torch.testing.assert_close(one.eu, ens.score_batch(PAIRS)[0].eu, atol=2e-5, rtol=1e-4)


def test_ensembles_on_one_base_share_its_weights(tmp_path):
    target_dir, drafts_dir, proxy_dir, names = make_ensemble(tmp_path, "llama")
    other = make_ensemble(tmp_path / "o", "llama", modules=("q_proj",), name="qonly")[1]
    other_manifest = json.loads((other / "manifest.json").read_text()) | {"base": str(target_dir)}
    (other / "manifest.json").write_text(json.dumps(other_manifest))
    target = models.load(str(target_dir))
    alone = [estimators.DraftEnsemble(d, target, proxy_dir).score_batch(PAIRS) for d in (drafts_dir, other)]
    bases = estimators.DraftBases()
    a = estimators.DraftEnsemble(drafts_dir, target, proxy_dir, bases=bases)
    b = estimators.DraftEnsemble(drafts_dir, target, proxy_source=a.proxy_source, bases=bases)
    c = estimators.DraftEnsemble(other, target, proxy_source=a.proxy_source, bases=bases)  # LoRA on fewer modules
    assert a.drafts is b.drafts is c.drafts and set(a.names).isdisjoint(b.names)  # one base, own adapter names
    torch.testing.assert_close(a.score(*PAIRS[0]).eu, b.score(*PAIRS[0]).eu)
    for ens, want in ((a, alone[0]), (c, alone[1])):  # another ensemble's adapters never act on these rows
        for got, ref in zip(ens.score_batch(PAIRS), want, strict=True):
            torch.testing.assert_close(got.eu, ref.eu, atol=2e-5, rtol=1e-4)
    b.close()
    assert not set(b.names) & set(a.drafts.peft_config) and set(a.names) <= set(a.drafts.peft_config)


def test_no_logits_tensor_over_the_answer(monkeypatch):
    """The head is applied to chunks of positions only: the largest logits tensor a score of a long
    answer makes is one chunk, not (K, T, V)."""
    from drafteu import sources

    noisy = NoisyModel(make_model(120), NoiseConfig(sigma=0.3))
    gt = estimators.GroundTruth(noisy, size=3)
    monkeypatch.setattr(sources, "CHUNK_ELEMENTS", 3 * 16 * 120)
    monkeypatch.setattr(sources, "MIN_CHUNK_POSITIONS", 1)
    seen = []
    head = noisy.model.get_base_model().get_output_embeddings()
    head.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    response = list(range(3, 103))
    gt.score([5, 6, 7], response)
    assert seen and max(s[0] * s[1] for s in seen if s[-1] == 120) <= 3 * 16  # rows x positions of one chunk


def test_a_model_with_more_after_its_head_keeps_its_logits():
    """A forward that changes the logits after the head (Gemma 2's soft-capping): the head probe sees
    it, so the scores still equal full forwards."""
    model = make_gemma3(120, final_logit_softcapping=3.0)
    src = HiddenSource(model, None)
    head, ok, width = src.head()
    assert width == 120
    assert ok  # soft-capping is applied by the head function itself
    want = full(model, [1, 2, 3, 4, 5], 2)
    got = src.hidden([([1, 2, 3], [4, 5])])
    torch.testing.assert_close(got.logits(slice(None))[0], want, atol=1e-5, rtol=1e-4)


def test_scores_carry_no_autograd_graph():
    """Scoring is inference: called without torch.no_grad (a server, a notebook), no score keeps the
    graph of its chunks' logits alive."""
    noisy = NoisyModel(make_model(120), NoiseConfig(sigma=0.3))
    for est in (estimators.GroundTruth(noisy, size=2), estimators.PredictiveEntropy(noisy)):
        s = est.score([5, 6, 7], [8, 9, 10])
        assert not s.eu.requires_grad and s.eu.grad_fn is None
