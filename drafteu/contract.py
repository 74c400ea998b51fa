"""The stage contract: what a stage's outputs were made from, and whether they are still current.

A stage declares its *inputs*: the slice of the config it reads (dotted keys -> values, with the
fields that only say where or how something runs left out, ``fileio.identity``) and the stages
whose outputs it consumes.  Its *digest* hashes the inputs, the upstream stages' digests and the
stage's version, so a changed key changes the digest of its stage and of everything downstream.

``reproduce`` keeps one stamp per stage, ``RUN/stages/<name>.json``: the inputs and digest its
outputs were made from, and whether the stage finished.  Before a stage runs, the pipeline alone
compares the stamp with the stage's current inputs (``decide``):

    stamp done, same digest      -> skip: the outputs are current
    stamp running, same digest   -> resume: the stage continues the work it had started
    no stamp, or another digest  -> recompute: its outputs are rebuilt, after saying which keys
                                    changed (downstream stages follow, their digests having
                                    changed with it)

A recompute replaces the old outputs only once the new ones are complete: ``begin`` moves the old
outputs and stamp into ``RUN/.previous/<name>/`` (renames, no copy), ``finish`` deletes them after
stamping the new ones done, and a stage that fails - an error, Ctrl-C - puts them back
(``restore``); after a kill, the next run puts them back before it decides anything (``recover``).
The run's ``config.yaml`` and ``manifest.json`` are kept the same way (``RUN_FILES``) until the
run's first stage with new results finishes.

The one rule is *recompute*: a run directory holds the results of the config it was last run
with.  Keeping the results of an old config means running the new one into another ``--run``.

Commands that write outside a run (``drafteu generate``, ``train-*``) keep the same record in
``OUT/stage.json`` (``claim``) and refuse, rather than delete, outputs made from other inputs: the
directory is the user's, not drafteu's.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drafteu import fileio
from drafteu.errors import DraftEUError

STAMP = "stage.json"
PREVIOUS = ".previous"  # RUN/.previous/<stage>/: a recomputed stage's old outputs until its new ones are complete
RUN_FILES = ("config.yaml", "manifest.json")  # the run's own files, kept as RUN/.previous/run/ during a run
ASIDE = "set-aside.json"  # in RUN/.previous/<stage>/: the run-relative paths set aside


def flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one dict of dotted keys (lists and scalars are leaves)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: obj}


def changes(old: dict, new: dict) -> list[str]:
    """Every dotted key whose value differs, as 'key: old -> new' (sorted)."""
    a, b = flat(old), flat(new)
    missing = object()
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, missing), b.get(k, missing)
        if va != vb:
            show = [("(unset)" if v is missing else json.dumps(v)) for v in (va, vb)]
            out.append(f"{k}: {show[0]} -> {show[1]}")
    return out


# ---------------------------------------------------------------------------------------------
# Stages of a run directory.


@dataclass(frozen=True)
class Stage:
    """One stage of ``reproduce``: ``run(ctx)`` does the work (resuming what a killed run left, and
    rebuilding only what is missing); ``reads(cfg)`` is the config slice it reads; ``after(cfg)``
    the stages it consumes; ``outputs`` the run-relative paths it writes (deleted when it is
    recomputed; globs allowed); ``products(cfg, run)`` the files a finished stage must have (one
    deleted - a damaged file the user removed - makes the stage resume and rebuild it).  Bump
    ``version`` when what the stage computes from the same inputs changes."""

    name: str
    run: Callable[[Context], dict | None]
    reads: Callable[[Any], dict]
    after: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    outputs: tuple[str, ...] = ()
    products: Callable[[Any, Path], list[Path]] = lambda cfg, run: []
    version: int = 1
    every_process: bool = False  # training: under `accelerate launch` every process runs it


@dataclass
class Context:
    """What a stage's ``run`` gets: the config, the run directory and its own digest."""

    cfg: Any
    run: Path
    digest: str
    upstream: dict[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    stage: Stage
    digest: str
    inputs: dict
    upstream: dict[str, str]
    action: str  # "skip" | "resume" | "run" | "recompute"
    why: str = ""


def digests(stages: tuple[Stage, ...], cfg) -> dict[str, tuple[str, dict, dict[str, str]]]:
    """name -> (digest, inputs, upstream digests) for every stage, from the config alone."""
    out: dict[str, tuple[str, dict, dict[str, str]]] = {}
    for s in stages:
        upstream = {}
        for u in s.after(cfg):
            if u not in out:
                raise ValueError(f"stage {s.name} consumes {u}, which does not come before it")
            upstream[u] = out[u][0]
        inputs = s.reads(cfg)
        out[s.name] = (fileio.digest({"stage": s.name, "version": s.version, "inputs": inputs,
                                     "upstream": upstream}), inputs, upstream)
    return out


def stamp_path(run: Path, name: str) -> Path:
    return Path(run) / "stages" / f"{name}.json"


def read_stamp(path: Path) -> dict | None:
    """A stamp, or None when absent; a damaged stamp counts as absent (its stage is recomputed)."""
    try:
        stamp = fileio.json_load(path)
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) and "digest" in stamp else None


