"""Training with the prompts' shared prefix run once (`train.share_prefix`) vs every sequence whole.

On a run's own data and draft base, in one process: a DDD draft (the drafts stage's `drafts.run`,
one draft, LoRA on every linear module) and the OSD proxy (`proxy.run`, nothing held out) are
trained for --steps optimizer steps with the option off and on, in the order A B B A (each mode's
time is the mean of its two passes, the training loop's own clock: loading is not counted).
Dropout is off so both modes train to the same weights; the table gives the final losses of both.
Writes the table to docs/benchmarks.md.

    python bench/shared_prefix.py --run runs/demo-gemma3 [--steps 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402


def draft(run: Path, cfg, share: bool, steps: int, tmp: Path) -> dict:
    from drafteu import rundir
    from drafteu.train import drafts
    from drafteu.train.loop import TrainConfig

    d = cfg.drafts
    train = TrainConfig(lr=d.train.lr, max_steps=steps, batch_size=d.train.batch_size, grad_accum=d.train.grad_accum,
                        warmup_steps=1, mixed_precision="no", share_prefix=share or None)
    m = drafts.run(drafts.DraftsConfig(samples=rundir.samples_path(run), out=tmp, base=rundir.base_model(cfg, run),
                                       target=cfg.target, method="ddd", partitions=1, per_partition=1,
                                       lora_r=d.lora_r, lora_alpha=d.lora_alpha, lora_dropout=0.0,
                                       lora_modules=d.lora_modules, train=train, device="cpu"))
    return m["train"]["s0_m0"]


def proxy(run: Path, cfg, share: bool, steps: int, tmp: Path) -> dict:
    from drafteu import rundir
    from drafteu.train import proxy as osd
    from drafteu.train.loop import TrainConfig

    p = cfg.proxy
    train = TrainConfig(lr=p.train.lr, max_steps=steps, batch_size=p.train.batch_size, grad_accum=p.train.grad_accum,
                        warmup_steps=1, weight_decay=p.train.weight_decay, mixed_precision="no",
                        share_prefix=share or None)
    m = osd.run(osd.ProxyConfig(samples=[rundir.samples_path(run)], out=tmp, target=cfg.target, noise=cfg.noise,
                                n_teacher=p.n_teacher, lora_r=p.lora_r, lora_alpha=p.lora_alpha, lora_dropout=0.0,
                                lora_modules=p.lora_modules, heldout=0.0, train=train, device="cpu"))
    return m["train"]


def prefix_share(run: Path, batch_size: int) -> float:
    """The mean fraction of a micro-batch's prompt tokens in its shared prefix (batches in file order)."""
    from drafteu import fileio, rundir
    from drafteu.train.batches import shared_prefix_len

    rows = fileio.read_samples(rundir.samples_path(run))
    shares = []
    for i in range(0, len(rows), batch_size):
        prompts = [r["prompt_ids"] for r in rows[i:i + batch_size]]
        plen = shared_prefix_len(prompts)
        shares.append(plen * len(prompts) / sum(len(p) for p in prompts))
    return sum(shares) / len(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo-gemma3")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    import torch

    from drafteu import hardware
    from drafteu.config import load_experiment

    cfg = load_experiment(args.run / "config.yaml")
    rows = []
    for stage, fn in (("draft (DDD)", draft), ("proxy (OSD)", proxy)):
        got = {False: [], True: []}
        for share in (False, True, True, False):  # A B B A
            with tempfile.TemporaryDirectory() as tmp:
                stats = fn(args.run, cfg, share, args.steps, Path(tmp))
            got[share].append(stats)
            print(stage, "shared" if share else "whole", stats["seconds"], stats["loss"], flush=True)
        secs = {s: sum(x["seconds"] for x in v) / len(v) / args.steps for s, v in got.items()}
        rows.append([stage, f"{secs[False]:.2f}", f"{secs[True]:.2f}", f"{secs[False] / secs[True]:.2f}x",
                     f"{got[False][0]['loss']:.5f}", f"{got[True][0]['loss']:.5f}"])
    cpu = torch.device("cpu")
    batch = cfg.drafts.train.batch_size
    lines = [f"`{' '.join(['python bench/shared_prefix.py', *sys.argv[1:]])}` — target `{cfg.target}`, the run's "
             f"{cfg.data.shots}-shot prompts (the shared prefix is {prefix_share(args.run, batch):.0%} of a "
             f"micro-batch's prompt tokens), {args.steps} optimizer steps per pass, passes A B B A in one process, "
             f"{torch.get_num_threads()} torch threads, float32; this CPU: {hardware.native_bf16(cpu)[1]}. "
             "Seconds per optimizer step from the training loop's clock; LoRA dropout off, so both modes train "
             "the same weights.", "",
             "| stage | s/step, whole sequences | s/step, shared prefix | speed-up | final loss, whole | "
             "final loss, shared |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    section = "\n".join(lines)
    print(section)
    write_section(args.out, "shared-prefix-cpu", "Training with a shared prefix", section)


if __name__ == "__main__":
    main()
