"""Benchmark: training memory and step time, full (B, W, V) logits vs drafteu's chunked losses, and the
chunked losses with activation checkpointing (``train.activation_checkpointing``).

Each setting runs in its own subprocess, one after the other (full, chunked, checkpointed at every
shape, so a drift of the machine touches them alike): a LoRA (r 16, all linear modules) on a model with the given
vocabulary trains ``--steps`` optimizer steps on a micro-batch of 8 sequences (a 64-token prompt + an
answer of the given length), after one warm-up step.  Two objectives: ``sft`` (the drafts' cross-entropy
on the answer) and ``osd`` (the proxy's forward KL against 2 noisy teachers: three window-sized logits
tensors in the full path).  The full path is what drafteu's trainers computed before the chunked losses:
the model's window logits, then the loss on them.  Reported: the process's peak resident set, its growth
over the loaded model (what the step adds), seconds per optimizer step, and whether the first step's
loss (the same weights in every mode) equals the full path's.

    python bench/train_memory.py                       # random models, vocabularies 49k / 152k / 262k
    python bench/train_memory.py --model gemma3-270m --vocabs 0 --lengths 384 --losses sft --steps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402

PROMPT = 64
BATCH = 8
MODES = ("full", "chunked", "checkpointed")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _model(spec: str, vocab: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from drafteu import models

    if spec != "random":
        return models.load(spec).model
    torch.manual_seed(0)  # SmolLM2-135M's widths, 4 layers: the head is what the vocabulary changes
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _full_step_gb(vocab: int, length: int, loss: str) -> float:
    """GB the full path's step adds over the loaded model: its window-sized tensors, at the bytes per
    window element measured on the random model at 49k-262k vocabularies (sft: ~17 - the float32 logits,
    their bf16 copy, softmax and gradients; osd: ~75 - two teachers' distributions, the KL's float32
    intermediates and their gradients)."""
    return BATCH * length * vocab * (17 if loss == "sft" else 75) / 1e9


def worker(spec: str, vocab: int, length: int, loss: str, mode: str, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from drafteu import divergence, hardware
    from drafteu.posterior import NoiseConfig, NoisyModel
    from drafteu.train.batches import Example, collate, window_hidden, window_logits
    from drafteu.train.loop import activation_checkpointing
    from drafteu.train.losses import window_loss

    model = _model(spec, vocab)
    vocab = model.get_output_embeddings().weight.shape[0]
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    if loss == "osd":  # the teachers: noise members of the same model, as in OSD
        noisy = NoisyModel(model, NoiseConfig(sigma=0.5, scale="relative"))
        teachers = noisy.set_members("teacher", [1, 2])
        noisy.model.add_adapter("draft", lora)
    else:
        noisy, teachers = NoisyModel.__new__(NoisyModel), []
        noisy.model = get_peft_model(model, lora, adapter_name="draft")
    noisy.model.set_adapter("draft")
    for n, p in noisy.model.named_parameters():
        p.requires_grad_(".draft." in n)
    params = [p for p in noisy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (BATCH, PROMPT + length), generator=g).tolist()
    batch = collate([Example(s[:PROMPT], s[PROMPT:]) for s in ids], 0, "cpu")
    precision, _ = hardware.resolve_mixed_precision("auto", torch.device("cpu"))
    base_rss = _rss_mb()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            t = None
            if teachers:
                noisy.model.eval()
                with torch.no_grad():
                    t = window_hidden(noisy.model, batch, adapters=teachers)
                    t = t.logits() if mode == "full" else t
                noisy.model.set_adapter("draft")
                noisy.model.train()
            mask = batch["loss_mask"]
            if mode == "full":
                s = window_logits(noisy.model, batch).float()
                per = F.cross_entropy(s.transpose(1, 2), batch["targets"], reduction="none") if loss == "sft" \
                    else divergence.kl(t.float(), s).mean(0)
                value = (per * mask).sum() / mask.sum()
            else:
                kw = {"targets": batch["targets"]} if loss == "sft" else {"teachers": t}
                value = window_loss(window_hidden(noisy.model, batch), mask,
                                    kind="ce" if loss == "sft" else "forward_kl",
                                    **kw)
            value.backward()
        opt.step()
        opt.zero_grad()
        return float(value.detach())

    with activation_checkpointing(noisy.model, mode == "checkpointed"):
        first = step()  # warm-up; its loss is the untrained weights', the same in every mode
        t0 = time.perf_counter()
        for _ in range(steps):
            value = step()
        seconds = (time.perf_counter() - t0) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": spec, "vocab": vocab, "length": length, "loss": loss, "mode": mode, "precision": precision,
            "threads": torch.get_num_threads(), "peak_mb": round(peak), "growth_mb": round(peak - base_rss),
            "step_s": round(seconds, 3), "first_loss": first, "loss_value": round(value, 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random", help="'random' (SmolLM2-135M widths, 4 layers) or a model spec")
    ap.add_argument("--vocabs", default="49152,151936,262144", help="vocabularies of the random model (0 with --model)")
    ap.add_argument("--lengths", default="64,128,256,512", help="answer lengths")
    ap.add_argument("--losses", default="sft,osd")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help="full (the model's window logits, then the loss), "
                    "chunked (drafteu's losses), checkpointed (chunked + activation checkpointing)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    ap.add_argument("--json", type=Path, help="write the rows here as they come; rows already in the "
                    "file (an interrupted run of the same command) are kept, not re-run")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--max-full-gb", type=float, default=12.0,
                    help="skip the full path where its step would add more (estimated from the window's size; a "
                         "model's own vocabulary is counted as 262,144)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        vocab, length, loss, mode, steps = args.worker
        print(json.dumps(worker(args.model, int(vocab), int(length), loss, mode, int(steps))))
        return
    # rows of an earlier, interrupted run of the same command (--json) are kept, their settings not re-run
    done = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    rows = []
    for loss in args.losses.split(","):
        for vocab in [int(v) for v in args.vocabs.split(",")]:
            for length in [int(n) for n in args.lengths.split(",")]:
                for mode in args.modes.split(","):
                    setting = f"{loss}/{vocab}/{length}/{mode}"
                    kept = [r for r in done if r.get("setting") == setting]
                    if kept:
                        rows.append(kept[0])
                        continue
                    need = _full_step_gb(vocab or 262144, length, loss)
                    if mode == "full" and need > args.max_full_gb:
                        rows.append({"loss": loss, "vocab": vocab, "length": length, "mode": mode, "skipped": need,
                                     "setting": setting})
                        print(rows[-1], flush=True)
                        continue
                    out = subprocess.run([sys.executable, __file__, "--model", args.model, "--worker", str(vocab),
                                          str(length), loss, mode, str(args.steps)], capture_output=True, text=True)
                    if out.returncode != 0:  # a kill (the machine's memory) leaves no traceback: say so
                        why = f"killed by signal {-out.returncode}" if out.returncode < 0 else out.stderr[-2000:]
                        raise SystemExit(f"{setting}: {why}; the rows so far are in --json, rerun to go on, "
                                         "--max-full-gb lower to skip the largest full settings")
                    rows.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"setting": setting})
                    print(rows[-1], flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.no_write:
        return
    import torch

    from drafteu import hardware

    argv = sys.argv[1:]
    if "--json" in argv:  # where this machine kept the rows: not part of what was measured
        del argv[argv.index("--json"):argv.index("--json") + 2]
    lines = [f"`python bench/train_memory.py {' '.join(argv)}` - model {args.model}, micro-batch {BATCH} x "
             f"({PROMPT}-token prompt + answer), LoRA r 16 on all linear modules, {rows[0]['threads']} threads, mixed "
             f"precision {rows[0]['precision']} ({hardware.native_bf16(torch.device('cpu'))[1]}). Modes: full (the "
             "model's window logits, then the loss), chunked (drafteu's losses), checkpointed (chunked + activation "
             "checkpointing). Peak: the process's resident set; growth: over the loaded model; step: seconds per "
             f"optimizer step (mean of {args.steps} after a warm-up); first loss: the warm-up step's, the same "
             "weights in every mode (relative difference to the full path's).", "",
             "| loss | vocabulary | answer tokens | mode | peak MB | growth MB | step s | step / full | first loss |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    full = {}
    for r in rows:
        head = f"| {r['loss']} | {r['vocab']:,} | {r['length']} | {r['mode']} |"
        if "skipped" in r:
            lines.append(f"{head} not run: it would add ~{r['skipped']:.0f} GB | | | | |")
            continue
        shape = (r["loss"], r["vocab"], r["length"])
        ref = full.setdefault(shape, r) if r["mode"] == "full" else full.get(shape)
        ratio = f"{r['step_s'] / ref['step_s']:.2f}x" if ref and r is not ref else ""
        diff = abs(r["first_loss"] - ref["first_loss"]) / max(1.0, abs(ref["first_loss"])) if ref else None
        first = f"{r['first_loss']:.5f}" + ("" if diff is None or r is ref else f" ({diff:.1e})")
        lines.append(f"{head} {r['peak_mb']:,} | {r['growth_mb']:,} | {r['step_s']:.2f} | {ratio} | {first} |")
    # one section per model and answer lengths: the random table, Gemma's goal shape, the demo's shape
    key = f"train-memory-{args.model}" + ("" if args.model == "random" else "-" + args.lengths.replace(",", "-"))
    title = f"Training memory on {args.model}: full logits vs chunked losses, answer tokens"
    write_section(args.out, key, title, "\n".join(lines))


if __name__ == "__main__":
    main()
