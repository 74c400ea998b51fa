"""The stage contract: a changed config key recomputes exactly the stages that read it and those
downstream of them; nothing else runs; a killed run resumes to the same bytes."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import typing
from pathlib import Path

import pytest
import yaml

from drafteu import contract, fileio, pipeline
from drafteu.config import ExperimentConfig, load_experiment
from drafteu.contract import Context, Stage
from drafteu.errors import DraftEUError

from .test_pipeline import tiny_config

STAGES = [s.name for s in pipeline.STAGES]
EVAL = ["score", "proxy_robustness", "fidelity", "hallucination", "cost"]
TRAINED = ["drafts", "perturbation"] + EVAL  # perturbation: it measures the untrained and K-only drafts


# -- the contract's parts -------------------------------------------------------------------------


def test_changes_name_every_differing_leaf():
    old = {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    new = {"a": {"b": 2, "c": [1, 2]}, "e": None}
    assert contract.changes(old, new) == ["a.b: 1 -> 2", "d: \"x\" -> (unset)", "e: (unset) -> null"]
    assert contract.changes(old, old) == []


def _stage(outputs=("out",), version=1):
    return Stage("s", run=lambda ctx: None, reads=lambda cfg: {"k": cfg}, outputs=outputs, version=version)


def test_decide_skips_resumes_and_recomputes(tmp_path):
    stage = _stage()
    digest, inputs, up = contract.digests((stage,), 1)["s"]
    assert contract.decide(stage, tmp_path, digest, inputs, up).action == "run"  # nothing there yet
    (tmp_path / "out").mkdir()
    d = contract.decide(stage, tmp_path, digest, inputs, up)
    assert d.action == "recompute" and "no record" in d.why  # outputs of unknown origin
    contract.begin(tmp_path, d)
    assert not (tmp_path / "out").exists()  # stale outputs are gone before the stage runs
    assert contract.decide(stage, tmp_path, digest, inputs, up).action == "resume"  # killed while running
    contract.finish(tmp_path, d, 1.5)
    assert contract.decide(stage, tmp_path, digest, inputs, up).action == "skip"
    d2, i2, u2 = contract.digests((stage,), 2)["s"]
    changed = contract.decide(stage, tmp_path, d2, i2, u2)
    assert changed.action == "recompute" and changed.why == "k: 1 -> 2"
    bumped = _stage(version=2)
    d3, i3, u3 = contract.digests((bumped,), 1)["s"]
    assert "stage changed (version 1 -> 2)" in contract.decide(bumped, tmp_path, d3, i3, u3).why
    contract.stamp_path(tmp_path, "s").write_text("{torn")
    assert contract.decide(stage, tmp_path, digest, inputs, up).action == "run"  # a damaged stamp is no stamp


def test_a_killed_sittings_time_counts_in_the_stages_seconds(tmp_path):
    """The heartbeat keeps the running stamp's ``sitting`` current; a sitting killed mid-stage (no ``finish``)
    is folded into ``seconds`` when the stage resumes, and ``finish`` adds the sittings up."""
    import time

    stage = _stage()
    digest, inputs, up = contract.digests((stage,), 1)["s"]
    d = contract.decide(stage, tmp_path, digest, inputs, up)
    contract.begin(tmp_path, d)
    with contract.Heartbeat(tmp_path, d, every=0.05):
        time.sleep(0.3)  # then "killed": no finish
    first = contract.read_stamp(contract.stamp_path(tmp_path, "s"))["sitting"]
    assert 0.1 <= first <= 1.0
    resumed = contract.decide(stage, tmp_path, digest, inputs, up)
    assert resumed.action == "resume"
    contract.begin(tmp_path, resumed)
    stamp = contract.read_stamp(contract.stamp_path(tmp_path, "s"))
    assert "sitting" not in stamp and stamp["seconds"] == pytest.approx(first)
    contract.finish(tmp_path, resumed, 2.0)
    done = contract.read_stamp(contract.stamp_path(tmp_path, "s"))
    assert done["status"] == "done" and done["seconds"] == pytest.approx(first + 2.0, abs=0.01)


def test_claim_refuses_outputs_of_other_inputs(tmp_path):
    out = tmp_path / "o"
    contract.claim(out, {"lr": 1}, what="x")
    contract.claim(out, {"lr": 2}, what="x")  # nothing computed yet: the new inputs take over
    (out / "samples.jsonl").write_text("{}\n")
    contract.claim(out, {"lr": 2}, what="x")  # the same inputs: resume
    with pytest.raises(DraftEUError, match=r"holds x made from other inputs \(lr: 2 -> 3\)"):
        contract.claim(out, {"lr": 3}, what="x")
    (out / contract.STAMP).unlink()
    with pytest.raises(DraftEUError, match="without a record"):
        contract.claim(out, {"lr": 2}, what="x")
    assert (out / "samples.jsonl").exists()  # nothing deleted


# -- every stage declares what it reads -------------------------------------------------------------


def _leaves(cls, prefix=""):
    """(dotted key, type) of every leaf field of the experiment config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ, key = hints[f.name], f"{prefix}{f.name}"
        inner = [a for a in typing.get_args(typ) if a is not type(None)]
        section = typ if dataclasses.is_dataclass(typ) else None
        if section is not None:
            yield from _leaves(section, key + ".")
        else:
            yield key, (inner[0] if inner and typing.get_origin(typ) is not list else typ)


