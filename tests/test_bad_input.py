"""Bad input, damaged and moved runs: a one-line error (exit 2) naming the problem and the fix,
or the corrected behaviour.  The table in RELIABILITY.md lists each case with its test here."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from typer.testing import CliRunner

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
