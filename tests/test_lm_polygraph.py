"""drafteu as an LM-Polygraph estimator, inside LM-Polygraph's own pipeline on the embedded model
(`make test-polygraph` installs LM-Polygraph into its own environment and runs these)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("lm_polygraph")
pytestmark = [pytest.mark.polygraph, pytest.mark.slow]

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 6 pens. How many pens are in 5 boxes?",
             "Sara had 9 pencils and gave 2 away. How many are left?"]


@pytest.fixture(scope="module")
def drafts(tmp_path_factory):
    """K = 3 noisy copies of the embedded target as a drafts directory (no training)."""
    from drafteu import fileio
    from drafteu.train import drafts

    root = tmp_path_factory.mktemp("poly")
    fileio.append_jsonl(root / "samples.jsonl", [{"qid": "q0", "sample": 0, "prompt_ids": [1], "response_ids": [2],
                                                 "correct": True, "finish": "eos"}])
    drafts.run(drafts.DraftsConfig(samples=root / "samples.jsonl", out=root / "drafts", base="embedded",
                                   target="embedded", method="untrained", partitions=1, per_partition=3))
    return root / "drafts" / "untrained"


@pytest.fixture(scope="module")
def managed(drafts):
    """LM-Polygraph's UEManager over 3 questions with its own estimators and drafteu's (greedy, 16 tokens)."""
    from lm_polygraph.defaults.register_default_stat_calculators import (
        register_default_stat_calculators,
    )
    from lm_polygraph.estimators import MaximumSequenceProbability, Perplexity
    from lm_polygraph.ue_metrics import ROCAUC
    from lm_polygraph.utils.builder_enviroment_stat_calculator import (
        BuilderEnvironmentStatCalculator,
    )
    from lm_polygraph.utils.dataset import Dataset
    from lm_polygraph.utils.factory_estimator import FactoryEstimator
    from lm_polygraph.utils.generation_parameters import GenerationParameters
    from lm_polygraph.utils.manager import UEManager
    from lm_polygraph.utils.model import WhiteboxModel

    from drafteu import data

    seq = FactoryEstimator()("drafteu.integrations.lm_polygraph", {"drafts": str(drafts), "aggregation": "mean"})
    tok = FactoryEstimator()("drafteu.integrations.lm_polygraph", {"drafts": str(drafts), "level": "token"})
    lm = seq.lm
    lm.tokenizer.padding_side = "left"  # batched generation (as WhiteboxModel.from_pretrained sets it)
    model = WhiteboxModel(lm.model, lm.tokenizer, model_path="embedded", instruct=True,
                          generation_parameters=GenerationParameters(do_sample=False, max_new_tokens=16))
    shots = data.shots_for("easy-word", 1)
    dataset = Dataset([data.chat_messages(q, shots) for q in QUESTIONS], ["7", "30", "7"], batch_size=2)
    man = UEManager(dataset, model, [MaximumSequenceProbability(), Perplexity(), seq, tok],
                    builder_env_stat_calc=BuilderEnvironmentStatCalculator(model),
                    available_stat_calculators=register_default_stat_calculators(
                        "Whitebox", output_attentions=False, output_hidden_states=False),
                    generation_metrics=[], ue_metrics=[ROCAUC()], processors=[], ignore_exceptions=False,
                    verbose=False, max_new_tokens=16, save_stats=["input_tokens"])
    man()
    return man, seq, tok


def test_the_estimator_runs_inside_lm_polygraphs_pipeline(managed):
    man, seq, tok = managed
    values = np.array(man.estimations["sequence", "DraftEU-mean"])
    assert values.shape == (3,) and np.all(values > 0) and np.all(np.isfinite(values))
    assert len(man.estimations["sequence", "MaximumSequenceProbability"]) == 3  # its own ran next to ours
    answers = [list(t) for t in man.stats["greedy_tokens"]]
    eos = seq.lm.tokenizer.eos_token_id
    n_tokens = sum(len(a) - (a[-1] == eos) for a in answers)
    assert len(man.estimations["token", "DraftEU"]) == n_tokens > 0
    assert seq.ensemble is tok.ensemble  # one loaded ensemble for both, each batch scored once


def test_its_scores_are_drafteu_scores_on_the_same_answers(managed, drafts, tmp_path):
    """LM-Polygraph's prompt (its chat template over the same messages) and drafteu's are the same
    tokens, and the plugin's token EU is `drafteu score --answer`'s on the answer it generated."""
    from drafteu import data
    from drafteu.cli import app

    man, seq, tok = managed
    tokens = np.array(man.estimations["token", "DraftEU"])
    start = 0
    for i, (question, text) in enumerate(zip(QUESTIONS, man.stats["greedy_texts"], strict=True)):
        out = tmp_path / f"s{i}.json"
        res = CliRunner().invoke(app,
                                 ["score", "--target", "embedded", "-q", question, "--answer", text, "--shots", "1",
                                       "--method", "drafts", "--drafts", str(drafts), "--json", str(out)])
        assert res.exit_code == 0, res.output
        scored = json.loads(out.read_text())
        ids = [t["id"] for t in scored["tokens"]]
        prompt, answer = seq.pairs({"input_tokens": [man.stats["input_tokens"][i]],
                                    "greedy_tokens": [man.stats["greedy_tokens"][i]]})[0]
        assert prompt == data.format_prompt(seq.lm.tokenizer, question, data.shots_for("easy-word", 1))
        assert ids == answer  # the answer's text tokenizes back to the generated tokens
        eu = np.array([t["eu"] for t in scored["tokens"]])
        np.testing.assert_allclose(tokens[start:start + len(eu)], eu, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(man.estimations["sequence", "DraftEU-mean"][i], scored["sequence"]["mean"],
                                   rtol=1e-4, atol=1e-6)
        start += len(eu)
    assert start == len(tokens)


def test_p_wrong_comes_from_the_runs_chosen_map(managed, drafts, tmp_path):
    """output: p_wrong - the run's calibration map applied to the answer's aggregated EU, its provenance
    kept; a drafts directory without a map is a clear error."""
    from drafteu import rundir
    from drafteu.calibration import p_wrong
    from drafteu.errors import DraftEUError
    from drafteu.integrations.lm_polygraph import DraftEUEstimator

    run = tmp_path / "run"
    (run / "drafts").mkdir(parents=True)
    (run / "drafts" / "ddd").symlink_to(drafts, target_is_directory=True)  # a run whose proposed ensemble it is
    (run / "eval").mkdir()
    fitted = {"kind": "isotonic", "x": [0.0, 0.5, 2.0], "y": [0.1, 0.4, 0.9]}
    (run / "eval" / "hallucination.json").write_text(json.dumps({"methods": {}, "calibration": {
        "method": "untrained", "aggregation": "max", "chosen": "isotonic", "map": fitted, "n_fit": 40, "folds": 5,
        "test": {"isotonic": {"ece": 0.05}}}}))
    man, seq, _ = managed
    est = DraftEUEstimator(run, output="p_wrong")
    stats = {k: man.stats[k] for k in ("input_tokens", "greedy_tokens")}
    got = est(stats)
    want = [p_wrong(s.aggregate("max"), fitted) for s in seq.token_scores(stats)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert str(est) == "DraftEU-p_wrong" and est.p_wrong_map == rundir.hallucination_map(run, "untrained")["provenance"]
    with pytest.raises(DraftEUError, match="output p_wrong needs a run directory"):
        DraftEUEstimator(drafts, output="p_wrong")


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_padding_is_removed_on_the_side_the_batch_was_padded(drafts, side):
    """LM-Polygraph's tokenizer padded the batch; drafteu's own pads on the other side.  The prompts
    come back unpadded, from LM-Polygraph's tokenizer or, without it, from the rows themselves, and
    the scores are those of the unpadded prompts."""
    import copy
    from types import SimpleNamespace

    from drafteu import data
    from drafteu.integrations.lm_polygraph import DraftEUEstimator

    est = DraftEUEstimator(drafts, aggregation="mean")
    theirs = copy.deepcopy(est.lm.tokenizer)
    theirs.padding_side = side
    shots = data.shots_for("easy-word", 1)
    prompts = [data.format_prompt(theirs, q, shots) for q in QUESTIONS[:2]]
    assert len(prompts[0]) != len(prompts[1])  # one of them is padded
    answers = [theirs(" 7", add_special_tokens=False)["input_ids"] + [theirs.eos_token_id],
               theirs(" 30 pens", add_special_tokens=False)["input_ids"]]
    padded = theirs.pad({"input_ids": prompts}, padding=True)["input_ids"]
    own = est.lm.tokenizer.padding_side
    est.lm.tokenizer.padding_side = "left" if side == "right" else "right"
    try:
        want = [(p, [t for t in a if t != theirs.eos_token_id]) for p, a in zip(prompts, answers, strict=True)]
        stats = {"input_tokens": padded, "greedy_tokens": answers, "model": SimpleNamespace(tokenizer=theirs)}
        assert est.pairs(stats) == want
        assert est.pairs({"input_tokens": padded, "greedy_tokens": answers}) == want  # from the rows
        direct = est.ensemble.score_batch(want)
        np.testing.assert_allclose(est(stats), [s.aggregate("mean") for s in direct], rtol=1e-5)
    finally:
        est.lm.tokenizer.padding_side = own


def test_polygraph_eval_runs_drafteus_estimator_from_the_example_config(drafts, tmp_path):
    """LM-Polygraph's own runner, as its users run it: `polygraph_eval` with the shipped
    examples/lm-polygraph/drafteu.yaml (the dataset, the drafts and where to save given on its
    command line).  drafteu's estimators run next to LM-Polygraph's, and their numbers are the
    plugin's on the tokens LM-Polygraph generated."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from drafteu.integrations.lm_polygraph import DraftEUEstimator

    example = Path(__file__).resolve().parents[1] / "examples" / "lm-polygraph" / "drafteu.yaml"
    questions = tmp_path / "questions.csv"
    with questions.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["question", "answer"])
        writer.writerows(zip(QUESTIONS, ["7 apples", "30 pens", "7 pencils"], strict=True))  # text, not numbers
    script = Path(sys.executable).parent / "polygraph_eval"
    out = tmp_path / "out"
    out.mkdir()  # LM-Polygraph saves into it (its default, hydra's output directory, exists)
    args = [f"dataset={questions}", f"estimators.2.cfg.drafts={drafts}", f"estimators.3.cfg.drafts={drafts}",
            f"cache_path={tmp_path}", f"+save_path={out}", "max_new_tokens=16", "+save_stats=[input_tokens]"]
    env = os.environ | {"HYDRA_CONFIG": str(example), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    saved = torch.load(out / "ue_manager_seed1", weights_only=False)
    assert saved["state"] != "failed"
    est = saved["estimations"]
    for name in ("DraftEU-mean", "DraftEU-max", "MaximumSequenceProbability", "Perplexity"):
        values = np.asarray(est["sequence", name], dtype=float)
        assert values.shape == (3,) and np.all(np.isfinite(values)), name
    stats = {"input_tokens": saved["stats"]["input_tokens"], "greedy_tokens": saved["stats"]["greedy_tokens"]}
    ours = DraftEUEstimator(drafts, aggregation="mean")
    rows = [ours({k: [v[i]] for k, v in stats.items()})[0] for i in range(3)]  # one answer at a time, unpadded
    np.testing.assert_allclose(est["sequence", "DraftEU-mean"], rows, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(est["sequence", "DraftEU-max"]) >= np.asarray(rows) - 1e-6)


def test_a_config_without_drafts_is_a_clear_error():
    from drafteu.errors import DraftEUError
    from drafteu.integrations.lm_polygraph import load_estimator

    with pytest.raises(DraftEUError, match="drafts"):
        load_estimator({"aggregation": "mean"})
