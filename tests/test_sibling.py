"""A sibling draft base end to end (the paper's setting: a small model of the target's family as the
drafts' base): `reproduce` trains the drafts as LoRA on the sibling, the proxy on the target, TokUR
and the ground truth on the target; `score` and `speculate` take the run; preflight refuses a sibling
whose vocabulary or prompt format differs before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from drafteu import fileio, models, rundir
from drafteu.cli import app
from drafteu.errors import DraftEUError
from tests.conftest import make_model, make_tokenizer
from tests.test_pipeline import tiny_config


@pytest.fixture(scope="module")
def sibling_dir(tmp_path_factory, tokenizer):
    """A smaller model of another width (1 layer, hidden 16; the target: 4 layers, hidden 32) with the
    target's tokenizer."""
    path = tmp_path_factory.mktemp("tiny-sibling")
    model = make_model(len(tokenizer), layers=1, seed=7, hidden_size=16, intermediate_size=32,
                       num_attention_heads=2, num_key_value_heads=1)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _config(tmp_path, tiny_dir, sibling) -> tuple:
    d = tiny_config(tiny_dir)
    d["draft_base"] = {"model": str(sibling)}
    d["drafts"]["methods"] = ["untrained", "ddd", "konly"]
    d["drafts"]["layouts"] = []
    path = tmp_path / "sibling.yaml"
    path.write_text(yaml.safe_dump(d))
    return path, tmp_path / "run"


@pytest.mark.integration
def test_reproduce_score_and_speculate_on_a_sibling_base(tmp_path, tiny_dir, sibling_dir):
    cfg, run = _config(tmp_path, tiny_dir, sibling_dir)
    res = CliRunner().invoke(app, ["reproduce", "--config", str(cfg), "--run", str(run)])
    assert res.exit_code == 0, res.output
    assert not (run / "draft_base" / "manifest.json").exists()  # the sibling is used as it is: nothing built
    for method in ("untrained", "ddd", "konly"):
        manifest = fileio.json_load(run / "drafts" / method / "manifest.json")
        assert manifest["base_absolute"] == str(sibling_dir.resolve()), method
    proxy = fileio.json_load(run / "proxy" / "manifest.json")
    assert proxy["base"] == "target" and proxy["target"] == str(tiny_dir)
    fid = fileio.json_load(run / "eval" / "fidelity.json")
    assert {"tokur", "untrained", "ddd", "konly"} <= set(fid["methods"])
    cost = fileio.json_load(run / "eval" / "cost.json")
    assert cost["methods"]["ddd"]["flops_per_token"] < cost["methods"]["tokur"]["flops_per_token"]

    # predictive entropy's pass stores the target's token NLL: perplexity, a free signal, at no cost
    rows = {rundir.key_of(r): r for r in fileio.read_jsonl(run / "eval" / "samples" / "samples.jsonl")}
    stored = next(r for r in fileio.read_jsonl(run / "eval" / "token_eu.jsonl") if r["method"] == "entropy" and r["eu"])
    _nll_is_the_targets(tiny_dir, rows[stored["key"]], stored["nll"])
    assert "perplexity" in fileio.json_load(run / "eval" / "hallucination.json")["methods"]

    out = tmp_path / "score.json"
    res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "Tom has 3 apples and buys 4 more.",
                                   "--answer", "The answer is 7.", "--method", "drafts", "--drafts", str(run),
                                   "--json", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    tokens = result["tokens"]
    assert tokens and all(t["eu"] >= 0 and abs(t["eu"] - t["variance"] - t["bias"]) < 1e-4 for t in tokens)
    # the answer's sentences, the riskiest first, each with its tokens' max and mean EU
    top = result["spans"][0]
    assert top["max_eu"] == pytest.approx(max(t["eu"] for t in tokens[top["start"]:top["end"]]), rel=1e-6)
    assert [s["max_eu"] for s in result["spans"]] == sorted((s["max_eu"] for s in result["spans"]), reverse=True)

    out = tmp_path / "speculate.json"
    res = CliRunner().invoke(app, ["speculate", "--target", str(tiny_dir), "--drafts", str(run / "drafts" / "ddd"),
                                   "--proxy", str(run / "proxy"), "-q", "Tom has 3 apples and buys 4 more.",
                                   "--max-new-tokens", "6", "--json", str(out)])
    assert res.exit_code == 0, res.output
    spoken = json.loads(out.read_text())
    assert spoken["tokens"] and all(t["eu"] >= 0 for t in spoken["tokens"])


