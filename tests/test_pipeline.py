"""`drafteu reproduce` end to end on a tiny random model, and the shipped experiment configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from drafteu import fileio, hardware, pipeline, rundir
from drafteu.cli import app
from drafteu.config import load_experiment
from drafteu.errors import DraftEUError
from drafteu.evaluate import scoring_stage

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(lr=1e-3, max_steps=2, batch_size=4, grad_accum=1, warmup_steps=1, save_every=1)


def tiny_config(target: Path) -> dict:
    return {
        "name": "tiny",
        "target": str(target),
        "data": {"questions": 8, "samples": 2, "max_new_tokens": 6, "batch_size": 8},
        "draft_base": {"layers": 2, "heldout": 0.25, "train": FAST},
        "drafts": {"methods": ["untrained", "ddd", "konly"], "partitions": 2, "per_partition": 1,
                   "layouts": [[1, 2]], "max_new_tokens": 4, "train": FAST},
        "proxy": {"teachers": 2, "questions": 4, "samples": 1, "heldout": 0.0, "train": FAST},
        "eval": {"questions": 6, "repeats": 2, "max_new_tokens": 6, "trials": 2, "bootstrap": 50,
                 "reference_size": 3, "proxy_ks": [1, 2], "cost_responses": 2, "heatmap_examples": 1},
    }


# Every draft method, the TRL baselines first: their trainers set accelerate's process-wide state
# (bf16 here), and the own loop's stages after them (ddd, idd, fdd, the 1x2 layout, then the
# proxy in float32) must still run.
ALL_METHODS = ["gkd", "minillm", "untrained", "ddd", "idd", "fdd", "konly"]


def _noise_drafts_equal_full_forwards(cfg, run: Path) -> None:
    """The perturbation stage's numbers for the drafts built of noise (untrained: the draft base's
    noise copies; K-only: the trained draft's) are what full forwards give, one adapter at a time:
    their MI, their KL to the target and their KL to the draft they perturb."""
    from peft import PeftModel

    from drafteu import divergence, estimators, models

    sets = fileio.json_load(run / "eval" / "perturbation.json")["sets"]
    rows = [r for r in rundir.fidelity_rows(rundir.eval_rows(run), cfg.eval.proxy_questions) if r["response_ids"]]
    target = models.load(cfg.target).model.eval()
    for method in ("untrained", "konly"):
        directory = run / "drafts" / method
        manifest = estimators.read_drafts_manifest(directory)
        assert ("perturbs" in manifest) == (method == "konly")
        base = models.load(estimators.manifest_base(manifest, directory)).model
        names = manifest["adapters"]
        model = PeftModel.from_pretrained(base, str(directory / names[0]), adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(directory / n), adapter_name=n)
        if method == "konly":
            model.load_adapter(str(directory / manifest["perturbs"]), adapter_name="centre")
        mi = to_target = mean_to_target = to_centre = n_tokens = 0.0
        with torch.no_grad():
            for r in rows:
                ids, keep = estimators.response_inputs(r["prompt_ids"], r["response_ids"])
                q = []
                for n in names:
                    model.set_adapter(n)
                    q.append(model(input_ids=ids, logits_to_keep=keep).logits[0, :-1])
                q = torch.stack(q).float()
                if method == "konly":
                    model.set_adapter("centre")
                    c = model(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float()
                else:
                    with model.disable_adapter():
                        c = model(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float()
                t = target(input_ids=ids, logits_to_keep=keep).logits[0, :-1].float()
                mi += float(divergence.mutual_information(q).sum())
                to_target += float(divergence.kl(q, t).mean(0).sum())
                mean_to_target += float(divergence.kl(divergence.mixture(q), t).sum())
                to_centre += float(divergence.kl(q, c).mean(0).sum())
                n_tokens += len(r["response_ids"])
        got = sets[f"{method} drafts"]
        assert got["members"] == len(names) and got["tokens"] == n_tokens and got["sigma"] == cfg.drafts.sigma
        assert got["mean_mi"] == pytest.approx(mi / n_tokens, rel=1e-3, abs=1e-6), method
        assert got["kl_member_to_target"] == pytest.approx(to_target / n_tokens, rel=1e-3), method
        assert got["kl_mean_to_target"] == pytest.approx(mean_to_target / n_tokens, rel=1e-3), method
        assert got["kl_member_to_centre"] == pytest.approx(to_centre / n_tokens, rel=1e-3, abs=1e-6), method
        assert got["kl_member_to_centre"] > 0  # the noise moved every member


@pytest.mark.integration
def test_tiny_reproduce_end_to_end_and_rerun_skips(tmp_path, tiny_dir):
    pytest.importorskip("trl")
    cfg_path = tmp_path / "tiny.yaml"
    d = tiny_config(tiny_dir)
    d["drafts"]["methods"] = ALL_METHODS
    d["drafts"]["train"] = FAST | {"mixed_precision": "bf16"}
    d["drafts"]["baseline_steps"] = 1  # GKD / MiniLLM: their own step budget
    cfg_path.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["reproduce", "--config", str(cfg_path), "--run", str(run)])
    assert res.exit_code == 0, res.output
    for rel in ("report.md", "report.html", "figures/fidelity_scatter.png", "figures/proxy_robustness.png",
                "eval/fidelity.json", "eval/hallucination.json", "eval/cost.json", "eval/proxy_robustness.json",
                "drafts/ddd/manifest.json", "drafts/layouts/1x2/ddd/manifest.json",
                "drafts/trials/t1/untrained/manifest.json", "drafts/trials/t1/konly/manifest.json"):
        assert (run / rel).exists(), rel
    fid = fileio.json_load(run / "eval" / "fidelity.json")
    assert set(fid["methods"]) >= {"tokur", *ALL_METHODS, "ddd 1x2"}
    # the resolved precision is in every training manifest and in the run's
    expected = hardware.resolve_mixed_precision("auto", torch.device("cpu"))[0]
    assert fileio.json_load(run / "manifest.json")["hardware"]["mixed_precision"] == {
        "draft_base": expected, "drafts": "bf16", "proxy": expected}
    for m in ALL_METHODS:
        if m not in ("untrained", "konly"):
            trained = fileio.json_load(run / "drafts" / m / "manifest.json")["train"]
            assert {t["mixed_precision"] for t in trained.values()} == {"bf16"}, m
            assert {t["steps"] for t in trained.values()} == {1 if m in ("gkd", "minillm") else FAST["max_steps"]}, m
    assert fileio.json_load(run / "draft_base" / "manifest.json")["train"]["mixed_precision"] == expected
    assert fileio.json_load(run / "proxy" / "manifest.json")["train"]["mixed_precision"] == expected
    assert all(len(m["trials"]) == 2 for m in fid["methods"].values())
    # token EU rows: trial 0 every method on every answer, trial 1 the redrawn ones on the firsts
    rows = fileio.read_jsonl(run / "eval" / "token_eu.jsonl")
    answers = fileio.read_jsonl(run / "eval" / "samples" / "samples.jsonl")
    assert len(answers) == 12
    t0 = [r for r in rows if r["trial"] == 0]
    assert len(t0) == 12 * (3 + len(ALL_METHODS) + 1)  # groundtruth, tokur, entropy, 7 methods, ddd 1x2
    t1 = {r["method"] for r in rows if r["trial"] == 1}
    assert t1 == {"groundtruth", "tokur", "untrained", "konly"}  # trained ensembles are not redrawn
    for r in t0:
        if r["variance"] is not None:
            assert all(abs(e - v - b) < 1e-4 for e, v, b in zip(r["eu"], r["variance"], r["bias"], strict=True))
    _token_eu_equals_the_estimators(load_experiment(cfg_path), run)
    _noise_drafts_equal_full_forwards(load_experiment(cfg_path), run)
    html = (run / "report.html").read_text()
    assert "data:image/png;base64," in html and "<span title=" in html
    assert html.count("<table>") >= 4 and "<th>method</th>" in html and "<h2>Fidelity" in html  # markdown rendered
    md = (run / "report.md").read_text()
    assert "## Fidelity" in md and "## Hallucination detection" in md and "## Cost" in md
    assert "| untrained drafts |" in md and "| konly drafts |" in md  # the drafts' noise, stated

    # publishing: report + figures + every number, a reading above the generated part kept
    pub = tmp_path / "results"
    pub.mkdir()
    (pub / "tiny-study.md").write_text("# Reading\n\nkept\n\n<!-- written by `drafteu report --publish`: "
                                       "everything below this line is replaced on the next publish -->\nold\n")
    res = CliRunner().invoke(app, ["report", "--run", str(run), "--publish", str(pub), "--name", "tiny-study"])
    assert res.exit_code == 0, res.output
    text = (pub / "tiny-study.md").read_text()
    assert text.startswith("# Reading\n\nkept\n") and "\nold\n" not in text and "## Fidelity" in text
    assert "](tiny-study/fidelity_scatter.png)" in text and (pub / "tiny-study" / "fidelity_scatter.png").exists()
    assert "(tiny-study/report.html)" in text and (pub / "tiny-study" / "report.html").exists()
    numbers = fileio.json_load(pub / "tiny-study.json")
    assert numbers["fidelity"] == fid and numbers["config"]["drafts"]["baseline_steps"] == 1
    assert set(numbers) >= {"manifest", "proxy_robustness", "hallucination", "cost"}
    # a page written by hand before its first publish (no marker yet) is kept whole, above the report
    (pub / "by-hand.md").write_text("# A study\n\nits reading\n")
    res = CliRunner().invoke(app, ["report", "--run", str(run), "--publish", str(pub), "--name", "by-hand"])
    assert res.exit_code == 0, res.output
    text = (pub / "by-hand.md").read_text()
    assert text.startswith("# A study\n\nits reading\n\n<!-- written by") and "## Fidelity" in text
    res = CliRunner().invoke(app, ["report", "--run", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output

    # a second run finds every stage complete and re-uses it
    before = {p: p.stat().st_mtime for p in (run / "eval").glob("*.json")}
    res = CliRunner().invoke(app, ["reproduce", "--config", str(cfg_path), "--run", str(run)])
    assert res.exit_code == 0, res.output
    assert {p: p.stat().st_mtime for p in (run / "eval").glob("*.json")} == before
    assert len(fileio.read_jsonl(run / "eval" / "token_eu.jsonl")) == len(rows)


def _token_eu_equals_the_estimators(cfg, run: Path) -> None:
    """reproduce's eval/token_eu.jsonl is what the estimator classes give when called directly,
    each on its own freshly loaded target, without prefix caches (the `drafteu score` path)."""
    from drafteu import estimators, models
    from drafteu.posterior import NoisyModel

    stored = rundir.token_eu(run)
    answers = rundir.eval_rows(run)
    checked = 0
    for trial in range(cfg.eval.trials):
        def fresh_noisy():
            return NoisyModel(models.load(cfg.target).model, cfg.noise)
        direct = {
            "groundtruth": estimators.GroundTruth(fresh_noisy(), cfg.eval.family_size, cfg.seed + trial),
            "tokur": estimators.TokUR(fresh_noisy(), cfg.eval.tokur_size, cfg.seed + trial),
            "entropy": estimators.PredictiveEntropy(fresh_noisy()),
        }
        for spec in rundir.trial_ensembles(cfg, trial):
            direct[spec.label] = estimators.DraftEnsemble(rundir.draft_dir(run, cfg, spec, trial),
                                                          models.load(cfg.target), rundir.proxy_adapter(run),
                                                          kernel=cfg.eval.draft_kernel)
        for row in answers:
            for method, est in direct.items():
                r = stored.get((rundir.key_of(row), method, trial))
                if r is None:
                    continue
                got = est.score(row["prompt_ids"], row["response_ids"])
                assert r["eu"] == pytest.approx(got.eu.tolist(), rel=1e-4, abs=1e-5), (method, trial)
                if got.variance is not None:
                    assert r["variance"] == pytest.approx(got.variance.tolist(), rel=1e-4, abs=1e-5)
                checked += 1
    assert checked == len(fileio.read_jsonl(run / "eval" / "token_eu.jsonl"))  # every stored row


@pytest.mark.integration
def test_scoring_resumes_after_a_kill(tmp_path, tiny_dir, monkeypatch):
    cfg = load_experiment(_write(tmp_path,
                                 tiny_config(tiny_dir) | {"eval": tiny_config(tiny_dir)["eval"] | {"trials": 1}}))
    run = tmp_path / "run"
    pipeline.run(cfg, run, until="eval_samples")
    scoring_stage.stage_score(cfg, run)
    path = run / "eval" / "token_eu.jsonl"
    full = path.read_bytes()
    path.unlink()
    real, calls = fileio.append_jsonl, {"n": 0}

    def dying(p, rows):
        calls["n"] += 1
        if calls["n"] == 4:  # three answers scored, the fourth killed mid-write: a torn last line
            p.write_text(p.read_text() + '{"key": "q')
            raise KeyboardInterrupt
        real(p, rows)

    monkeypatch.setattr(fileio, "append_jsonl", dying)
    with pytest.raises(KeyboardInterrupt):
        scoring_stage.stage_score(cfg, run)
    assert not path.exists() and len(fileio.read_jsonl(scoring_stage.part_path(run, 0), repair=True)) > 0
    monkeypatch.setattr(fileio, "append_jsonl", real)
    scoring_stage.stage_score(cfg, run)
    assert path.read_bytes() == full  # TokUR's fresh draws are resume-safe; the part is merged in order
    assert not scoring_stage.part_path(run, 0).exists()


def _write(tmp_path, d):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load_experiment(path)
    assert cfg.name == path.stem
    # every key the file sets reaches the config: what the file says is what runs
    written = yaml.safe_load(path.read_text())
    for section, values in written.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(cfg, section), key)
                if not isinstance(value, dict):  # (nested sections: their own keys' checks, in their tests)
                    assert (list(got) if isinstance(got, tuple) else got) == value, f"{path.name}: {section}.{key}"
    assert rundir.ensembles(cfg)


def test_shipped_configs_exist():
    names = {p.name for p in (ROOT / "configs").glob("*.yaml")}
    assert {"demo.yaml", "paper-llama-8b-3b.yaml", "paper-llama-8b-1b.yaml", "paper-llama-3b-1b.yaml"} <= names


@pytest.mark.parametrize("patch, message", [
    ({"drafts": {"methods": ["nope"]}}, "unknown draft method"),
    ({"eval": {"trials": 0}}, "must be >= 1"),
    ({"evall": {}}, "unknown key"),
    ({"eval": {"trials": "five"}}, "eval.trials must be int"),
    ({"proxy": {"data": "x"}}, "proxy.data"),
])
def test_bad_configs_get_clear_errors(tmp_path, patch, message):
    with pytest.raises(DraftEUError, match=message):
        load_experiment(_write(tmp_path, patch))


def test_set_overrides_reach_the_config(tmp_path):
    cfg = load_experiment(_write(tmp_path, {"name": "x"}), {"eval.trials": 2, "drafts.methods": ["ddd"]})
    assert cfg.eval.trials == 2 and cfg.drafts.methods == ["ddd"]


@pytest.mark.integration
def test_draft_base_trains_once_per_recipe_on_its_own_data(tmp_path, tiny_dir, monkeypatch):
    """draft_base.cache + draft_base.data: the first run generates the warm-up data and trains the base
    in the machine cache; a second run with the same recipe copies it (no training), and another
    recipe gets its own entry."""
    from safetensors.torch import load_file

    _test_cache = tmp_path / "cache"  # empty: other tests in the session may have built this recipe
    monkeypatch.setenv("DRAFTEU_CACHE", str(_test_cache))

    d = tiny_config(tiny_dir)
    d["draft_base"] |= {"cache": True, "data": {"task": "easy-word", "questions": 6, "samples": 1,
                                                 "max_new_tokens": 6, "batch_size": 8}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d))
    cfg = load_experiment(tmp_path / "c.yaml")
    a = pipeline.stage_draft_base(pipeline.context(cfg, tmp_path / "a", "draft_base"))
    b = pipeline.stage_draft_base(pipeline.context(cfg, tmp_path / "b", "draft_base"))
    assert a["cache"]["reused"] is False and b["cache"]["reused"] is True
    assert Path(a["cache"]["path"]).parent == _test_cache / "draft_base"
    data_dirs = list((_test_cache / "draft_base").glob("data-*"))
    assert len(data_dirs) == 1 and len(fileio.read_jsonl(data_dirs[0] / "samples.jsonl")) == 6  # its own data
    assert a["train_examples"] + a["heldout_examples"] == 6
    wa, wb = (load_file(tmp_path / r / "draft_base" / "model.safetensors") for r in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (tmp_path / "b" / "draft_base" / "trainer").exists()
    assert fileio.json_load(tmp_path / "b" / "draft_base" / "manifest.json")["cache"]["reused"] is True
    d["draft_base"]["layers"] = 1
    (tmp_path / "c1.yaml").write_text(yaml.safe_dump(d))
    c = pipeline.stage_draft_base(pipeline.context(load_experiment(tmp_path / "c1.yaml"), tmp_path / "c", "draft_base"))
    assert c["cache"]["reused"] is False and c["cache"]["path"] != a["cache"]["path"]
    assert list((_test_cache / "draft_base").glob("data-*")) == data_dirs  # another depth, the same data