# another valid value for a key, where its type alone does not say one
OTHER = {"target": "other-model", "dtype": "float32", "device": "cpu", "name": "n", "notes": "n",
         "noise.scheme": "svd", "noise.scale": "relative", "noise.target_modules": ["q_proj"],
         "data.task": "tasks/other.jsonl",
         "generation.backend": "vllm", "draft_base.model": "sibling", "draft_base.data": {"questions": 5},
         "drafts.methods": ["ddd"], "drafts.layouts": [[1, 1]], "drafts.lora_modules": "q_proj",
         "proxy.data": "samples", "proxy.lora_modules": ["q_proj"], "proxy.base": "draft_base",
         "eval.draft_kernel": "dynamic",
         "eval.task": "tasks/other.jsonl",
         "eval.split": "train", "eval.aggregations": ["max"], "eval.proxy_ks": [2],
         "draft_base.quantize.bits": 4, "draft_base.quantize.group_size": 32, "draft_base.quantize.scheme": "dynamic"}


def _other(key, typ, value):
    for suffix, alt in (("scheduler", "cosine"), ("mixed_precision", "bf16")):
        if key.endswith(suffix):
            return "linear" if value == alt else alt
    if key in OTHER:
        return OTHER[key]
    if typ is bool:
        return not value
    if typ is int:
        return 3 if value is None else value + 1
    if typ is float:
        return 0.3 if value is None else value * 0.5 + 0.01
    raise AssertionError(f"no other value for {key} ({typ})")


def _builders(cfg, run):
    """The configs each training / generation stage builds (their identity is what they compute)."""
    return {
        "data": [pipeline.data_cfg(cfg, run)],
        "draft_base": [pipeline.draft_base_cfg(cfg, run / "s.jsonl", run / "b")]
        + ([pipeline.draft_base_data_cfg(cfg, run / "d")] if cfg.draft_base.model == "truncate" else [])
        if cfg.draft_base.model in ("truncate", "quantize") else [],
        "drafts": pipeline.drafts_cfgs(cfg, run),
        "teachers": pipeline.teacher_cfgs(cfg, run),
        "proxy": [pipeline.proxy_cfg(cfg, run)],
        "eval_samples": [pipeline.eval_samples_cfg(cfg, run)],
    }