def _nll_is_the_targets(target_dir, row, nll):
    import torch

    from drafteu import estimators

    model = models.load(str(target_dir)).model
    ids, keep = estimators.response_inputs(row["prompt_ids"], row["response_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float(), -1)
    want = -logp.gather(-1, torch.tensor(row["response_ids"])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(nll), want, rtol=1e-4, atol=1e-5)


def test_the_eu_added_to_a_free_signal_is_a_paired_auroc_difference():
    """hallucination: a logistic map on [EU, entropy] against entropy alone, fitted on the fit questions and
    compared on the test answers over question resamples - informative EU adds, noise EU does not."""
    import numpy as np

    from drafteu.config import ExperimentConfig
    from drafteu.evaluate import stages

    rng = np.random.default_rng(0)
    qids = [f"q{i // 3}" for i in range(600)]
    label = rng.integers(0, 2, 600)
    free = label * 0.5 + rng.normal(0, 1, 600)  # a weak free signal
    cfg = ExperimentConfig()
    strong = stages._added_to(label * 2.0 + rng.normal(0, 1, 600), free, label, qids, cfg)
    noise = stages._added_to(rng.normal(0, 1, 600), free, label, qids, cfg)
    assert strong["difference"] > 0.1 and strong["verdict"] == "agrees"
    assert abs(noise["difference"]) < 0.05 and noise["verdict"] != "agrees"


def test_a_sibling_with_another_prompt_format_or_vocabulary_is_refused_before_any_work(tmp_path, tiny_dir, sibling_dir):
    other = tmp_path / "other-template"
    shutil.copytree(sibling_dir, other)
    tok = models.load(str(other), tokenizer_only=True).tokenizer
    tok = type(tok).from_pretrained(str(other))
    tok.chat_template = tok.chat_template.replace("<|im_start|>assistant\n", "<|im_start|>assistant:\n")
    tok.save_pretrained(other)
    cfg, run = _config(tmp_path, tiny_dir, other)
    res = CliRunner().invoke(app, ["reproduce", "--config", str(cfg), "--run", str(run)])
    assert res.exit_code == 2 and not run.exists(), res.output
    assert "draft_base.model" in res.output and "formats a prompt differently" in res.output

    foreign = tmp_path / "other-vocab"
    shutil.copytree(sibling_dir, foreign)
    tok = make_tokenizer(corpus=["A completely different corpus of words, numbers 1 2 3 and symbols + - *."] * 3)
    tok.save_pretrained(foreign)
    from drafteu import preflight

    with pytest.raises(DraftEUError, match="draft_base.model: vocabularies of .* are incompatible"):
        preflight.sibling(str(tiny_dir), str(foreign), "draft_base.model")


def test_the_report_says_why_drafts_of_the_targets_size_cost_more():
    from drafteu import report

    cst = {"reference": "tokur", "flops_rel_reference": {"ddd": 1.67},
           "params": {"target": 134_500_000, "draft": 134_500_000, "members": 4, "target_passes": 3}}
    (line,) = [x for x in report._cost_reading(cst) if x]
    assert "ddd costs 1.67x tokur's FLOPs" in line and "100% of the target's parameters" in line
    assert "docs/results/qwen-gsm8k.md" in line
    cheap = cst | {"flops_rel_reference": {"ddd": 0.63}, "params": cst["params"] | {"draft": 494_000_000 // 3}}
    assert report._cost_reading(cheap) == [] and report._cost_reading({"reference": "tokur",
                                                                       "flops_rel_reference": {}}) == []
