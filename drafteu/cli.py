"""The `drafteu` command line: each subcommand builds a typed config and calls one `run(cfg)`.

Every option is declared once, as a field of the command's config dataclass (its type, default and
``help`` metadata): ``config_command`` builds the typer command from the fields, the way litgpt
builds its commands from functions' signatures.  Nested sections (the noise, the training
settings) become flat options named in ``NESTED``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from drafteu.errors import DraftEUError
from drafteu.generate import GenerateConfig
from drafteu.perturbation import NoiseCheckConfig
from drafteu.pipeline import STAGES
from drafteu.score import ScoreConfig
from drafteu.serve import ServeConfig
from drafteu.speculate import SpeculateConfig
from drafteu.train.draft_base import DraftBaseConfig
from drafteu.train.drafts import DraftsConfig
from drafteu.train.proxy import ProxyConfig

# rich_markup_mode=None: help texts are shown as written ('drafteu[vllm]', '[ddd,konly]' keep their brackets)
app = typer.Typer(
    help="drafteu: token-level epistemic uncertainty of an LLM from a small ensemble of drafts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
console = Console()
err = Console(stderr=True)

THREADS_HELP = "torch CPU threads (default: $DRAFTEU_THREADS, else torch's default)"

# Short and alternative flags; every other option is --field-name.
FLAGS = {"question": ("--question", "-q"), "out": ("--out", "-o"), "family_size": ("--family-size", "-k"),
         "partitions": ("--partitions", "-S"), "per_partition": ("--per-partition", "-M"), "json": ("--json",),
         "questions": ("--questions", "-n"), "n_teacher": ("--n-teacher", "--teachers")}
# Nested config sections as flat options: section -> {field: option name} ("*": every field, same name).
NOISE = {"sigma": "sigma", "rank": "rank", "target_modules": "noise_modules", "scheme": "scheme",
         "scale": "noise_scale"}
NESTED = {"noise": NOISE, "train": "*", "init_noise": {"sigma": "init_sigma"}, "quantize": "*"}


def _option_type(typ):
    """(the type typer parses, a converter to the field's type) for a config field's type."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # e.g. str | int: typer takes the text, the config converts it
            return str, lambda v: v
        opt, conv = _option_type(inner[0])
        return (opt | None if type(None) in args else opt), (lambda v: None if v is None else conv(v))
    if origin is tuple or (origin is list and args and args[0] is str):
        return str, lambda v: tuple(m.strip() for m in v.split(",") if m.strip())  # comma-separated
    return typ, lambda v: v


def _cli_default(value):
    if isinstance(value, tuple) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return value


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return ...


def config_command(cls, name: str | None = None, *, skip: tuple[str, ...] = (), threads: bool = True):
    """Make ``fn(cfg, **extras)`` a typer command whose options are the fields of ``cls`` (nested
    sections flattened per ``NESTED``) plus ``fn``'s own keyword-only options; the command builds
    ``cls`` from them and turns a ``DraftEUError`` into one line (exit 2)."""

    def decorate(fn: Callable):
        hints = typing.get_type_hints(cls)
        params, build = [], []  # build: (field, nested field or None, option name, converter)
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            default = _field_default(f)
            if f.name in NESTED and dataclasses.is_dataclass(hints[f.name]):
                sub_hints = typing.get_type_hints(hints[f.name])
                mapping = NESTED[f.name]
                subs = {s.name: s.name for s in dataclasses.fields(hints[f.name])} if mapping == "*" else mapping
                for sub, opt_name in subs.items():
                    sub_field = next(s for s in dataclasses.fields(hints[f.name]) if s.name == sub)
                    typ, conv = _option_type(sub_hints[sub])
                    owner = f.metadata.get("help")
                    helptext = f"{owner}: " * bool(owner) + sub_field.metadata.get("help", "")
                    params.append(inspect.Parameter(opt_name, inspect.Parameter.KEYWORD_ONLY, annotation=typ,
                                                    default=typer.Option(_cli_default(getattr(default, sub)),
                                                                         *FLAGS.get(opt_name, ()), help=helptext)))
                    build.append((f.name, sub, opt_name, conv))
                continue
            typ, conv = _option_type(hints[f.name])
            option = typer.Option(_cli_default(default), *FLAGS.get(f.name, ()), help=f.metadata.get("help", ""))
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=typ, default=option))
            build.append((f.name, None, f.name, conv))
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind == inspect.Parameter.KEYWORD_ONLY]
        params += own
        if threads:
            params.append(inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, annotation=int | None,
                                            default=typer.Option(None, help=THREADS_HELP)))

        def make(values: dict):
            top, nested = {}, {}
            for fname, sub, opt_name, conv in build:
                if sub is None:
                    top[fname] = conv(values[opt_name])
                else:
                    nested.setdefault(fname, {})[sub] = conv(values[opt_name])
            for fname, subs in nested.items():
                field = next(f for f in dataclasses.fields(cls) if f.name == fname)
                top[fname] = dataclasses.replace(_field_default(field), **subs)
            return cls(**top)

        @functools.wraps(fn)
        def command(**values):
            extras = {p.name: values[p.name] for p in own}

            def go():
                fn(make(values), **extras)
            _stage(go, values.get("threads"))

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        app.command(name)(command)
        return command

    return decorate


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


