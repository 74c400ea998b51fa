"""Study: which draft base is to the embedded target what Llama-3.2-1B is to Llama-3.1-8B?

For each recipe (truncation depth x warm-up steps x distillation data: target answers to easy-word
*train* questions, or to GSM8K train questions with the same token budget), the draft base is built by the
pipeline's own cached stage (``pipeline.stage_draft_base`` with ``draft_base.data`` and ``cache``), so a recipe
trained here is re-used by any experiment config with the same recipe.  Each base is then measured on held-out
target answers (easy-word *test* questions, sampled at temperature 1 like the evaluation):

- top-1 agreement with the target (teacher-forced), mean KL(p_target || q) and KL(q || p_target)
  per response token (KL(q || p) is the bias term of one untrained draft against the raw target);
- the ground-truth EU scale on the same tokens: the mean MI of the K = 3 noisy target family
  (sigma from the config), the number the bias term has to come near (issue goal: within 3x);
- cost: CPU-minutes of warm-up training (from the stage manifest: the run that trained it) and the
  draft's decode step relative to the target's (batch 1, prompt cached, median; same process).

    python bench/draft_base_study.py [--recipes 6:120 10:120 15:120 6:240 6:120:gsm8k] [--questions 200]

Writes docs/results/draft-base-study.{md,json} and docs/results/draft_base_study.png; text from a
"## Reading" heading on in an existing draft-base-study.md is kept.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from divergence import shown_args  # noqa: E402

DATA = ("word", "gsm8k")
READING = "## Reading"


def recipe_config(base: dict, layers: int, steps: int, source: str, args) -> dict:
    d = json.loads(json.dumps(base))
    d["draft_base"] = {
        "layers": layers, "heldout": 0.05, "cache": True,
        "data": {"task": "easy-word" if source == "word" else str(args.gsm8k), "questions": args.questions,
                 "samples": args.samples, "temperature": 1.0,
                 "max_new_tokens": 48, "batch_size": 16, "shots": d["data"].get("shots", 1)},
        "train": {"lr": 5.0e-4, "max_steps": steps, "batch_size": 8, "grad_accum": 1,
                  "warmup_steps": max(2, steps // 10), "save_every": max(10, steps // 4)},
    }
    return d


def step_ms(models_: dict, prompt: list[int], reps: int = 21) -> dict[str, float]:
    """Median decode step (batch 1, prompt cached) of each model, the models' steps interleaved so
    that a slow spell of the machine hits all of them alike."""
    import torch

    from drafteu.kvcache import PrefixCache

    caches = {}
    for name, model in models_.items():
        caches[name] = PrefixCache(model)
        caches[name].feed(prompt, [], 1, next(model.parameters()).device)
    times = {name: [] for name in models_}
    with torch.no_grad():
        for _ in range(reps + 2):
            for name, c in caches.items():
                t0 = time.perf_counter()
                c.feed(prompt, [100], 1, next(models_[name].parameters()).device)
                times[name].append(time.perf_counter() - t0)
                c.rollback(len(prompt))
    return {name: 1000 * statistics.median(t[2:]) for name, t in times.items()}


def measure(target_lm, draft, held, pad, truth, prompt) -> dict:
    """Agreement, both KLs per response token, and the one-draft bias term KL(q || p_target) against
    the ground-truth EU ``truth`` (per-token tensors of the held-out answers, in order): its mean
    ratio, Spearman and RMSE.  With drafts this far from the target, every draft method's EU is
    almost all bias term (embedded study: 1.564 of DDD's 1.566 nats), so these are what DDD's
    fidelity can reach on this base."""
    import torch

    from drafteu import divergence
    from drafteu.evaluate.fidelity import rmse, spearman
    from drafteu.train.draft_base import top1_agreement
    from drafteu.train.loop import collate, window_logits

    kl_pq, kl_qp = [], []
    with torch.no_grad():
        for i in range(0, len(held), 8):
            chunk = held[i: i + 8]
            batch = collate(chunk, pad, "cpu")
            p = window_logits(target_lm.model, batch)
            q = window_logits(draft, batch)
            pq, qp = divergence.kl(p, q), divergence.kl(q, p)
            for j, e in enumerate(chunk):  # left-padded: row j's response is the last len(...) positions
                kl_pq.append(pq[j, pq.shape[1] - len(e.response_ids):])
                kl_qp.append(qp[j, qp.shape[1] - len(e.response_ids):])
    pq, qp, gt = torch.cat(kl_pq).double().numpy(), torch.cat(kl_qp).double().numpy(), torch.cat(truth).double().numpy()
    steps = step_ms({"draft": draft, "target": target_lm.model}, prompt)
    return {"top1_agreement": top1_agreement(target_lm.model, draft, held, pad), "kl_target_to_draft": float(pq.mean()),
            "kl_draft_to_target": float(qp.mean()), "bias_over_truth": float(qp.mean() / gt.mean()),
            "bias_spearman": spearman(qp, gt), "bias_rmse": rmse(qp, gt),
            "step_ms": steps["draft"], "target_step_ms": steps["target"],
            "step_vs_target": steps["draft"] / steps["target"]}


def training_minutes(manifest: dict) -> dict:
    """CPU-minutes of the whole recipe from its stage manifest.  A run resumed after a kill measured
    only its own part: the time before the kill is added when the checkpoint recorded it, else the
    part is scaled to every step and marked as an estimate."""
    minutes, train = manifest["seconds"] / 60, manifest.get("train", {})
    resumed = train.get("resumed_from")
    if not resumed:
        return {"train_minutes": minutes, "minutes_estimated": False}
    if train.get("seconds") is not None:
        return {"train_minutes": minutes + (train["seconds"] - train["seconds_this_run"]) / 60,
                "minutes_estimated": False}
    return {"train_minutes": minutes * train["steps"] / (train["steps"] - resumed), "minutes_estimated": True}


def family_mi(cfg, rows) -> list:
    """Ground-truth EU (MI of the K = 3 noisy family) per response token of each of ``rows``."""
    from drafteu import models
    from drafteu.estimators import GroundTruth
    from drafteu.posterior import NoisyModel

    noisy = NoisyModel(models.load(cfg.target).model, cfg.noise)  # its own copy: the noise is injected in place
    gt = GroundTruth(noisy, size=cfg.eval.family_size, seed=cfg.seed)
    out = [gt.score(r["prompt_ids"], r["response_ids"]).eu for r in rows]
    assert all(len(e) == len(r["response_ids"]) for e, r in zip(out, rows, strict=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="target, noise, shots, seed")
    ap.add_argument("--recipes", nargs="+", default=["6:120", "10:120", "15:120", "6:240", "6:120:gsm8k"],
                    help="LAYERS:STEPS[:DATA] (truncation depth : warm-up steps : word (default) or gsm8k)")
    ap.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl",
                    help="GSM8K train jsonl for the gsm8k data recipes")
    ap.add_argument("--questions", type=int, default=200, help="easy-word train questions the target answers")
    ap.add_argument("--samples", type=int, default=2, help="target answers per question")
    ap.add_argument("--heldout-questions", type=int, default=40, help="easy-word test questions for the measures")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()

    import torch

    from drafteu import data, fileio, generate, models, pipeline
    from drafteu.config import load_experiment
    from drafteu.train.loop import examples_from_rows

    base = yaml.safe_load(args.config.read_text())
    work = Path(tempfile.mkdtemp(prefix="draft-base-study-"))
    cfg0 = load_experiment(args.config)
    held_dir = models.cache_dir() / "draft_base" / f"study-heldout-{args.heldout_questions}"
    generate.run(generate.GenerateConfig(out=held_dir, target=cfg0.target, task="easy-word", split="test",
                                         questions=args.heldout_questions, samples=1, temperature=1.0,
                                         max_new_tokens=48, batch_size=16, shots=cfg0.data.shots, seed=cfg0.seed))
    rows = fileio.read_samples(held_dir / "samples.jsonl")
    target = models.load(cfg0.target)
    rows = [r for r in rows if r["response_ids"]]
    held = examples_from_rows(rows, None)  # the answers' own tokens, aligned with the ground truth's
    pad = target.tokenizer.pad_token_id
    truth = family_mi(cfg0, rows)
    gt_mi = float(torch.cat(truth).mean())
    prompt = data.format_prompt(target.tokenizer, rows[0]["question"], data.shots_for("easy-word", cfg0.data.shots))
    results = []
    recipes = []
    for r in args.recipes:
        parts = r.split(":")
        source = parts[2] if len(parts) == 3 else "word"
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts[:2]) or source not in DATA:
            ap.error(f"--recipes takes LAYERS:STEPS[:DATA] such as 6:120 or 6:120:gsm8k (DATA: {', '.join(DATA)}), "
                     f"got {r!r}")
        recipes.append((int(parts[0]), int(parts[1]), source))
    if any(s == "gsm8k" for *_, s in recipes) and not args.gsm8k.is_file():
        ap.error(f"--gsm8k {args.gsm8k} not found: pass the GSM8K train jsonl")
    for layers, steps, source in recipes:
        name = f"L{layers}-s{steps}-{source}"
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(recipe_config(base, layers, steps, source, args)))
        cfg = load_experiment(path)
        t0 = time.time()
        manifest = pipeline.stage_draft_base(pipeline.context(cfg, work / f"run-{name}", "draft_base"))
        print(f"{name}: {'re-used' if manifest['cache']['reused'] else 'trained'} ({time.time() - t0:.0f} s)",
              flush=True)
        draft = models.load(str(work / f"run-{name}" / "draft_base")).model
        row = {"layers": layers, "steps": steps, "data": source, **training_minutes(manifest),
               "params_m": manifest["parameters"] / 1e6, "cache": manifest["cache"]["path"],
               **measure(target, draft, held, pad, truth, prompt)}
        results.append(row)
        print(json.dumps(row), flush=True)
        del draft
    shallowest = min(layers for layers, *_ in recipes)
    untrained = models.truncate_layers(target.model, shallowest)
    ref = {"layers": shallowest, "steps": 0, "data": "-", "train_minutes": 0.0, "minutes_estimated": False,
           "params_m": sum(p.numel() for p in untrained.parameters()) / 1e6, "cache": None,
           **measure(target, untrained, held, pad, truth, prompt)}
    results.insert(0, ref)
    target_step = statistics.median(r["target_step_ms"] for r in results)
    write(args, results, gt_mi, target_step, len(rows), sum(len(e.response_ids) for e in held), torch.get_num_threads())


def write(args, results, gt_mi, target_step, n_rows, n_tokens, threads) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "draft-base-study.json").write_text(json.dumps(
        {"command": f"python bench/draft_base_study.py {shown_args()}".strip(), "ground_truth_mi": gt_mi,
         "target_step_ms": target_step, "heldout_answers": n_rows, "heldout_tokens": n_tokens, "threads": threads,
         "recipes": results}, indent=1))
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for layers, source in sorted({(r["layers"], r["data"]) for r in results if r["steps"]}):
        pts = sorted((r for r in results if r["layers"] == layers and r["data"] == source and r["steps"]),
                     key=lambda r: r["steps"])
        label = f"{layers} layers" + (", GSM8K data" if source == "gsm8k" else "")
        for ax, key in zip(axes, ("top1_agreement", "kl_draft_to_target", "bias_over_truth", "bias_spearman"),
                           strict=True):
            ax.plot([r["train_minutes"] for r in pts], [r[key] for r in pts], "o-" if source == "word" else "s--",
                    label=label)
    for ax, title in zip(axes, ("top-1 agreement with the target", "KL(q || p_target), nats/token",
                                "bias term / ground-truth EU", "Spearman: bias term vs ground-truth EU"), strict=True):
        ax.set_xlabel("warm-up training, CPU-minutes")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[2].axhline(3.0, color="k", ls="--", lw=0.8)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "draft_base_study.png", dpi=120)
    lines = [
        "# Draft-base study (embedded target)", "",
        f"`python bench/draft_base_study.py {shown_args()}`".replace(" `", "`") + f" — {threads} CPU threads. "
        f"Held-out: {n_rows} target answers to easy-word test questions ({n_tokens} response tokens, temperature 1). "
        f"Ground-truth EU on those tokens (MI of the K = 3 noisy family): **{gt_mi:.4f} nats/token**. Target decode "
        f"step {target_step:.1f} ms (batch 1, prompt cached; median over recipes, each draft timed interleaved with "
        "the target). Steps 0 = the truncated target, untrained. ≈: a recipe resumed after a kill whose checkpoint "
        "predates recording the time before it; its measured part scaled to all steps.", "",
        "| layers | warm-up steps | data | training (CPU-min) | params (M) | top-1 agreement | KL(p ‖ q) | KL(q ‖ p) = "
        "bias term of one draft | bias / ground truth | Spearman vs "
        "ground truth | RMSE vs ground truth | decode step vs target |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        data_name = {"word": "easy-word", "gsm8k": "GSM8K", "-": "-"}[r["data"]]
        approx = "≈ " if r["minutes_estimated"] else ""
        lines.append(f"| {r['layers']} | {r['steps']} | {data_name} | {approx}{r['train_minutes']:.1f} | "
                     f"{r['params_m']:.0f} | {r['top1_agreement']:.3f} | {r['kl_target_to_draft']:.3f} | "
                     f"{r['kl_draft_to_target']:.3f} | {r['bias_over_truth']:.0f}x | {r['bias_spearman']:.3f} | "
                     f"{r['bias_rmse']:.3f} | {r['step_vs_target']:.2f} |")
    lines += ["", "![draft-base study](draft_base_study.png)", ""]
    md = args.out / "draft-base-study.md"
    kept = md.read_text().partition(READING)[1:] if md.exists() else ("", "")
    md.write_text("\n".join(lines) + ("\n" + "".join(kept) if kept[0] else ""))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
