"""Benchmark: speculative decoding with per-token EU against plain greedy decoding of the target.

Any target and ensemble (``--target``, ``--drafts``, ``--proxy``, ``--task``; ``--json`` writes the numbers
too), by default the embedded setup (CPU): the SmolLM2-135M target and a trained draft ensemble (default: the DDD
ensemble of runs/spec and the proxy of runs/dev, see bench/ensembles.py for runs/dev; runs/spec
re-uses runs/dev's samples with a longer draft-base warm-up:

    drafteu train-draft-base --samples runs/dev/data/samples.jsonl -o runs/spec/draft_base --layers 6 --epochs 4
    drafteu train-drafts --samples runs/dev/data/samples.jsonl -o runs/spec/drafts --base runs/spec/draft_base \
        --method ddd -S 2 -M 3 --max-steps 20 --warmup-steps 2

).  Every mode decodes the same prompts in the same process, interleaved prompt by prompt (so
machine noise hits all modes alike), after one warm-up each, each mode keeping its KV caches
across prompts (plain decoding too); tokens/s = total tokens / total time.  Greedy outputs are
checked against plain greedy decoding.  Modes: plain greedy; speculative proposing from q_mix or
from one draft, each without EU, with EU (bias vs the verifying target) and with EU (bias vs the
proxy p_mix).  A second table times each kind of forward alone and derives, from those times,
the acceptance each mode needs to break even and to reach 1.3x.

    python bench/speculative.py [--drafts DIR] [--proxy DIR] [--questions 6] [--max-new-tokens 48]
                                [--gamma 1 2] [--propose mix 0] [--dtype auto] [--draft-dtype bfloat16]
    python bench/speculative.py --gpu     # random Llama-3.1-8B / Llama-3.2-1B shapes on CUDA

On a GPU (``--gpu``) the weights are random, so acceptance is meaningless: it times drafteu's own
``SpeculativeDecoder`` forwards (``PrefixCache`` feeds of the target, the fused target + proxy
verification and the fused K drafts) and whole speculative generations.
``--random-shapes tiny --device cpu`` runs the same code on tiny shapes (a smoke run, in the tests).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT, shown_args, write_section  # noqa: E402
from speculative_batched import batched  # noqa: E402


def real(args) -> str:
    """The modes on a real target and ensemble (``--target``, ``--drafts``, ``--proxy``, ``--task``);
    the table, and ``args.record`` filled for ``--json``."""
    import torch

    from drafteu import data, estimators, hardware, models
    from drafteu.kvcache import PrefixCache, StaticPrefixCache
    from drafteu.spec_decoding import SpeculativeDecoder, plain_greedy

    torch.manual_seed(0)
    plain_lm = models.load(args.target, dtype=args.dtype)
    proxy_lm = models.load(args.target, dtype=args.dtype)
    # drafts; the target stays a plain model
    ens = estimators.DraftEnsemble(args.drafts, plain_lm, dtype=args.draft_dtype)
    # the target carries the proxy adapter
    ens_p = estimators.DraftEnsemble(args.drafts, proxy_lm, args.proxy, dtype=args.draft_dtype)
    tok = plain_lm.tokenizer
    eos = models.eos_ids(plain_lm.model, tok)
    problems = data.load_task(args.task, "test", n=args.questions)
    prompts = [data.format_prompt(tok, p.question, data.shots_for(args.task, args.shots)) for p in problems]
    k = len(ens.names)

    def spec(propose, eu, bias, gamma, compile="off", adaptive=False):
        e = ens_p if bias == "proxy" else ens
        return SpeculativeDecoder.from_ensemble(e, e.target, gamma=gamma, propose=propose, bias=bias, eu=eu,
                                                compile=compile, adaptive=adaptive,
                                                gamma_max=max(gamma, args.gamma_max))

    modes = {"plain greedy (target)": None}
    if args.compile:
        modes["plain greedy (target), compiled"] = "compiled"
    for gamma in args.gamma:
        for propose, pname in [(p, "q_mix" if p == "mix" else f"draft {p}") for p in args.propose]:
            head = f"gamma {gamma}, propose {pname}"
            modes[f"{head}, no EU"] = spec(propose, False, "target", gamma)
            modes[f"{head}, EU (bias vs target)"] = spec(propose, True, "target", gamma)
            modes[f"{head}, EU (bias vs p_mix)"] = spec(propose, True, "proxy", gamma)
            if args.adaptive:
                head_a = f"gamma {gamma} adaptive (<= {max(gamma, args.gamma_max)}), propose {pname}"
                modes[f"{head_a}, no EU"] = spec(propose, False, "target", gamma, adaptive=True)
                modes[f"{head_a}, EU (bias vs p_mix)"] = spec(propose, True, "proxy", gamma, adaptive=True)
            if args.compile:
                modes[f"{head}, no EU, compiled"] = spec(propose, False, "target", gamma, "on")
                modes[f"{head}, EU (bias vs p_mix), compiled"] = spec(propose, True, "proxy", gamma, "on")
    stats = {m: {"tokens": 0, "seconds": 0.0, "proposed": 0, "accepted": 0, "mismatch": 0, "draft_s": 0.0,
                 "verify_s": 0.0, "eu_s": 0.0} for m in modes}
    refs = {}
    plain_cache = PrefixCache(plain_lm.model)  # plain decoding re-uses the shared prompt prefix too
    compiled_cache = StaticPrefixCache(plain_lm.model, compile=True) if args.compile else None

    def once(mode, dec, i, prompt):
        t0 = time.perf_counter()
        if dec is None or dec == "compiled":
            out = plain_greedy(plain_lm.model, prompt, args.max_new_tokens, eos,
                               cache=plain_cache if dec is None else compiled_cache)
            return out, time.perf_counter() - t0, 0, 0, {}
        r = dec.generate(prompt, args.max_new_tokens, eos_ids=eos)
        return r.token_ids, time.perf_counter() - t0, r.proposed, r.accepted, r.timings

    for mode, dec in modes.items():  # warm-up
        once(mode, dec, -1, prompts[0])
    for i, prompt in enumerate(prompts):
        for mode, dec in modes.items():
            out, sec, prop, acc, timings = once(mode, dec, i, prompt)
            if dec is None:
                refs[i] = out
            s = stats[mode]
            s["tokens"] += len(out)
            s["seconds"] += sec
            s["proposed"] += prop
            s["accepted"] += acc
            s["mismatch"] += int(out != refs[i])
            for key, val in timings.items():
                s[key] += val
        print(f"prompt {i + 1}/{len(prompts)} done", flush=True)
    base = stats["plain greedy (target)"]
    base_tps = base["tokens"] / base["seconds"]
    device = next(plain_lm.model.parameters()).device
    args.record = {"target": args.target, "drafts": str(args.drafts), "proxy": str(args.proxy), "task": args.task,
                   "prompts": len(prompts), "max_new_tokens": args.max_new_tokens, "K": k,
                   "device": hardware.describe(device), "target_dtype": str(next(plain_lm.model.parameters()).dtype),
                   "draft_dtype": args.draft_dtype,
                   "modes": {m: {"tokens_per_s": s["tokens"] / s["seconds"],
                                 "vs_plain": (s["tokens"] / s["seconds"]) / base_tps,
                                 "acceptance": s["accepted"] / s["proposed"] if s["proposed"] else None,
                                 "outputs_differing_from_plain_greedy": s["mismatch"]} for m, s in stats.items()}}
    lines = [
        f"`python bench/speculative.py {shown_args()}` — target `{args.target}` "
        f"({plain_lm.model.config.num_hidden_layers} layers, {next(plain_lm.model.parameters()).dtype}) on {device} "
        f"({torch.get_num_threads()} threads); drafts: `{args.drafts}` (K = {k} LoRA drafts on a "
        f"{ens.drafts.get_base_model().config.num_hidden_layers}-layer base, {args.draft_dtype} weights), "
        f"proxy `{args.proxy}`; {len(prompts)} {args.task} test prompts ({args.shots}-shot), greedy, ≤ "
        f"{args.max_new_tokens} new tokens; all modes interleaved prompt by prompt in one process; every mode (plain "
        "included) keeps its KV caches across prompts, so the shared worked examples are computed once. Time per token "
        "split into drafting, verification and EU. Compiled modes: static KV caches + torch.compile (inductor), warmed "
        "up (compiled) before timing.",
        "",
        "| mode | tokens/s | vs plain target | acceptance | EU overhead vs same proposer without EU "
        "| ms/token draft / verify / EU | outputs ≠ plain greedy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for mode, s in stats.items():
        tps = s["tokens"] / s["seconds"]
        acc = f"{s['accepted'] / s['proposed']:.1%}" if s["proposed"] else "—"
        over = "—"
        if "EU (" in mode:
            ref = stats[mode.split(", EU")[0] + ", no EU"]
            over = f"{(s['seconds'] / s['tokens']) / (ref['seconds'] / ref['tokens']) - 1:+.1%}"
        split = "—" if not s["proposed"] else " / ".join(
            f"{1000 * s[k] / s['tokens']:.0f}" for k in ("draft_s", "verify_s", "eu_s"))
        lines.append(f"| {mode} | {tps:.2f} | {tps / base_tps:.2f}x | {acc} | {over} | {split} | {s['mismatch']} |")
    lines += ["", step_costs(args, plain_lm, modes, prompts[0], stats, base_tps)]
    if args.batch > 1:
        lines += ["", batched(args, plain_lm, ens, ens_p, prompts, eos)]
    return "\n".join(lines)


def step_costs(args, plain_lm, modes, prompt, stats, base_tps) -> str:
    """Median time of each forward a round is made of, and what they imply.

    A round with acceptance a and gamma proposals emits E = (1 - a^(gamma+1)) / (1 - a) tokens on
    average and costs gamma draft steps + one verification of gamma + 1 tokens (+ with one draft
    proposing and EU on, one K-draft pass over gamma + 1 tokens); speed-up over plain decoding =
    E x (plain step) / (round cost).  Solving for a gives the acceptance a goal needs."""
    import statistics

    from drafteu.kvcache import PrefixCache, StaticPrefixCache
    from drafteu.spec_decoding import SpeculativeDecoder

    dev = next(plain_lm.model.parameters()).device
    gammas = sorted(set(args.gamma))

    def ms(model, names, n, compiled=False, reps=12):
        c = StaticPrefixCache(model, names, compile=True) if compiled else PrefixCache(model, names)
        c.feed(prompt, [], 1, dev)
        times = []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            c.feed(prompt, [100] * n, n, dev)
            times.append(time.perf_counter() - t0)
            c.rollback(len(prompt))
        return 1000 * statistics.median(times[2:])

    decs = [d for d in modes.values() if isinstance(d, SpeculativeDecoder)]
    ens_cache = next(d.caches["drafts"] for d in decs if "drafts" in d.caches)
    proxy_dec = next((d for d in decs if d.eu and d.bias == "proxy"), None)
    one_dec = next((d for d in decs if "designated" in d.caches), None)
    kinds = [False, True] if args.compile else [False]
    target = {(c, n): ms(plain_lm.model, None, n, c) for c in kinds for n in range(1, max(gammas) + 2)}
    drafts = {(c, n): ms(ens_cache.model, ens_cache.names, n, c) for c in kinds for n in range(1, max(gammas) + 2)}
    proxy = {(c, g + 1): ms(proxy_dec.caches["target"].model, ["__base__", "proxy"], g + 1, c)
             for c in kinds for g in gammas} if proxy_dec else {}
    one = ms(one_dec.caches["designated"].model, None, 1) if one_dec else None

    def label(c):
        return ", compiled" if c else ""
    rows = [f"| target, {n} token{'s' * (n > 1)}{label(c)} | {t:.1f} |" for (c, n), t in target.items()]
    rows += [f"| target + proxy row, {n} tokens{label(c)} | {t:.1f} |" for (c, n), t in proxy.items()]
    rows += [f"| K = {len(ens_cache.names)} drafts (fused), {n} token{'s' * (n > 1)}{label(c)} | {t:.1f} |"
             for (c, n), t in drafts.items()]
    if one is not None:
        rows.append(f"| one draft (merged), 1 token | {one:.1f} |")
    plain_step = min(t for (c, n), t in target.items() if n == 1)

    model_rows = []
    for g in gammas:
        for mode, dec in modes.items():
            if not isinstance(dec, SpeculativeDecoder) or dec.gamma != g:
                continue
            c = dec.compile
            verify = proxy[c, g + 1] if (dec.eu and dec.bias == "proxy") else target[c, g + 1]
            if dec.propose == "mix":
                cost = g * drafts[c, 1] + verify
            else:
                cost = g * one + verify + (drafts[c, g + 1] if dec.eu else 0.0)
            st = stats[mode]
            measured = (st["tokens"] / st["seconds"]) / base_tps
            model_rows.append(f"| {mode} | {cost:.0f} | {needed_acceptance(plain_step, cost, g, 1.0)} | "
                              f"{needed_acceptance(plain_step, cost, g, 1.3)} | {measured:.2f}x |")
    return "\n".join([
        "Where the time goes (same run, same process): median ms of one forward with the prompt cached, and "
        "the acceptance each mode would need, from these step times, to break even with the fastest plain "
        f"decoding step measured here ({plain_step:.1f} ms) and to reach 1.3x (a round of gamma proposals emits "
        "(1 - a^(gamma+1)) / (1 - a) tokens on average; this model ignores the per-round bookkeeping and the "
        "extra token a draft step feeds after a fully accepted round).",
        "", "| forward | ms |", "| --- | ---: |", *rows, "",
        "| mode | round cost (ms) | acceptance for 1.0x | acceptance for 1.3x | measured vs plain |",
        "| --- | ---: | ---: | ---: | ---: |", *model_rows,
    ])


SHAPES = {  # (target, draft) Llama shapes for random-weight step timings
    "paper": (dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),   # Llama-3.1-8B
              dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)),   # Llama-3.2-1B
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
             dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)),
}


def random_models(args, device: str, shapes: str):
    """Random-weight target (+ proxy adapter) and K LoRA drafts, as drafteu loads them: PEFT models
    in eval mode, the K drafts behind ``FusedDrafts``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    dt = torch.bfloat16 if device.startswith("cuda") else torch.float32
    t_shape, d_shape = SHAPES[shapes]
    common = dict(max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device(device):
        target = LlamaForCausalLM(LlamaConfig(**common, **t_shape)).to(dt).eval()
        draft = LlamaForCausalLM(LlamaConfig(**common, **d_shape)).to(dt).eval()
    lora = dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"], init_lora_weights=False)
    names = [f"d{i}" for i in range(args.k)]
    drafts = get_peft_model(draft, LoraConfig(**lora), adapter_name=names[0])
    for n in names[1:]:
        drafts.add_adapter(n, LoraConfig(**lora))
    proxy = get_peft_model(target, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                              init_lora_weights=False), adapter_name="proxy")
    return proxy.eval(), drafts.eval(), names, t_shape["vocab_size"]