def base_identity(base: str, resolve: bool = False) -> str:
    """What a model something is trained on is (a draft base): one drafteu built (``train-draft-base``,
    a run's ``draft_base/``) is the digest of the inputs it was made from, wherever it has been copied;
    anything else (a sibling's hub id or directory) is its spec as given (``resolve``: a directory as
    its absolute path, so a relative and an absolute spelling agree)."""
    stamp = read_stamp(Path(base) / STAMP) if Path(base).is_dir() else None
    if stamp:
        return f"drafteu:{stamp['digest']}"
    return str(Path(base).resolve()) if resolve and Path(base).is_dir() else str(base)


def _paths(run: Path, stage: Stage) -> list[Path]:
    """The stage's outputs that exist (an output may be a glob pattern, e.g. per-process parts)."""
    out = []
    for rel in stage.outputs:
        out += sorted(Path(run).glob(rel)) if "*" in rel else [Path(run) / rel] if (Path(run) / rel).exists() else []
    return out


def _has_outputs(run: Path, stage: Stage) -> bool:
    return bool(_paths(run, stage))


def decide(stage: Stage, run: Path, digest: str, inputs: dict, upstream: dict[str, str],
           products: list[Path] = ()) -> Decision:
    """Compare the stage's stamp with its inputs now (the one place that decides reuse); a done
    stage missing one of its ``products`` resumes to rebuild it."""
    stamp = read_stamp(stamp_path(run, stage.name))
    d = Decision(stage, digest, inputs, upstream, "run")
    if stamp is None:
        if _has_outputs(run, stage):
            d.action, d.why = "recompute", "its outputs have no record of the inputs they were made from"
        return d
    if stamp["digest"] == digest:
        missing = [p for p in products if not Path(p).exists()]
        d.action = "skip" if stamp.get("status") == "done" and not missing else "resume"
        if missing and stamp.get("status") == "done":
            more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
            d.why = f"{Path(missing[0]).relative_to(run)} is missing{more}"
        return d
    d.action = "recompute"
    why = changes(stamp.get("inputs", {}), inputs)
    if stamp.get("version") != stage.version:
        why.append(f"the {stage.name} stage changed (version {stamp.get('version')} -> {stage.version})")
    old_up = stamp.get("upstream", {})
    why += [f"{u} changed" for u in sorted(set(upstream) | set(old_up)) if upstream.get(u) != old_up.get(u)]
    d.why = "; ".join(why) or "its inputs changed"
    return d