def _stage(go, threads) -> None:
    """Run a command: a DraftEUError or an OSError (a full disk, a read-only or missing folder) is one
    line naming the path and what to do, never a traceback; finished work stays on disk."""
    from drafteu import fileio

    try:
        from drafteu import models

        _quiet_libraries()
        models.set_threads(threads)
        go()
    except DraftEUError as e:
        _fail(str(e))
    except OSError as e:
        _fail(fileio.describe_oserror(e))


@config_command(ScoreConfig, "score")
def score(cfg: ScoreConfig) -> None:
    """Score the tokens of an answer (generated greedily when --answer is omitted) by their EU;
    --answers FILE.jsonl scores many in batches."""
    from drafteu import score as score_stage
    from drafteu.display import heatmap

    with console.status(f"scoring with {cfg.method} on {cfg.target} ..."):
        results = score_stage.run(cfg)
    for result in results if isinstance(results, list) else [results]:
        console.print(heatmap(result))
        _say_diagnostic(result)
    if cfg.json is not None:
        console.print(f"wrote {cfg.json}")


def _say_diagnostic(result: dict) -> None:
    """The bias term's share of a draft-ensemble EU, and the warning when it dominates."""
    d = result.get("diagnostic")
    if not d:
        return
    kl = f"; the draft base's KL to the target: {d['base_kl_to_target']:.4f} nats/token" if d["base_kl_to_target"] \
        is not None else ""
    console.print(f"bias term: {d['bias_share']:.0%} of the EU{kl}", highlight=False)
    if d["warning"]:
        err.print(f"warning: {escape(d['warning'])}", highlight=False, soft_wrap=True)


@config_command(NoiseCheckConfig, "noise-check")
def noise_check(cfg: NoiseCheckConfig) -> None:
    """How strong each of --sigmas is on the target: a fixed K-member family's mean MI per token
    against its ceiling ln K, and the members' KL to the target, on the same answers.  Choose a sigma
    for a new model from it (docs/method.md §2)."""
    from rich.table import Table

    from drafteu import perturbation

    with console.status(f"measuring {len(cfg.sigma_values)} noise setting(s) on {cfg.target} ..."):
        rows = perturbation.check(cfg)
    table = Table(title=f"{rows[0]['tokens']} answer tokens, K = {cfg.family_size}")
    for col in ("sigma", "scale", "mean MI", "MI / ln K", "KL(member || target)", "KL(mean || target)"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['sigma']:g}", r["scale"], f"{r['mean_mi']:.4f}", f"{r['share_of_ln_k']:.1%}",
                      f"{r['kl_member_to_target']:.4f}", f"{r['kl_mean_to_target']:.4f}")
    console.print(table)
    for r in rows:
        if r["warning"]:
            err.print(f"sigma {r['sigma']:g}: {escape(r['warning'])}", highlight=False, soft_wrap=True)
    if cfg.json is not None:
        console.print(f"wrote {cfg.json}")


@config_command(GenerateConfig, "generate")
def generate(cfg: GenerateConfig) -> None:
    """Sample answers per question from the target (or a noisy family member) into OUT/samples.jsonl.

    Resumable: rerun the same command after an interruption and it continues where it stopped.
    """
    from drafteu import generate as generate_stage

    summary = generate_stage.run(cfg)
    console.print(f"{summary['rows']} samples of {summary['questions']} questions in {cfg.out / 'samples.jsonl'}; "
                  f"accuracy {summary['accuracy']:.1%}")


@config_command(DraftBaseConfig, "train-draft-base")
def train_draft_base(cfg: DraftBaseConfig) -> None:
    """Truncate the target to its first LAYERS layers and warm the draft up by logit distillation."""
    from drafteu.train import draft_base

    m = draft_base.run(cfg)
    console.print(f"draft base in {cfg.out}: top-1 agreement with the target "
                  f"{m['top1_agreement_before']} -> {m['top1_agreement_after']}")


@config_command(DraftsConfig, "train-drafts")
def train_drafts(cfg: DraftsConfig) -> None:
    """Train an S x M draft ensemble (DDD, IDD, FDD, GKD, MiniLLM) or build an untrained / K-only one."""
    from drafteu.train import drafts

    m = drafts.run(cfg)
    console.print(f"{m['method']} ensemble of {len(m['adapters'])} drafts in {cfg.out / m['method']}")


