"""Benchmark: LoRA draft training throughput, bf16 autocast vs float32, same data, same run.

Each setting trains the same LoRA draft (all linear modules, r 16) on the same target samples
for --steps optimizer steps in its own subprocess, one after the other; tokens/s counts prompt
and response tokens.  Writes the table to docs/benchmarks.md.

    python bench/train_throughput.py --samples runs/dev/data/samples.jsonl --base runs/dev/draft_base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402


def worker(samples: Path, base: str, precision: str, steps: int) -> dict:
    import torch

    from drafteu.train import drafts
    from drafteu.train.loop import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        m = drafts.run(drafts.DraftsConfig(samples=samples, out=Path(tmp), base=base, method="idd", partitions=1,
                                           per_partition=1, train=TrainConfig(lr=5e-4, max_steps=steps, batch_size=8,
                                                                              grad_accum=1, warmup_steps=1,
                                                                              mixed_precision=precision)))
    return {"precision": precision, "threads": torch.get_num_threads(), **m["train"]["s0_m0"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=Path, default=ROOT / "runs" / "dev" / "data" / "samples.jsonl")
    ap.add_argument("--base", default=str(ROOT / "runs" / "dev" / "draft_base"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.samples, args.base, args.worker, args.steps)))
        return
    rows = []
    for precision in ("no", "bf16"):
        out = subprocess.run([sys.executable, __file__, "--worker", precision, "--samples", str(args.samples),
                              "--base", args.base, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    import torch

    from drafteu import hardware

    cpu = torch.device("cpu")
    auto, why = hardware.resolve_mixed_precision("auto", cpu)
    base = rows[0]["tokens_per_s"]
    lines = [f"`{' '.join(['python bench/train_throughput.py', *sys.argv[1:]])}` — LoRA (r 16, all linear) on "
             f"the embedded draft base, {args.steps} steps of 8 target samples, {rows[0]['threads']} torch threads, "
             f"one setting at a time. This CPU: {hardware.native_bf16(cpu)[1]}; `mixed_precision: auto` resolves "
             f"to **{'bf16 autocast' if auto == 'bf16' else 'float32'}** here.", "",
             "| precision | tokens/s | speed vs float32 | final loss |", "| --- | ---: | ---: | ---: |"]
    for r in rows:
        name = "float32" if r["precision"] == "no" else "bf16 autocast"
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x | {r['loss']:.4f} |")
    section = "\n".join(lines)
    print(section)
    capability = hardware.native_bf16(cpu)[0]
    key = "train-cpu" if capability else "train-cpu-no-native-bf16"
    title = "Draft training throughput" + ("" if capability else ", a CPU without native bf16")
    write_section(args.out, key, title, section)


if __name__ == "__main__":
    main()
