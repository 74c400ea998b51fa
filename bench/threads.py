"""Benchmark: greedy decoding and family scoring of the embedded model at 1 vs N torch threads.

Each thread count runs in its own subprocess, one after the other (never two at once), on the
same prompt; optional --busy starts one CPU-burning process beside it to show oversubscription.
Writes the table to docs/benchmarks.md.

    python bench/threads.py [--threads 1 2] [--new-tokens 64] [--busy]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


def worker(threads: int, new_tokens: int) -> dict:
    import torch

    from drafteu import data, estimators, models
    from drafteu.generate import greedy_answer
    from drafteu.posterior import NoisyModel

    models.set_threads(threads)
    lm = models.load("embedded")
    prompt = data.format_prompt(lm.tokenizer, QUESTION)
    greedy_answer(lm.model, lm.tokenizer, prompt, 4)  # warm-up
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    gen_s = time.perf_counter() - t0
    response = out[0, len(prompt):].tolist()
    gt = estimators.GroundTruth(NoisyModel(lm.model), size=3)
    gt.score(prompt, response)  # warm-up
    t0 = time.perf_counter()
    gt.score(prompt, response)
    score_s = time.perf_counter() - t0
    return {"threads": threads, "decode_tok_s": len(response) / gen_s, "score_s": score_s}


def _burn(seconds: float) -> None:
    end = time.time() + seconds
    x = 0
    while time.time() < end:
        x += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--busy", action="store_true", help="run a CPU-burning process beside each run")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.new_tokens)))
        return
    rows = []
    for n in args.threads:
        burner = mp.Process(target=_burn, args=(600,)) if args.busy else None
        if burner:
            burner.start()
        try:
            out = subprocess.run([sys.executable, __file__, "--worker", str(n), "--new-tokens", str(args.new_tokens)],
                                 capture_output=True, text=True, check=True).stdout
        finally:
            if burner:
                burner.terminate()
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1])
    base = rows[0]
    lines = [
        f"`python bench/threads.py{' --busy' if args.busy else ''}` — embedded SmolLM2-135M, greedy decoding of "
        f"{args.new_tokens} tokens, then ground-truth scoring (K = 3 family) of them"
        f"{', with one CPU-burning process beside each run' if args.busy else ', machine otherwise idle'}.",
        "",
        "| threads | decode tokens/s | decode speed vs first row | family scoring (s) | scoring speed vs first row |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['threads']} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f}x | "
                     f"{r['score_s']:.2f} | {base['score_s'] / r['score_s']:.2f}x |")
    section = "\n".join(lines)
    print(section)
    write_section(args.out, "threads-busy" if args.busy else "threads-idle",
                  "Torch threads on this machine", section)


if __name__ == "__main__":
    main()
