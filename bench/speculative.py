"""Benchmark: speculative decoding with per-token EU against plain greedy decoding of the target.

Embedded setup (CPU): the SmolLM2-135M target and a trained draft ensemble (default: the DDD
ensemble and proxy of runs/dev, see bench/ensembles.py).  Every mode decodes the same prompts
in the same process, interleaved prompt by prompt (so machine noise hits all modes alike), after
one warm-up each; tokens/s = total tokens / total time.  Greedy outputs are checked against plain
greedy decoding.  Modes: plain greedy; speculative proposing from q_mix or from one draft, each
without EU, with EU (bias vs the verifying target) and with EU (bias vs the proxy p_mix).

    python bench/speculative.py [--drafts runs/dev/drafts/ddd] [--proxy runs/dev/proxy/adapter]
                                [--questions 8] [--max-new-tokens 64] [--gamma 1 3]
    python bench/speculative.py --gpu     # random Llama-3.1-8B / Llama-3.2-1B shapes on CUDA

On a GPU (``--gpu``) the weights are random, so acceptance is meaningless: it reports the time
of one verification step (gamma + 1 tokens, with and without the proxy row) and of one draft
step (K drafts in a mixed-adapter batch, and one draft).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, write_section  # noqa: E402


def embedded(args) -> str:
    import torch

    from drafteu import data, estimators, models
    from drafteu.speculative import SpeculativeDecoder, plain_greedy

    torch.manual_seed(0)
    plain_lm = models.load("embedded")
    proxy_lm = models.load("embedded")
    ens = estimators.DraftEnsemble(args.drafts, plain_lm)  # drafts; the target stays a plain model
    ens_p = estimators.DraftEnsemble(args.drafts, proxy_lm, args.proxy)  # the target carries the proxy adapter
    tok = plain_lm.tokenizer
    eos = {tok.eos_token_id}
    problems = data.load_task("easy-word", "test", n=args.questions)
    prompts = [data.format_prompt(tok, p.question, data.shots_for("easy-word", 2)) for p in problems]
    k = len(ens.names)

    def spec(propose, eu, bias, gamma):
        e = ens_p if bias == "proxy" else ens
        return SpeculativeDecoder.from_ensemble(e, e.target, gamma=gamma, propose=propose, bias=bias, eu=eu)

    modes = {"plain greedy (target)": None}
    for gamma in args.gamma:
        for propose, pname in (("mix", "q_mix"), (0, "draft 0")):
            head = f"gamma {gamma}, propose {pname}"
            modes[f"{head}, no EU"] = spec(propose, False, "target", gamma)
            modes[f"{head}, EU (bias vs target)"] = spec(propose, True, "target", gamma)
            modes[f"{head}, EU (bias vs p_mix)"] = spec(propose, True, "proxy", gamma)
    stats = {m: {"tokens": 0, "seconds": 0.0, "proposed": 0, "accepted": 0, "mismatch": 0} for m in modes}
    refs = {}

    def once(mode, dec, i, prompt):
        t0 = time.perf_counter()
        if dec is None:
            out = plain_greedy(plain_lm.model, prompt, args.max_new_tokens, eos)
            return out, time.perf_counter() - t0, 0, 0
        r = dec.generate(prompt, args.max_new_tokens, eos_ids=eos)
        return r.token_ids, time.perf_counter() - t0, r.proposed, r.accepted

    for mode, dec in modes.items():  # warm-up
        once(mode, dec, -1, prompts[0])
    for i, prompt in enumerate(prompts):
        for mode, dec in modes.items():
            out, sec, prop, acc = once(mode, dec, i, prompt)
            if dec is None:
                refs[i] = out
            s = stats[mode]
            s["tokens"] += len(out)
            s["seconds"] += sec
            s["proposed"] += prop
            s["accepted"] += acc
            s["mismatch"] += int(out != refs[i])
        print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    base = stats["plain greedy (target)"]
    base_tps = base["tokens"] / base["seconds"]
    lines = [
        f"`python bench/speculative.py` — embedded SmolLM2-135M target (30 layers) on CPU "
        f"({torch.get_num_threads()} threads); drafts: `{args.drafts}` (K = {k} LoRA drafts on a "
        f"{ens.drafts.get_base_model().config.num_hidden_layers}-layer base), proxy `{args.proxy}`; "
        f"{len(prompts)} easy-word test prompts (2-shot), greedy, ≤ {args.max_new_tokens} new tokens; "
        "all modes interleaved prompt by prompt in one process.",
        "",
        "| mode | tokens/s | vs plain target | acceptance | EU overhead vs same proposer without EU | outputs ≠ plain greedy |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, s in stats.items():
        tps = s["tokens"] / s["seconds"]
        acc = f"{s['accepted'] / s['proposed']:.1%}" if s["proposed"] else "—"
        over = "—"
        if "EU (" in mode:
            ref = stats[mode.split(", EU")[0] + ", no EU"]
            over = f"{(s['seconds'] / s['tokens']) / (ref['seconds'] / ref['tokens']) - 1:+.1%}"
        lines.append(f"| {mode} | {tps:.2f} | {tps / base_tps:.2f}x | {acc} | {over} | {s['mismatch']} |")
    return "\n".join(lines)


def gpu(args) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if not torch.cuda.is_available():
        return "Not run: no CUDA device on this machine."
    dev, dt = "cuda", torch.bfloat16
    common = dict(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    t_cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, **common)
    d_cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, **common | {"tie_word_embeddings": True})
    with torch.device(dev):
        target = LlamaForCausalLM(t_cfg).to(dt).eval()
        draft = LlamaForCausalLM(d_cfg).to(dt).eval()
    lora = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"])
    k = args.k
    drafts = get_peft_model(draft, LoraConfig(**lora), adapter_name="d0")
    for i in range(1, k):
        drafts.add_adapter(f"d{i}", LoraConfig(**lora))
    names = [f"d{i}" for i in range(k)]
    tpe = get_peft_model(target, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]), adapter_name="proxy")
    prompt = torch.randint(0, 128000, (1, 512), device=dev)

    def timed(fn, n=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / n * 1000

    g = args.gamma[-1]
    with torch.no_grad():
        def prefill(model, b, **kw):
            return model(input_ids=prompt.expand(b, -1), use_cache=True, **kw).past_key_values

        step = torch.randint(0, 128000, (1, g + 1), device=dev)
        one = torch.randint(0, 128000, (1, 1), device=dev)
        rows = []
        for label, model, b, kw in (
            ("verify, target only", target, 1, {}),
            ("verify, target + proxy row", tpe, 2, {"adapter_names": ["__base__", "proxy"]}),
        ):
            cache = prefill(model, b, **kw)
            def f(model=model, b=b, kw=kw, cache=cache):
                model(input_ids=step.expand(b, -1), past_key_values=cache, use_cache=True, logits_to_keep=g + 1, **kw)
                cache.crop(-(g + 1))
            rows.append((label, timed(f)))
        for label, b, kw in (("draft step, K drafts (mixed batch)", k, {"adapter_names": names}),
                             ("draft step, one draft (merged)", 1, {})):
            model = drafts if kw else draft
            cache = prefill(model, b, **kw)
            def f(model=model, b=b, kw=kw, cache=cache):
                model(input_ids=one.expand(b, -1), past_key_values=cache, use_cache=True, logits_to_keep=1, **kw)
                cache.crop(-1)
            rows.append((label, timed(f)))
    lines = [f"`python bench/speculative.py --gpu` — {torch.cuda.get_device_name()}, bf16, random weights with "
             f"Llama-3.1-8B (target) and Llama-3.2-1B (draft) shapes, K = {k}, gamma = {g}, 512-token context.",
             "", "| step | ms |", "| --- | ---: |"] + [f"| {a} | {b:.2f} |" for a, b in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafts", type=Path, default=ROOT / "runs" / "dev" / "drafts" / "ddd")
    ap.add_argument("--proxy", type=Path, default=ROOT / "runs" / "dev" / "proxy" / "adapter")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--gamma", type=int, nargs="+", default=[1, 3], help="tokens proposed per round (several: each)")
    ap.add_argument("--k", type=int, default=6, help="--gpu: drafts in the ensemble")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    if args.gpu:
        section = gpu(args)
        key, title = "speculative-gpu", "Speculative decoding step times on a GPU"
    else:
        section = embedded(args)
        key, title = "speculative-embedded", "Speculative decoding with per-token EU on the embedded setup"
    print(section)
    write_section(args.out, key, title, section)


if __name__ == "__main__":
    main()
