"""The cost-fidelity frontier of a draft ensemble across `reproduce` runs of one design.

Reads each run directory's stored results (``eval/fidelity.json``, ``hallucination.json``,
``proxy_robustness.json``, ``cost.json``, ``config.yaml``, ``manifest.json``) - the numbers the
estimator classes computed, nothing recomputed here - and writes one row per run: what differs in its
config, the proposed ensemble's fidelity (RMSE, Spearman, variance term, bias / ground truth), its
hallucination AUROC against TokUR's (the paired difference over all answers with its interval), and
its cost against TokUR in both of the cost stage's modes.  Runs are compared only when they were
timed on the same kind of machine (each row says which).

    python bench/frontier.py runs/f15 runs/f8 runs/f4 --out docs/results/lora-layers-frontier.md
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import write_section  # noqa: E402

# config keys that tell frontier points apart (shown per row when they differ between runs)
KEYS = ("drafts.lora_layers", "proxy.lora_layers", "proxy.base", "drafts.lora_r", "drafts.train.lr",
        "drafts.train.max_steps", "drafts.partitions", "drafts.per_partition", "eval.draft_kernel")


def _get(cfg, key: str):
    """The value of dotted config key ``key`` (``drafts.train.lr``) in a loaded config."""
    return functools.reduce(getattr, key.split("."), cfg)


def _json(run: Path, name: str) -> dict:
    path = run / "eval" / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def row(run: Path, method: str) -> dict:
    """One frontier point: the numbers the run stored for ``method`` and its reference (TokUR)."""
    from drafteu.config import load_experiment

    cfg = load_experiment(run / "config.yaml")
    fid, hal, rob, cst = (_json(run, n) for n in ("fidelity", "hallucination", "proxy_robustness", "cost"))
    manifest = json.loads((run / "manifest.json").read_text())
    ref = cst.get("reference", "tokur")
    f, b = fid["methods"][method], fid["bias"][method]
    comparison = next(iter(hal.get("comparisons", {}).values()), {})
    modes = cst.get("modes", {})
    return {
        "run": run.name, "config": {k: _get(cfg, k) for k in KEYS},
        "rmse": f["rmse"], "spearman": f["spearman"], "variance": b["mean_variance"], "bias": b["mean_bias"],
        "bias_vs_truth": b["bias_vs_truth"],
        "mean_eu": sum(t["mean_estimate"] for t in f["trials"]) / len(f["trials"]),
        "mean_truth": sum(t["mean_truth"] for t in f["trials"]) / len(f["trials"]),
        "truth_spearman_tokur": fid["methods"].get(ref, {}).get("spearman"),
        "auroc": hal["methods"][method]["mean"]["auroc"], "auroc_ref": hal["methods"][ref]["mean"]["auroc"],
        "auroc_diff": {k: comparison.get(k) for k in ("difference", "low", "high", "verdict")},
        "p_mix_rmse": rob.get("estimates", {}).get("p_mix", {}).get("rmse"),
        "flops": cst["flops_rel_reference"][method],
        "modes": {m: {"wall": v["wall_rel_reference"][method], "fed_flops": v["fed_flops_rel_reference"][method],
                      "ms": v["methods"][method]["ms_per_token"], "ref_ms": v["methods"][ref]["ms_per_token"]}
                  for m, v in modes.items()},
        "kernel": cst.get("draft_kernel", ""), "hardware": manifest.get("hardware", {}).get("hardware", "?"),
        "drafts_seconds": manifest.get("stages", {}).get("drafts", {}).get("compute_seconds"),
    }


def table(rows: list[dict]) -> str:
    varying = [k for k in KEYS if len({json.dumps(r["config"][k]) for r in rows}) > 1]

    def pm(x, d=4):
        return f"{x['mean']:.{d}f} ± {x['std']:.{d}f}"

    head = ["run", *varying, "mean EU (truth)", "RMSE", "Spearman", "variance (JSD)", "bias / truth", "AUROC (TokUR)",
            "AUROC − TokUR, all answers", "FLOPs vs TokUR (paper)", "wall vs TokUR, full forwards",
            "FLOPs of work done vs TokUR, prefix shared", "wall vs TokUR, prefix shared"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * (1 + len(varying)) + ["---:"] * 11) + " |"]
    for r in rows:
        d, full, shared = r["auroc_diff"], r["modes"].get("full forwards", {}), r["modes"].get("prefix shared", {})
        cells = [r["run"], *(json.dumps(r["config"][k]) for k in varying),
                 f"{r['mean_eu']:.4f} ({r['mean_truth']:.4f})", pm(r["rmse"]), pm(r["spearman"], 3),
                 f"{r['variance']:.4f}", f"{r['bias_vs_truth']:.2f}x",
                 f"{r['auroc']['value']:.3f} ({r['auroc_ref']['value']:.3f})",
                 f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
                 if d.get("difference") is not None else "",
                 f"{r['flops']:.2f}x", f"{full.get('wall', float('nan')):.2f}x",
                 f"{shared.get('fed_flops', float('nan')):.2f}x", f"{shared.get('wall', float('nan')):.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    machines = sorted({r["hardware"] for r in rows})
    # one line per kernel; each run's own auto measurement (it varies run to run) said apart
    kernels = sorted({re.sub(r" \(auto: [^)]*\)", "", r["kernel"]) for r in rows if r["kernel"]})
    measured = "; ".join(f"{r['run']} {m.group(1)}" for r in rows
                         if (m := re.search(r"\(auto: ([^)]*)\)", r["kernel"])))
    ms = "; ".join(f"{r['run']} {r['modes']['full forwards']['ref_ms']:.1f} / "
                   f"{r['modes']['prefix shared']['ref_ms']:.1f}"
                   for r in rows if "full forwards" in r["modes"] and "prefix shared" in r["modes"])
    return "\n".join(lines + ["", f"Timed on: {', '.join(machines)}; the members' kernel: "
                                  f"{'; '.join(kernels) or 'the recipe'}"
                              + (f" (what `eval.draft_kernel: auto` measured: {measured})." if measured else "."),
                              "TokUR's own ms per scored token in each run's cost stage (full forwards / prefix "
                              f"shared), the spread of the baseline the wall ratios divide by: {ms}."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--method", default=None, help="the ensemble compared (default: the proposed one, DDD)")
    ap.add_argument("--out", type=Path, default=None, help="a markdown file: the table replaces its 'frontier' section")
    ap.add_argument("--json", type=Path, default=None, help="every row's numbers")
    args = ap.parse_args()
    from drafteu.methods import named

    method = args.method or named("proposed")
    rows = [row(r, method) for r in args.runs]
    body = table(rows)
    print(body)
    if args.out is not None:
        device = "cuda" if any("cuda" in r["hardware"].lower() for r in rows) else "cpu"
        write_section(args.out, f"frontier-{device}", "The frontier, measured", body)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
