"""Benchmark: which matmul kernel the quantized self-draft's members should run on this machine.

The embedded target's decoder (its body: every linear layer, the float head left out, as the draft
base keeps it) in three forms - float32 (``F.linear``, MKL / oneDNN), int8 weight-only (torchao
``Int8WeightOnlyConfig``: the weights converted per matmul) and int8 dynamic (torchao
``Int8DynamicActivationInt8WeightConfig``: per-token int8 activations x int8 weights, the
``torch._int_mm`` / oneDNN VNNI path) - timed side by side, interleaved, at the shapes scoring and
decoding run (K = 4 member rows x L positions), with each form's KL to the float target on real
answer tokens (activation quantization costs accuracy).  Writes the table to docs/benchmarks.md.

    python bench/matmul_kernels.py [--repeats 7] [--positions 1 16 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402

QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=4, help="member rows of one forward (K)")
    ap.add_argument("--positions", type=int, nargs="+", default=[1, 16, 128])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()

    import torch

    from drafteu import data, divergence, hardware, models, quantize
    from drafteu.generate import greedy_answer

    lm = models.load("embedded", dtype="float32", device="cpu")
    forms = {"float32": lm.model}
    for name, scheme in (("int8 weight-only", "weight-only"), ("int8 dynamic", "dynamic")):
        forms[name] = quantize.apply(copy.deepcopy(lm.model), quantize.QuantizeSettings(bits=8, scheme=scheme))
    # accuracy: each form's KL to the float target on the target's own greedy answer
    prompt = data.format_prompt(lm.tokenizer, QUESTION, data.shots_for("score", 1))
    answer = greedy_answer(lm.model, lm.tokenizer, prompt, 48)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logits = {n: m(input_ids=ids).logits[0, len(prompt) - 1: -1].float() for n, m in forms.items()}
    kl = {n: float(divergence.kl(logits["float32"], x).mean()) for n, x in logits.items()}
    top1 = {n: float((x.argmax(-1) == logits["float32"].argmax(-1)).float().mean()) for n, x in logits.items()}

    times: dict[tuple[str, int], list[float]] = {}
    g = torch.Generator().manual_seed(0)
    for positions in args.positions:
        x = torch.randint(0, lm.tokenizer.vocab_size, (args.rows, positions), generator=g)
        with torch.no_grad():
            for m in forms.values():  # warm-up: first-call allocations and kernel choice
                m.model(input_ids=x)
            for r in range(args.repeats):
                order = list(forms) if r % 2 == 0 else list(forms)[::-1]  # interleaved, both orders
                for name in order:
                    t0 = time.perf_counter()
                    forms[name].model(input_ids=x)  # the body: the head is float in every form
                    times.setdefault((name, positions), []).append(time.perf_counter() - t0)

    hw = hardware.describe(torch.device("cpu"))
    lines = [f"`python bench/matmul_kernels.py` on {hw['hardware']}, {torch.get_num_threads()} threads, torch "
             f"{torch.__version__}: the embedded target's decoder body (float head left out) in each form, "
             f"{args.rows} member rows x L positions per forward, median of {args.repeats} interleaved repeats; "
             "KL and top-1 agreement to the float target on its own 48-token greedy answer (full model).", "",
             "| form | KL to float (nats/token) | top-1 agreement | "
             + " | ".join(f"L = {p}: ms (vs float32)" for p in args.positions) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in args.positions) + " |"]
    for name in forms:
        cells = []
        for p in args.positions:
            t, base = statistics.median(times[(name, p)]), statistics.median(times[("float32", p)])
            cells.append(f"{1000 * t:.1f} ({t / base:.2f}x)")
        lines.append(f"| {name} | {kl[name]:.5f} | {top1[name]:.3f} | " + " | ".join(cells) + " |")
    body = "\n".join(lines)
    print(body)
    # one section per kind of CPU (the kernels' ranking differs between them): AVX512-BF16 / AMX or AVX2
    native, _ = hardware.native_bf16(torch.device("cpu"))
    kind = "avx512" if native else torch.backends.cpu.get_cpu_capability().lower()
    write_section(args.out, f"bench-kernels-{kind}", f"Kernels of the quantized self-draft, {hw['hardware']}", body)


if __name__ == "__main__":
    main()
