"""Bad input, damaged and moved runs: a one-line error (exit 2) naming the problem and the fix,
or the corrected behaviour.  The table in RELIABILITY.md lists each case with its test here."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

from drafteu import runio
from drafteu.cli import app

from .test_pipeline import tiny_config

pytestmark = pytest.mark.integration


def _one_line_error(res, *needles):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    for n in needles:
        assert n in res.output, (n, res.output)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_dir):
    """A finished tiny `reproduce` run (every stage, one trial)."""
    root = tmp_path_factory.mktemp("bad")
    d = tiny_config(tiny_dir)
    d["eval"]["trials"] = 1
    (root / "c.yaml").write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["reproduce", "-c", str(root / "c.yaml"), "--run", str(root / "r1")])
    assert res.exit_code == 0, res.output
    return root


def _stamps(run):
    """mtime of every computed output (samples, weights, adapters, token EU, evaluation results);
    config.yaml files may be rewritten (they record where the run is now)."""
    computed = [p for p in run.rglob("*") if p.suffix in (".jsonl", ".safetensors")
                or (p.parent.name == "eval" and p.suffix == ".json")]
    return {p.relative_to(run): p.stat().st_mtime_ns for p in computed}


def test_a_copied_run_is_the_same_run_after_the_original_is_gone(finished_run, tiny_dir, tmp_path):
    moved = tmp_path / "elsewhere" / "r2"
    shutil.copytree(finished_run / "r1", moved)
    shutil.copy(finished_run / "c.yaml", tmp_path / "c.yaml")
    shutil.rmtree(finished_run / "r1")  # the original is gone (moved between machines)
    for manifest in (moved / "drafts").rglob("manifest.json"):
        assert not json.loads(manifest.read_text())["base"].startswith("/")  # stored relative
    before = _stamps(moved)
    assert len(before) > 20
    res = CliRunner().invoke(app, ["reproduce", "-c", str(tmp_path / "c.yaml"), "--run", str(moved)])
    assert res.exit_code == 0, res.output
    assert _stamps(moved) == before  # nothing recomputed or rewritten
    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "What is 2 + 3?", "--answer", "5",
                                   "--method", "drafts", "--drafts", str(moved), "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["tokens"][0]["variance"] > 0
    finished_run.joinpath("r1").mkdir()  # leave the module fixture's layout as it was
    shutil.copytree(moved, finished_run / "r1", dirs_exist_ok=True)


def _damaged_copy(finished_run, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(finished_run / "r1", run)
    return run


@pytest.mark.parametrize("damage, needles", [
    ("delete_adapter", ["drafts/ddd/s0_m0/adapter_model.safetensors is missing", "re-run"]),
    ("truncate_adapter", ["adapter", "s0_m0 is damaged", "re-run"]),
    ("truncate_manifest", ["manifest.json is damaged", "re-run"]),
])
def test_a_damaged_run_is_diagnosed_not_crashed_on(finished_run, tiny_dir, tmp_path, damage, needles):
    run = _damaged_copy(finished_run, tmp_path)
    ddd = run / "drafts" / "ddd"
    if damage == "delete_adapter":
        (ddd / "s0_m0" / "adapter_model.safetensors").unlink()
    elif damage == "truncate_adapter":
        f = ddd / "s0_m0" / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    else:
        f = ddd / "manifest.json"
        f.write_text(f.read_text()[:40])
    kept = {p: p.read_bytes() for p in run.rglob("*.jsonl")}
    for target in (run, ddd):
        res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "What is 2 + 3?", "--answer", "5",
                                       "--method", "drafts", "--drafts", str(target)])
        _one_line_error(res, *needles)
    assert {p: p.read_bytes() for p in run.rglob("*.jsonl")} == kept  # nothing written or deleted


def test_corrupt_models_get_clear_errors(tmp_path, tiny_dir):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(bytes(range(256)) * 64)
    res = CliRunner().invoke(app, ["score", "--target", str(bad), "-q", "What is 2 + 3?", "--answer", "5"])
    _one_line_error(res, "random.gguf", "not a valid GGUF")
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    w = model / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    res = CliRunner().invoke(app, ["score", "--target", str(model), "-q", "What is 2 + 3?", "--answer", "5"])
    _one_line_error(res, "could not load model", "damaged")


def test_non_utf8_inputs_are_clear_errors(tmp_path, tiny_dir):
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage\x81\n")
    res = CliRunner().invoke(app, ["generate", "-o", str(tmp_path / "o"), "--target", str(tiny_dir),
                                   "--task", str(binary)])
    _one_line_error(res, "bin.jsonl is not UTF-8 text")
    res = CliRunner().invoke(app, ["train-proxy", "--samples", str(binary), "-o", str(tmp_path / "p"),
                                   "--target", str(tiny_dir)])
    _one_line_error(res, "bin.jsonl is not UTF-8 text")
    res = CliRunner().invoke(app, ["train-proxy", "--samples", str(tmp_path / "missing.jsonl"), "-o",
                                   str(tmp_path / "p"), "--target", str(tiny_dir)])
    _one_line_error(res, "samples file not found")


def test_reproduce_input_errors_come_before_any_work(tmp_path, tiny_dir):
    d = tiny_config(tiny_dir)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(d))
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = CliRunner().invoke(app, ["reproduce", "-c", str(cfg), "--run", str(afile)])
    _one_line_error(res, "is a file")
    assert "reproduce tiny" not in res.output and afile.read_text() == "x"
    d["draft_base"]["heldout"] = 0.1  # 10 groups from 8 questions
    cfg.write_text(yaml.safe_dump(d))
    res = CliRunner().invoke(app, ["reproduce", "-c", str(cfg), "--run", str(tmp_path / "r")])
    _one_line_error(res, "data.questions is 8", "draft_base.heldout 0.1", "10 groups")
    assert not (tmp_path / "r").exists()  # nothing generated first


@pytest.mark.parametrize("args, needles", [
    (["--sigma", "inf"], ["sigma must be a finite number"]),
    (["--sigma", "nan"], ["sigma must be a finite number"]),
    (["-k", "1"], ["--family-size 1", "K >= 2"]),
    (["-k", "1000"], ["--family-size 1000", "at most 64"]),
])
def test_extreme_values(tiny_dir, args, needles):
    res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "What is 2 + 3?", "--answer", "5",
                                   *args])
    _one_line_error(res, *needles)


def test_huge_sigma_is_said(tiny_dir, capsys):
    res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "What is 2 + 3?", "--answer", "5",
                                   "--sigma", "1e9", "-k", "2"])
    assert res.exit_code == 0, res.output
    assert "far above the paper's 0.1" in capsys.readouterr().err + res.output



def test_sampled_generation_is_the_same_however_batched_or_resumed(tiny_dir, tmp_path):
    from drafteu import generate

    common = dict(target=str(tiny_dir), questions=6, samples=2, temperature=1.0, max_new_tokens=8)
    generate.run(generate.GenerateConfig(out=tmp_path / "a", batch_size=8, **common))
    generate.run(generate.GenerateConfig(out=tmp_path / "b", batch_size=3, prefix_cache=False, **common))
    a, b = (runio.read_jsonl(tmp_path / x / "samples.jsonl") for x in "ab")
    key = lambda r: (r["qid"], r["sample"])  # noqa: E731
    ids = lambda rows: {key(r): r["response_ids"] for r in rows}  # noqa: E731
    assert ids(a) == ids(b)
    assert len({tuple(v) for v in ids(a).values()}) > 3  # it does sample
    # killed after a few rows (with a torn last line), then resumed
    path = tmp_path / "a" / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:20])
    generate.run(generate.GenerateConfig(out=tmp_path / "a", batch_size=4, **common))
    assert ids(runio.read_jsonl(path)) == ids(a)


def test_row_seeded_sampler_samples_the_tempered_top_p_distribution():
    import torch
    from scipy.stats import chisquare

    from drafteu.generate import RowSeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -3.0]])
    temperature, top_p, n = 0.8, 0.9, 3000
    p = torch.softmax(logits[0] / temperature, -1)
    keep = (p.sort(descending=True).values.cumsum(0) - p.sort(descending=True).values) < top_p
    nucleus = p.sort(descending=True).indices[keep]
    q = torch.zeros_like(p)
    q[nucleus] = p[nucleus] / p[nucleus].sum()
    draws = torch.zeros(5)
    for s in range(n):
        out = RowSeededSampler([s], temperature, top_p, start=3)(torch.zeros(1, 3, dtype=torch.long), logits)
        draws[int(out.argmax())] += 1
    assert draws[q == 0].sum() == 0  # nothing outside the nucleus
    stat = chisquare(draws[q > 0].numpy(), (q[q > 0] * n).numpy())
    assert stat.pvalue > 1e-3, (draws, q * n)
    # the power check: the untempered distribution is rejected
    p1 = torch.softmax(logits[0], -1)[q > 0]
    assert chisquare(draws[q > 0].numpy(), (p1 / p1.sum() * n).numpy()).pvalue < 1e-3


def test_hub_ids_say_they_try_the_hub_and_honour_offline_mode(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(app, ["score", "--target", "no-such-org/no-such-model", "-q", "x", "--answer", "5"])
    _one_line_error(res, "could not load model 'no-such-org/no-such-model'")
    assert "not a local path" in res.output and "HF_HUB_OFFLINE" in res.output