VARIANTS = {"demo": {}, "teachers+own base data": {"proxy.data": "teachers", "proxy.questions": 4,
                                                   "draft_base.data": {"questions": 6}},
            "truncated base": {"draft_base.model": "truncate", "draft_base.layers": 6}}  # the demo's is quantized


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stages_read_every_key_their_work_depends_on(tmp_path, variant):
    """For every config key neither a stage nor its upstream stages declare, changing it leaves what
    the stage builds (its configs' identity) unchanged: a stage cannot depend on a key the contract
    does not watch."""
    root = Path(__file__).resolve().parents[1]
    base = load_experiment(root / "configs" / "demo.yaml", VARIANTS[variant])
    run = tmp_path / "run"
    built = {k: [fileio.identity(c) for c in v] for k, v in _builders(base, run).items()}
    watched: dict[str, set[str]] = {}
    for stage in pipeline.STAGES:  # its own keys and, through their digests, its upstream stages'
        watched[stage.name] = set(stage.reads(base)).union(*(watched[u] for u in stage.after(base)))
    checked = 0
    for key, typ in _leaves(ExperimentConfig):
        value = base
        for part in key.split("."):
            value = getattr(value, part, None)
        new = _other(key, typ, value)
        try:
            if key == "draft_base.quantize.group_size" and base.draft_base.quantize.bits == 8 and new is None:
                continue
            cfg = load_experiment(root / "configs" / "demo.yaml", {**VARIANTS[variant], key: new})
        except DraftEUError as e:
            raise AssertionError(f"{key} = {new!r} is not a valid value: {e}") from e
        for stage in pipeline.STAGES:
            if stage.name not in built:
                continue
            if any(key == d or key.startswith(d + ".") for d in watched[stage.name]):
                continue
            got = [fileio.identity(c) for c in _builders(cfg, run)[stage.name]]
            assert got == built[stage.name], f"stage {stage.name} depends on {key}, which it does not declare"
            checked += 1
    assert checked > 200


@contextlib.contextmanager
def _traced_reads(cfg):
    """The dotted config keys read while inside (a leaf field read by attribute, also through
    ``dataclasses.replace`` / ``fields_identity``): the stage's real inputs, as its code reads them."""
    paths, read, patched = {}, set(), {}

    def walk(obj, prefix):
        paths[id(obj)] = prefix
        patched.setdefault(type(obj), {f.name for f in dataclasses.fields(obj)})
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{prefix}{f.name}.")

    walk(cfg, "")

    def getter(self, name):
        value = object.__getattribute__(self, name)
        prefix = paths.get(id(self))
        if prefix is not None and name in patched[type(self)] and not dataclasses.is_dataclass(value):
            read.add(prefix + name)
        return value

    for cls in patched:
        cls.__getattribute__ = getter
    try:
        yield read
    finally:
        for cls in patched:
            del cls.__getattribute__


def _location_keys(cfg, prefix=""):
    """Keys that say where or how a run computes, never what (``location_fields``), and the labels."""
    out = {f"{prefix}{n}" for n in getattr(cfg, "location_fields", ())}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out |= _location_keys(value, f"{prefix}{f.name}.")
    return out | ({"name", "notes"} if not prefix else set())


# read always, watched only when not at this value (runs made before the option keep their identity)
OPTIONAL = {"eval.draft_kernel": "recipe"}


@pytest.mark.integration
def test_the_evaluation_stages_read_only_keys_the_contract_watches(finished, tmp_path):
    """Each evaluation stage - those that build no config of their own, so the builders' test above
    cannot see their inputs - run again on a copy of a finished run with its outputs removed, reads
    (attribute by attribute, traced) only config keys that it or a stage it consumes declares."""
    cfg = load_experiment(finished / "c.yaml")
    built = _builders(cfg, tmp_path)
    allowed = _location_keys(cfg) | {k for k, v in OPTIONAL.items() if fileio.identity(_value(cfg, k)) == v}
    watched: dict[str, set[str]] = {}
    undeclared, checked = {}, []
    for stage in pipeline.STAGES:
        watched[stage.name] = set(stage.reads(cfg)).union(*(watched[u] for u in stage.after(cfg)))
        if stage.name in built:
            continue
        run = tmp_path / stage.name
        shutil.copytree(finished / "run", run)
        for pattern in stage.outputs:
            for path in run.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        ctx = pipeline.context(cfg, run, stage.name)  # the contract's digests read every key: outside the trace
        with _traced_reads(cfg) as read:
            stage.run(ctx)
        assert read, f"stage {stage.name} read nothing: the trace is broken"
        checked.append(stage.name)
        bad = sorted(k for k in read - allowed
                     if not any(k == d or k.startswith(d + ".") for d in watched[stage.name]))
        if bad:
            undeclared[stage.name] = bad
    assert checked == ["score", "perturbation", "proxy_robustness", "fidelity", "hallucination", "cost"]
    assert undeclared == {}, f"stages read keys they do not declare: {undeclared}"


