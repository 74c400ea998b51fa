"""Draft ensembles on the embedded setup: train every stage (skipping finished ones), then measure
the draft base's agreement, the mean JSD per method on held-out responses, the proxy's KL to a
held-out family mean, and each stage's wall time.  Writes the tables to docs/benchmarks.md.

    python bench/ensembles.py --run runs/dev [--methods ddd idd fdd untrained konly]

Expects ``RUN/data/samples.jsonl`` (drafteu generate, train split) and scores held-out responses
from ``--heldout`` (greedy target answers on test questions, e.g. runs/acc-easy/samples.jsonl).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "dev")
    ap.add_argument("--heldout", type=Path, default=ROOT / "runs" / "acc-easy" / "samples.jsonl")
    ap.add_argument("--heldout-n", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=["untrained", "ddd", "idd", "fdd", "konly"])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps per draft")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--teacher-questions", type=int, default=30)
    ap.add_argument("--teacher-samples", type=int, default=2)
    ap.add_argument("--proxy-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    import torch

    from drafteu import estimators, fileio, generate, models
    from drafteu.train import draft_base, drafts, proxy
    from drafteu.train.loop import TrainConfig

    run, samples = args.run, args.run / "data" / "samples.jsonl"
    walls = {}

    def timed(name, fn):
        t0 = time.time()
        out = fn()
        walls[name] = time.time() - t0
        print(f"{name}: {walls[name]:.0f} s", flush=True)
        return out

    base_m = timed("draft base", lambda: draft_base.run(draft_base.DraftBaseConfig(
        samples=samples, out=run / "draft_base", layers=args.layers,
        train=TrainConfig(lr=5e-4, epochs=1.0, batch_size=8, grad_accum=1, warmup_steps=5))))
    train = TrainConfig(lr=args.lr, max_steps=args.steps, batch_size=8, grad_accum=1, warmup_steps=2, save_every=10)
    for method in args.methods:
        timed(f"drafts {method}", lambda m=method: drafts.run(drafts.DraftsConfig(
            samples=samples, out=run / "drafts", base=str(run / "draft_base"), method=m,
            partitions=2, per_partition=3, train=train)))
    for k in range(3):
        timed(f"teacher {k} samples", lambda k=k: generate.run(generate.GenerateConfig(
            out=run / f"teacher{k}", questions=args.teacher_questions, samples=args.teacher_samples, member=k,
            max_new_tokens=96, batch_size=16)))
    proxy_m = timed("proxy (OSD)", lambda: proxy.run(proxy.ProxyConfig(
        samples=[run / f"teacher{k}" / "samples.jsonl" for k in range(3)], out=run / "proxy", heldout=0.2,
        train=TrainConfig(lr=3e-4, max_steps=args.proxy_steps, batch_size=8, grad_accum=1, warmup_steps=2,
                          weight_decay=0.01, save_every=10))))

    # Mean JSD (variance), bias and EU per method on held-out responses, vs ground truth.
    rows = fileio.read_jsonl(args.heldout)[: args.heldout_n]
    from drafteu.posterior import NoisyModel

    gt = estimators.GroundTruth(NoisyModel(models.load("embedded").model), size=3, seed=0)
    truth = [gt.score(r["prompt_ids"], r["response_ids"]).eu for r in rows]
    truth_all = torch.cat(truth)
    table = {}
    for method in args.methods:
        t0 = time.time()
        target = models.load("embedded")  # fresh: the ensemble puts the proxy adapter on it
        ens = estimators.DraftEnsemble(run / "drafts" / method, target, run / "proxy" / "adapter")
        scores = [ens.score(r["prompt_ids"], r["response_ids"]) for r in rows]
        var = torch.cat([s.variance for s in scores])
        bias = torch.cat([s.bias for s in scores])
        eu = var + bias
        from scipy.stats import spearmanr

        table[method] = {
            "jsd": float(var.mean()), "bias": float(bias.mean()), "eu": float(eu.mean()),
            "rmse": float(((eu - truth_all) ** 2).mean().sqrt()),
            "spearman": float(spearmanr(eu.numpy(), truth_all.numpy()).statistic),
            "score_s": time.time() - t0,
        }
        print(method, table[method], flush=True)
        del ens
    tokens = int(truth_all.numel())

    lines = [
        f"`python bench/ensembles.py` — embedded SmolLM2-135M target; draft base = its first {args.layers} of 30 "
        f"layers warmed up by logit distillation on {base_m['train_examples']} target samples "
        f"({base_m['train']['steps']} steps); drafts 2 x 3 LoRA (r 16), {args.steps} steps of 8 sequences each, "
        f"lr {args.lr}; proxy: OSD with 2 fresh teachers per batch, {args.proxy_steps} steps on "
        f"{args.teacher_questions} questions x {args.teacher_samples} samples x 3 noisy teachers. "
        f"Held-out: {len(rows)} greedy target answers to easy-word *test* questions ({tokens} tokens); "
        "ground truth = MI of a fixed K = 3 family (sigma 0.1).",
        "",
        f"Draft base top-1 agreement with the target (teacher-forced, held-out samples): "
        f"{base_m['top1_agreement_before']:.3f} before warm-up, {base_m['top1_agreement_after']:.3f} after.",
        "",
        "| method | mean JSD (variance) | mean bias KL(q_mix ‖ p_mix) | mean EU | RMSE vs truth | Spearman vs truth |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, r in table.items():
        lines.append(f"| {m} | {r['jsd']:.4f} | {r['bias']:.4f} | {r['eu']:.4f} | {r['rmse']:.4f} | "
                     f"{r['spearman']:.3f} |")
    lines += ["", f"Ground-truth mean EU on these tokens: {float(truth_all.mean()):.4f}.", ""]
    h = proxy_m.get("heldout", {})
    if h:
        lines += [
            f"Proxy check ({int(h['tokens'])} held-out teacher-sample tokens, reference = mean of a fixed "
            f"8-member family): KL(p_ref ‖ p_mix) = {h['kl_ref_mean_to_proxy']:.4f} vs "
            f"KL(p_ref ‖ raw target) = {h['kl_ref_mean_to_target']:.4f}.", ""]
    lines += ["| stage | wall time (s) |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in walls.items()]
    section = "\n".join(lines)
    print(section)
    write_section(args.out, "ensembles-embedded", "Draft ensembles on the embedded setup", section)
    (args.run / "ensembles.json").write_text(json.dumps({"methods": table, "walls": walls}, indent=1))


if __name__ == "__main__":
    main()
