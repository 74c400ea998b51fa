"""Run-directory I/O shared by the stages: atomic writes, config.yaml, manifest.json, jsonl."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from drafteu.errors import DraftEUError


def tmp_name(path: Path) -> Path:
    """The temporary sibling a write to ``path`` goes through (``.<name>.tmp<pid>``): a killed
    writer's leftovers are recognisable, and removed by ``sweep`` once that process is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename: a killed run never leaves a half-written file, and a
    failed write (a full disk) leaves no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_load(path: Path):
    """Read a JSON file written by write_json."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_json(path: Path, obj) -> None:
    """Atomic JSON write."""
    write_text_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def require_finite(obj) -> None:
    """Every float field of dataclass ``obj`` is a finite number, or a DraftEUError naming the field
    (a NaN passes every comparison a range check makes)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise DraftEUError(f"{f.name} must be a finite number, got {value}")


def plain(obj):
    """A config dataclass as YAML/JSON-ready builtins (Paths as str, tuples as lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def digest(obj) -> str:
    """A short stable hash of ``obj`` (configs, lists of config parts) as plain JSON."""
    return hashlib.sha256(json.dumps(plain(obj), sort_keys=True).encode()).hexdigest()[:16]


def identity(obj):
    """What ``obj`` (a config, or any value) is, as plain JSON-ready builtins: a dataclass's fields
    without those it lists in ``location_fields`` (where something lives or how it is computed -
    paths, the device, batch sizes - never what it computes), recursively; a class with an
    ``identity()`` method says it itself.  Runs keep their identity when copied or moved."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "identity"):
            return obj.identity()
        return fields_identity(obj)
    if isinstance(obj, (list, tuple)):
        return [identity(x) for x in obj]
    if isinstance(obj, dict):
        return {k: identity(v) for k, v in obj.items()}
    return plain(obj)


def fields_identity(obj, skip: tuple[str, ...] = ()) -> dict:
    """The default ``identity`` of dataclass ``obj`` with the fields ``skip`` left out too (for
    ``identity()`` methods that drop fields by value).  A field a class lists in ``optional_fields``
    counts only when set (not None): an option added later, while off, leaves the identities of
    earlier runs - and of runs that do not use it - as they were."""
    drop = set(skip) | set(getattr(obj, "location_fields", ()))
    optional = set(getattr(obj, "optional_fields", ()))
    return {f.name: identity(getattr(obj, f.name)) for f in dataclasses.fields(obj)
            if f.name not in drop and not (f.name in optional and getattr(obj, f.name) is None)}


def config_hash(cfg) -> str:
    """A short stable hash of what ``cfg`` computes (``identity``)."""
    return digest(identity(cfg))


def file_digest(path: Path) -> str:
    """sha256 (16 hex digits) of a file's bytes: the content identity of an input file."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def files_digest(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``file_digest`` of every file under ``directory`` (relative path -> digest), except those
    whose first path part is in ``skip``: what a cache entry is checked against before reuse."""
    directory = Path(directory)
    return {str(p.relative_to(directory)): file_digest(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).parts[0] not in skip}


def versions() -> dict:
    import peft
    import torch
    import transformers

    from drafteu import __version__

    return {"drafteu": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__}


def is_main_process() -> bool:
    """False on the non-main processes of an ``accelerate launch`` / ``torchrun`` run."""
    return int(os.environ.get("RANK", "0")) == 0