def _value(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


# -- the table: edit a finished run, see exactly the dependent stages run again ---------------------


# (edits, stages recomputed); the tiny run: proxy from 2 teachers, draft base on the run's data
TABLE = [
    ({"seed": 1}, STAGES),
    ({"dtype": "float32"}, STAGES),
    ({"device": "cpu", "name": "renamed", "notes": "x"}, []),
    ({"noise.sigma": 0.2}, ["teachers", "proxy"] + TRAINED),
    ({"data.temperature": 0.7}, ["data", "draft_base", "teachers", "proxy"] + TRAINED),
    ({"data.questions": 10}, ["data", "draft_base"] + TRAINED),
    ({"data.shots": 1}, STAGES),
    ({"data.batch_size": 4, "eval.batch_size": 4, "generation.tensor_parallel_size": 2}, []),
    ({"generation.backend": "vllm"}, STAGES),  # every generation stage samples (T = 1)
    ({"generation.backend": "vllm", "data.temperature": 0.0, "eval.temperature": 0.0},
     STAGES),  # greedy everywhere: the backend is no longer read, the temperatures are
    ({"draft_base.layers": 1}, ["draft_base"] + TRAINED),
    ({"draft_base.train.lr": 0.002}, ["draft_base"] + TRAINED),
    ({"draft_base.train.save_every": 2, "draft_base.cache": True}, []),
    ({"drafts.lora_r": 4}, TRAINED),
    ({"drafts.methods": ["untrained", "ddd"]}, TRAINED),
    ({"drafts.train.max_steps": 3}, TRAINED),
    ({"drafts.train.save_every": 3, "proxy.train.save_every": 3}, []),
    ({"proxy.train.max_steps": 3}, ["proxy"] + EVAL),
    ({"proxy.n_teacher": 1}, ["proxy", "perturbation"] + EVAL),
    ({"proxy.samples": 2}, ["teachers", "proxy"] + EVAL),
    ({"eval.temperature": 0.5}, ["eval_samples", "perturbation"] + EVAL),
    ({"eval.trials": 2}, TRAINED),
    ({"eval.bootstrap": 20}, ["proxy_robustness", "fidelity", "hallucination"]),
    ({"eval.ece_bins": 10}, ["hallucination"]),
    ({"eval.cost_responses": 1}, ["cost"]),
    ({"eval.heatmap_examples": 2}, []),
    ({"draft_base.model": "quantize"}, ["draft_base"] + TRAINED),
    ({"draft_base.quantize.bits": 4, "drafts.lora_layers": None}, []),  # a truncated base does not read them
    ({"drafts.lora_layers": 1}, TRAINED),
]
# rows run for real (the others are checked through the plan, which is what `run` follows)
REAL = [2, 3, 5, 7, 11, 12, 14, 17, 19, 21, 22, 23]


def _tiny(tiny_dir) -> dict:
    d = tiny_config(tiny_dir)
    d["eval"]["trials"] = 1
    d["draft_base"]["cache"] = False
    return d


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("contract")
    (root / "c.yaml").write_text(yaml.safe_dump(_tiny(tiny_dir)))
    pipeline.run(load_experiment(root / "c.yaml"), root / "run", log=lambda s: None)
    return root


# the file each stage writes last: rewritten exactly when the stage runs
PRODUCT = {"data": "data/samples.jsonl", "draft_base": "draft_base/model.safetensors",
           "drafts": "drafts/ddd/s0_m0/adapter_model.safetensors", "teachers": "proxy_data/t0/samples.jsonl",
           "proxy": "proxy/adapter/adapter_model.safetensors", "eval_samples": "eval/samples/samples.jsonl",
           "score": "eval/token_eu.jsonl", "perturbation": "eval/perturbation.json",
           "proxy_robustness": "eval/proxy_robustness.json",
           "fidelity": "eval/fidelity.json", "hallucination": "eval/hallucination.json", "cost": "eval/cost.json"}


@pytest.mark.parametrize("row", range(len(TABLE)), ids=lambda i: ",".join(TABLE[i][0]))
def test_an_edit_recomputes_exactly_the_stages_that_depend_on_it(finished, row):
    edits, expected = TABLE[row]
    cfg = load_experiment(finished / "c.yaml", {k: fileio.plain(v) if not isinstance(v, str) else v
                                                for k, v in edits.items()})
    untouched = load_experiment(finished / "c.yaml")
    assert all(d.action == "skip" for d in pipeline.plan(untouched, finished / "run"))
    plan = {d.stage.name: d for d in pipeline.plan(cfg, finished / "run")}
    assert sorted(n for n, d in plan.items() if d.action != "skip") == sorted(expected)
    for name in expected:  # each says why, naming the key or the upstream stage
        why = plan[name].why
        assert any(k in why for k in edits) or "changed" in why or "rebuilt" in why, (name, why)
    if row not in REAL:
        return
    run = finished / f"run-{row}"
    shutil.copytree(finished / "run", run)
    before = {n: (run / p).stat().st_mtime_ns for n, p in PRODUCT.items()}
    manifest = pipeline.run(cfg, run, log=lambda s: None)
    assert sorted(n for n, s in manifest["stages"].items() if s["action"] != "skip") == sorted(expected)
    after = {n: (run / p).stat().st_mtime_ns for n, p in PRODUCT.items()}
    assert sorted(n for n in PRODUCT if after[n] != before[n]) == sorted(expected)
    again = pipeline.run(cfg, run, log=lambda s: None)  # and now it is current
    assert {s["action"] for s in again["stages"].values()} == {"skip"}
    shutil.rmtree(run)


# -- a killed reproduce resumes to the same bytes ---------------------------------------------------

# (stage, function it calls repeatedly, the call that dies): each kill lands mid-stage, after the
# stage wrote part of its output (rows appended, a training checkpoint saved)
KILLS = [("data", "append", 2), ("draft_base", "collate", 2), ("drafts", "collate", 3), ("teachers", "append", 2),
         ("proxy", "collate", 2), ("eval_samples", "append", 2), ("score", "append", 5),
         ("proxy_robustness", "append", 3), ("hallucination", "write", 1)]
# timings (the cost stage times things), and config.yaml files, which say where inputs were read from
VOLATILE = ("manifest.json", "report.md", "report.html", "cost.json", "config.yaml")


def _outputs(run: Path) -> dict[str, bytes]:
    """Every output's bytes; a PEFT adapter config without the base path it records (where the run is)."""
    import json

    out = {}
    for p in sorted(run.rglob("*")):
        if p.is_file() and p.name not in VOLATILE and p.suffix not in (".pt", ".png") and p.parent.name != "stages":
            data = p.read_bytes()
            if p.name == "adapter_config.json":
                data = json.dumps(json.loads(data) | {"base_model_name_or_path": None}, sort_keys=True).encode()
            out[str(p.relative_to(run))] = data
    return out


@pytest.mark.integration
def test_a_reproduce_killed_in_every_stage_resumes_to_the_same_bytes(tmp_path, tiny_dir, finished, monkeypatch):
    from drafteu.train import loop

    cfg = load_experiment(finished / "c.yaml")
    current = {"stage": None}
    kill = {"at": None, "calls": 0}

    def hooked(name, fn):
        def wrapper(*a, **kw):
            stage, what, n = kill["at"] or (None, None, None)
            if current["stage"] == stage and what == name:
                kill["calls"] += 1
                if kill["calls"] == n:
                    kill["at"] = None
                    raise KeyboardInterrupt(f"killed in {stage}")
            return fn(*a, **kw)
        return wrapper

    append, collate, write = fileio.append_jsonl, loop.collate, fileio.write_json
    monkeypatch.setattr(fileio, "append_jsonl", hooked("append", append))
    monkeypatch.setattr(loop, "collate", hooked("collate", collate))
    monkeypatch.setattr(fileio, "write_json", hooked("write", write))

    def tracked(stage):
        def run_stage(ctx: Context):
            current["stage"] = stage.name
            try:
                return stage.run(ctx)
            finally:
                current["stage"] = None
        return dataclasses.replace(stage, run=run_stage)

    monkeypatch.setattr(pipeline, "STAGES", tuple(tracked(s) for s in pipeline.STAGES))
    run = tmp_path / "killed"
    killed = []
    for point in KILLS:
        kill.update(at=point, calls=0)
        try:
            pipeline.run(cfg, run, log=lambda s: None)
        except KeyboardInterrupt as e:
            killed.append(str(e))
    assert killed == [f"killed in {s}" for s, _, _ in KILLS]  # every kill landed where it was aimed
    pipeline.run(cfg, run, log=lambda s: None)
    a, b = _outputs(finished / "run"), _outputs(run)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == [], [k for k in a if a[k] != b[k]]


# -- a recompute that fails leaves the previous results ------------------------------------------


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _fail(*args, **kwargs):
    raise OSError(28, "No space left on device (injected)")


@pytest.mark.parametrize("when", ["start", "mid-way", "kill"])
@pytest.mark.parametrize("stage,key", [("draft_base", "draft_base.train.lr"), ("drafts", "drafts.train.lr"),
                                       ("proxy", "proxy.train.lr")])
def test_a_failed_recompute_leaves_the_run_as_it_was(finished, monkeypatch, tmp_path, stage, key, when):
    """A training stage recomputed with a changed key and made to fail - at its start, mid-way
    (its first checkpoint hits a full disk, after training steps and files of its own), or killed
    mid-way (nothing runs after the error; the next run recovers) - leaves every file of the run
    byte for byte as it was, stamps included; the next successful run leaves no trace of the swap."""
    from drafteu.train import loop

    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    before = _snapshot(run)
    cfg = load_experiment(finished / "c.yaml", {key: 0.002})
    assert {d.stage.name: d.action for d in pipeline.plan(cfg, run)}[stage] == "recompute"
    with monkeypatch.context() as m:
        if when == "start":
            m.setattr(pipeline, "STAGES", tuple(dataclasses.replace(s, run=_fail) if s.name == stage else s
                                                for s in pipeline.STAGES))
        else:
            m.setattr(loop, "_atomic_save", _fail)
        if when == "kill":  # nothing of drafteu runs after the failure: no restore
            m.setattr(contract, "restore", lambda *a, **k: False)
            m.setattr(contract, "restore_run_files", lambda *a, **k: None)
        with pytest.raises(OSError, match="injected"):
            pipeline.run(cfg, run, log=lambda s: None, until=stage)
    if when == "kill":
        assert (run / contract.PREVIOUS / stage).is_dir() and _snapshot(run) != before
        assert contract.recover(run, pipeline.STAGES) == [stage]  # what the next run does first
    assert _snapshot(run) == before
    pipeline.run(cfg, run, log=lambda s: None, until=stage)  # and the recompute then goes through
    assert not (run / contract.PREVIOUS).exists()
    assert {d.stage.name: d.action for d in pipeline.plan(cfg, run)}[stage] == "skip"
