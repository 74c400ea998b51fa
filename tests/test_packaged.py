"""Packaged models split into part packages (drafteu.packaged): assembled in part order, checked by
size and sha256, nothing half-written on failure, the install command named when a part is missing.
Fake part packages run everywhere; the real Qwen2.5-Coder pair's files only where `make qwen` ran."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from drafteu import models, packaged
from drafteu.errors import DraftEUError

ROOT = Path(__file__).resolve().parents[1]


def _fake_parts(site: Path, stem: str, n: int) -> list[bytes]:
    """``n`` importable part packages ``<stem>1 .. <stem>n`` under ``site``, each with a distinct
    ``data/partNN.bin``; returns their bytes in part order."""
    blobs = []
    for i in range(1, n + 1):
        pkg = site / f"{stem}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        blob = bytes([i]) * (100 + i) + f"part {i}".encode()
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
        blobs.append(blob)
    return blobs


@pytest.fixture
def parts(tmp_path, monkeypatch):
    """Twelve fake parts (so 'part10' sorts before 'part2' as text) and a model entry for them."""
    site = tmp_path / "site"
    stem = f"fake_model_part_{tmp_path.name[-8:].replace('-', '_')}_"
    blobs = _fake_parts(site, stem, 12)
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(blobs)
    model = packaged.PackagedModel(
        name="fake", what="a fake model", install="make fake", parts=tuple(f"{stem}{i}" for i in range(1, 13)),
        version="1.0", size=len(whole), sha256=hashlib.sha256(whole).hexdigest(), file_name="fake.gguf")
    return model, site, stem, whole, tmp_path / "cache"


def test_parts_are_assembled_in_numeric_order_once(parts):
    model, _site, _stem, whole, cache = parts
    out = packaged.assemble(model, cache)
    assert out.read_bytes() == whole  # part1, part2, ..., part10, part11, part12: not text order
    assert out.parent == cache / "packaged"
    first = out.stat().st_mtime_ns
    assert packaged.assemble(model, cache) == out  # the sidecar says nothing changed: not rewritten
    assert out.stat().st_mtime_ns == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["fake.gguf", "fake.gguf.verified.json"]


def test_a_changed_part_is_assembled_and_checked_again(parts):
    model, site, stem, _whole, cache = parts
    out = packaged.assemble(model, cache)
    part = site / f"{stem}3" / "data" / "part03.bin"
    part.write_bytes(part.read_bytes()[::-1])  # same size, other bytes: the checksum catches it
    with pytest.raises(DraftEUError, match=r"sha256 .* reinstall them \(make fake, with pip's --force-reinstall\)"):
        packaged.assemble(model, cache)
    assert out.read_bytes() == _whole  # the file made from the good parts is left as it was
    assert not list(out.parent.glob("*.tmp*"))


def test_a_missing_part_names_the_install_command_and_writes_nothing(parts):
    model, site, stem, _whole, cache = parts
    (site / f"{stem}7" / "data" / "part07.bin").unlink()
    with pytest.raises(DraftEUError, match=rf"{stem}7 is not installed: make fake"):
        packaged.assemble(model, cache)
    assert not (cache / "packaged").exists()


def test_a_part_of_another_size_is_refused_before_use(parts):
    model, site, stem, _whole, cache = parts
    part = site / f"{stem}12" / "data" / "part12.bin"
    part.write_bytes(part.read_bytes() + b"x")
    with pytest.raises(DraftEUError, match=rf"assemble to {model.size + 1:,} bytes, expected {model.size:,}"):
        packaged.assemble(model, cache)
    assert not list((cache / "packaged").iterdir())


def test_an_unwritable_cache_is_one_line_naming_drafteu_cache(parts, tmp_path):
    model, *_rest = parts
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DraftEUError, match="DRAFTEU_CACHE"):
        packaged.assemble(model, blocker)


def test_models_resolve_a_packaged_name_through_drafteus_cache(parts, monkeypatch):
    model, _site, _stem, whole, cache = parts
    monkeypatch.setitem(packaged.MODELS, "fake", model)
    monkeypatch.setenv("DRAFTEU_CACHE", str(cache))
    packaged.gguf_path.cache_clear()
    try:
        directory, name = models.resolve("fake")
    finally:
        packaged.gguf_path.cache_clear()
    assert (Path(directory) / name).read_bytes() == whole


def test_the_extras_install_exactly_the_registrys_parts():
    """pyproject's qwen extras pin the same packages, in the same versions, as the registry."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["qwen-1-5b"] == packaged.MODELS["qwen2.5-coder-1.5b"].requirements()
    assert extras["qwen-0-5b"] == packaged.MODELS["qwen2.5-coder-0.5b"].requirements()
    assert "make qwen" in packaged.MODELS["qwen2.5-coder-1.5b"].install
    assert "qwen:" in (ROOT / "Makefile").read_text()


QWEN = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")
installed = all(packaged.part_path(p) for name in QWEN for p in packaged.MODELS[name].parts)


@pytest.mark.slow
@pytest.mark.skipif(not installed, reason="the Qwen2.5-Coder pair is an optional download: make qwen")
@pytest.mark.parametrize("name", QWEN)
def test_the_real_pair_assembles_to_its_parts_concatenated(name):
    model = packaged.MODELS[name]
    directory, file_name = models.resolve(name)
    digest = hashlib.sha256()
    for p in model.parts:
        digest.update(packaged.part_path(p).read_bytes())
    assembled = hashlib.sha256((Path(directory) / file_name).read_bytes()).hexdigest()
    assert assembled == digest.hexdigest() == model.sha256
