"""Typed configs.  Each field's ``help`` metadata is the single source of the CLI's --help text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from drafteu.errors import DraftEUError
from drafteu.estimators import AGGREGATIONS, METHODS
from drafteu.posterior import NoiseConfig


def help_of(cls, name: str) -> str:
    """The ``help`` text of dataclass field ``name`` (used by the CLI)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


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
    method: str = field(
        default="groundtruth",
        metadata={"help": "groundtruth (MI of a fixed noisy target family), tokur (MI of fresh "
                  "noisy copies), entropy (the target's predictive entropy) or drafts (JSD of the "
                  "drafts + KL to the proxy; needs --drafts)"},
    )
    drafts: Path | None = field(
        default=None, metadata={"help": "with --method drafts: a run directory or a drafts directory"}
    )
    proxy: Path | None = field(
        default=None, metadata={"help": "with --method drafts and a drafts directory: the proxy (train-proxy output); "
                                "without it the bias term uses the raw target"}
    )
    family_size: int = field(default=3, metadata={"help": "K: noisy target copies for groundtruth/tokur"})
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    seed: int = field(default=0, metadata={"help": "seed of the noise family (same seed, same numbers)"})
    shots: int = field(default=2, metadata={"help": "worked examples before the question (0..2), as in generate"})
    max_new_tokens: int = field(default=256, metadata={"help": "length limit of a generated answer"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, float32, bfloat16, float16"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu, cuda, cuda:1"})
    json: Path | None = field(default=None, metadata={"help": "write the per-token result as JSON here"})

    def __post_init__(self):
        if not self.question or not self.question.strip():
            raise DraftEUError("--question is empty; pass the problem text to score")
        if self.method not in METHODS:
            raise DraftEUError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "drafts" and self.drafts is None:
            raise DraftEUError("--method drafts needs --drafts DIR (a run directory or a drafts directory)")
        if self.family_size < 1:
            raise DraftEUError(f"--family-size must be >= 1, got {self.family_size}")
        if self.max_new_tokens < 1:
            raise DraftEUError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.answer is not None and not self.answer.strip():
            raise DraftEUError("--answer is empty; omit it to generate an answer")


__all__ = ["ScoreConfig", "NoiseConfig", "help_of", "AGGREGATIONS"]
