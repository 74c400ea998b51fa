"""Bad input, damaged and moved runs: a one-line error (exit 2) naming the problem and the fix,
or the corrected behaviour.  The table in RELIABILITY.md lists each case with its test here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from drafteu import fileio
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
    # The original is gone (moved between machines); it comes back afterwards, pass or fail,
    # so that the module fixture's other users still find it.
    away = finished_run / "r1-away"
    (finished_run / "r1").rename(away)
    try:
        for manifest in (moved / "drafts").rglob("manifest.json"):
            assert not json.loads(manifest.read_text())["base"].startswith("/")  # stored relative
        before = _stamps(moved)
        for product in ("data/samples.jsonl", "draft_base/model.safetensors", "eval/token_eu.jsonl",
                        "proxy/adapter/adapter_model.safetensors", "drafts/ddd/s0_m0/adapter_model.safetensors"):
            assert Path(product) in before, product
        res = CliRunner().invoke(app, ["reproduce", "-c", str(tmp_path / "c.yaml"), "--run", str(moved)])
        assert res.exit_code == 0, res.output
        assert _stamps(moved) == before  # nothing recomputed or rewritten
        out = tmp_path / "s.json"
        res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "What is 2 + 3?", "--answer", "5",
                                       "--method", "drafts", "--drafts", str(moved), "--json", str(out)])
        assert res.exit_code == 0, res.output
        assert json.loads(out.read_text())["tokens"][0]["variance"] > 0
    finally:
        away.rename(finished_run / "r1")


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
    a, b = (fileio.read_jsonl(tmp_path / x / "samples.jsonl") for x in "ab")
    key = lambda r: (r["qid"], r["sample"])  # noqa: E731
    ids = lambda rows: {key(r): r["response_ids"] for r in rows}  # noqa: E731
    assert ids(a) == ids(b)
    assert len({tuple(v) for v in ids(a).values()}) > 3  # it does sample
    # killed after a few rows (with a torn last line), then resumed
    path = tmp_path / "a" / "samples.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:5]) + lines[5][:20])
    generate.run(generate.GenerateConfig(out=tmp_path / "a", batch_size=4, **common))
    assert ids(fileio.read_jsonl(path)) == ids(a)


def test_row_seeded_sampler_samples_the_tempered_top_p_distribution():
    import torch
    from scipy.stats import chisquare

    from drafteu.generate import RowSeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -3.0]])
    temperature, top_p, n = 0.8, 0.9, 3000
    p = torch.softmax(logits[0] / temperature, -1)  # 0.656, 0.188, 0.101, 0.054, 0.001
    # top-p 0.9 by hand: the mass before tokens 0, 1, 2 is 0, 0.656, 0.844 (< 0.9: kept); before token 3
    # it is 0.945 (dropped)
    nucleus = torch.tensor([0, 1, 2])
    assert torch.allclose(p, torch.tensor([0.6564, 0.1881, 0.1006, 0.0539, 0.0013]), atol=1e-3)
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
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import (a user sets it before starting drafteu): without
    # this the lookup went online and waited ~40 s for the network here before failing
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    res = CliRunner().invoke(app, ["score", "--target", "no-such-org/no-such-model", "-q", "x", "--answer", "5"])
    _one_line_error(res, "could not load model 'no-such-org/no-such-model'")
    assert "not a local path" in res.output and "HF_HUB_OFFLINE" in res.output


# -- nothing lost, nothing mixed (concurrent runs, kills, full disks, the cache, --publish) ---------


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_two_reproduce_on_one_run_one_runs_the_other_is_refused(tmp_path, tiny_dir):
    """A second `reproduce` on a run directory in use gets a one-line error naming the first process;
    the first finishes with every (question, sample) once."""
    import os
    import subprocess
    import sys
    import time

    d = tiny_config(tiny_dir)
    d["eval"]["trials"] = 1
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "drafteu.cli", "reproduce", "-c", str(tmp_path / "c.yaml"),
                              "--run", str(run)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "DRAFTEU_THREADS": "1"})
    owner = run / fileio.LOCK_OWNER
    deadline = time.time() + 120
    while not owner.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert owner.exists(), "the first reproduce never took the lock"
    res = CliRunner().invoke(app, ["reproduce", "-c", str(tmp_path / "c.yaml"), "--run", str(run)])
    _one_line_error(res, "is in use by process", str(first.pid), "reproduce")
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out[-3000:]
    rows = fileio.read_jsonl(run / "data" / "samples.jsonl")
    assert len(rows) == len({(r["qid"], r["sample"]) for r in rows}) == 8 * 2
    assert not owner.exists()


def test_a_dead_processs_lock_and_temporary_files_do_not_block_or_stay(finished_run, tiny_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run / "r1", run)
    dead = _dead_pid()
    fileio.write_json(run / fileio.LOCK_OWNER, {"pid": dead, "command": "drafteu reproduce", "started": "then"})
    (run / fileio.LOCK).touch()  # the lock file stays; the OS lock died with its process
    leftovers = [run / f".manifest.json.tmp{dead}", run / "eval" / f".fidelity.json.tmp{dead}",
                 run / "drafts" / "ddd" / "s0_m0.tmp"]
    for p in leftovers[:2]:
        p.write_text("half")
    leftovers[2].mkdir()
    live = run / f".other.json.tmp{__import__('os').getpid()}"  # a live writer's file is not touched
    live.write_text("mine")
    res = CliRunner().invoke(app, ["reproduce", "-c", str(finished_run / "c.yaml"), "--run", str(run)])
    assert res.exit_code == 0, res.output
    assert not any(p.exists() for p in leftovers) and live.exists()


@pytest.mark.parametrize("name", ["..", ".", "../../x", "/tmp/x", "a/b"])
def test_publish_takes_a_plain_name(finished_run, tmp_path, name):
    docs = tmp_path / "docs" / "results"
    docs.mkdir(parents=True)
    res = CliRunner().invoke(app, ["report", "--run", str(finished_run / "r1"), "--publish", str(docs), "--name", name])
    _one_line_error(res, "--name", "plain file name")
    assert list(tmp_path.rglob("*.md")) == [] and list(docs.iterdir()) == []


def test_publish_refuses_a_file_or_an_unwritable_folder(finished_run, tmp_path, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    res = CliRunner().invoke(app, ["report", "--run", str(finished_run / "r1"), "--publish", str(afile)])
    _one_line_error(res, "--publish", "is a file")
    res = CliRunner().invoke(app, ["report", "--run", str(finished_run / "r1"), "--publish", str(afile / "sub")])
    _one_line_error(res, "--publish", "cannot be written")
    real = Path.write_bytes

    def read_only(self, data):
        if self.name.startswith(".write-test"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    res = CliRunner().invoke(app, ["report", "--run", str(finished_run / "r1"), "--publish", str(tmp_path / "ro")])
    _one_line_error(res, "--publish", "cannot be written", "Permission denied")


def test_a_damaged_draft_base_cache_entry_is_said_and_rebuilt(tmp_path, tiny_dir, _test_cache, capsys):
    from drafteu import models, pipeline
    from drafteu.config import load_experiment

    d = tiny_config(tiny_dir)
    d["draft_base"] |= {"cache": True, "data": {"questions": 6, "samples": 1, "max_new_tokens": 6}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = load_experiment(tmp_path / "c.yaml")
    a = pipeline.stage_draft_base(pipeline.context(cfg, tmp_path / "a", "draft_base"))
    weights = next(Path(a["cache"]["path"]).glob("model/*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the entry is damaged
    b = pipeline.stage_draft_base(pipeline.context(cfg, tmp_path / "b", "draft_base"))
    said = capsys.readouterr()
    assert b["cache"]["reused"] is False
    assert f"the cached draft base {weights.parent} is damaged" in said.err + said.out
    models.load(str(tmp_path / "b" / "draft_base"))  # the rebuilt copy loads
    c = pipeline.stage_draft_base(pipeline.context(cfg, tmp_path / "c", "draft_base"))
    assert c["cache"]["reused"] is True  # and the rebuilt entry is trusted again


def test_a_cache_folder_that_is_a_file_or_unwritable_is_named(tmp_path, tiny_dir, monkeypatch):
    d = tiny_config(tiny_dir)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    afile = tmp_path / "cachefile"
    afile.write_text("x")
    monkeypatch.setenv("DRAFTEU_CACHE", str(afile))
    res = CliRunner().invoke(app, ["reproduce", "-c", str(tmp_path / "c.yaml"), "--run", str(tmp_path / "r")])
    _one_line_error(res, "DRAFTEU_CACHE", str(afile), "is a file")
    assert not (tmp_path / "r").exists()
    res = CliRunner().invoke(app,
                             ["score", "-q", "What is 2 + 3?", "--answer", "5"])  # the embedded GGUF is converted there
    _one_line_error(res, "DRAFTEU_CACHE", "is a file")
    assert "not a valid GGUF" not in res.output


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path, tiny_dir, monkeypatch):
    import errno

    import torch

    from drafteu.train import loop

    real_write = Path.write_text

    def full(self, text, *a, **kw):
        if ".tmp" in self.name and "manifest" in self.name:
            real_write(self, text[: len(text) // 2], *a, **kw)  # half written, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_write(self, text, *a, **kw)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "gen"
    res = CliRunner().invoke(app, ["generate", "-o", str(out), "--target", str(tiny_dir), "-n", "2", "--samples", "1",
                                   "--max-new-tokens", "4"])
    _one_line_error(res, "No space left on device", "free some space")
    assert len(fileio.read_jsonl(out / "samples.jsonl")) == 2  # the rows written before are kept
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    monkeypatch.setattr(Path, "write_text", real_write)

    def no_space(obj, path, *a, **kw):  # torch's zip writer reports a full disk as a RuntimeError
        Path(path).write_bytes(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1024 vs 512")

    monkeypatch.setattr(torch, "save", no_space)
    monkeypatch.setattr("shutil.disk_usage", lambda p: type("u", (), {"free": 1 << 20})())
    res = CliRunner().invoke(app, ["train-drafts", "--samples", str(out / "samples.jsonl"), "--base", str(tiny_dir),
                                   "--target", str(tiny_dir), "-o", str(tmp_path / "d"), "-S", "1", "-M", "1",
                                   "--max-steps", "2", "--save-every", "1"])
    _one_line_error(res, "checkpoint.pt", "No space left on device", "saving a training checkpoint")
    assert not [p for p in (tmp_path / "d").rglob("*") if ".tmp" in p.name]
    assert loop  # the loop module was imported (its save is what failed)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "null\n"])
def test_an_empty_config_is_an_error(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    res = CliRunner().invoke(app, ["reproduce", "-c", str(cfg), "--run", str(tmp_path / "r")])
    _one_line_error(res, "c.yaml is empty")
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("sets, env, needles", [
    (["eval.temperature=-1"], {}, ["eval.temperature must be >= 0"]),
    (["eval.questions=0"], {}, ["eval.questions must be >= 1"]),
    (["draft_base.layers=1000"], {}, ["draft_base.layers is 1000", "has 4 layers"]),
    (["draft_base.model=bogus"], {"HF_HUB_OFFLINE": "1"}, ["draft_base.model", "bogus"]),
    (["draft_base.model=/no/such/sibling"], {}, ["draft_base.model", "not found"]),
    ([], {"DRAFTEU_DIVERGENCE": "bogus"}, ["DRAFTEU_DIVERGENCE", "bogus"]),
    (["generation.backend=vllm"], {}, ["generation.backend is vllm", "pip install 'drafteu[vllm]'"]),
])
def test_config_values_are_checked_before_any_work(tmp_path, tiny_dir, monkeypatch, sets, env, needles):
    import importlib.util

    if "generation.backend=vllm" in sets and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(tiny_config(tiny_dir)))
    args = ["reproduce", "-c", str(tmp_path / "c.yaml"), "--run", str(tmp_path / "r")]
    for s in sets:
        args += ["--set", s]
    res = CliRunner().invoke(app, args)
    _one_line_error(res, *needles)
    assert not (tmp_path / "r").exists()  # refused before the run directory was written


def test_a_deleted_damaged_draft_is_the_only_one_rebuilt(finished_run, tmp_path):
    """The advice for a damaged adapter - delete it and re-run - rebuilds that draft alone, to the
    same bytes, and nothing after it."""
    run = tmp_path / "run"
    shutil.copytree(finished_run / "r1", run)
    adapter = run / "drafts" / "ddd" / "s0_m0" / "adapter_model.safetensors"
    before = adapter.read_bytes()
    stamps = _stamps(run)
    adapter.unlink()
    res = CliRunner().invoke(app, ["reproduce", "-c", str(finished_run / "c.yaml"), "--run", str(run)])
    assert res.exit_code == 0, res.output
    assert "[drafts] resuming (drafts/ddd/s0_m0/adapter_model.safetensors is missing)" in res.output
    assert adapter.read_bytes() == before
    after = _stamps(run)
    assert [p for p in after if after[p] != stamps.get(p)] == [adapter.relative_to(run)]


# -- values that used to pass the config check and delete outputs (every numeric field: test_config_values.py)


@pytest.mark.parametrize("key,value,needle", [
    ("drafts.lora_modules", "q_proj,bogus_proj", "drafts.lora_modules: bogus_proj is not a linear module"),
    ("proxy.lora_modules", "[bogus_proj]", "proxy.lora_modules: bogus_proj"),
    ("noise.target_modules", "[bogus_proj]", "noise.target_modules: bogus_proj"),
    ("drafts.lora_layers", "1000", "drafts.lora_layers is 1000"),
    ("drafts.lora_r", "0", "lora_r must be >= 1"),
    ("drafts.lora_dropout", "1.5", "lora_dropout must be in [0, 1)"),
    ("drafts.lora_alpha", "0", "lora_alpha must be > 0"),
    ("proxy.lora_r", "0", "lora_r must be >= 1"),
    ("data.temperature", "nan", "data.temperature must be a finite number"),
])
def test_bad_values_are_refused_before_the_run_is_touched(finished_run, tmp_path, key, value, needle):
    """The values that used to pass the config check and delete a stage's outputs before failing:
    now exit 2 with one line naming the key, the run byte for byte as it was."""
    run = tmp_path / "run"
    shutil.copytree(finished_run / "r1", run)
    before = {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}
    res = CliRunner().invoke(app, ["reproduce", "--config", str(finished_run / "c.yaml"), "--run", str(run),
                                   "--set", f"{key}={value}"])
    _one_line_error(res, needle)
    assert {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()} == before
