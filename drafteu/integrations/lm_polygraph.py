"""drafteu's draft-ensemble EU as an LM-Polygraph estimator (``pip install 'drafteu[polygraph]'``).

LM-Polygraph 0.7 builds an estimator it does not know by importing the module its config names and
calling ``load_estimator(config)`` (``FactoryEstimator``)::

    estimators:
      - name: drafteu.integrations.lm_polygraph
        cfg: {drafts: runs/demo, aggregation: mean}

or from Python, ``DraftEUEstimator(drafts="runs/demo")`` next to its own estimators in a
``UEManager``.  The estimator reads the tokens LM-Polygraph's ``WhiteboxModel`` fed and generated
(``input_tokens``, ``greedy_tokens``) and scores each LM-Polygraph batch in one batched pass of
``estimators.DraftEnsemble.score_batch`` - the class ``drafteu score`` uses - so the numbers are
``drafteu score``'s on the same tokens.  Generation
needs the tokenizer to pad on the left (``WhiteboxModel.from_pretrained`` sets it; set
``tokenizer.padding_side = "left"`` when building the WhiteboxModel from ``estimator.lm``).  Two
conventions are LM-Polygraph's: the prompt row is the padded batch row (its padding is removed
here, on the side LM-Polygraph's tokenizer padded it: ``batch_padding``), and a generated answer
keeps its end-of-sequence token (removed here: drafteu scores the answer's tokens, as ``drafteu
score`` and the pipeline do).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from drafteu import estimators, models, rundir
from drafteu.errors import DraftEUError
from drafteu.methods import ESTIMATORS, named

try:
    from lm_polygraph.estimators.estimator import Estimator
except ImportError as e:  # the module is only imported by LM-Polygraph, or by a user who wants it
    raise ImportError("drafteu.integrations.lm_polygraph needs LM-Polygraph: pip install 'drafteu[polygraph]'") from e

LEVELS = ("sequence", "token")
# what a sequence-level estimator returns: the aggregated EU, or P(wrong) from the run's map
OUTPUTS = ("eu", "p_wrong")


def strip_padding(row: list[int], pad_id: int | None, side: str = "left") -> list[int]:
    """A padded prompt row without its padding (``side``: where the batch was padded)."""
    row = list(row)
    if pad_id is None:
        return row
    if side == "left":
        while row and row[0] == pad_id:
            row.pop(0)
    else:
        while row and row[-1] == pad_id:
            row.pop()
    return row


def batch_padding(stats: dict, fallback) -> tuple[int | None, str]:
    """(pad id, padding side) of the batch in ``stats``: LM-Polygraph's own tokenizer (the
    ``WhiteboxModel`` its manager puts in ``stats["model"]``) padded it; without one, ``fallback``'s
    pad id and the side the rows show (a padded batch's shorter rows start or end with the pad)."""
    tok = getattr(stats.get("model"), "tokenizer", None)
    if tok is not None and getattr(tok, "padding_side", None) in ("left", "right"):
        pad = tok.pad_token_id if tok.pad_token_id is not None else fallback.pad_token_id
        return pad, tok.padding_side
    pad, rows = fallback.pad_token_id, [list(r) for r in stats["input_tokens"]]
    starts = sum(bool(r) and r[0] == pad for r in rows)
    ends = sum(bool(r) and r[-1] == pad for r in rows)
    return pad, "right" if ends > starts else "left"


class _Shared:
    """One loaded target + ensemble for every estimator on the same run (mean, max, sum, token
    level), and the scores of the batch LM-Polygraph last handed them: each answer is scored once."""

    def __init__(self, drafts: str, target: str, proxy: str | None, device: str, dtype: str):
        self.lm = models.load(target, dtype=dtype, device=device)
        drafts_dir, proxy_dir = rundir.resolve_drafts(drafts, proxy)
        self.ensemble = ESTIMATORS[named("estimate")].build(estimators.BuildContext(
            target=self.lm, drafts=drafts_dir, proxy=proxy_dir, device=device, dtype=dtype,
            prefix_len="auto"))  # the benchmark's shared instruction, once
        self.batch, self.scores = None, []

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[estimators.TokenScores]:
        batch = [(tuple(p), tuple(a)) for p, a in pairs]
        if batch != self.batch:
            self.batch, self.scores = batch, self.ensemble.score_batch(pairs)  # one batched pass
        return self.scores


@functools.cache
def _shared(drafts: str, target: str, proxy: str | None, device: str, dtype: str) -> _Shared:
    return _Shared(drafts, target, proxy, device, dtype)


class DraftEUEstimator(Estimator):
    """Token EU of the draft ensemble of ``drafts`` (a run directory or a drafts directory) for the
    target ``target`` (a hub id, a local directory or 'embedded'; the model LM-Polygraph runs).
    ``level='sequence'``: one number per answer, the ``aggregation`` (mean, max or sum) of its token
    EU; ``level='token'``: every answer token's EU, concatenated over answers (LM-Polygraph's
    token-level shape).  ``output='p_wrong'`` (sequence level, a run directory whose hallucination stage
    fitted a map): P(the answer is wrong) from the run's chosen map (``rundir.hallucination_map``; the
    aggregation is the map's; its provenance in ``p_wrong_map``) - calibrated numbers for LM-Polygraph's
    calibration metrics.  ``proxy``: a proxy adapter (a run's own by default).  Estimators with the
    same drafts, target, proxy, device and dtype share one loaded ensemble and score a batch once."""

    def __init__(self, drafts: str | Path, *, target: str = "embedded", aggregation: str = "mean",
                 level: str = "sequence", proxy: str | Path | None = None, device: str = "auto",
                 dtype: str = "auto", output: str = "eu"):
        if aggregation not in estimators.AGGREGATIONS:
            raise DraftEUError(f"aggregation {aggregation!r}: choose one of {', '.join(estimators.AGGREGATIONS)}")
        if level not in LEVELS:
            raise DraftEUError(f"level {level!r}: choose one of {', '.join(LEVELS)}")
        if output not in OUTPUTS or (output == "p_wrong" and level != "sequence"):
            raise DraftEUError(f"output {output!r}: choose eu, or p_wrong with level sequence")
        super().__init__(["input_tokens", "greedy_tokens"], level)
        self.shared = _shared(str(drafts), target, None if proxy is None else str(proxy), device, dtype)
        self.lm, self.ensemble = self.shared.lm, self.shared.ensemble
        self.eos_id = self.lm.tokenizer.eos_token_id
        self.output, self.p_wrong_map = output, None
        if output == "p_wrong":
            fitted = rundir.hallucination_map(Path(drafts), self.ensemble.method)
            if fitted is None:
                raise DraftEUError(f"output p_wrong needs a run directory whose hallucination stage fitted a map for "
                                   f"{self.ensemble.method!r}; {drafts} has none (run `drafteu reproduce`, or use "
                                   "output: eu)")
            self.fitted, self.p_wrong_map, aggregation = fitted, fitted["provenance"], fitted["aggregation"]
        self.aggregation = aggregation

    def __str__(self) -> str:
        if self.level == "token":
            return "DraftEU"
        return "DraftEU-p_wrong" if self.output == "p_wrong" else f"DraftEU-{self.aggregation}"

    def pairs(self, stats: dict) -> list[tuple[list[int], list[int]]]:
        """(prompt ids, answer ids) per generated answer, in drafteu's conventions (see the module)."""
        pad_id, side = batch_padding(stats, self.lm.tokenizer)  # as this batch was padded, not as ours pads
        out = []
        for prompt, answer in zip(stats["input_tokens"], stats["greedy_tokens"], strict=True):
            answer = list(answer)
            if answer and answer[-1] == self.eos_id:
                answer = answer[:-1]
            out.append((strip_padding(prompt, pad_id, side), answer))
        return out

    def token_scores(self, stats: dict) -> list[estimators.TokenScores]:
        return self.shared.score(self.pairs(stats))

    def __call__(self, stats: dict) -> np.ndarray:
        scores = self.token_scores(stats)
        if self.level == "token":
            return np.concatenate([s.eu.numpy() for s in scores] or [np.zeros(0)]).astype(np.float64)
        seq = [s.aggregate(self.aggregation) for s in scores]
        if self.output == "p_wrong":
            from drafteu.calibration import p_wrong

            seq = [p_wrong(x, self.fitted) for x in seq]
        return np.array(seq, dtype=np.float64)


def load_estimator(config) -> DraftEUEstimator:
    """LM-Polygraph's entry point: ``config`` holds DraftEUEstimator's arguments (``drafts`` at least)."""
    config = dict(config or {})
    if "drafts" not in config:
        raise DraftEUError("the drafteu estimator needs `drafts:` (a drafteu run or drafts directory) in its cfg")
    return DraftEUEstimator(**config)
