"""Training under several processes: `accelerate launch` with two CPU processes (gloo)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from drafteu import fileio, generate, models
from drafteu.train import drafts, loop

pytestmark = pytest.mark.integration
TRAIN = ["-S", "1", "-M", "1", "--max-steps", "6", "--grad-accum", "1", "--lr", "0.01", "--warmup-steps", "1",
         "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(samples, tiny_dir, out, processes: int) -> subprocess.CompletedProcess:
    args = ["-m", "drafteu.cli", "train-drafts", "--samples", str(samples), "--base", str(tiny_dir),
            "--target", str(tiny_dir), "-o", str(out), *TRAIN, "--batch-size", str(8 // processes)]
    if processes > 1:
        accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        # accelerate's multi-process launcher (torch.distributed.run); drafteu's CPU device makes
        # accelerate pick gloo.  (`accelerate launch --cpu` alone starts one process without MPI.)
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(_free_port()), *args]
    else:
        cmd = [sys.executable, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DRAFTEU_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _sft_loss(tiny_dir, adapter, examples, pad_id) -> float:
    from peft import PeftModel

    model = models.load(str(tiny_dir), device="cpu").model
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return float(drafts._sft_loss(model.eval(), loop.collate(examples, pad_id, "cpu")))


def test_two_processes_train_like_one(tmp_path, tiny_dir):
    generate.run(generate.GenerateConfig(out=tmp_path / "data", target=str(tiny_dir), questions=8, samples=2,
                                         max_new_tokens=6, batch_size=8))
    samples = tmp_path / "data" / "samples.jsonl"
    one, two = _train(samples, tiny_dir, tmp_path / "one", 1), _train(samples, tiny_dir, tmp_path / "two", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]

    # one copy of the adapter, written once, and nothing half-written left behind
    ens = tmp_path / "two" / "ddd"
    assert sorted(p.name for p in ens.iterdir() if p.name != fileio.LOCK) == ["config.yaml", "manifest.json",
                                                                              "partitions.json", "s0_m0",
                                                     "s0_m0.trainer", "stage.json"]
    assert sorted(p.name for p in (ens / "s0_m0").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    stats = fileio.json_load(ens / "manifest.json")["train"]["s0_m0"]
    assert stats["processes"] == 2 and stats["steps"] == 6
    assert fileio.json_load(tmp_path / "one" / "ddd" / "manifest.json")["train"]["s0_m0"]["processes"] == 1

    # the loss goes down as with one process (same 8 sequences per optimizer step: 1 x 8 and 2 x 4)
    lm = models.load(str(tiny_dir), tokenizer_only=True)
    examples = loop.examples_from_rows(fileio.read_jsonl(samples), lm.tokenizer.eos_token_id)
    before = _sft_loss(tiny_dir, None, examples, lm.tokenizer.pad_token_id)
    after1 = _sft_loss(tiny_dir, tmp_path / "one" / "ddd" / "s0_m0", examples, lm.tokenizer.pad_token_id)
    after2 = _sft_loss(tiny_dir, ens / "s0_m0", examples, lm.tokenizer.pad_token_id)
    assert after1 < before and after2 < before
    print(f"SFT loss: before {before:.4f}, 1 process {after1:.4f}, 2 processes {after2:.4f}")
    assert abs(after2 - after1) < 0.25 * (before - after1), (before, after1, after2)


def test_two_processes_score_like_one(tmp_path, tiny_dir):
    """The score stage under `accelerate launch` with 2 CPU processes: each scores every other answer
    into its own part, the main process merges them, and token_eu.jsonl is byte for byte the one a
    single process writes."""
    import yaml

    from drafteu import pipeline
    from drafteu.config import load_experiment

    from .test_pipeline import tiny_config

    d = tiny_config(tiny_dir)
    d["draft_base"]["cache"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    pipeline.run(load_experiment(tmp_path / "c.yaml"), tmp_path / "run", until="eval_samples", log=lambda s: None)
    for name in ("one", "two"):
        shutil.copytree(tmp_path / "run", tmp_path / name)
    args = ["-m", "drafteu.cli", "reproduce", "-c", str(tmp_path / "c.yaml"), "--until", "score"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DRAFTEU_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, "--run", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=300, env=env)
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                          "--main_process_port", str(_free_port()), *args, "--run", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a = (tmp_path / "one" / "eval" / "token_eu.jsonl").read_bytes()
    b = (tmp_path / "two" / "eval" / "token_eu.jsonl").read_bytes()
    rows = fileio.read_jsonl(tmp_path / "one" / "eval" / "token_eu.jsonl")
    assert len(rows) > 50 and {r["trial"] for r in rows} == {0, 1}
    assert a == b
    assert not list((tmp_path / "two" / "eval").glob("token_eu.part*"))  # merged and removed
    stamp = fileio.json_load(tmp_path / "two" / "stages" / "score.json")
    assert stamp["status"] == "done"
    for name in ("one", "two"):  # nothing upstream was recomputed
        assert {s for s, v in fileio.json_load(tmp_path / name / "manifest.json")["stages"].items()
                if v["action"] != "skip"} == {"score"}