def begin(run: Path, d: Decision) -> None:
    """Before the stage runs (main process): set its old outputs and stamp aside (a recompute), stamp
    it as running."""
    run = Path(run)
    if d.action == "recompute":
        keep = run / PREVIOUS / d.stage.name
        remove(keep)  # (``recover`` emptied it; a leftover here holds nothing of the previous results)
        old = _paths(run, d.stage) + [p for p in [stamp_path(run, d.stage.name)] if p.exists()]
        # the list first: a kill mid-way through the renames still knows what to put back
        fileio.write_json(keep / ASIDE, {"stage": d.stage.name, "paths": [str(p.relative_to(run)) for p in old]})
        _move([p.relative_to(run) for p in old], run, keep)
    if d.action != "resume":
        fileio.write_json(stamp_path(run, d.stage.name), {
            "stage": d.stage.name, "version": d.stage.version, "digest": d.digest, "status": "running",
            "inputs": d.inputs, "upstream": d.upstream, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    else:  # the sittings before this one: finished ones in "seconds", a killed one's last heartbeat in "sitting"
        path = stamp_path(run, d.stage.name)
        stamp = read_stamp(path) or {}
        stamp["seconds"] = round(stamp.get("seconds", 0.0) + stamp.pop("sitting", 0.0), 2)
        fileio.write_json(path, stamp)


class Heartbeat:
    """While a stage runs (main process), its running stamp's ``sitting`` holds this sitting's seconds so far,
    rewritten every ``every`` seconds: a sitting killed mid-stage still counts (``begin`` folds it into the
    stamp's ``seconds`` on resume, ``finish`` adds them up).  A context manager around the stage's work."""

    def __init__(self, run: Path, d: Decision, every: float = 60.0):
        import threading

        self.path, self.every, self.t0 = stamp_path(run, d.stage.name), every, time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{d.stage.name}", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            stamp = read_stamp(self.path)
            if stamp is None or stamp.get("status") != "running":
                return
            stamp["sitting"] = round(time.time() - self.t0, 2)
            fileio.write_json(self.path, stamp)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def finish(run: Path, d: Decision, seconds: float) -> None:
    """After the stage finished (main process): its outputs are current for its inputs."""
    path = stamp_path(run, d.stage.name)
    stamp = read_stamp(path) or {}
    compute = seconds + (stamp.get("seconds", 0.0) if d.action == "resume" else 0.0)  # + the sittings before
    fileio.write_json(path, {
        "stage": d.stage.name, "version": d.stage.version, "digest": d.digest, "status": "done",
        "inputs": d.inputs, "upstream": d.upstream, "started": stamp.get("started"),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(compute, 2)})
    remove(Path(run) / PREVIOUS / d.stage.name)  # the new outputs are complete: the old ones can go


def _move(rels: list[Path], src: Path, dest: Path) -> None:
    """Rename each run-relative path from under ``src`` to under ``dest`` (absent ones are skipped)."""
    for rel in rels:
        if (src / rel).exists() or (src / rel).is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).rename(dest / rel)


def _put_back(run: Path, keep: Path, current: list[Path]) -> None:
    """Delete ``current`` (what a failed attempt wrote) and move what ``keep`` holds back to ``run``."""
    try:
        rels = [Path(r) for r in fileio.json_load(keep / ASIDE)["paths"]]
    except (OSError, ValueError, KeyError):
        rels = []  # killed before the list was written: nothing was moved yet
    for path in current:
        remove(path)
    _move(rels, keep, run)
    remove(keep)


def restore(run: Path, stage: Stage) -> bool:
    """Put a failed recompute's previous outputs and stamp back (main process); whether there were any."""
    run = Path(run)
    keep = run / PREVIOUS / stage.name
    if not keep.is_dir():
        return False
    stamp = stamp_path(run, stage.name)
    _put_back(run, keep, _paths(run, stage) + ([stamp] if stamp.exists() else []))
    return True


def recover(run: Path, stages: tuple[Stage, ...]) -> list[str]:
    """Before a run decides anything: the stages whose recompute was killed get their previous outputs
    back (one whose new outputs were stamped done keeps them); the run's own files likewise.  Returns
    the stages restored."""
    run = Path(run)
    done = []
    for stage in stages:
        keep = run / PREVIOUS / stage.name
        if not keep.is_dir():
            continue
        stamp = read_stamp(stamp_path(run, stage.name))
        if stamp is not None and stamp.get("status") == "done":
            remove(keep)  # killed after the new outputs were complete
        elif restore(run, stage):
            done.append(stage.name)
    restore_run_files(run)
    return done


def keep_run_files(run: Path) -> None:
    """Copy the run's ``config.yaml`` and ``manifest.json`` aside before a run rewrites them."""
    keep = Path(run) / PREVIOUS / "run"
    remove(keep)
    names = [n for n in RUN_FILES if (Path(run) / n).exists()]
    fileio.write_json(keep / ASIDE, {"stage": "run", "paths": names})
    for name in names:
        shutil.copy2(Path(run) / name, keep / name)


def restore_run_files(run: Path) -> None:
    """Put the kept ``config.yaml`` and ``manifest.json`` back (a run that failed); no-op without them."""
    keep = Path(run) / PREVIOUS / "run"
    if keep.is_dir():
        _put_back(Path(run), keep, [Path(run) / n for n in RUN_FILES if (Path(run) / n).exists()])


def drop_run_files(run: Path) -> None:
    """The run finished (or ended where asked): its new ``config.yaml`` and ``manifest.json`` stay."""
    remove(Path(run) / PREVIOUS / "run")
    if (Path(run) / PREVIOUS).is_dir() and not any((Path(run) / PREVIOUS).iterdir()):
        (Path(run) / PREVIOUS).rmdir()


def remove(path: Path) -> None:
    """Delete a file or a directory tree (absent is fine)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------------
# Outputs of the standalone commands.


def claim(directory: Path, inputs: dict, *, what: str) -> None:
    """Make ``directory`` hold the outputs of ``inputs`` (a stage config's ``fileio.identity``).

    A directory stamped with the same inputs is resumed; one without outputs (new, or stamped by
    a run that failed before computing anything) is stamped with them; one whose outputs were made
    from other inputs - or have no stamp - is refused, naming the keys that differ.  Nothing is
    deleted."""
    directory = Path(directory)
    path = directory / STAMP
    stamp = read_stamp(path)
    digest = fileio.digest(inputs)
    if stamp is not None and stamp["digest"] == digest:
        return
    bookkeeping = (STAMP, "config.yaml", fileio.LOCK, fileio.LOCK_OWNER)
    writing = tuple(f".{b}.tmp" for b in bookkeeping)  # fileio.tmp_name of a stamp being written
    made = directory.is_dir() and any(p.name not in bookkeeping and not p.name.startswith(writing)
                                      for p in directory.iterdir())
    if made and stamp is None:  # under several processes the main one may have stamped it meanwhile
        stamp = read_stamp(path)
        if stamp is not None and stamp["digest"] == digest:
            return
    if made and stamp is not None:
        diff = changes(stamp.get("inputs", {}), inputs)
        raise DraftEUError(f"{directory} holds {what} made from other inputs ({'; '.join(diff[:6])}"
                           f"{'; ...' if len(diff) > 6 else ''}); use another output directory, or delete it to "
                           "start over")
    if made:
        raise DraftEUError(f"{directory} holds files without a record of the inputs they were made from "
                           f"({STAMP} is missing: an older drafteu, or not a drafteu output); use another "
                           "output directory, or delete it to start over")
    if fileio.is_main_process():
        fileio.write_json(path, {"digest": digest, "inputs": inputs})