def barrier() -> None:
    """Wait for every process of an ``accelerate launch`` / ``torchrun`` job (a no-op in one).
    Accelerate's own state is used where it runs distributed (GPUs); on CPUs ``--multi_gpu``
    leaves it single-process, so the processes meet in a gloo group of their own, set up from the
    launcher's environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes > 1:
        state.wait_for_everyone()
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()


def write_config(directory: Path, cfg) -> None:
    """The resolved config as ``config.yaml`` (written by the main process only)."""
    if not is_main_process():
        return
    write_text_atomic(Path(directory) / "config.yaml", yaml.safe_dump(plain(cfg), sort_keys=False))


def write_manifest(directory: Path, stage: str, cfg, started: float, **extra) -> dict:
    """``manifest.json``: stage, versions, seed, config hash, timings, plus stage facts (written by
    the main process only; every process gets the dict)."""
    manifest = {
        "stage": stage,
        "versions": versions(),
        "seed": getattr(cfg, "seed", None),
        "config_hash": config_hash(cfg),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 3),
        **extra,
    }
    if is_main_process():
        write_json(Path(directory) / "manifest.json", manifest)
    return manifest


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Rows of a jsonl file.  ``repair`` drops a torn last line (a write killed midway)."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if repair and data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with path.open("r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DraftEUError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); "
                           "pass a jsonl file written by drafteu generate") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DraftEUError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
    return rows


def read_samples(path: Path, hint: str = "run drafteu generate first") -> list[dict]:
    """Rows of an input samples.jsonl: a missing file, a directory or an empty file is a clear error."""
    path = Path(path)
    if path.is_dir():
        raise DraftEUError(f"{path} is a directory; pass its samples.jsonl")
    if not path.exists():
        raise DraftEUError(f"samples file not found: {path}; {hint}")
    rows = read_jsonl(path)
    if not rows:
        raise DraftEUError(f"{path} holds no samples; {hint}")
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows with one write + fsync, so a batch lands whole or (at worst) as a torn tail."""
    if not rows:
        return
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(blob)
        f.flush()
        os.fsync(f.fileno())


# -- one writer per directory, and what a dead one left behind -----------------------------------

LOCK = ".drafteu.lock"
LOCK_OWNER = ".drafteu.lock.json"
_TMP = re.compile(r"\.tmp(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep(root: Path) -> list[Path]:
    """Remove the temporary files of writers that are gone: ``*.tmp<pid>`` of dead processes, and
    the ``*.tmp`` staging folders of adapters and copied draft bases (only called under the lock,
    so no live writer owns them).  Returns what was removed."""
    import shutil

    removed = []
    root = Path(root)
    if not root.is_dir():
        return removed
    for p in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
        m = _TMP.search(p.name)
        stale = (m is not None and not _alive(int(m.group(1)))) or (p.name.endswith(".tmp") and p.is_dir())
        if stale and (p.exists() or p.is_symlink()):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            removed.append(p)
    return removed


@contextmanager
def locked(directory: Path, what: str = "run"):
    """Hold ``directory``'s lock while writing it: one process at a time.  Another holder is a
    one-line error naming it; the lock is an OS file lock (``filelock``), released when its holder
    exits however it dies, so a killed run never blocks the next.  Under ``accelerate launch`` the
    main process holds it for the whole job.  On entry, leftovers of dead writers are swept."""
    from filelock import FileLock, Timeout

    if not is_main_process():
        yield
        return
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise DraftEUError(f"{directory} is a file; give a directory")
    directory.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory / LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            owner = json_load(directory / LOCK_OWNER)
            who = f"process {owner['pid']} ({owner['command']}, since {owner['started']})"
        except (OSError, ValueError, KeyError):
            who = "another process"
        raise DraftEUError(f"{directory} is in use by {who}: one {what} is written by one process at a time; "
                           "wait for it to finish (or stop it), then re-run") from None
    try:
        import sys

        write_json(directory / LOCK_OWNER, {"pid": os.getpid(), "command": " ".join(
            [Path(sys.argv[0]).name, *sys.argv[1:3]]), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        sweep(directory)
        yield
    finally:
        (directory / LOCK_OWNER).unlink(missing_ok=True)
        lock.release()


def unwritable(directory: Path) -> str | None:
    """Why ``directory`` (created if missing) cannot be written, or None when it can."""
    try:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or str(e)
    return None


def describe_oserror(e: OSError) -> str:
    """One line for an OSError: the path, what the system said, and what to do."""
    import errno

    path = e.filename or ""
    what = e.strerror or str(e)
    fix = {errno.ENOSPC: "free some space there and re-run: finished work is kept and the stage resumes",
           errno.EDQUOT: "free some space there and re-run: finished work is kept and the stage resumes",
           errno.EACCES: "make it writable, or give another directory",
           errno.EPERM: "make it writable, or give another directory",
           errno.EROFS: "it is on a read-only file system; give another directory",
           errno.ENOTDIR: "a part of that path is a file, not a directory; give another path",
           errno.EISDIR: "it is a directory; give a file path"}.get(e.errno, "check the path and re-run")
    return f"{path}: {what}; {fix}" if path else f"{what}; {fix}"