@config_command(ProxyConfig, "train-proxy")
def train_proxy(cfg: ProxyConfig) -> None:
    """Train the proxy p_mix by Online Stochastic Distillation against fresh noisy teachers.

    Give --samples once per teacher's samples.jsonl (they are mixed equally)."""
    from drafteu.train import proxy

    m = proxy.run(cfg)
    h = m.get("heldout") or {}
    console.print(f"proxy in {cfg.out / 'adapter'}; held-out KL to the family mean: proxy "
                  f"{h.get('kl_ref_mean_to_proxy')}, raw target {h.get('kl_ref_mean_to_target')}")


@config_command(SpeculateConfig, "speculate")
def speculate(cfg: SpeculateConfig) -> None:
    """Answer by speculative decoding with the draft ensemble; stream tokens coloured by their EU.

    Greedy (the default) gives exactly the target's greedy answer; every token carries its
    variance (JSD of the drafts) and bias (KL(q_mix || p)).  Prints the acceptance rate and tokens/s.
    """
    from rich.text import Text

    from drafteu import speculate
    from drafteu.display import color, heatmap

    def stream(pieces, var, bias_t):
        for i, piece in enumerate(pieces):
            style = f"black on {color((float(var[i]) + float(bias_t[i])) / cfg.scale)}" if var is not None else None
            console.print(Text(piece, style=style), end="")

    result = speculate.run(cfg, on_pieces=stream)
    console.print()
    s = result["speculative"]
    console.print(f"acceptance {s['acceptance']:.1%} ({s['accepted']}/{s['proposed']} proposals, {s['rounds']} "
                  f"rounds), {s['tokens']} tokens in {s['seconds']:.2f} s = {s['tokens_per_s']:.1f} tokens/s",
                  highlight=False)
    if cfg.eu:
        console.print(heatmap(result))
        _say_diagnostic(result)
    if cfg.json is not None:
        console.print(f"wrote {cfg.json}")


@config_command(ServeConfig, "serve")
def serve(cfg: ServeConfig) -> None:
    """Serve a run's drafts over an OpenAI-compatible HTTP API: chat and text completions whose every
    token carries its EU, /v1/score for text you already have, /health and /metrics.

    Needs the serve extra: pip install 'drafteu[serve]'.  Binds 127.0.0.1 unless --host says otherwise.
    """
    from drafteu import serve as serve_stage

    serve_stage.run(cfg, log=lambda s: console.print(s, highlight=False, markup=False))


@app.command()
def reproduce(
    config: Path = typer.Option(..., "--config", "-c", help="experiment YAML, e.g. configs/demo.yaml"),
    run_dir: Path | None = typer.Option(None, "--run", help="run directory (default: runs/<config name>)"),
    overrides: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set eval.trials=2; "
                                        "the value is read as the key's type (a text key takes it as written, "
                                        "lists as YAML: --set drafts.methods=[ddd,konly]); repeat the option"),
    until: str | None = typer.Option(None, help=f"stop after this stage ({', '.join(s.name for s in STAGES)}); "
                                     "no report"),
    threads: int | None = typer.Option(None, help=THREADS_HELP),
):
    """Run every stage of an experiment (data, drafts, proxy, evaluation, report) into one run directory.

    Each stage records what its outputs were made from: a current stage is skipped, an interrupted
    one resumes, and one whose config keys changed is recomputed with everything after it (the keys
    are named; its previous outputs stay until the new ones are complete, and come back if it
    fails).  Ends by writing RUN/report.md, RUN/report.html and RUN/figures/.
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
        # pipeline.run checks the config (preflight) before it prints or writes anything
        m = pipeline.run(cfg, out, log=lambda s: console.print(s, highlight=False, markup=False), until=until)
        console.print(f"done in {m['last_run_seconds']:.0f} s" + ("" if until else
                                                                  f": {out / 'report.md'}, {out / 'report.html'}"))
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
        from drafteu import fileio
        from drafteu import report as rep
        from drafteu.config import load_experiment

        if not (run_dir / "config.yaml").is_file():
            raise DraftEUError(f"{run_dir} is not a run directory (no config.yaml); give the --run of a `reproduce`")
        cfg = load_experiment(run_dir / "config.yaml")
        if publish is not None:  # a bad --publish or --name is refused before anything is written
            rep.check_publish(publish, name or cfg.name)
        with fileio.locked(run_dir, "run"):
            console.print(f"wrote {rep.write(cfg, run_dir)}")
        if publish is not None:
            paths = rep.publish(run_dir, publish, name or cfg.name)
            console.print("published " + ", ".join(str(p) for p in paths.values()))
    _stage(go, None)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
