"""The `drafteu` command line: each subcommand builds a typed config and calls one `run(cfg)`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import warnings
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from drafteu.config import DraftsSection, ScoreConfig, help_of
from drafteu.errors import DraftEUError
from drafteu.generate import GenerateConfig
from drafteu.posterior import NoiseConfig
from drafteu.speculative import SpeculateConfig
from drafteu.train.draft_base import DraftBaseConfig
from drafteu.train.drafts import DraftsConfig
from drafteu.train.loop import TrainConfig
from drafteu.train.proxy import ProxyConfig

app = typer.Typer(
    help="drafteu: token-level epistemic uncertainty of an LLM from a small ensemble of drafts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

THREADS_HELP = "torch CPU threads (default: $DRAFTEU_THREADS, else torch's default)"


def opt(cls, name: str, *flags: str, help_prefix: str = "", help_suffix: str = ""):
    """A typer option for dataclass field ``name`` of ``cls``: its default and its help text come
    from the field, so a command's options cannot drift from the configs they build."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = ...
    if isinstance(default, tuple):
        default = ",".join(default)  # module lists are written comma-separated on the command line
    return typer.Option(default, *flags, help=help_prefix + f.metadata.get("help", "") + help_suffix)


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
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


@app.command()
def score(
    question: str = opt(ScoreConfig, "question", "--question", "-q"),
    target: str = opt(ScoreConfig, "target"),
    answer: str | None = opt(ScoreConfig, "answer"),
    method: str = opt(ScoreConfig, "method"),
    drafts: Path | None = opt(ScoreConfig, "drafts"),
    proxy: Path | None = opt(ScoreConfig, "proxy"),
    family_size: int = opt(ScoreConfig, "family_size", "--family-size", "-k"),
    sigma: float = opt(NoiseConfig, "sigma"),
    rank: int = opt(NoiseConfig, "rank"),
    noise_modules: str = opt(NoiseConfig, "target_modules", help_prefix="comma-separated "),
    scheme: str = opt(NoiseConfig, "scheme"),
    seed: int = opt(ScoreConfig, "seed"),
    shots: int = opt(ScoreConfig, "shots"),
    max_new_tokens: int = opt(ScoreConfig, "max_new_tokens"),
    dtype: str = opt(ScoreConfig, "dtype"),
    device: str = opt(ScoreConfig, "device"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_out: Path | None = opt(ScoreConfig, "json", "--json"),
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
            question=question, target=target, answer=answer, method=method, drafts=drafts, proxy=proxy,
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
    out: Path = opt(GenerateConfig, "out", "--out", "-o"),
    target: str = opt(GenerateConfig, "target"),
    task: str = opt(GenerateConfig, "task"),
    split: str = opt(GenerateConfig, "split"),
    questions: int | None = opt(GenerateConfig, "questions", "--questions", "-n"),
    samples: int = opt(GenerateConfig, "samples"),
    temperature: float = opt(GenerateConfig, "temperature"),
    top_p: float = opt(GenerateConfig, "top_p"),
    max_new_tokens: int = opt(GenerateConfig, "max_new_tokens"),
    batch_size: int = opt(GenerateConfig, "batch_size"),
    shots: int = opt(GenerateConfig, "shots"),
    prefix_cache: bool = opt(GenerateConfig, "prefix_cache"),
    member: int | None = opt(GenerateConfig, "member"),
    family_seed: int = opt(GenerateConfig, "family_seed"),
    sigma: float = opt(NoiseConfig, "sigma"),
    rank: int = opt(NoiseConfig, "rank"),
    steps: int = opt(GenerateConfig, "steps"),
    low: int = opt(GenerateConfig, "low"),
    high: int = opt(GenerateConfig, "high"),
    seed: int = opt(GenerateConfig, "seed"),
    backend: str = opt(GenerateConfig, "backend"),
    tensor_parallel_size: int = opt(GenerateConfig, "tensor_parallel_size"),
    gpu_memory_utilization: float = opt(GenerateConfig, "gpu_memory_utilization"),
    max_model_len: int | None = opt(GenerateConfig, "max_model_len"),
    dtype: str = opt(GenerateConfig, "dtype"),
    device: str = opt(GenerateConfig, "device"),
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
            tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
        )
        summary = generate_stage.run(cfg)
    except DraftEUError as e:
        _fail(str(e))
    console.print(
        f"{summary['rows']} samples of {summary['questions']} questions in {out / 'samples.jsonl'}; "
        f"accuracy {summary['accuracy']:.1%}"
    )


_TRAIN_OPTIONS = {"lr": float, "epochs": float, "max_steps": int, "batch_size": int, "grad_accum": int,
                  "warmup_steps": int, "mixed_precision": str, "save_every": int}


def train_options(fn):
    """Give a training command the TrainConfig options (help from TrainConfig, written once).

    The command receives ``train_overrides``: the options the user set, to apply on top of the
    stage's own defaults.
    """
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.name != "train_overrides"]
    for name, typ in _TRAIN_OPTIONS.items():
        option = typer.Option(None, help=f"{help_of(TrainConfig, name)} (default: the stage's)")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=typ | None))

    @functools.wraps(fn)
    def wrapper(**kwargs):
        overrides = {k: kwargs.pop(k) for k in _TRAIN_OPTIONS}
        return fn(train_overrides={k: v for k, v in overrides.items() if v is not None}, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {**fn.__annotations__, **{k: t | None for k, t in _TRAIN_OPTIONS.items()}}
    return wrapper




@app.command("train-draft-base")
@train_options
def train_draft_base(
    samples: Path = opt(DraftBaseConfig, "samples"),
    out: Path = opt(DraftBaseConfig, "out", "--out", "-o"),
    target: str = opt(DraftBaseConfig, "target"),
    layers: int = opt(DraftBaseConfig, "layers"),
    heldout: float = opt(DraftBaseConfig, "heldout"),
    seed: int = opt(DraftBaseConfig, "seed"),
    device: str = opt(DraftBaseConfig, "device"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    train_overrides: dict | None = None,
):
    """Truncate the target to its first LAYERS layers and warm the draft up by logit distillation."""
    def go():
        from drafteu.train import draft_base

        train = dataclasses.replace(DraftBaseConfig.__dataclass_fields__["train"].default_factory(), **train_overrides)
        m = draft_base.run(DraftBaseConfig(samples=samples, out=out, target=target, layers=layers, heldout=heldout,
                                           train=train, seed=seed, device=device))
        console.print(f"draft base in {out}: top-1 agreement with the target "
                      f"{m['top1_agreement_before']} -> {m['top1_agreement_after']}")
    _stage(go, threads)


@app.command("train-drafts")
@train_options
def train_drafts(
    samples: Path = opt(DraftsConfig, "samples"),
    out: Path = opt(DraftsConfig, "out", "--out", "-o"),
    base: str = opt(DraftsConfig, "base"),
    target: str = opt(DraftsConfig, "target"),
    method: str = opt(DraftsConfig, "method"),
    partitions: int = opt(DraftsConfig, "partitions", "--partitions", "-S"),
    per_partition: int = opt(DraftsConfig, "per_partition", "--per-partition", "-M"),
    lora_r: int = opt(DraftsConfig, "lora_r"),
    lora_alpha: int = opt(DraftsConfig, "lora_alpha"),
    init_sigma: float = opt(DraftsSection, "init_sigma"),
    sigma: float = opt(DraftsSection, "sigma"),
    max_new_tokens: int = opt(DraftsConfig, "max_new_tokens"),
    seed: int = opt(DraftsConfig, "seed"),
    device: str = opt(DraftsConfig, "device"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    train_overrides: dict | None = None,
):
    """Train an S x M draft ensemble (DDD, IDD, FDD) or build an untrained / K-only one."""
    def go():
        from drafteu.train import drafts

        train = dataclasses.replace(DraftsConfig.__dataclass_fields__["train"].default_factory(), **train_overrides)
        m = drafts.run(DraftsConfig(samples=samples, out=out, base=base, target=target, method=method,
                                    partitions=partitions, per_partition=per_partition, lora_r=lora_r,
                                    lora_alpha=lora_alpha, init_noise=NoiseConfig(sigma=init_sigma),
                                    noise=NoiseConfig(sigma=sigma), train=train, max_new_tokens=max_new_tokens,
                                    seed=seed, device=device))
        console.print(f"{m['method']} ensemble of {len(m['adapters'])} drafts in {out / m['method']}")
    _stage(go, threads)


@app.command("train-proxy")
@train_options
def train_proxy(
    samples: list[Path] = opt(ProxyConfig, "samples", help_suffix="; repeat the option"),
    out: Path = opt(ProxyConfig, "out", "--out", "-o"),
    target: str = opt(ProxyConfig, "target"),
    n_teacher: int = opt(ProxyConfig, "n_teacher", "--n-teacher", "--teachers"),
    sigma: float = opt(NoiseConfig, "sigma"),
    heldout: float = opt(ProxyConfig, "heldout"),
    seed: int = opt(ProxyConfig, "seed"),
    device: str = opt(ProxyConfig, "device"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    train_overrides: dict | None = None,
):
    """Train the proxy p_mix by Online Stochastic Distillation against fresh noisy teachers."""
    def go():
        from drafteu.train import proxy

        train = dataclasses.replace(ProxyConfig.__dataclass_fields__["train"].default_factory(), **train_overrides)
        m = proxy.run(ProxyConfig(samples=samples, out=out, target=target, n_teacher=n_teacher,
                                  noise=NoiseConfig(sigma=sigma), heldout=heldout, train=train, seed=seed,
                                  device=device))
        h = m.get("heldout") or {}
        console.print(f"proxy in {out / 'adapter'}; held-out KL to the family mean: proxy "
                      f"{h.get('kl_ref_mean_to_proxy')}, raw target {h.get('kl_ref_mean_to_target')}")
    _stage(go, threads)


@app.command()
def speculate(
    question: str = opt(SpeculateConfig, "question", "--question", "-q"),
    drafts: Path = opt(SpeculateConfig, "drafts"),
    target: str = opt(SpeculateConfig, "target"),
    proxy: Path | None = opt(SpeculateConfig, "proxy"),
    gamma: int = opt(SpeculateConfig, "gamma"),
    propose: str = opt(SpeculateConfig, "propose"),
    bias: str = opt(SpeculateConfig, "bias"),
    eu: bool = opt(SpeculateConfig, "eu"),
    temperature: float = opt(SpeculateConfig, "temperature"),
    max_new_tokens: int = opt(SpeculateConfig, "max_new_tokens"),
    shots: int = opt(SpeculateConfig, "shots"),
    seed: int = opt(SpeculateConfig, "seed"),
    scale: float = opt(SpeculateConfig, "scale"),
    dtype: str = opt(SpeculateConfig, "dtype"),
    draft_dtype: str = opt(SpeculateConfig, "draft_dtype"),
    device: str = opt(SpeculateConfig, "device"),
    compile: str = opt(SpeculateConfig, "compile"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
    json_out: Path | None = opt(SpeculateConfig, "json", "--json"),
):
    """Answer by speculative decoding with the draft ensemble; stream tokens coloured by their EU.

    Greedy (the default) gives exactly the target's greedy answer; every token carries its
    variance (JSD of the drafts) and bias (KL(q_mix || p)).  Prints the acceptance rate and tokens/s.
    """
    from rich.text import Text

    from drafteu.display import color, heatmap

    def stream(pieces, var, bias_t):
        for i, piece in enumerate(pieces):
            style = f"black on {color((float(var[i]) + float(bias_t[i])) / scale)}" if var is not None else None
            console.print(Text(piece, style=style), end="")

    def go():
        from drafteu import speculative

        cfg = SpeculateConfig(question=question, drafts=drafts, target=target, proxy=proxy, gamma=gamma,
                              propose=propose, bias=bias, eu=eu, temperature=temperature,
                              max_new_tokens=max_new_tokens, shots=shots, seed=seed, scale=scale, dtype=dtype,
                              draft_dtype=draft_dtype, device=device, compile=compile, json=json_out)
        result = speculative.run(cfg, on_pieces=stream)
        console.print()
        s = result["speculative"]
        console.print(f"acceptance {s['acceptance']:.1%} ({s['accepted']}/{s['proposed']} proposals, {s['rounds']} "
                      f"rounds), {s['tokens']} tokens in {s['seconds']:.2f} s = {s['tokens_per_s']:.1f} tokens/s",
                      highlight=False)
        if eu:
            console.print(heatmap(result))
        if json_out is not None:
            console.print(f"wrote {json_out}")

    _stage(go, threads)


@app.command()
def reproduce(
    config: Path = typer.Option(..., "--config", "-c", help="experiment YAML, e.g. configs/demo.yaml"),
    run_dir: Path | None = typer.Option(None, "--run", help="run directory (default: runs/<config name>)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set eval.trials=2; "
                                        "the value is read as the key's type (a text key takes it as written, "
                                        "lists as YAML: --set drafts.methods=[ddd,konly]); repeat the option"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
):
    """Run every stage of an experiment (data, drafts, proxy, evaluation, report) into one run directory.

    Finished stages are skipped and interrupted ones resume, so rerunning the same command after a
    kill continues where it stopped.  Ends by writing RUN/report.md, RUN/report.html and RUN/figures/.
    """
    def go():
        from drafteu import pipeline
        from drafteu.config import load_experiment

        parsed = {}
        for item in overrides:
            if "=" not in item:
                raise DraftEUError(f"--set {item!r}: write KEY=VALUE, e.g. --set eval.trials=2")
            key, value = item.split("=", 1)
            parsed[key.strip()] = value  # coerced by the field's type in load_experiment
        cfg = load_experiment(config, parsed)
        out = run_dir or Path("runs") / cfg.name
        pipeline.preflight(cfg, out)  # config errors before anything is printed or written
        console.print(f"reproduce [bold]{cfg.name}[/] into {out}")
        m = pipeline.run(cfg, out, log=lambda s: console.print(s, highlight=False, markup=False))
        console.print(f"done in {m['last_run_seconds']:.0f} s: {out / 'report.md'}, {out / 'report.html'}")
    _stage(go, threads)


@app.command()
def report(
    run_dir: Path = typer.Option(..., "--run", help="a `reproduce` run directory"),
    publish: Path | None = typer.Option(None, help="also copy the report, its figures and every number (JSON) into "
                                        "this folder, e.g. docs/results"),
    name: str | None = typer.Option(None, help="file name of the published report (default: the config's name)"),
):
    """(Re)write a run's report.md, report.html and figures from its eval/*.json, without recomputing
    anything; with --publish, copy them where results are committed (PUBLISH/NAME.md, PUBLISH/NAME/*.png,
    PUBLISH/NAME.json; text above the generated part of an existing NAME.md is kept)."""
    def go():
        from drafteu import report as rep
        from drafteu.config import load_experiment

        if not (run_dir / "config.yaml").is_file():
            raise DraftEUError(f"{run_dir} is not a run directory (no config.yaml); give the --run of a `reproduce`")
        cfg = load_experiment(run_dir / "config.yaml")
        console.print(f"wrote {rep.write(cfg, run_dir)}")
        if publish is not None:
            paths = rep.publish(run_dir, publish, name or cfg.name)
            console.print("published " + ", ".join(str(p) for p in paths.values()))
    _stage(go, None)


def _stage(go, threads) -> None:
    try:
        from drafteu import models

        _quiet_libraries()
        models.set_threads(threads)
        go()
    except DraftEUError as e:
        _fail(str(e))


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
