"""The `drafteu` command line: each subcommand builds a typed config and calls one `run(cfg)`."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console

from drafteu.config import ScoreConfig, help_of
from drafteu.errors import DraftEUError
from drafteu.generate import GenerateConfig
from drafteu.posterior import NoiseConfig

app = typer.Typer(
    help="drafteu: token-level epistemic uncertainty of an LLM from a small ensemble of drafts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

THREADS_HELP = "torch CPU threads (default: $DRAFTEU_THREADS, else torch's default)"


@app.callback()
def _root() -> None:
    """drafteu: token-level epistemic uncertainty of an LLM from a small ensemble of drafts.

    Models: 'embedded' (SmolLM2-135M-Instruct, offline), a hub id, a local directory or a .gguf
    file.  Set DRAFTEU_THREADS to pin torch's CPU threads on a shared machine.
    """


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def score(
    question: str = typer.Option(..., "--question", "-q", help=help_of(ScoreConfig, "question")),
    target: str = typer.Option("embedded", help=help_of(ScoreConfig, "target")),
    answer: str | None = typer.Option(None, help=help_of(ScoreConfig, "answer")),
    method: str = typer.Option("groundtruth", help=help_of(ScoreConfig, "method")),
    family_size: int = typer.Option(3, "--family-size", "-k", help=help_of(ScoreConfig, "family_size")),
    sigma: float = typer.Option(0.1, help=help_of(NoiseConfig, "sigma")),
    rank: int = typer.Option(8, help=help_of(NoiseConfig, "rank")),
    noise_modules: str = typer.Option("q_proj,v_proj", help="comma-separated " + help_of(NoiseConfig, "target_modules")),
    scheme: str = typer.Option("gaussian", help=help_of(NoiseConfig, "scheme")),
    seed: int = typer.Option(0, help=help_of(ScoreConfig, "seed")),
    shots: int = typer.Option(2, help=help_of(ScoreConfig, "shots")),
    max_new_tokens: int = typer.Option(256, help=help_of(ScoreConfig, "max_new_tokens")),
    dtype: str = typer.Option("auto", help=help_of(ScoreConfig, "dtype")),
    device: str = typer.Option("cpu", help=help_of(ScoreConfig, "device")),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_out: Path | None = typer.Option(None, "--json", help=help_of(ScoreConfig, "json")),
):
    """Score the tokens of an answer (generated greedily when --answer is omitted) by their EU."""
    try:
        from drafteu import models
        from drafteu import score as score_stage
        from drafteu.display import heatmap

        _quiet_libraries()
        models.set_threads(threads)
        noise = NoiseConfig(
            sigma=sigma, rank=rank, scheme=scheme,
            target_modules=tuple(m.strip() for m in noise_modules.split(",") if m.strip()),
        )
        cfg = ScoreConfig(
            question=question, target=target, answer=answer, method=method,
            family_size=family_size, noise=noise, seed=seed, shots=shots, max_new_tokens=max_new_tokens,
            dtype=dtype, device=device, json=json_out,
        )
        with console.status(f"scoring with {method} on {target} ..."):
            result = score_stage.run(cfg)
    except DraftEUError as e:
        _fail(str(e))
    console.print(heatmap(result))
    if json_out is not None:
        console.print(f"wrote {json_out}")


@app.command()
def generate(
    out: Path = typer.Option(..., "--out", "-o", help=help_of(GenerateConfig, "out")),
    target: str = typer.Option("embedded", help=help_of(GenerateConfig, "target")),
    task: str = typer.Option("easy-word", help=help_of(GenerateConfig, "task")),
    split: str = typer.Option("train", help=help_of(GenerateConfig, "split")),
    questions: int | None = typer.Option(None, "--questions", "-n", help=help_of(GenerateConfig, "questions")),
    samples: int = typer.Option(4, help=help_of(GenerateConfig, "samples")),
    temperature: float = typer.Option(1.0, help=help_of(GenerateConfig, "temperature")),
    top_p: float = typer.Option(1.0, help=help_of(GenerateConfig, "top_p")),
    max_new_tokens: int = typer.Option(256, help=help_of(GenerateConfig, "max_new_tokens")),
    batch_size: int = typer.Option(8, help=help_of(GenerateConfig, "batch_size")),
    shots: int = typer.Option(2, help=help_of(GenerateConfig, "shots")),
    prefix_cache: bool = typer.Option(True, help=help_of(GenerateConfig, "prefix_cache")),
    member: int | None = typer.Option(None, help=help_of(GenerateConfig, "member")),
    family_seed: int = typer.Option(0, help=help_of(GenerateConfig, "family_seed")),
    sigma: float = typer.Option(0.1, help=help_of(NoiseConfig, "sigma")),
    rank: int = typer.Option(8, help=help_of(NoiseConfig, "rank")),
    steps: int = typer.Option(1, help=help_of(GenerateConfig, "steps")),
    low: int = typer.Option(2, help=help_of(GenerateConfig, "low")),
    high: int = typer.Option(9, help=help_of(GenerateConfig, "high")),
    seed: int = typer.Option(0, help=help_of(GenerateConfig, "seed")),
    backend: str = typer.Option("hf", help=help_of(GenerateConfig, "backend")),
    dtype: str = typer.Option("auto", help=help_of(GenerateConfig, "dtype")),
    device: str = typer.Option("cpu", help=help_of(GenerateConfig, "device")),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
):
    """Sample answers per question from the target (or a noisy family member) into OUT/samples.jsonl.

    Resumable: rerun the same command after an interruption and it continues where it stopped.
    """
    try:
        from drafteu import generate as generate_stage
        from drafteu import models

        _quiet_libraries()
        models.set_threads(threads)
        cfg = GenerateConfig(
            out=out, target=target, task=task, split=split, questions=questions, samples=samples,
            temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
            batch_size=batch_size, shots=shots, prefix_cache=prefix_cache, member=member,
            family_seed=family_seed, noise=NoiseConfig(sigma=sigma, rank=rank), steps=steps,
            low=low, high=high, seed=seed, backend=backend, dtype=dtype, device=device,
        )
        summary = generate_stage.run(cfg)
    except DraftEUError as e:
        _fail(str(e))
    console.print(
        f"{summary['rows']} samples of {summary['questions']} questions in {out / 'samples.jsonl'}; "
        f"accuracy {summary['accuracy']:.1%}"
    )


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
