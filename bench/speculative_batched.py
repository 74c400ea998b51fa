"""Several requests at once, for ``bench/speculative.py --batch B``: plain greedy as one batched ``generate`` of
the HF backend against the speculative decoder of several requests, with and without EU."""

from __future__ import annotations

import time


def batched(args, plain_lm, ens, ens_p, prompts, eos) -> str:
    """Several requests at once (``--batch B``): plain greedy as one batched ``generate`` of the HF backend
    (what `drafteu serve --engine batched` runs) against the speculative decoder of several requests
    (``spec_decoding_batch``, what `--engine speculative` runs for concurrent requests), with and without
    EU, the prompts in groups of B, modes interleaved group by group; ``args.record["batched"]``."""
    from drafteu.generate import HFBackend, Sampling
    from drafteu.spec_decoding_batch import BatchedSpeculativeDecoder, Request

    backend = HFBackend(args.target, plain_lm.tokenizer, model=plain_lm.model, prefix_cache=False)
    gamma = args.gamma[0]
    modes = {"plain greedy (target), batched generate": None,
             f"speculative, gamma {gamma}, no EU": BatchedSpeculativeDecoder.from_ensemble(
                 ens, ens.target, gamma=gamma, eu=False, bias="target"),
             f"speculative, gamma {gamma}, EU (bias vs p_mix)": BatchedSpeculativeDecoder.from_ensemble(
                 ens_p, ens_p.target, gamma=gamma, bias="proxy")}
    groups = [prompts[i: i + args.batch] for i in range(0, len(prompts), args.batch)]
    stats = {m: {"tokens": 0, "seconds": 0.0, "proposed": 0, "accepted": 0, "mismatch": 0} for m in modes}

    def once(dec, group):
        t0 = time.perf_counter()
        if dec is None:
            outs = [ids for ids, _ in backend.generate(group, Sampling(0.0, 1.0, args.max_new_tokens))]
            return outs, time.perf_counter() - t0, 0, 0
        res = dec.generate([Request(p, args.max_new_tokens) for p in group], eos_ids=eos)
        return [r.token_ids for r in res], time.perf_counter() - t0, sum(r.proposed for r in res), \
            sum(r.accepted for r in res)

    for dec in modes.values():  # warm-up
        once(dec, groups[0][:2])
    for g, group in enumerate(groups):
        refs = None
        for mode, dec in modes.items():
            outs, sec, prop, acc = once(dec, group)
            refs = outs if dec is None else refs
            st = stats[mode]
            st["tokens"] += sum(map(len, outs))
            st["seconds"] += sec
            st["proposed"] += prop
            st["accepted"] += acc
            st["mismatch"] += sum(o != r for o, r in zip(outs, refs, strict=True))
        print(f"group {g + 1}/{len(groups)} done", flush=True)
    base = stats["plain greedy (target), batched generate"]
    base_tps = base["tokens"] / base["seconds"]
    args.record["batched"] = {"batch": args.batch, "gamma": gamma, "modes": {
        m: {"tokens_per_s": s["tokens"] / s["seconds"], "vs_plain": s["tokens"] / s["seconds"] / base_tps,
            "acceptance": s["accepted"] / s["proposed"] if s["proposed"] else None,
            "outputs_differing_from_plain_greedy": s["mismatch"]} for m, s in stats.items()}}
    lines = [f"Several requests at once: {len(prompts)} prompts in groups of {args.batch}, each group decoded by "
             "every mode in turn (interleaved), ≤ {args.max_new_tokens} new tokens, greedy.".replace(
                 "{args.max_new_tokens}", str(args.max_new_tokens)), "",
             "| mode | tokens/s (all requests) | vs plain batched | acceptance | outputs ≠ plain greedy |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for mode, st in stats.items():
        tps = st["tokens"] / st["seconds"]
        acc = f"{st['accepted'] / st['proposed']:.1%}" if st["proposed"] else "—"
        lines.append(f"| {mode} | {tps:.2f} | {tps / base_tps:.2f}x | {acc} | {st['mismatch']} |")
    return "\n".join(lines)
