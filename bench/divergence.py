"""Benchmark: `eu_decomposition`'s eager-chunked and compiled paths against a naive one-shot
implementation and against the memory-traffic floor.

K drafts x T positions x V vocabulary, bf16 logits (what models emit).  Implementations:
``naive`` (every intermediate a full float32 tensor), ``chunked`` (drafteu's eager path, the CPU
default), ``compiled`` (drafteu's torch.compile path, the CUDA default; one warm-up call compiles
it before timing) and ``floor`` (one read of the inputs: a bf16 -> float32 sum, the least any
implementation must do).  Each (implementation, T, V) runs in its own subprocess so that peak
memory (max RSS above the RSS after the inputs exist; on CUDA max allocated) is measured cleanly;
time is the median of --repeats runs after a warm-up.  All run in the same invocation, so the
ratios compare like with like.  Writes the table to docs/benchmarks.md.

    python bench/divergence.py [--vocab 49152 128256] [--k 6] [--t 1024] [--device cpu] [--impl ...]
    python bench/divergence.py --device cuda --t 1024 4096      # the GPU goal: compiled <= 3x floor
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def naive(q, p):
    """The textbook one-shot version: every intermediate is a full (K, T, V) float32 tensor."""
    import torch

    logq = torch.log_softmax(q.float(), -1)
    logp = torch.log_softmax(p.float(), -1)
    qk = logq.exp()
    mix = qk.mean(0)
    logmix = mix.log()
    variance = (qk * (logq - logmix)).sum(-1).mean(0)
    bias = (mix * (logmix - logp)).sum(-1)
    return variance, bias


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> None:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def floor(q, p):
    """One read of every input element (a reduction): the memory traffic any implementation needs."""
    return q.sum(), p.sum()  # float32 accumulation inside the kernel, no float32 copy


def worker(impl: str, k: int, t: int, v: int, repeats: int, device: str) -> dict:
    import os

    os.environ["DRAFTEU_DIVERGENCE"] = "compiled" if impl == "compiled" else "eager"
    import torch

    from drafteu.divergence import eu_decomposition

    gen = torch.Generator().manual_seed(0)
    q = torch.empty(k, t, v, dtype=torch.bfloat16)
    p = torch.empty(t, v, dtype=torch.bfloat16)
    for j in range(0, t, 16):  # fill in small blocks: no large float32 temporaries
        for i in range(k):
            q[i, j : j + 16] = torch.randn(q[i, j : j + 16].shape, generator=gen) * 3
        p[j : j + 16] = torch.randn(p[j : j + 16].shape, generator=gen) * 3
    q, p = q.to(device), p.to(device)
    fns = {"naive": lambda: naive(q, p), "floor": lambda: floor(q, p),
           "chunked": lambda: tuple(eu_decomposition(q, p))[:2], "compiled": lambda: tuple(eu_decomposition(q, p))[:2]}
    fn = fns[impl]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if impl in ("compiled", "floor") or device.startswith("cuda"):
        fn()  # warm-up (compiles); naive / chunked on a CPU skip it to keep the peak-memory reading clean
        sync()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_bytes()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    return {
        "impl": impl, "vocab": v, "seconds": statistics.median(times), "peak_bytes": peak,
        "variance_mean": out[0].float().mean().item(), "bias_mean": out[1].float().mean().item(),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--t", type=int, nargs="+", default=[1024])
    ap.add_argument("--impl", nargs="+", default=["naive", "chunked", "compiled", "floor"],
                    choices=["naive", "chunked", "compiled", "floor"])
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--worker", nargs=3, metavar=("IMPL", "T", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, t, v = args.worker
        print(json.dumps(worker(impl, args.k, int(t), int(v), args.repeats, args.device)))
        return

    table = [
        f"`{('python bench/divergence.py ' + shown_args()).strip()}` — K = {args.k}, bf16 logits, device "
        f"{args.device}, median of {args.repeats} after a warm-up (naive / chunked on a CPU: no warm-up); "
        f"{platform.processor() or platform.machine()}. Time and peak memory per implementation; the ratio "
        "columns divide by the floor (one read of the inputs), so 1.0x is the memory-traffic limit; "
        "|Δ| = largest difference of the mean variance / bias from the naive (or chunked) result.",
        "",
        "| T | V | " + " | ".join(f"{i} (ms)" for i in args.impl) + " | "
        + " | ".join(f"{i} / floor" for i in args.impl if i != "floor") + " | "
        + " | ".join(f"{i} peak (MiB)" for i in args.impl if i != "floor") + " | |Δ| |",
        "| ---: | ---: | " + " | ".join("---:" for _ in range(3 * len(args.impl) - 2 * ("floor" in args.impl) + 1))
        + " |",
    ]
    for t in args.t:
        for v in args.vocab:
            res = {}
            for impl in args.impl:  # one at a time: never two torch processes at once
                cmd = [sys.executable, __file__, "--worker", impl, str(t), str(v), "--k", str(args.k),
                       "--repeats", str(args.repeats), "--device", args.device]
                run = subprocess.run(cmd, capture_output=True, text=True)
                if run.returncode != 0:
                    tail = (run.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"T={t} V={v} {impl}: failed ({tail})")
                    res[impl] = None
                    continue
                res[impl] = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"T={t} V={v} {impl}: {res[impl]['seconds'] * 1000:.1f} ms, "
                      f"peak +{res[impl]['peak_bytes'] / 2**20:.0f} MiB", flush=True)
            fl = res.get("floor")
            ref = res.get("naive") or res.get("chunked")
            means = [r for i, r in res.items() if r is not None and i != "floor"]
            agree = max((max(abs(r["variance_mean"] - ref["variance_mean"]), abs(r["bias_mean"] - ref["bias_mean"]))
                         for r in means), default=0.0) if ref else float("nan")

            def cell(r, f):
                return "failed (out of memory?)" if r is None else f(r)
            row = [str(t), str(v)]
            row += [cell(res[i], lambda r: f"{r['seconds'] * 1000:.1f}") for i in args.impl]
            row += [cell(res[i], lambda r, fl=fl: f"{r['seconds'] / fl['seconds']:.1f}x" if fl else "—")
                    for i in args.impl if i != "floor"]
            row += [cell(res[i], lambda r: f"{r['peak_bytes'] / 2**20:.0f}") for i in args.impl if i != "floor"]
            row.append(f"{agree:.1e}")
            table.append("| " + " | ".join(row) + " |")
    section = "\n".join(table)
    print(section)
    write_section(args.out, f"divergence-{args.device.split(':')[0]}", "eu_decomposition: naive, chunked, compiled "
                  "and the memory-traffic floor", section)


def shown_args() -> str:
    """The command line as run, without --out (where the table goes is not part of the measurement)."""
    argv, shown = sys.argv[1:], []
    while argv:
        a = argv.pop(0)
        if a == "--out":
            argv.pop(0)
        elif not a.startswith("--out="):
            shown.append(a)
    return " ".join(shown)


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between markers ``key`` in ``path``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title} ({key.split('-')[-1]})\n\n{body}\n{end}"
    head = "# Benchmarks\n\nNumbers measured by the scripts in `bench/`; each table says how.\n"
    text = path.read_text() if path.exists() else head
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
