"""Device, dtype and mixed-precision resolution (``drafteu.hardware``) and --set coercion."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from drafteu import hardware
from drafteu.cli import app
from drafteu.config import load_experiment
from drafteu.errors import DraftEUError
from drafteu.train.loop import TrainConfig


def test_auto_device_is_cuda_when_available_else_cpu():
    assert hardware.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert hardware.resolve_device("CPU") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("spec, message", [
    ("cuda", "sees no CUDA device"), ("cuda:1", "sees no CUDA device"), ("bogus", "unknown device 'bogus'"),
    ("meta", "unsupported device"),
])
def test_bad_devices_get_clear_errors(spec, message):
    with pytest.raises(DraftEUError, match=message):
        hardware.resolve_device(spec)


def _cpu(monkeypatch, amx: bool, avx512_bf16: bool):
    hardware._cpu_bf16.cache_clear()
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    return torch.device("cpu")


@pytest.mark.parametrize("amx, avx512_bf16, expected", [
    (False, False, "no"), (True, False, "bf16"), (False, True, "bf16"),
])
def test_auto_mixed_precision_follows_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    cpu = _cpu(monkeypatch, amx, avx512_bf16)
    try:
        mp, why = hardware.resolve_mixed_precision("auto", cpu)
        assert mp == expected and why.startswith("auto: CPU")
        # explicit values are kept; bf16 where it is emulated says so
        assert hardware.resolve_mixed_precision("no", cpu)[0] == "no"
        mp, why = hardware.resolve_mixed_precision("bf16", cpu)
        assert mp == "bf16" and (("emulated" in why) == (expected == "no"))
        # model dtype auto: float32 on every CPU (bf16 only on GPUs with native bf16)
        assert hardware.resolve_dtype("auto", cpu) == "float32"
        assert hardware.resolve_dtype("bfloat16", cpu) == "bfloat16"
    finally:
        hardware._cpu_bf16.cache_clear()


def test_models_load_on_auto_device(tiny_dir):
    from drafteu import models

    lm = models.load(str(tiny_dir))  # device auto, dtype auto
    p = next(lm.model.parameters())
    assert p.device.type == hardware.resolve_device("auto").type
    assert p.dtype == getattr(torch, hardware.resolve_dtype("auto", p.device))


def test_train_config_accepts_auto_and_rejects_others():
    assert TrainConfig().mixed_precision == "auto"
    with pytest.raises(DraftEUError, match="mixed_precision must be auto, bf16 or no"):
        TrainConfig(mixed_precision="fp8")


def _cfg(tmp_path, text: str):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_no_is_a_string_not_false(tmp_path):
    cfg = load_experiment(_cfg(tmp_path, "name: x\ndrafts:\n  train: {mixed_precision: no}\n"))
    assert cfg.drafts.train.mixed_precision == "no"


@pytest.mark.parametrize("key, text, expected", [
    ("drafts.train.mixed_precision", "no", "no"),   # a str field takes the text as written
    ("name", "123", "123"),
    ("notes", "yes", "yes"),
    ("eval.trials", "2", 2),
    ("drafts.train.lr", "1e-4", 1e-4),
    ("eval.retrain_per_trial", "yes", True),
    ("eval.questions", "null", None),
    ("eval.questions", "7", 7),
    ("drafts.methods", "[ddd, konly]", ["ddd", "konly"]),
    ("drafts.layouts", "[[1, 2]]", [[1, 2]]),
])
def test_set_values_take_the_type_of_their_field(tmp_path, key, text, expected):
    cfg = load_experiment(_cfg(tmp_path, "name: x\n"), {key: text})
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    assert node == expected and type(node) is type(expected)


@pytest.mark.parametrize("key, text, message", [
    ("eval.trials", "two", "--set eval.trials=two: expects an integer"),
    ("drafts.train.lr", "fast", "--set drafts.train.lr=fast: expects a number"),
    ("eval.nope", "1", "--set eval.nope: unknown key 'nope' in eval"),
    ("name.x", "1", "--set name.x: name is a value, not a section"),
    ("eval.retrain_per_trial", "maybe", "expects true or false"),
])
def test_bad_set_values_name_the_key(tmp_path, key, text, message):
    with pytest.raises(DraftEUError, match=message.replace("[", r"\[").replace(".", r"\.")):
        load_experiment(_cfg(tmp_path, "name: x\n"), {key: text})


def test_reproduce_cli_set_errors_are_one_line(tmp_path):
    p = _cfg(tmp_path, yaml.safe_dump({"name": "x"}))
    res = CliRunner().invoke(app, ["reproduce", "-c", str(p), "--run", str(tmp_path / "r"),
                                   "--set", "drafts.train.mixed_precision=no", "--set", "eval.trials=two"])
    assert res.exit_code == 2 and "eval.trials=two: expects an integer" in res.output
    assert "mixed_precision" not in res.output  # 'no' was accepted as the text it is
    res = CliRunner().invoke(app, ["reproduce", "-c", str(tmp_path), "--run", str(tmp_path / "r")])
    assert res.exit_code == 2 and "is a directory" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
@pytest.mark.parametrize("device, message", [("cuda", "sees no CUDA device"), ("bogus", "unknown device 'bogus'")])
def test_cli_bad_device_is_a_one_line_error(tiny_dir, device, message):
    res = CliRunner().invoke(app, ["score", "--target", str(tiny_dir), "-q", "What is 2 + 3?", "--answer", "5",
                                   "--device", device])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_compile_auto_is_cuda_only_and_bad_values_are_clear(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert hardware.resolve_compile("auto", cpu) is False  # measured: a few percent on CPUs, not worth compiling
    assert hardware.resolve_compile("auto", cuda) is True  # launch-bound steps: CUDA graphs
    assert hardware.resolve_compile("off", cuda) is False
    assert hardware.compile_mode(cuda) == "reduce-overhead" and hardware.compile_mode(cpu) is None
    with pytest.raises(DraftEUError, match="auto, on or off"):
        hardware.resolve_compile("fast", cpu)
    monkeypatch.setattr(hardware, "has_cxx_compiler", lambda: False)  # no C++ compiler on this machine
    with pytest.raises(DraftEUError, match="C\\+\\+ compiler"):
        hardware.resolve_compile("on", cpu)
