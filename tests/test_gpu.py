"""The same pipeline on a CUDA device (``gpu`` marker; skipped without one).

Tiny random models on the GPU: `reproduce` with every draft method, `score`, speculative decoding
(greedy == the target's greedy) and the fused K-draft forward (== PEFT).  The device is
``$DRAFTEU_GPU_TEST_DEVICE`` (default ``cuda``); setting it to ``cpu`` runs these tests' code on a
machine without a GPU (how they are kept working where CI has none).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from typer.testing import CliRunner

from drafteu import data, estimators, fileio, generate, models
from drafteu.cli import app
from drafteu.generate import greedy_answer
from drafteu.spec_decoding import SpeculativeDecoder, plain_greedy

from .test_pipeline import ALL_METHODS, tiny_config
from .test_speculative import check_fused_equals_peft

DEVICE = os.environ.get("DRAFTEU_GPU_TEST_DEVICE", "cuda")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(), reason="needs a CUDA device"),
]
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_dir):
    """A tiny `reproduce` on the device with every draft method and a layout."""
    pytest.importorskip("trl")
    root = tmp_path_factory.mktemp("gpu")
    d = tiny_config(tiny_dir) | {"device": DEVICE}
    d["drafts"]["methods"] = ALL_METHODS
    d["eval"]["trials"] = 1
    (root / "c.yaml").write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["reproduce", "-c", str(root / "c.yaml"), "--run", str(root / "run")])
    assert res.exit_code == 0, res.output
    return root / "run"


def test_reproduce_runs_every_method_on_the_device(run):
    m = fileio.json_load(run / "manifest.json")
    assert torch.device(m["hardware"]["device"]).type == torch.device(DEVICE).type
    fid = fileio.json_load(run / "eval" / "fidelity.json")
    assert set(fid["methods"]) >= {*ALL_METHODS, "ddd 1x2", "tokur"}
    for r in fileio.read_jsonl(run / "eval" / "token_eu.jsonl"):
        assert all(x == x and x >= -1e-4 for x in r["eu"])  # finite-or-not NaN, non-negative
        if r["variance"] is not None:
            assert all(abs(e - v - b) < 1e-3 for e, v, b in zip(r["eu"], r["variance"], r["bias"], strict=True))
    if torch.device(DEVICE).type == "cuda":
        expected = "bf16" if torch.cuda.is_bf16_supported() else "no"
        assert m["hardware"]["mixed_precision"]["drafts"] == expected


def test_score_on_the_device_matches_the_cpu(run, tiny_dir, tmp_path):
    out = {}
    for dev in ("cpu", DEVICE):
        path = tmp_path / f"{dev}.json"
        res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", QUESTION, "--answer",
                                       "The answer is 7.", "--method", "drafts", "--drafts", str(run),
                                       "--device", dev, "--dtype", "float32", "--json", str(path)])
        assert res.exit_code == 0, res.output
        out[dev] = json.loads(path.read_text())
    a, b = out["cpu"]["tokens"], out[DEVICE]["tokens"]
    assert [t["id"] for t in a] == [t["id"] for t in b]
    for x, y in zip(a, b, strict=True):
        assert x["eu"] == pytest.approx(y["eu"], abs=2e-3)


def test_speculative_greedy_is_the_targets_greedy(run, tiny_dir):
    lm = models.load(str(tiny_dir), device=DEVICE, dtype="float32")  # exact equalities: bf16 near-ties flip
    ens = estimators.DraftEnsemble(run / "drafts" / "ddd", lm, run / "proxy" / "adapter", dtype="float32")
    prompt = data.format_prompt(lm.tokenizer, QUESTION, data.shots_for("score", 0))
    eos = {lm.tokenizer.eos_token_id}
    with ens.base_target():
        ref = greedy_answer(lm.model, lm.tokenizer, prompt, 24)
        assert plain_greedy(lm.model, prompt, 24, eos) == ref
    # the offline reference of bias="target": the same drafts against the raw target (an ensemble without a
    # proxy, on a target of its own: the first one carries the proxy adapter)
    raw = models.load(str(tiny_dir), device=DEVICE, dtype="float32")
    ens_raw = estimators.DraftEnsemble(run / "drafts" / "ddd", raw, None, dtype="float32")
    for propose, bias in (("mix", "proxy"), (0, "target")):
        dec = SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2, propose=propose, bias=bias)
        res = dec.generate(prompt, 24, eos_ids=eos)
        assert res.token_ids == ref
        offline = (ens if bias == "proxy" else ens_raw).score(prompt, res.token_ids)
        assert torch.allclose(res.variance, offline.variance, atol=1e-3)
        assert torch.allclose(res.bias, offline.bias, atol=1e-3)


def test_fused_drafts_equal_peft_on_the_device():
    check_fused_equals_peft(DEVICE, atol=1e-4)


def test_generation_on_the_device_equals_batch_one(tiny_dir, tmp_path):
    cfg = dict(target=str(tiny_dir), questions=4, samples=1, temperature=0.0, max_new_tokens=6, device=DEVICE)
    a = generate.run(generate.GenerateConfig(out=tmp_path / "a", batch_size=4, **cfg))
    b = generate.run(generate.GenerateConfig(out=tmp_path / "b", batch_size=1, **cfg))
    assert a["rows"] == b["rows"] == 4
    ra, rb = (fileio.read_jsonl(tmp_path / x / "samples.jsonl") for x in "ab")
    assert [r["response_ids"] for r in ra] == [r["response_ids"] for r in rb]


def test_compiled_steps_and_divergences_on_the_device(run, tiny_dir, monkeypatch):
    """compile=on (CUDA graphs on CUDA) decodes the eager tokens with the eager EU; the compiled
    eu_decomposition (CUDA's default) equals the eager kernels on the device."""
    from drafteu import divergence
    from drafteu.hardware import has_cxx_compiler

    if torch.device(DEVICE).type == "cpu" and not has_cxx_compiler():
        pytest.skip("torch.compile on a CPU needs a C++ compiler")
    lm = models.load(str(tiny_dir), device=DEVICE, dtype="float32")  # exact equalities: bf16 near-ties flip
    ens = estimators.DraftEnsemble(run / "drafts" / "ddd", lm, run / "proxy" / "adapter", dtype="float32")
    prompt = data.format_prompt(lm.tokenizer, QUESTION, data.shots_for("score", 0))
    eos = {lm.tokenizer.eos_token_id}
    out = {c: SpeculativeDecoder.from_ensemble(ens, ens.target, gamma=2, bias="proxy", compile=c)
           .generate(prompt, 16, eos_ids=eos) for c in ("off", "on")}
    assert out["on"].token_ids == out["off"].token_ids
    assert torch.allclose(out["on"].variance + out["on"].bias, out["off"].variance + out["off"].bias, atol=2e-3)
    gen = torch.Generator().manual_seed(0)
    q = (torch.randn(6, 33, 1000, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    p = (torch.randn(33, 1000, generator=gen) * 3).to(DEVICE, torch.bfloat16)
    terms = {}
    for how in ("eager", "compiled"):
        monkeypatch.setenv("DRAFTEU_DIVERGENCE", how)
        terms[how] = divergence.eu_decomposition(q, p)
    for f in ("variance", "bias"):
        assert torch.allclose(getattr(terms["eager"], f), getattr(terms["compiled"], f), atol=1e-5)