def hf_static_compiled_step(model, prompt: list[int], device: str, reps: int, sync) -> float:
    """The reference: transformers' own recipe for fast decoding (a ``StaticCache`` and
    ``torch.compile`` of the forward, CUDA graphs on CUDA), one token after ``prompt``; median ms."""
    import statistics

    import torch
    from transformers import StaticCache

    from drafteu.kvcache import cache_kw

    cache = StaticCache(config=model.config, max_cache_len=1024)
    n = len(prompt)
    with torch.no_grad():
        model(input_ids=torch.tensor([prompt], device=device), **cache_kw(cache), use_cache=True,
              cache_position=torch.arange(n, device=device), logits_to_keep=1)
        step = torch.compile(model.forward, mode="reduce-overhead" if device.startswith("cuda") else None,
                             fullgraph=True, dynamic=False)
        tok, pos = torch.tensor([[7]], device=device), torch.tensor([n], device=device)
        times = []
        for _ in range(reps + 3):
            for layer in cache.layers:  # the same position every time
                layer.cumulative_length.fill_(n)
            sync()
            t0 = time.perf_counter()
            step(input_ids=tok, **cache_kw(cache), use_cache=True, cache_position=pos, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[3:])


def needed_acceptance(step_ms: float, round_ms: float, gamma: int, goal: float) -> str:
    """Acceptance a at which a round of ``gamma`` proposals costing ``round_ms`` emits tokens
    ``goal`` x as fast as plain decoding at ``step_ms`` per token: E(a) = (1 - a^(g+1)) / (1 - a)."""
    def speedup(a):
        return (gamma + 1 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)) * step_ms / round_ms
    if speedup(1.0) < goal:
        return "unreachable"
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if speedup(mid) < goal else (lo, mid)
    return f"{hi:.0%}"


