"""The report's figures (matplotlib, headless): the fidelity scatter, proxy robustness (Table 4),
hallucination AUROC (Table 2), selective answering (risk-coverage) and cost (Table 6), each from its
stage's JSON, written to ``RUN/figures/`` for ``drafteu.report``."""

from __future__ import annotations

from pathlib import Path


def save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(run: Path, fid: dict | None, rob: dict | None, hal: dict | None, cst: dict | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run / "figures"
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    if fid:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for i, (m, r) in enumerate(fid["methods"].items()):
            xs = [t["rmse"] for t in r["trials"]]
            ys = [t["spearman"] for t in r["trials"]]
            ax.scatter(xs, ys, label=m, color=plt.cm.tab10(i % 10), alpha=0.8)
        xs_all = [t["rmse"] for r in fid["methods"].values() for t in r["trials"] if t["rmse"] > 0]
        if xs_all and max(xs_all) / min(xs_all) > 20:
            ax.set_xscale("log")
        ax.set_xlabel("RMSE vs ground truth (lower is better)")
        ax.set_ylabel("Spearman vs ground truth (higher is better)")
        ax.set_title("Fidelity per trial (Fig. 1)")
        ax.legend(fontsize=7, loc="best")
        paths.append(save(fig, out / "fidelity_scatter.png"))
    if rob:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        names = list(rob["estimates"])
        for ax, metric in zip(axes, ("rmse", "spearman"), strict=True):
            ax.boxplot([[t[metric] for t in rob["estimates"][n]["trials"]] for n in names])
            ax.set_xticks(range(1, len(names) + 1), names, rotation=20, fontsize=8)
            ax.set_title(f"bias term: {metric.upper() if metric == 'rmse' else 'Spearman'} vs reference")
        fig.suptitle("Proxy robustness (Fig. 2)")
        paths.append(save(fig, out / "proxy_robustness.png"))
    if hal:
        how = next(iter(next(iter(hal["methods"].values()))))
        names = [m for m, r in hal["methods"].items() if "auroc" in r[how]]
        if names:
            fig, ax = plt.subplots(figsize=(6, 3.6))
            vals = [hal["methods"][m][how]["auroc"] for m in names]
            mid = [v["value"] for v in vals]
            err = [[max(v["value"] - v["low"], 0) for v in vals], [max(v["high"] - v["value"], 0) for v in vals]]
            ax.bar(range(len(names)), mid, yerr=err, capsize=3, color="#6a8fc8")
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
            ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
            ax.set_ylabel(f"AUROC ({how} EU)")
            ax.set_title("Hallucination detection (Table 2), 95% bootstrap CI")
            paths.append(save(fig, out / "hallucination_auroc.png"))
    sel = (hal or {}).get("selective")
    if sel and sel.get("methods"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, (m, r) in enumerate(sel["methods"].items()):
            ax.plot(r["coverage"], r["accuracy"], label=m, color=plt.cm.tab10(i % 10), lw=1.2)
        grid = next(iter(sel["methods"].values()))["coverage"]
        ax.plot(grid, sel["oracle"], color="black", ls=":", lw=1, label="oracle")
        ax.axhline(sel["random"], color="grey", ls="--", lw=0.8, label="random")
        ax.set_xlabel("share of answers kept (coverage)")
        ax.set_ylabel("accuracy of the kept answers")
        ax.set_title("Selective answering: risk-coverage")
        ax.legend(fontsize=7, loc="best")
        paths.append(save(fig, out / "risk_coverage.png"))
    cal = (hal or {}).get("calibration")
    if cal and "test" in cal:
        fig, ax = plt.subplots(figsize=(4.6, 4.2))
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        for i, (k, t) in enumerate(cal["test"].items()):
            pts = t["reliability"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=plt.cm.tab10(i),
                    label=f"{k}{' (chosen)' if k == cal['chosen'] else ''}, ECE {t['ece']:.3f}")
        ax.set_xlabel("predicted P(wrong)")
        ax.set_ylabel("observed wrong rate (test answers)")
        ax.set_title(f"Reliability of P(wrong) from {cal['method']}")
        ax.legend(fontsize=7, loc="upper left")
        paths.append(save(fig, out / "calibration.png"))
    if cst and cst.get("flops_rel_reference"):
        names = list(cst["methods"])
        fig, ax = plt.subplots(figsize=(6, 3.6))
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [cst["flops_rel_reference"][m] for m in names], 0.4, label="FLOPs")
        ax.bar([i + 0.2 for i in x], [cst["wall_rel_reference"][m] for m in names], 0.4, label="wall time")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xticks(list(x), names, rotation=20, fontsize=8)
        ax.set_ylabel(f"relative to {cst['reference']}")
        ax.set_title("Cost per scored token (Table 6)")
        ax.legend()
        paths.append(save(fig, out / "cost.png"))
    return paths
