"""`drafteu serve` under load: throughput and p50 / p99 latency at 1, 4 and 16 concurrent clients, with
the EU and without it (the same server; a request's ``"eu": false`` skips the scoring), all on loopback.

    python bench/serve.py                          # noisy copies of the embedded target as drafts
    python bench/serve.py --drafts runs/demo       # a reproduce run's drafts
    python bench/serve.py --backend vllm           # generation on vLLM's async engine (in vLLM's environment)

Each client sends ``--requests`` chat completions one after another (``--max-tokens`` each, greedy);
clients of one setting start together.  The table goes to docs/benchmarks.md (serve-cpu / serve-cuda).
Goals on a CPU: the EU costs <= 20% of a request's latency with one client, and batching makes 16
clients' throughput >= 2x one client's.  Then memory: the server's resident set before and after one
long `/v1/score` (``--score-tokens`` response tokens), and its peak, read from /proc (Linux).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, shown_args, write_section  # noqa: E402

QUESTIONS = ["Tom has 3 apples and buys 4 more. How many apples does he have?",
             "A box holds 6 pens. How many pens are in 5 boxes?",
             "Sara had 9 pencils and gave 2 away. How many are left?",
             "What is 12 plus 30?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_ensemble(root: Path) -> Path:
    """K = 4 noisy copies of the embedded target (no training)."""
    from drafteu import fileio
    from drafteu.train import drafts

    fileio.append_jsonl(root / "samples.jsonl", [{"qid": "q0", "sample": 0, "prompt_ids": [1], "response_ids": [2],
                                                 "correct": True, "finish": "eos"}])
    drafts.run(drafts.DraftsConfig(samples=root / "samples.jsonl", out=root / "drafts", base="embedded",
                                   target="embedded", method="untrained", partitions=1, per_partition=4))
    return root / "drafts" / "untrained"


async def clients(url: str, concurrency: int, requests: int, max_tokens: int,
                  eu: bool) -> tuple[list[float], int, float]:
    """(latencies, completion tokens, wall seconds) of ``concurrency`` clients x ``requests`` each."""
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        async def user(u: int):
            out = []
            for r in range(requests):
                t0 = time.perf_counter()
                resp = await client.post("/v1/chat/completions", json={
                    "model": "bench", "max_tokens": max_tokens, "temperature": 0, "eu": eu,
                    "messages": [{"role": "user", "content": QUESTIONS[(u + r) % len(QUESTIONS)]}]})
                resp.raise_for_status()
                out.append((time.perf_counter() - t0, resp.json()["usage"]["completion_tokens"]))
            return out

        t0 = time.perf_counter()
        done = await asyncio.gather(*(user(u) for u in range(concurrency)))
        wall = time.perf_counter() - t0
    flat = [x for d in done for x in d]
    return [x for x, _ in flat], sum(t for _, t in flat), wall


def _rss_gb() -> tuple[float, float]:
    """(resident, peak resident) of this process in GB, from /proc/self/status (NaN elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return tuple(int(fields[k].split()[0]) / 1e6 for k in ("VmRSS", "VmHWM"))
    except (OSError, KeyError, ValueError):
        return float("nan"), float("nan")


def long_score(url: str, tokens: int) -> dict:
    """One `/v1/score` of a response of about ``tokens`` tokens: the resident set before, after and
    at its peak (the server runs in this process)."""
    import httpx

    response = " ".join(f"{i} apples and {i + 1} pears make {2 * i + 1} fruits." for i in range(tokens // 12 + 1))
    before, _ = _rss_gb()
    resp = httpx.post(url + "/v1/score", timeout=1200, json={"model": "bench", "question": QUESTIONS[0],
                                                             "response": response})
    resp.raise_for_status()
    after, peak = _rss_gb()
    return {"tokens": len(resp.json()["tokens"]), "before": before, "after": after, "peak": peak}


def measure(args, drafts_dir: Path, engine: str) -> tuple[list[str], dict, dict]:
    """One server with ``--engine engine``: (table rows, {(clients, eu): p50 / p99 / rps / tps}, memory)."""
    import httpx
    import uvicorn

    from drafteu.serve import ServeConfig, build

    port = _free_port()
    cfg = ServeConfig(drafts=drafts_dir, target=args.target, port=port, model_name="bench", device=args.device,
                      max_concurrency=max(args.concurrency), max_queue=4 * max(args.concurrency), backend=args.backend,
                      # the long /v1/score's client waits as long (a 2-core CPU shared with vLLM's engine needs it)
                      engine=engine, gamma=args.gamma, timeout=1200.0)
    worker, app = build(cfg)
    worker.start()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    for eu in (True, False):  # warm-up (both decoders of the speculative engine)
        asyncio.run(clients(url, 1, 1, args.max_tokens, eu))
    rows, per = [], {}
    for c in args.concurrency:
        for eu in (True, False):  # interleaved per concurrency: machine noise hits both alike
            lat, tokens, wall = asyncio.run(clients(url, c, args.requests, args.max_tokens, eu))
            lat.sort()
            p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
            per[c, eu] = {"p50": statistics.median(lat), "p99": p99, "rps": len(lat) / wall, "tps": tokens / wall}
            rows.append(f"| {engine} | {c} | {'on' if eu else 'off'} | {len(lat)} | {per[c, eu]['rps']:.2f} | "
                        f"{per[c, eu]['tps']:.1f} | {per[c, eu]['p50']:.2f} | {p99:.2f} |")
            print(rows[-1], flush=True)
    mem = long_score(url, args.score_tokens) if args.score_tokens else None
    server.should_exit = True
    worker.stop()
    return rows, per, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafts", type=Path, help="a run or drafts directory (default: "
                                                "4 noisy copies of the embedded target)")
    ap.add_argument("--target", default="embedded")
    ap.add_argument("--engine", nargs="+", default=["batched"], choices=["batched", "speculative"],
                    help="serve's engines to measure, one server after the other (same requests)")
    ap.add_argument("--gamma", type=int, default=2, help="the speculative engine's tokens proposed per round")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="hf", help="generation: hf (the batched engine's static batches) or vllm "
                                                    "(vLLM's async engine: continuous batching)")
    ap.add_argument("--score-tokens", type=int, default=3151, help="response tokens of the long /v1/score (0: skip)")
    ap.add_argument("--json", type=Path, help="also write every number here")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    import json

    import torch

    tmp = tempfile.TemporaryDirectory()
    drafts_dir = args.drafts or untrained_ensemble(Path(tmp.name))
    rows, per, mem = [], {}, None
    for engine in args.engine:
        r, p, m = measure(args, drafts_dir, engine)
        rows += r
        per |= {(engine, *k): v for k, v in p.items()}
        mem = mem or m
    lo, hi = min(args.concurrency), max(args.concurrency)
    device = "cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    lines = []
    for engine in args.engine:
        eu_cost = per[engine, lo, True]["p50"] / per[engine, lo, False]["p50"] - 1
        scale = per[engine, hi, True]["rps"] / per[engine, lo, True]["rps"]
        kept = per[engine, hi, True]["tps"] / per[engine, hi, False]["tps"]
        lines += [f"- {engine}: the EU's share of a request's latency with {lo} client **{eu_cost:+.0%}** of the p50 "
                  f"without it; {hi} clients' throughput with EU / without **{kept:.2f}x**; with {hi} clients / with "
                  f"{lo} (EU on) **{scale:.2f}x**."]
    if len(args.engine) > 1:
        a, b = args.engine[:2]
        lines.append(f"- {b} / {a} (EU on): {lo} client p50 "
                     f"**{per[b, lo, True]['p50'] / per[a, lo, True]['p50']:.2f}x**, "
                     f"{hi} clients tokens/s **{per[b, hi, True]['tps'] / per[a, hi, True]['tps']:.2f}x**.")
    if mem is not None:
        lines.append(f"- Memory: one `/v1/score` of a {mem['tokens']}-token response took the server's resident set "
                     f"from {mem['before']:.2f} GB to {mem['after']:.2f} GB after it "
                     f"(peak {mem['peak']:.2f} GB, since start)"
                     + ("; vLLM's engine runs in a process of its own, not counted" if args.backend != "hf" else "")
                     + ".")
    body = "\n".join([
        f"`python bench/serve.py {shown_args()}`: `drafteu serve` (engines: {', '.join(args.engine)}; "
        f"{'HF backend' if args.backend == 'hf' else 'vLLM async engine, continuous batching'}) on "
        f"{'4 noisy copies of the embedded target' if args.drafts is None else args.drafts} as the drafts, target "
        f"`{args.target}`, {args.requests} greedy chat completions of up to {args.max_tokens} tokens per client, "
        f"clients started together, over loopback; {torch.get_num_threads()} torch threads on {device}; one server per "
        "engine, one after the other. EU off: the same server and requests with `\"eu\": false` (the batched engine "
        "skips the scoring pass, the speculative one decodes without the EU's work).", "",
        "| engine | clients | EU | requests | requests/s | tokens/s | p50 (s) | p99 (s) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |", *rows, "", *lines])
    if args.json:
        args.json.write_text(json.dumps({"target": args.target, "drafts": str(drafts_dir), "device": device,
                                         "engines": args.engine, "gamma": args.gamma, "memory": mem,
                                         "runs": [{"engine": e, "clients": c, "eu": eu, **v}
                                                  for (e, c, eu), v in per.items()]}, indent=1))
    name = "" if args.target == "embedded" else f"-{args.target}"
    key = f"serve-{device}{name}" + ("" if args.backend == "hf" else f"-{args.backend}") + \
        ("" if args.engine == ["batched"] else "-" + "-".join(args.engine))
    write_section(args.out, key, f"drafteu serve: throughput and latency, {args.backend} backend"
                  + ("" if args.target == "embedded" else f", target {args.target}"), body)
    print(body)


if __name__ == "__main__":
    main()