def step_times(args, device: str = "cuda", shapes: str = "paper", context: int = 512, reps: int = 20) -> str:
    """Step times of drafteu's own decoder on random weights: the forwards ``SpeculativeDecoder``
    makes (its caches' feeds and roll-backs), eager and (``args.compile``) compiled on static KV
    caches, next to transformers' own static-cache + compile step; the EU of a round; the
    acceptance speculative decoding with EU needs per gamma; then whole speculative generations."""
    import statistics

    import torch

    from drafteu import divergence
    from drafteu.fused import FusedDrafts
    from drafteu.kvcache import PrefixCache, StaticPrefixCache
    from drafteu.spec_decoding import SpeculativeDecoder

    if device.startswith("cuda") and not torch.cuda.is_available():
        return "Not run: no CUDA device on this machine."
    compiled = getattr(args, "compile", False)
    target, peft_drafts, names, vocab = random_models(args, device, shapes)
    drafts = FusedDrafts(peft_drafts, names)  # as DraftEnsemble.runner / SpeculativeDecoder.from_ensemble
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab - 1, (context,), generator=gen).tolist()

    def ms(cache, n):
        """Median ms of feeding n tokens after the cached prompt, rolled back after each."""
        cache.rollback(0)
        cache.feed(prompt, [], 1, device)
        times = []
        for _ in range(reps + 3):
            sync()
            t0 = time.perf_counter()
            cache.feed(prompt, [7] * n, n, device)
            sync()
            times.append(time.perf_counter() - t0)
            cache.rollback(len(prompt))
        return 1000 * statistics.median(times[3:])

    def eu_ms(n):
        q = torch.randn(len(names), n, vocab, device=device).to(next(target.parameters()).dtype)
        p = torch.randn(n, vocab, device=device).to(q.dtype)
        times = []
        for _ in range(reps + 3):
            sync()
            t0 = time.perf_counter()
            divergence.eu_decomposition(q, p)
            sync()
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times[3:])

    # The caches SpeculativeDecoder verifies and drafts with (the same models, names and fusion).
    kinds = [("eager", lambda m, n: PrefixCache(m, n))]
    if compiled:
        mode = "reduce-overhead" if device.startswith("cuda") else None
        kinds.append(("compiled", lambda m, n: StaticPrefixCache(m, n, compile=True, mode=mode)))
    base_only = FusedDrafts(target, ["__base__"])
    with_proxy = FusedDrafts(target, ["__base__", "proxy"])
    t = {}
    for kind, make in kinds:
        tgt, tgt_proxy = make(base_only, ["__base__"]), make(with_proxy, ["__base__", "proxy"])
        ens = make(drafts, names)
        t[kind, "target", 1] = ms(tgt, 1)
        t[kind, "drafts", 1] = ms(ens, 1)
        for g in args.gamma:
            t[kind, "target", g + 1] = ms(tgt, g + 1)
            t[kind, "proxy", g + 1] = ms(tgt_proxy, g + 1)
    eu = {g: eu_ms(g + 1) for g in args.gamma}
    hf = hf_static_compiled_step(target.get_base_model(), prompt, device, reps, sync) if compiled else None
    table = []
    for kind, _ in kinds:
        table.append(f"| {kind} | target, 1 token (plain decoding step) | {t[kind, 'target', 1]:.2f} |")
        for g in args.gamma:
            table.append(f"| {kind} | verify {g + 1} tokens, target | {t[kind, 'target', g + 1]:.2f} |")
            table.append(f"| {kind} | verify {g + 1} tokens, target + proxy row (fused) | "
                         f"{t[kind, 'proxy', g + 1]:.2f} |")
        table.append(f"| {kind} | K = {len(names)} drafts (fused), 1 token | {t[kind, 'drafts', 1]:.2f} |")
    for g in args.gamma:
        table.append(f"| — | eu_decomposition of a round ({g + 1} positions) | {eu[g]:.2f} |")
    if hf is not None:
        table.append(f"| reference | transformers StaticCache + torch.compile, target, 1 token | {hf:.2f} |")
    best = "compiled" if compiled else "eager"
    ratios = []
    if hf is not None:
        ratios.append(f"- drafteu's compiled target step / transformers' compiled step: "
                      f"**{t[best, 'target', 1] / hf:.2f}x** (goal <= 1.25x)")
    ratios.append(f"- K = {len(names)} draft step / target step ({best}): "
                  f"**{t[best, 'drafts', 1] / t[best, 'target', 1]:.2f}** (goal <= 0.35)")
    if compiled:
        ratios.append(f"- compiled vs eager: target step {t['eager', 'target', 1] / t['compiled', 'target', 1]:.2f}x "
                      f"faster, K-draft step {t['eager', 'drafts', 1] / t['compiled', 'drafts', 1]:.2f}x faster")
    plain = min(t[best, "target", 1], hf) if hf is not None else t[best, "target", 1]
    need = ["| gamma | round cost, EU vs target (ms) | round cost, EU vs p_mix (ms) | acceptance for 1.0x | "
            "for 1.3x (EU vs target) | for 1.3x (EU vs p_mix) |", "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g in args.gamma:
        r_t = g * t[best, "drafts", 1] + t[best, "target", g + 1] + eu[g]
        r_p = g * t[best, "drafts", 1] + t[best, "proxy", g + 1] + eu[g]
        need.append(f"| {g} | {r_t:.2f} | {r_p:.2f} | {needed_acceptance(plain, r_t, g, 1.0)} | "
                    f"{needed_acceptance(plain, r_t, g, 1.3)} | {needed_acceptance(plain, r_p, g, 1.3)} |")
    gens = []
    for g in args.gamma:
        for bias in ("target", "proxy"):
            dec = SpeculativeDecoder.from_models(target, drafts, names, vocab, gamma=g, bias=bias,
                                                 compile="on" if compiled else "off")
            dec.generate(prompt, 4)  # warm-up
            sync()
            res = dec.generate(prompt, args.max_new_tokens)
            sync()
            gens.append(f"| gamma {g}, EU bias vs {bias} | {res.rounds} | {res.acceptance:.0%} | "
                        f"{1000 * res.seconds / max(res.rounds, 1):.1f} | {len(res.token_ids) / res.seconds:.1f} |")
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    dtype = "bf16" if device.startswith("cuda") else "float32"
    return "\n".join([
        f"`python bench/speculative.py {shown_args()}` — {name}, {dtype}, random weights of {shapes} shapes "
        f"({'Llama-3.1-8B target, Llama-3.2-1B drafts' if shapes == 'paper' else 'tiny'}), K = {len(names)} LoRA "
        f"drafts (r 16, all linear layers), {context}-token context; drafteu's own SpeculativeDecoder caches "
        "(eager: PrefixCache; compiled: StaticPrefixCache), median of "
        f"{reps} after warm-up.",
        "", "| path | forward | ms |", "| --- | --- | ---: |", *table, "", *ratios, "",
        f"Acceptance speculative decoding with EU needs, per gamma, against the fastest plain decoding step "
        f"measured here ({plain:.2f} ms): round = gamma K-draft steps + one verification + the round's EU "
        f"({best} steps).",
        "", *need, "",
        f"Whole generations ({best} steps; random weights: acceptance is not meaningful, round times are):", "",
        "| mode | rounds | acceptance | ms per round | tokens/s |", "| --- | ---: | ---: | ---: | ---: |", *gens,
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="embedded", help="the target (a model spec: embedded, a packaged name, ...)")
    ap.add_argument("--drafts", type=Path, default=ROOT / "runs" / "spec" / "drafts" / "ddd")
    ap.add_argument("--proxy", type=Path, default=ROOT / "runs" / "dev" / "proxy" / "adapter")
    ap.add_argument("--task", default="easy-word", help="the prompts' task (easy-word, a GSM8K jsonl, ...)")
    ap.add_argument("--shots", type=int, default=2, help="worked examples before each question")
    ap.add_argument("--json", type=Path, help="also write the modes' numbers (tokens/s, acceptance, device) here")
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1, help="also decode the prompts B at a time: plain batched generate "
                    "against the speculative decoder of several requests (with and without EU)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--gamma", type=int, nargs="+", default=[1, 2], help="tokens proposed per round (several: each)")
    ap.add_argument("--k", type=int, default=6, help="--gpu: drafts in the ensemble")
    ap.add_argument("--dtype", default="auto", help="dtype of the target (auto = float32 for the embedded model)")
    ap.add_argument("--draft-dtype", default="auto", help="dtype of the drafts (auto, float32, bfloat16)")
    ap.add_argument("--propose", nargs="+", default=["mix", "0"], help="proposers: mix and/or draft indices")
    ap.add_argument("--adaptive", action="store_true", help="also each gamma adapted per round (from the acceptance)")
    ap.add_argument("--gamma-max", type=int, default=8, help="with --adaptive: the largest gamma")
    ap.add_argument("--gpu", action="store_true", help="step times on CUDA with random weights of the paper's shapes")
    ap.add_argument("--random-shapes", choices=sorted(SHAPES), default=None,
                    help="step times with random weights of these shapes on --device (a smoke run: tiny on cpu)")
    ap.add_argument("--device", default="cuda", help="with --random-shapes: the device")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="also time compiled static-cache steps (default: on with --gpu, off otherwise)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = ap.parse_args()
    args.propose = [p if p == "mix" else int(p) for p in args.propose]
    if args.gpu or args.random_shapes:
        shapes, device = (args.random_shapes or "paper"), ("cuda" if args.gpu else args.device)
        if args.compile is None:
            args.compile = device.startswith("cuda")
        section = step_times(args, device, shapes)
        key = f"speculative-{device.split(':')[0]}-{shapes}"
        title = f"Speculative decoding step times, {device}, {shapes} shapes"
    else:
        section = real(args)
        name = "embedded" if args.target == "embedded" else args.target
        key, title = f"speculative-{name}", f"Speculative decoding with per-token EU, target {name}"
        if args.target == "embedded":
            key, title = "speculative-embedded", "Speculative decoding with per-token EU on the embedded setup"
        if args.draft_dtype != "auto" or args.dtype != "auto":
            key = f"speculative-target-{args.dtype}-drafts-{args.draft_dtype}-{name}"
            title += f", target {args.dtype}, drafts {args.draft_dtype}"
        if args.json:
            import json

            args.json.write_text(json.dumps(args.record, indent=1))
    print(section)
    write_section(args.out, key, title, section)


if __name__ == "__main__":
    main()
