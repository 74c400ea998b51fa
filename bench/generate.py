"""Benchmark: `drafteu generate` throughput at batch 1 vs batch B, with and without the
shared-prefix KV cache, on the same questions in one run (greedy, so every setting produces the
same tokens).  Writes the table to docs/benchmarks.md.

    python bench/generate.py [--questions 16] [--batch 8] [--max-new-tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="embedded")
    ap.add_argument("--task", default="easy-word")
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    from drafteu import fileio, generate, models

    models.load(args.target)  # convert/cache outside the timed runs
    settings = [(1, False), (1, True), (args.batch, False), (args.batch, True)]
    rows, outputs = [], []
    for batch, cache in settings:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = generate.GenerateConfig(
                out=Path(tmp), target=args.target, task=args.task, split="test", questions=args.questions,
                samples=1, temperature=0.0, max_new_tokens=args.max_new_tokens, batch_size=batch,
                prefix_cache=cache,
            )
            t0 = time.perf_counter()
            s = generate.run(cfg)
            wall = time.perf_counter() - t0
            outputs.append([r["response_ids"] for r in fileio.read_jsonl(Path(tmp) / "samples.jsonl")])
        rows.append({"batch": batch, "cache": cache, "samples_s": s["samples_per_s"],
                     "tokens_s": s["tokens_per_s"], "tokens": s["new_tokens"], "wall": wall})
        print(rows[-1])
    same = all(o == outputs[0] for o in outputs)
    base = rows[0]
    lines = [
        f"`python bench/generate.py` — {args.target}, {args.task} test, {args.questions} questions, greedy, "
        f"max {args.max_new_tokens} new tokens, 2-shot prompts; all settings in one run. "
        f"Identical outputs across settings: {'yes' if same else 'NO'}.",
        "",
        "| batch | prefix KV cache | samples/s | tokens/s | speed vs batch 1 without cache |",
        "| ---: | :---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['batch']} | {'yes' if r['cache'] else 'no'} | {r['samples_s']:.2f} | "
                     f"{r['tokens_s']:.1f} | {r['tokens_s'] / base['tokens_s']:.2f}x |")
    section = "\n".join(lines)
    print(section)
    write_section(args.out, "generate-cpu", "generate throughput", section)


if __name__ == "__main__":
    main()
