"""The batched, chunked scorer: the score stage's work batched vs one answer at a time, and the peak
resident memory of scoring a short vs a long answer.  Writes both tables to docs/benchmarks.md.

    python bench/scoring.py --run runs/demo [--answers 12] [--memory-target embedded|PATH.gguf]
                            [--baseline-code DIR]  # an earlier checkout's memory rows beside these

Speed: trial 0 of the score stage (every estimator of the run's config) on the first ``--answers``
evaluated answers, through ``TrialEstimators.score`` - the stage's own code - once per answer
(batch 1) and in batches of ``eval.score_batch``, in one process, a warm-up first, in the order
A B B A (each mode's wall is the mean of its two passes); both modes' numbers
are compared with each other and with the run's stored ``eval/token_eu.jsonl``.
Memory: ``drafteu score --method drafts`` (or ``groundtruth`` for a target without a run) in a fresh
process per answer length; peak resident set size (ru_maxrss) of that process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402


def speed(run: Path, n: int) -> dict:
    import torch

    from drafteu.config import load_experiment
    from drafteu.evaluate.scoring_stage import TrialEstimators, score_jobs
    from drafteu.methods import TARGET_ONLY
    from drafteu.rundir import EnsembleSpec, eval_rows, key_of, token_eu

    cfg = load_experiment(run / "config.yaml")
    rows = eval_rows(run)
    trial, methods, rs = score_jobs(cfg, rows)[0]
    rs = rs[:n]
    est = TrialEstimators(cfg, run, rows)
    est.set_trial(trial, [EnsembleSpec.from_label(m) for m in methods if m not in TARGET_ONLY])
    size = cfg.eval.score_batch
    est.score(rs[:size], methods)  # warm-up: first-call allocations, the head probes, TokUR's draw slots
    modes = {"batch 1": 1, f"batches of {size}": size}
    out, wall = {}, dict.fromkeys(modes, 0.0)
    for mode in (*modes, *reversed(modes)):  # A B B A: drift hits both modes alike
        for e in est.estimators.values():
            e.forget()
        t0 = time.perf_counter()
        got = {m: [] for m in methods}
        step = modes[mode]
        for i in range(0, len(rs), step):
            for m, scores in est.score(rs[i:i + step], methods).items():
                got[m] += scores
        wall[mode] += (time.perf_counter() - t0) / 2
        out[mode] = got
    a, b = out.values()
    diff = max(float((x.eu - y.eu).abs().max()) for m in methods for x, y in zip(a[m], b[m], strict=True)
               if x.eu.numel())
    stored = token_eu(run)
    vs_stored = max(float((torch.tensor(stored[(key_of(r), m, trial)]["eu"]) - s.eu).abs().max())
                    for m in methods for r, s in zip(rs, b[m], strict=True) if s.eu.numel())
    tokens = sum(len(r["response_ids"]) for r in rs)
    return {"answers": len(rs), "tokens": tokens, "methods": methods, "wall": wall, "max_diff": diff,
            "max_diff_stored": vs_stored, "threads": torch.get_num_threads(), "batch": size}


CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[2]) if sys.argv[2] else None
import drafteu
from pathlib import Path
from drafteu import data, estimators, models, rundir
from drafteu.posterior import NoiseConfig, NoisyModel
kw = json.loads(sys.argv[1])
lm = models.load(kw["target"])
if kw["method"] == "drafts":
    d, p = rundir.resolve_drafts(Path(kw["drafts"]), None)
    est = estimators.DraftEnsemble(d, lm, p)
else:
    est = estimators.GroundTruth(NoisyModel(lm.model, NoiseConfig()), size=3)
prompt = data.format_prompt(lm.tokenizer, kw["question"])
answer = lm.tokenizer(kw["answer"], add_special_tokens=False)["input_ids"]

def rss(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) / 1024

loaded = rss("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here on: scoring only
est.score(prompt, answer)
print(json.dumps({"tokens": len(answer), "loaded_mib": loaded, "peak_mib": rss("VmHWM"), "code": drafteu.__file__}))
"""


def memory(target: str, drafts: Path | None, lengths: list[int], code: Path | None = None) -> list[dict]:
    from drafteu import models

    tok = models.load(target, tokenizer_only=True).tokenizer
    unit = " Tom has 3 apples and buys 4 more, so he has 3 + 4 = 7 apples."
    out = []
    for n in lengths:
        text = unit * (n // len(tok(unit, add_special_tokens=False)["input_ids"]) + 1)
        ids = tok(text, add_special_tokens=False)["input_ids"][:n]
        kw = {"question": "How many apples does Tom have?", "answer": tok.decode(ids), "target": target}
        kw |= {"method": "drafts", "drafts": str(drafts)} if drafts else {"method": "groundtruth"}
        res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(kw), str(code or "")], capture_output=True,
                             text=True, check=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1]) | {"method": kw["method"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "demo")
    ap.add_argument("--answers", type=int, default=12)
    ap.add_argument("--memory-target", action="append", default=None,
                    help="targets of the memory table (default: embedded, with the run's drafts)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[50, 2000])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--baseline-code", type=Path, default=None,
                    help="a checkout of an earlier drafteu (git worktree add DIR COMMIT): its memory rows side by side")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    lines = []
    if not args.skip_speed:
        s = speed(args.run, args.answers)
        one, many = s["wall"].values()
        lines += [f"The score stage's work (trial 0: {', '.join(s['methods'])}) on {s['answers']} answers "
                  f"({s['tokens']} tokens) of `{args.run.name}`, {s['threads']} threads, one process, warm, modes "
                  "timed A B B A (mean of two passes each):", "",
                  "| mode | wall (s) | answers/s |", "| --- | ---: | ---: |"]
        lines += [f"| {m} | {w:.1f} | {s['answers'] / w:.2f} |" for m, w in s["wall"].items()]
        lines += ["", f"**Batched / batch 1: {one / many:.2f}x** the answers per second.  Largest difference of a "
                  f"token's EU between the modes: {s['max_diff']:.1e}; against the run's stored token EU "
                  "(6 significant digits, scored by the previous one-answer-at-a-time code): "
                  f"{s['max_diff_stored']:.1e}.", ""]
    targets = args.memory_target or ["embedded"]
    lines += ["Resident memory of scoring one answer (`score` of the estimator `drafteu score` builds), a fresh "
              "process per row: after loading the models, and the peak "
              "while scoring (the high-water mark reset after loading):",
              "", "| target, code | method | answer tokens | loaded (MiB) | peak scoring (MiB) |",
              "| --- | --- | ---: | ---: | ---: |"]
    codes = [(None, "this code")] + ([(args.baseline_code, f"baseline ({args.baseline_code.name})")]
                                      if args.baseline_code else [])
    for target in targets:
        drafts = args.run if target == "embedded" else None
        for code, name in codes:
            rows = memory(target, drafts, args.lengths, code)
            for r in rows:
                lines.append(f"| {Path(target).name}, {name} | {r['method']} | {r['tokens']} | {r['loaded_mib']:.0f} | "
                             f"{r['peak_mib']:.0f} |")
            lines.append(f"| {Path(target).name}, {name} | ratio | {rows[-1]['tokens']} / {rows[0]['tokens']} | | "
                         f"**{rows[-1]['peak_mib'] / rows[0]['peak_mib']:.2f}x** |")
    body = "\n".join(lines) + "\n\nScript: `python bench/scoring.py --run runs/demo`."
    write_section(args.out, "scoring-cpu", "Batched, chunked scoring", body)
    print(body)


if __name__ == "__main__":
    main()
