"""How close each draft is to the target, and what a pass of it costs, on the drafts' held-out answers.

For a `reproduce` run whose drafts held out questions (`drafts.heldout`): the target's answers to those
questions (in no draft's partition), teacher-forced through the target and through every draft - the raw
draft base, each trained draft of the ensembles that have adapters (DDD, IDD, ...), and, with
`--self-draft`, the target's own int8 weight-only self-draft (`draft_base.model: quantize`, the recipe
drafteu builds) - reporting per model the mean per-token KL(p_target || q) and top-1 agreement, and the
wall time of its pass over the same answers against the target's, side by side in one process (each
model's timed pass twice, in alternating order).  Numbers come from drafteu's own window passes and
chunked reductions (train.batches.window_hidden, train.losses.reduce_window).

    python bench/draft_closeness.py --run runs/qwen-gsm8k --self-draft --json docs/results/qwen-gsm8k-closeness.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from divergence import ROOT  # noqa: E402, F401  (the repository root on sys.path)


def _heldout_examples(run: Path, tokenizer):
    from drafteu import fileio
    from drafteu.train.batches import examples_from_rows

    parts = json.loads((run / "drafts" / "ddd" / "partitions.json").read_text())
    held = set(parts.get("heldout") or [])
    if not held:
        raise SystemExit(f"{run}: its drafts held out no questions (drafts.heldout); nothing to measure on")
    rows = [r for r in fileio.read_jsonl(run / "data" / "samples.jsonl") if r["qid"] in held]
    return examples_from_rows(rows, tokenizer.eos_token_id)


def _models(run: Path, cfg, dtype: str, self_draft: bool):
    """(label, model, adapter name or None) for every model measured: the raw draft base (a copy no
    adapter touches), each trained draft (its ensemble's adapters on a base of its own) and the self-draft."""
    from peft import PeftModel

    from drafteu import models
    from drafteu.ensembles import manifest_base, read_drafts_manifest

    out, seen = [], set()
    for method in cfg.drafts.methods:
        directory = run / "drafts" / method
        manifest = read_drafts_manifest(directory)
        spec = manifest_base(manifest, directory)
        if spec not in seen:
            seen.add(spec)
            out.append((f"draft base ({spec})", models.load(spec, dtype=dtype).model, None))
        names = [n for n in manifest["adapters"] if (directory / n / "adapter_config.json").is_file()]
        if not manifest.get("train") or not names:  # noise copies (untrained, K-only): nothing trained to measure
            continue
        model = PeftModel.from_pretrained(models.load(spec, dtype=dtype).model, str(directory / names[0]),
                                          adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(str(directory / n), adapter_name=n)
        out += [(f"{method} {n}", model, n) for n in names]
    if self_draft:
        from drafteu import quantize

        target = models.load(cfg.target, dtype=dtype).model
        quantize.apply(target, quantize.QuantizeSettings(bits=8, scheme="weight-only"))
        out.append(("int8 self-draft (weight-only)", target, None))
    return out


@torch.no_grad()
def measure(run: Path, self_draft: bool, batch_size: int) -> dict:
    from drafteu import divergence, models
    from drafteu.config import load_experiment
    from drafteu.train.batches import collate, window_hidden
    from drafteu.train.losses import reduce_window

    cfg = load_experiment(run / "config.yaml")
    target = models.load(cfg.target, dtype=cfg.dtype)
    examples = _heldout_examples(run, target.tokenizer)
    pad = target.tokenizer.pad_token_id
    batches = [collate(examples[i:i + batch_size], pad, "cpu", share_prefix=True)
               for i in range(0, len(examples), batch_size)]
    drafts = _models(run, cfg, cfg.dtype, self_draft)
    tokens = sum(float(b["loss_mask"].sum()) for b in batches)

    def window(model, name, batch):
        if name is not None:
            model.set_adapter(name)
        return window_hidden(model, batch)

    def timed(model, name) -> float:
        t0 = time.perf_counter()
        for b in batches:
            window(model, name, b)
        return time.perf_counter() - t0

    results = {}
    for label, model, name in drafts:
        kl = agree = 0.0
        for b in batches:
            t = window(target.model, None, b)
            d = window(model, name, b)
            vocab = min(t.head.width if t.head else t.states.shape[-1], d.head.width if d.head else d.states.shape[-1])
            k, a = reduce_window(lambda p, q: (divergence.kl(p[0], q[0]), (p[0].argmax(-1) == q[0].argmax(-1)).float()),
                                 b["loss_mask"], t.cut(vocab), d.cut(vocab))
            kl, agree = kl + float(k.sum()), agree + float(a.sum())
        results[label] = {"kl_target_to_draft": kl / tokens, "top1_agreement": agree / tokens}
    # pass times: the target and each distinct model, alternating order, twice
    distinct = [("target", target.model, None)] + [(lbl, m,
                                                    n) for lbl, m, n in drafts if n is None or lbl.endswith("s0_m0")]
    wall = {lbl: 0.0 for lbl, _, _ in distinct}
    for order in (distinct, distinct[::-1]):
        for lbl, m, n in order:
            wall[lbl] += timed(m, n) / 2
    return {"run": str(run), "target": cfg.target, "dtype": cfg.dtype, "heldout_answers": len(examples),
            "tokens": int(tokens), "threads": torch.get_num_threads(), "models": results,
            "pass_seconds": wall, "pass_vs_target": {k: v / wall["target"] for k, v in wall.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--self-draft", action="store_true", help="also the target's int8 weight-only self-draft")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = measure(args.run, args.self_draft, args.batch_size)
    print(json.dumps(out, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
