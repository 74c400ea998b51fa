"""`drafteu score`: generate (or take) an answer and report its token-level EU."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from drafteu import data, estimators, models, rundir
from drafteu.answers import read_answers, to_json
from drafteu.calibration import p_wrong
from drafteu.config import MAX_FAMILY
from drafteu.data import token_pieces
from drafteu.errors import DraftEUError
from drafteu.estimators import METHODS
from drafteu.fileio import write_json
from drafteu.generate import greedy_answer
from drafteu.hardware import DEVICE_HELP, KERNEL_HELP, SCORING_KERNELS
from drafteu.methods import ESTIMATORS, named
from drafteu.posterior import NoiseConfig, NoisyModel


@dataclass
class ScoreConfig:
    """`drafteu score`: token-level EU of one (question, answer) pair."""

    question: str = field(metadata={"help": "the question (problem text) to answer and score"})
    target: str = field(
        default="embedded",
        metadata={"help": "target model: 'embedded' (SmolLM2-135M-Instruct), a hub id, a local "
                  "directory, or a .gguf file"},
    )
    answer: str | None = field(
        default=None, metadata={"help": "the answer to score; generated greedily by the target when omitted"}
    )
    answers: Path | None = field(
        default=None, metadata={"help": "a JSONL file of answers to score in batches, one per line: "
                                "{\"answer\": ...} (the --question) or {\"question\": ..., \"answer\": ...}; "
                                "--json then writes a list"})
    method: str = field(
        default=named("truth"),
        metadata={"help": "; ".join(kind.help for kind in ESTIMATORS.values())},
    )
    drafts: Path | None = field(
        default=None, metadata={"help": "with --method drafts: a run directory or a drafts directory"}
    )
    proxy: Path | None = field(
        default=None, metadata={"help": "with --method drafts and a drafts directory: the proxy (train-proxy output); "
                                "without it the bias term uses the raw target"}
    )
    family_size: int = field(default=3, metadata={"help": "K: noisy target copies of an MI method (" + ", ".join(
        name for name, kind in ESTIMATORS.items() if kind.size_setting) + ")"})
    noise: NoiseConfig = field(default_factory=NoiseConfig, metadata={"help": "the noise of the family / TokUR copies"})
    seed: int = field(default=0, metadata={"help": "seed of the noise family (same seed, same numbers)"})
    shots: int = field(default=2, metadata={"help": "worked examples before the question (0..2), as in generate"})
    max_new_tokens: int = field(default=256, metadata={"help": "length limit of a generated answer"})
    dtype: str = field(default="auto", metadata={"help": "dtype of every model (target, drafts, "
                                                         "proxy): auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    draft_kernel: str = field(default="recipe", metadata={"help": "with --method drafts: " + KERNEL_HELP})
    json: Path | None = field(default=None, metadata={"help": "write the per-token result as JSON here"})

    def __post_init__(self):
        if not self.question or not self.question.strip():
            raise DraftEUError("--question is empty; pass the problem text to score")
        if self.draft_kernel not in SCORING_KERNELS:
            raise DraftEUError(f"--draft-kernel {self.draft_kernel!r}: choose one of {', '.join(SCORING_KERNELS)}")
        if self.method not in METHODS:
            raise DraftEUError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        kind = ESTIMATORS[self.method]
        if kind.uses_drafts and self.drafts is None:
            raise DraftEUError(f"--method {self.method} needs --drafts DIR (a run directory or a drafts directory)")
        if kind.size_setting is not None and self.family_size < 2:
            raise DraftEUError(f"--family-size {self.family_size}: the mutual information of fewer than 2 noisy "
                               "copies is 0 by definition; use K >= 2 (the paper uses 3)")
        if self.family_size > MAX_FAMILY:
            raise DraftEUError(f"--family-size {self.family_size}: at most {MAX_FAMILY} (each copy is one more "
                               "target pass per token; the paper uses 3)")
        if self.max_new_tokens < 1:
            raise DraftEUError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.answer is not None and not self.answer.strip():
            raise DraftEUError("--answer is empty; omit it to generate an answer")
        if self.answers is not None and self.answer is not None:
            raise DraftEUError("give --answer or --answers, not both")
        if self.answers is not None and not Path(self.answers).is_file():
            raise DraftEUError(f"--answers {self.answers}: no such file (a JSONL of {{\"answer\": ...}} lines)")


def run(cfg: ScoreConfig) -> dict | list[dict]:
    """Load the target, get the answer(s), score them in one batched pass, return (and optionally
    write) the JSON: one object, or a list of them for ``--answers``."""
    if cfg.json is not None and Path(cfg.json).is_dir():
        raise DraftEUError(f"--json {cfg.json} is a directory; give a file path")
    items = read_answers(cfg.answers, cfg.question) if cfg.answers is not None else None
    lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    drafts_dir, proxy_dir = rundir.resolve_drafts(cfg.drafts, cfg.proxy) if cfg.drafts is not None else (None, None)
    kind = ESTIMATORS[cfg.method]
    # built (and checked: an ensemble's drafts and proxy loaded) before generating anything; answers to several
    # prompts share their prompts' common prefix
    est = kind.build(estimators.BuildContext(
        target=lm, noisy=NoisyModel(lm.model, cfg.noise), drafts=drafts_dir, proxy=proxy_dir, device=cfg.device,
        dtype=cfg.dtype, kernel=cfg.draft_kernel, seed=cfg.seed, prefix_len="auto" if items is not None else 0,
        sizes={kind.size_setting: cfg.family_size} if kind.size_setting else {}))
    shots = data.shots_for("score", cfg.shots)
    if items is None:
        prompt_ids = data.format_prompt(lm.tokenizer, cfg.question, shots)
        if cfg.answer is None:
            models.check_context(lm.model.config, len(prompt_ids) + cfg.max_new_tokens,
                                 "the prompt + --max-new-tokens", "shorten the question or lower --max-new-tokens",
                                 cfg.target)
            with est.base_target():
                response_ids = greedy_answer(lm.model, lm.tokenizer, prompt_ids, cfg.max_new_tokens)
        else:
            response_ids = list(lm.tokenizer(cfg.answer, add_special_tokens=False)["input_ids"])
        pairs, questions = [(prompt_ids, response_ids)], [cfg.question]
    else:
        prompts = {q: data.format_prompt(lm.tokenizer, q, shots) for q in dict.fromkeys(q for q, _ in items)}
        pairs = [(prompts[q], list(lm.tokenizer(a, add_special_tokens=False)["input_ids"])) for q, a in items]
        questions = [q for q, _ in items]
    for n, (prompt_ids, response_ids) in enumerate(pairs, 1):
        where = f" (answer {n})" if items is not None else ""
        models.check_context(lm.model.config, len(prompt_ids) + len(response_ids), "the prompt + answer" + where,
                             "shorten the question or the answer", cfg.target)
    # the run's map from sequence EU to P(wrong) (a run directory's hallucination stage), with its provenance
    fitted = rundir.hallucination_map(Path(cfg.drafts), est.method) if cfg.drafts is not None else None
    results = []
    for question, (_, response_ids), scores in zip(questions, pairs, est.score_batch(pairs), strict=True):
        answer = lm.tokenizer.decode(response_ids, skip_special_tokens=True)
        result = to_json(question, answer, cfg.method, cfg.target, scores, token_pieces(lm.tokenizer, response_ids))
        if est.has_terms and response_ids:
            result["diagnostic"] = estimators.bias_diagnostic(scores.variance, scores.bias, est.base_kl, est.proxy_fit)
        if est.kernel is not None:
            result["draft_kernel"] = est.kernel  # what the self-draft's layers ran on, and why
        if fitted is not None and response_ids:
            result["p_wrong"] = p_wrong(result["sequence"][fitted["aggregation"]], fitted)
            result["p_wrong_map"] = fitted["provenance"]
        results.append(result)
    out = results if items is not None else results[0]
    if cfg.json is not None:
        write_json(cfg.json, out)
    return out
