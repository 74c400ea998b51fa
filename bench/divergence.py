"""Benchmark: chunked `eu_decomposition` against a naive one-shot implementation.

K drafts x T positions x V vocabulary, bf16 logits (what models emit).  Each (implementation, V)
runs in its own subprocess so that peak memory (max RSS above the RSS after the inputs exist)
is measured cleanly; time is the median of --repeats runs.  Both implementations run in the same
invocation, so the ratios compare like with like.  Writes the table to docs/benchmarks.md.

    python bench/divergence.py [--vocab 49152 128256] [--k 6] [--t 1024] [--device cpu]
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


def worker(impl: str, k: int, t: int, v: int, repeats: int, device: str) -> dict:
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
    fn = (lambda: naive(q, p)) if impl == "naive" else (lambda: tuple(eu_decomposition(q, p))[:2])
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
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
    ap.add_argument("--t", type=int, default=1024)
    ap.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "VOCAB"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        impl, v = args.worker
        print(json.dumps(worker(impl, args.k, args.t, int(v), args.repeats, args.device)))
        return

    rows = []
    for v in args.vocab:
        res = {}
        for impl in ("naive", "chunked"):  # one at a time: never two torch processes at once
            cmd = [sys.executable, __file__, "--worker", impl, str(v), "--k", str(args.k),
                   "--t", str(args.t), "--repeats", str(args.repeats), "--device", args.device]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[impl] = json.loads(out.strip().splitlines()[-1])
            print(f"V={v} {impl}: {res[impl]['seconds']:.3f} s, peak +{res[impl]['peak_bytes'] / 2**20:.0f} MiB")
        n, c = res["naive"], res["chunked"]
        agree = max(abs(n["variance_mean"] - c["variance_mean"]), abs(n["bias_mean"] - c["bias_mean"]))
        rows.append((v, n, c, agree))

    table = [
        f"`python bench/divergence.py` — K = {args.k}, T = {args.t}, bf16 logits, device {args.device}, "
        f"{rows[0][1]['threads']} torch threads, median of {args.repeats}; {platform.processor() or platform.machine()}.",
        "",
        "| V | naive time (s) | chunked time (s) | time ratio naive/chunked | naive peak (MiB) | chunked peak (MiB) | memory ratio naive/chunked | mean abs diff of means |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v, n, c, agree in rows:
        table.append(
            f"| {v} | {n['seconds']:.3f} | {c['seconds']:.3f} | {n['seconds'] / c['seconds']:.2f}x | "
            f"{n['peak_bytes'] / 2**20:.0f} | {c['peak_bytes'] / 2**20:.0f} | "
            f"{n['peak_bytes'] / max(c['peak_bytes'], 1):.1f}x | {agree:.1e} |"
        )
    section = "\n".join(table)
    print(section)
    write_section(args.out, f"divergence-{args.device.split(':')[0]}", "eu_decomposition: chunked vs naive", section)


def write_section(path: Path, key: str, title: str, body: str) -> None:
    """Replace (or append) the section between markers ``key`` in ``path``."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    block = f"{start}\n## {title} ({key.split('-')[-1]})\n\n{body}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nNumbers measured by the scripts in `bench/`; each table says how.\n"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    main()
