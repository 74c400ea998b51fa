"""LM-Polygraph's benchmark on the embedded model, drafteu's estimator next to LM-Polygraph's own.

LM-Polygraph runs everything: its ``WhiteboxModel`` answers easy-word test questions (one shot, the
chat template, sampled at ``--temperature``), its ``UEManager`` computes each estimator's sequence
uncertainty and scores them with its own metrics (PRR, ROC-AUC).  drafteu enters only as an
estimator (``drafteu.integrations.lm_polygraph``); the labels come from drafteu's answer checker,
wrapped as LM-Polygraph generation metrics: ``correct`` (1 = right, the quality PRR ranks) and
``wrong`` (1 = wrong, for ROC-AUC: LM-Polygraph computes ``roc_auc_score(metric, uncertainty)``,
so a wrong-answer label makes it the hallucination AUROC drafteu reports).

The outside check: for every estimator, the AUROC LM-Polygraph computed must equal drafteu's own
(``evaluate.compare.auroc``, what the hallucination stage's all-answer comparison calls) on the same answers and
labels, matched by position in LM-Polygraph's dataset (each answer is one row; LM-Polygraph keeps
the rows in order).  The hallucination stage's protocol (a logistic map fitted on half of the
questions, test metrics with question-bootstrap intervals; ``evaluate.hallucination.evaluate``)
is run on the same scores too.  Needs the polygraph environment (``make test-polygraph`` builds it).

    .venv-polygraph/bin/python bench/lm_polygraph.py --drafts runs/embedded-study-int8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

# This file's folder goes last on the path: first, it would be the `lm_polygraph` package itself.
HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from divergence import ROOT, shown_args  # noqa: E402


def labelled_metrics():
    """LM-Polygraph generation metrics from drafteu's answer checker: correct (1/0) and wrong (1/0)."""
    from lm_polygraph.generation_metrics.generation_metric import GenerationMetric

    from drafteu import data

    class Checked(GenerationMetric):
        def __init__(self, wrong: bool):
            super().__init__(["greedy_texts"], "sequence")
            self.wrong = wrong

        def __str__(self):
            return "wrong" if self.wrong else "correct"

        def __call__(self, stats, target_texts):
            ok = [data.is_correct(data.extract_answer(t), g)
                  for t, g in zip(stats["greedy_texts"], target_texts, strict=True)]
            return np.array([float(o != self.wrong) for o in ok])

    return [Checked(False), Checked(True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafts", type=Path, required=True, help="a drafteu run (its DDD ensemble and proxy)")
    ap.add_argument("--target", default="embedded")
    ap.add_argument("--questions", type=int, default=100, help="easy-word test questions")
    ap.add_argument("--repeats", type=int, default=3, help="answers per question")
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "lm-polygraph.md")
    args = ap.parse_args()

    import torch
    from lm_polygraph.defaults.register_default_stat_calculators import (
        register_default_stat_calculators,
    )
    from lm_polygraph.estimators import (
        FisherRao,
        MaximumSequenceProbability,
        MeanTokenEntropy,
        Perplexity,
        RenyiNeg,
        SelfCertainty,
    )
    from lm_polygraph.ue_metrics import ROCAUC, PredictionRejectionArea
    from lm_polygraph.utils.builder_enviroment_stat_calculator import (
        BuilderEnvironmentStatCalculator,
    )
    from lm_polygraph.utils.dataset import Dataset
    from lm_polygraph.utils.generation_parameters import GenerationParameters
    from lm_polygraph.utils.manager import UEManager
    from lm_polygraph.utils.model import WhiteboxModel

    from drafteu import data
    from drafteu.evaluate import compare, hallucination
    from drafteu.integrations.lm_polygraph import DraftEUEstimator

    torch.manual_seed(args.seed)
    t0 = time.time()
    ours = [DraftEUEstimator(args.drafts, target=args.target, aggregation=a) for a in ("mean", "max", "sum")]
    lm = ours[0].lm  # LM-Polygraph runs the very model drafteu scores against
    lm.tokenizer.padding_side = "left"  # batched generation (as WhiteboxModel.from_pretrained sets it)
    problems = data.load_task("easy-word", "test", n=args.questions, seed=args.seed)
    shots = data.shots_for("easy-word", 1)
    rows = [p for p in problems for _ in range(args.repeats)]
    dataset = Dataset([data.chat_messages(p.question, shots) for p in rows], [p.gold for p in rows],
                      batch_size=args.batch_size)
    model = WhiteboxModel(lm.model, lm.tokenizer, model_path=args.target, instruct=True,
                          generation_parameters=GenerationParameters(
                              temperature=args.temperature, do_sample=args.temperature > 0,
                              max_new_tokens=args.max_new_tokens))
    theirs = [MaximumSequenceProbability(), Perplexity(), MeanTokenEntropy(), SelfCertainty(), RenyiNeg(),
              FisherRao()]
    man = UEManager(dataset, model, theirs + ours,
                    builder_env_stat_calc=BuilderEnvironmentStatCalculator(model),
                    available_stat_calculators=register_default_stat_calculators(
                        "Whitebox", output_attentions=False, output_hidden_states=False),
                    generation_metrics=labelled_metrics(),
                    ue_metrics=[PredictionRejectionArea(), ROCAUC()],
                    processors=[], ignore_exceptions=False, verbose=True, max_new_tokens=args.max_new_tokens)
    man()
    seconds = time.time() - t0

    wrong = np.array(man.gen_metrics["sequence", "wrong"], dtype=np.int64)
    qids = [p.qid for p in rows]
    raw = {"wrong": wrong.tolist(), "qids": qids, "texts": list(man.stats["greedy_texts"]),
           "scores": {str(e): list(map(float, man.estimations["sequence", str(e)])) for e in theirs + ours},
           "metrics": {" / ".join(map(str, k)): float(v) for k, v in man.metrics.items()}}
    args.out.with_suffix(".raw.json").write_text(json.dumps(raw) + "\n")  # kept whatever follows
    table, checks = [], []
    for est in theirs + ours:
        name = str(est)
        score = np.array(man.estimations["sequence", name], dtype=np.float64)
        lp_auroc = float(man.metrics["sequence", name, "wrong", "roc-auc"])
        lp_prr = float(man.metrics.get(("sequence", name, "correct", "prr_normalized"), np.nan))
        own = compare.auroc(score, wrong)  # what the hallucination stage's all-answer comparison computes
        stage = hallucination.evaluate(score, wrong, qids, seed=args.seed, bootstrap=args.bootstrap)
        checks.append(abs(lp_auroc - own) < 1e-12)
        table.append({"estimator": name, "lm_polygraph_prr": lp_prr, "lm_polygraph_auroc": lp_auroc,
                      "drafteu_auroc": own, "drafteu_prr": hallucination.prr(score, 1 - wrong),
                      "stage_auroc": stage.get("auroc"), "drafteu": est in ours})
    result = {"command": f"python bench/lm_polygraph.py {shown_args()}", "seconds": round(seconds, 1),
              "answers": len(rows), "wrong": int(wrong.sum()), "rows": table,
              "auroc_equal": all(checks)}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.write_text(render(result))
    print(args.out.read_text())
    if not all(checks):
        sys.exit("LM-Polygraph's AUROC differs from drafteu's on the same answers and labels")


def render(r: dict) -> str:
    def iv(m):
        return f"{m['value']:.3f} [{m['low']:.3f}, {m['high']:.3f}]" if isinstance(m, dict) else "-"

    lines = [
        "# drafteu inside LM-Polygraph: its benchmark on the embedded model", "",
        f"`{r['command']}` ({r['seconds'] / 60:.1f} min on this machine's CPU).", "",
        f"{r['answers']} answers, {r['wrong']} wrong ({r['wrong'] / r['answers']:.0%}), generated, scored and "
        "evaluated by LM-Polygraph 0.7 (WhiteboxModel, UEManager, its PRR and ROC-AUC); labels by drafteu's "
        "answer checker as LM-Polygraph generation metrics. drafteu's rows are `drafteu.integrations.lm_polygraph` "
        "on the DDD ensemble and proxy of the run named in the command.", "",
        "| estimator | PRR (LM-Polygraph) | AUROC (LM-Polygraph) | AUROC (drafteu, same answers) | "
        "AUROC, hallucination-stage protocol (test half, 95% interval) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        name = f"**{row['estimator']}**" if row["drafteu"] else row["estimator"]
        lines.append(f"| {name} | {row['lm_polygraph_prr']:.3f} | {row['lm_polygraph_auroc']:.3f} | "
                     f"{row['drafteu_auroc']:.3f} | {iv(row['stage_auroc'])} |")
    lines += ["", "LM-Polygraph's AUROC equals drafteu's on every row: "
              + ("yes (to 1e-12)." if r["auroc_equal"] else "**no**."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
