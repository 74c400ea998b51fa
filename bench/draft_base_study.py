"""Study: which draft base is to the embedded target what Llama-3.2-1B is to Llama-3.1-8B?

For each recipe (truncation depth x warm-up steps, on target answers to easy-word *train*
questions), the draft base is built by the pipeline's own cached stage
(``pipeline.stage_draft_base`` with ``draft_base.data`` and ``cache``), so a recipe trained here is
re-used by any experiment config with the same recipe.  Each base is then measured on held-out
target answers (easy-word *test* questions, sampled at temperature 1 like the evaluation):

- top-1 agreement with the target (teacher-forced), mean KL(p_target || q) and KL(q || p_target)
  per response token (KL(q || p) is the bias term of one untrained draft against the raw target);
- the ground-truth EU scale on the same tokens: the mean MI of the K = 3 noisy target family
  (sigma from the config), the number the bias term has to come near (issue goal: within 3x);
- cost: CPU-minutes of warm-up training (from the stage manifest: the run that trained it) and the
  draft's decode step relative to the target's (batch 1, prompt cached, median; same process).

    python bench/draft_base_study.py [--recipes 6:120 10:120 15:120 6:240] [--questions 200] [--samples 2]

Writes docs/results/draft-base-study.{md,json} and docs/results/draft_base_study.png.
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


def recipe_config(base: dict, layers: int, steps: int, args) -> dict:
    d = json.loads(json.dumps(base))
    d["draft_base"] = {
        "layers": layers, "heldout": 0.05, "cache": True,
        "data": {"task": "easy-word", "questions": args.questions, "samples": args.samples, "temperature": 1.0,
                 "max_new_tokens": 48, "batch_size": 16, "shots": d["data"].get("shots", 1)},
        "train": {"lr": 5.0e-4, "max_steps": steps, "batch_size": 8, "grad_accum": 1,
                  "warmup_steps": max(2, steps // 10), "save_every": max(10, steps // 4)},
    }
    return d


def step_ms(model, prompt: list[int], reps: int = 15) -> float:
    from drafteu.kvcache import PrefixCache

    dev = next(model.parameters()).device
    c = PrefixCache(model)
    c.feed(prompt, [], 1, dev)
    times = []
    for _ in range(reps + 2):
        t0 = time.perf_counter()
        c.feed(prompt, [100], 1, dev)
        times.append(time.perf_counter() - t0)
        c.rollback(len(prompt))
    return 1000 * statistics.median(times[2:])


def measure(target_lm, draft, held, pad, gt_mi: float, prompt) -> dict:
    import torch

    from drafteu import divergence
    from drafteu.train.draft_base import top1_agreement
    from drafteu.train.loop import collate, window_logits

    kl_pq = kl_qp = n = 0.0
    with torch.no_grad():
        for i in range(0, len(held), 8):
            batch = collate(held[i: i + 8], pad, "cpu")
            p = window_logits(target_lm.model, batch)
            q = window_logits(draft, batch)
            m = batch["loss_mask"]
            kl_pq += float((divergence.kl(p, q) * m).sum())
            kl_qp += float((divergence.kl(q, p) * m).sum())
            n += float(m.sum())
    return {"top1_agreement": top1_agreement(target_lm.model, draft, held, pad), "kl_target_to_draft": kl_pq / n,
            "kl_draft_to_target": kl_qp / n, "bias_over_truth": (kl_qp / n) / gt_mi,
            "step_ms": step_ms(draft, prompt)}


def family_mi(cfg, rows) -> float:
    """Mean ground-truth EU (MI of the K = 3 noisy family) per response token of ``rows``."""
    import torch

    from drafteu import models
    from drafteu.estimators import GroundTruth
    from drafteu.posterior import NoisyModel

    noisy = NoisyModel(models.load(cfg.target).model, cfg.noise)  # its own copy: the noise is injected in place
    gt = GroundTruth(noisy, size=cfg.eval.family_size, seed=cfg.seed)
    return float(torch.cat([gt.score(r["prompt_ids"], r["response_ids"]).eu for r in rows]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="target, noise, shots, seed")
    ap.add_argument("--recipes", nargs="+", default=["6:120", "10:120", "15:120", "6:240"],
                    help="LAYERS:STEPS pairs (truncation depth : warm-up steps)")
    ap.add_argument("--questions", type=int, default=200, help="easy-word train questions the target answers")
    ap.add_argument("--samples", type=int, default=2, help="target answers per question")
    ap.add_argument("--heldout-questions", type=int, default=40, help="easy-word test questions for the measures")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = ap.parse_args()

    import torch

    from drafteu import data, generate, models, pipeline, runio
    from drafteu.config import load_experiment
    from drafteu.train.loop import examples_from_rows

    base = yaml.safe_load(args.config.read_text())
    work = Path(tempfile.mkdtemp(prefix="draft-base-study-"))
    cfg0 = load_experiment(args.config)
    held_dir = models.cache_dir() / "draft_base" / f"study-heldout-{args.heldout_questions}"
    generate.run(generate.GenerateConfig(out=held_dir, target=cfg0.target, task="easy-word", split="test",
                                         questions=args.heldout_questions, samples=1, temperature=1.0,
                                         max_new_tokens=48, batch_size=16, shots=cfg0.data.shots, seed=cfg0.seed))
    rows = runio.read_samples(held_dir / "samples.jsonl")
    target = models.load(cfg0.target)
    held = examples_from_rows(rows, target.tokenizer.eos_token_id)
    pad = target.tokenizer.pad_token_id
    gt_mi = family_mi(cfg0, rows)
    prompt = data.format_prompt(target.tokenizer, rows[0]["question"], data.shots_for("easy-word", cfg0.data.shots))
    target_step = step_ms(target.model, prompt)
    results = []
    try:
        recipes = [tuple(int(x) for x in r.split(":")) for r in args.recipes]
    except ValueError:
        ap.error(f"--recipes takes LAYERS:STEPS pairs such as 6:120, got {args.recipes}")
    for layers, steps in recipes:
        path = work / f"L{layers}-s{steps}.yaml"
        path.write_text(yaml.safe_dump(recipe_config(base, layers, steps, args)))
        cfg = load_experiment(path)
        t0 = time.time()
        manifest = pipeline.stage_draft_base(cfg, work / f"run-L{layers}-s{steps}")
        print(f"L{layers} s{steps}: {'re-used' if manifest['cache']['reused'] else 'trained'} "
              f"({time.time() - t0:.0f} s)", flush=True)
        draft = models.load(str(work / f"run-L{layers}-s{steps}" / "draft_base")).model
        row = {"layers": layers, "steps": steps, "train_minutes": manifest["seconds"] / 60,
               "params_m": manifest["parameters"] / 1e6, "cache": manifest["cache"]["path"],
               **measure(target, draft, held, pad, gt_mi, prompt)}
        row["step_vs_target"] = row["step_ms"] / target_step
        results.append(row)
        print(json.dumps(row), flush=True)
        del draft
    shallowest = min(layers for layers, _ in recipes)
    untrained = models.truncate_layers(target.model, shallowest)
    ref = {"layers": shallowest, "steps": 0, "train_minutes": 0.0,
           "params_m": sum(p.numel() for p in untrained.parameters()) / 1e6, "cache": None,
           **measure(target, untrained, held, pad, gt_mi, prompt)}
    ref["step_vs_target"] = ref["step_ms"] / target_step
    results.insert(0, ref)
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
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for layers in sorted({r["layers"] for r in results if r["steps"]}):
        pts = [r for r in results if r["layers"] == layers and r["steps"]]
        for ax, key in zip(axes, ("top1_agreement", "kl_draft_to_target", "bias_over_truth"), strict=True):
            ax.plot([r["train_minutes"] for r in pts], [r[key] for r in pts], "o-", label=f"{layers} layers")
    for ax, title in zip(axes, ("top-1 agreement with the target", "KL(q || p_target), nats/token",
                                "bias term / ground-truth EU"), strict=True):
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
        f"step {target_step:.1f} ms (batch 1, prompt cached). Steps 0 = the truncated target, untrained.", "",
        "| layers | warm-up steps | training (CPU-min) | params (M) | top-1 agreement | KL(p ‖ q) | KL(q ‖ p) = bias "
        "term of one draft | bias / ground truth | decode step vs target |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(f"| {r['layers']} | {r['steps']} | {r['train_minutes']:.1f} | {r['params_m']:.0f} | "
                     f"{r['top1_agreement']:.3f} | {r['kl_target_to_draft']:.3f} | {r['kl_draft_to_target']:.3f} | "
                     f"{r['bias_over_truth']:.0f}x | {r['step_vs_target']:.2f} |")
    lines += ["", "![draft-base study](draft_base_study.png)", ""]
    (args.out / "draft-base-study.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
