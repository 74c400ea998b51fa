"""The run directory of `drafteu reproduce`: its layout, ensemble specs and readers.

    config.yaml  manifest.json       the experiment as run; stages, timings, hardware
    data/samples.jsonl               target samples on train questions          (generate)
    draft_base/                      truncated + warmed-up target (draft_base.model: truncate), or the
                                     quantization recipe + its measured KL (quantize); with
                                     draft_base.cache a copy of $DRAFTEU_CACHE/draft_base/<recipe>/model
    draft_base_data/samples.jsonl    its own warm-up data (draft_base.data without cache; with cache:
                                     $DRAFTEU_CACHE/draft_base/<recipe>/data)
    drafts/<method>/                 one ensemble per method (manifest.json, s<i>_m<j>/ adapters)
    drafts/layouts/<S>x<M>/ddd/      extra DDD layouts (Table 5)
    drafts/trials/t<i>/...           ensembles redrawn for trial i (same sub-layout)
    proxy_data/t<k>/samples.jsonl    answers of fixed noisy teacher k           (generate --member k)
    proxy/adapter/                   the OSD proxy (a PEFT adapter on the target)
    eval/samples/samples.jsonl       target answers on test questions, `repeats` each
    eval/token_eu.jsonl              token EU per (answer key, method label, trial)   (+ .meta.json)
    eval/proxy_bias.jsonl            the bias term under each p estimate             (proxy robustness)
    eval/<stage>.json                fidelity, proxy_robustness, hallucination, cost
    stages/<stage>.json              what each stage's outputs were made from (drafteu.contract)
    report.md  report.html  figures/*.png

Every stage reads and writes through the helpers here; the method behind each file is in docs/method.md.
Generic atomic I/O (jsonl, JSON, YAML) is ``drafteu.fileio``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from drafteu import draft_base_kinds, fileio
from drafteu.errors import DraftEUError
from drafteu.methods import draft_method, named


@dataclass(frozen=True)
class EnsembleSpec:
    """One scored draft ensemble: a method, or a DDD ensemble of another S x M layout."""

    method: str
    layout: tuple[int, int] | None = None

    @property
    def label(self) -> str:
        """The name in token_eu.jsonl, the JSON results and the report ("ddd", "ddd 1x6")."""
        return self.method if self.layout is None else f"{self.method} {self.layout[0]}x{self.layout[1]}"

    @classmethod
    def from_label(cls, label: str) -> EnsembleSpec:
        method, _, layout = label.partition(" ")
        if not layout:
            return cls(method)
        s, m = layout.split("x")
        return cls(method, (int(s), int(m)))

    @property
    def trained(self) -> bool:
        return draft_method(self.method).trained


def ensembles(cfg) -> list[EnsembleSpec]:
    """Every ensemble an experiment scores: its methods, then the extra DDD layouts."""
    proposed = named("proposed")  # the layouts are the proposed method's (DDD's)
    layouts = [EnsembleSpec(proposed, (s, m)) for s, m in cfg.drafts.layouts]
    return [EnsembleSpec(m) for m in cfg.drafts.methods] + layouts


def labels(cfg) -> list[str]:
    return [e.label for e in ensembles(cfg)]


def redrawn(cfg, spec: EnsembleSpec) -> bool:
    """Whether ``spec`` has its own ensemble in trials > 0 (docs/method.md §5): every ensemble with
    ``retrain_per_trial``, else the untrained ones (their noise is redrawn)."""
    return cfg.eval.retrain_per_trial or not spec.trained


def trial_ensembles(cfg, trial: int) -> list[EnsembleSpec]:
    """Ensembles that have their own numbers in ``trial`` (the others re-use trial 0's)."""
    return [e for e in ensembles(cfg) if trial == 0 or redrawn(cfg, e)]


def draft_dir(run: Path, cfg, spec: EnsembleSpec, trial: int) -> Path:
    """Directory of ensemble ``spec`` in ``trial`` (shared across trials where nothing is redrawn)."""
    sub = Path("layouts") / f"{spec.layout[0]}x{spec.layout[1]}" if spec.layout else Path()
    if trial > 0 and redrawn(cfg, spec):
        sub = Path("trials") / f"t{trial}" / sub
    return Path(run) / "drafts" / sub / spec.method


def base_model(cfg, run: Path) -> str:
    """The draft base: the run's built one (truncated or quantized target), or the configured sibling."""
    return str(Path(run) / "draft_base") if draft_base_kinds.kind(cfg.draft_base.model) else cfg.draft_base.model


def samples_path(run: Path) -> Path:
    return Path(run) / "data" / "samples.jsonl"


def teacher_dir(run: Path, k: int) -> Path:
    return Path(run) / "proxy_data" / f"t{k}"


def proxy_adapter(run: Path) -> Path:
    return Path(run) / "proxy" / "adapter"


def eval_json(run: Path, stage: str) -> Path:
    return Path(run) / "eval" / f"{stage}.json"


def draft_base_manifest(run: Path) -> dict:
    """The run's built draft base's manifest (its kind, its measured KL to the target), {} without one."""
    return _json_or_empty(Path(run) / "draft_base" / "manifest.json")


def run_manifest(run: Path) -> dict:
    """The run's manifest.json (the stages' timings, the config's digest), {} without one."""
    return _json_or_empty(Path(run) / "manifest.json")


def stage_result(run: Path, stage: str) -> dict | None:
    """An evaluation stage's JSON (``eval/<stage>.json``), or None before the stage has run."""
    path = eval_json(run, stage)
    return fileio.json_load(path) if path.exists() else None


def _json_or_empty(path: Path) -> dict:
    return fileio.json_load(path) if path.exists() else {}


TOKEN_EU = Path("eval") / "token_eu.jsonl"
PROXY_BIAS = Path("eval") / "proxy_bias.jsonl"
TOKEN_EU_META = Path("eval") / "token_eu.meta.json"  # written by older versions; removed with the scores
EVAL_SAMPLES = Path("eval") / "samples"


# -- readers ------------------------------------------------------------------------------------


def eval_rows(run: Path) -> list[dict]:
    """The evaluated answers (eval/samples/samples.jsonl)."""
    rows = fileio.read_jsonl(Path(run) / EVAL_SAMPLES / "samples.jsonl")
    if not rows:
        raise DraftEUError(f"{run}/eval/samples holds no answers; the eval_samples stage did not run")
    return rows


def key_of(row: dict) -> str:
    """An answer's key in token_eu.jsonl: question id # sample index."""
    return f"{row['qid']}#{row['sample']}"


def fidelity_rows(rows: list[dict], limit: int | None) -> list[dict]:
    """The first answer of each of the first ``limit`` questions (all questions when None)."""
    firsts = [r for r in rows if r["sample"] == 0]
    return firsts if limit is None else firsts[:limit]


def token_eu(run: Path) -> dict[tuple[str, str, int], dict]:
    """(answer key, method label, trial) -> the stored row of eval/token_eu.jsonl."""
    return {(r["key"], r["method"], r["trial"]): r for r in fileio.read_jsonl(Path(run) / TOKEN_EU)}


def hallucination_map(run: Path, method: str) -> dict | None:
    """The map from ``method``'s sequence EU to P(wrong) that ``run`` fitted, with its provenance: the
    calibration the hallucination stage chose (Platt or isotonic, by held-out log-loss) where it is for
    ``method``, else that method's logistic map; None when the run has none.  The dict carries the map
    (``calibration.p_wrong`` applies it), ``aggregation`` and ``provenance`` (the run, the answers fitted
    on, the map and its test-split ECE)."""
    import json
    import math

    path = Path(run) / "eval" / "hallucination.json"
    try:
        hal = json.loads(path.read_text(encoding="utf-8"))
        cal = hal.get("calibration") or {}
        if cal.get("method") == method and "map" in cal:
            return {**cal["map"], "aggregation": cal["aggregation"], "provenance": {
                "run": str(Path(run).resolve()), "map": cal["chosen"], "answers_fitted": cal["n_fit"],
                "test_ece": cal["test"][cal["chosen"]]["ece"], "chosen_by": f"{cal['folds']}-fold log-loss"}}
        fitted = hal["methods"][method]
        how = next(iter(fitted))
        m = fitted[how]
        if not all(k in m for k in ("coef", "intercept", "score_mean", "score_std")) or not math.isfinite(m["coef"]):
            return None
        return {"kind": "platt", **{k: m[k] for k in ("coef", "intercept", "score_mean", "score_std")},
                "aggregation": how, "provenance": {"run": str(Path(run).resolve()), "map": "logistic",
                                                   "answers_fitted": m.get("n_fit"), "test_ece": m["ece"]["value"]}}
    except (OSError, ValueError, KeyError, StopIteration, TypeError):
        return None


def rounded(t: torch.Tensor | None) -> list[float] | None:
    """A tensor as a list of 6-significant-digit floats (how token EU is stored)."""
    return None if t is None else [float(f"{x:.6g}") for x in t.tolist()]


# -- ensembles outside a run: `drafteu score --drafts` / `speculate --drafts` --------------------


def _stage_of(manifest: Path) -> str | None:
    try:
        return fileio.json_load(manifest).get("stage")
    except (OSError, ValueError):
        return None


def resolve_drafts(path: str | Path, proxy: str | Path | None = None) -> tuple[Path, Path | None]:
    """(drafts dir, proxy adapter dir or None) from a run directory or a drafts directory.

    A run directory gives its ``drafts/ddd`` ensemble and ``proxy/adapter``; a drafts directory
    (one with a drafts manifest) gives itself, and the proxy only if ``proxy`` names one (else the
    bias term uses the raw target, docs/method.md §3).
    """
    path = Path(path)
    run_drafts = draft_dir(path, None, EnsembleSpec(named("proposed")), 0)
    if (run_drafts / "manifest.json").exists():
        drafts, run_proxy = run_drafts, proxy_adapter(path)
        proxy = proxy or (run_proxy if (run_proxy / "adapter_config.json").exists() else None)
    elif (path / "manifest.json").exists() and _stage_of(path / "manifest.json") == "drafts":
        drafts = path
    elif (path / "manifest.json").exists() and _stage_of(path / "manifest.json") is None:
        raise DraftEUError(f"{path / 'manifest.json'} is damaged (not valid JSON); delete {path} and re-run the "
                           "stage that made it (reproduce rebuilds only what is missing)")
    else:
        raise DraftEUError(f"{path} is neither a run directory (with drafts/ddd) nor a drafts directory; "
                           "train one with drafteu train-drafts")
    if proxy is not None:
        proxy = Path(proxy)
        if (proxy / "adapter" / "adapter_config.json").exists():
            proxy = proxy / "adapter"
        if not (proxy / "adapter_config.json").exists():
            raise DraftEUError(f"{proxy} is not a proxy adapter directory (train one with drafteu train-proxy)")
    return drafts, proxy
