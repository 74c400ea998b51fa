"""Typed configs.  Each field's ``help`` metadata is the single source of the CLI's --help text."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

from drafteu import draft_base_kinds, fileio
from drafteu.errors import DraftEUError
from drafteu.estimators import AGGREGATIONS
from drafteu.hardware import DEVICE_HELP, KERNEL_HELP, SCORING_KERNELS
from drafteu.posterior import NoiseConfig

MAX_FAMILY = 64  # noisy copies per scored token: each is a full target pass


def help_of(cls, name: str) -> str:
    """The ``help`` text of dataclass field ``name`` (used by the CLI)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)


__all__ = ["NoiseConfig", "help_of", "MAX_FAMILY"]


# --------------------------------------------------------------------------------------------
# Experiment configs (`drafteu reproduce --config configs/<name>.yaml`): one YAML per experiment.
# --------------------------------------------------------------------------------------------

from drafteu.generate import SamplingSettings  # noqa: E402
from drafteu.methods import DRAFT_METHODS  # noqa: E402
from drafteu.train.draft_base import DraftBaseSettings  # noqa: E402
from drafteu.train.drafts import DraftSettings  # noqa: E402
from drafteu.train.proxy import ProxySettings  # noqa: E402
from drafteu.vllm_engine import EngineSettings  # noqa: E402


@dataclass(kw_only=True)
class DataSection(SamplingSettings):
    """Target samples the drafts are distilled on (paper Sec. 4.2: 4 answers per question); the
    fields of `drafteu generate` (``generate.SamplingSettings``)."""


@dataclass(kw_only=True)
class GenerationSection(EngineSettings):
    """How every generation stage runs (draft data, draft-base data, teacher data, evaluation
    answers): the backend and its engine options (`drafteu generate --backend`)."""

    backend: str = field(default="hf", metadata={"help": "hf (transformers' generate) or vllm (vLLM's engine; "
                                                 "pip install 'drafteu[vllm]')"})

    def __post_init__(self):
        super().__post_init__()
        from drafteu.generate import BACKENDS

        if self.backend not in BACKENDS:
            raise DraftEUError(f"generation.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass(kw_only=True)
class DraftBaseData(SamplingSettings):
    """Target answers the draft base is warmed up on, when it has its own (the fields of `drafteu
    generate`; train split), e.g. more questions or another task than the drafts' data."""


@dataclass(kw_only=True)
class DraftBaseSection(DraftBaseSettings):
    """The draft base: a sibling model, 'truncate' (the target's first layers, warmed up with the
    fields of `drafteu train-draft-base`) or 'quantize' (the target itself at low precision, the
    ``quantize`` fields; docs/method.md §15)."""

    model: str = field(default=draft_base_kinds.DEFAULT, metadata={"help": draft_base_kinds.MODEL_HELP})
    data: DraftBaseData | None = field(default=None, metadata={
        "help": "the warm-up data: None = the run's draft data (the data section); a mapping of generate's "
                "fields = target answers of its own (e.g. GSM8K train questions)"})
    cache: bool = field(default=True, metadata={
        "help": "keep the trained base in the machine cache ($DRAFTEU_CACHE/draft_base), keyed by the target and "
                "the recipe (layers, training, data), and copy it into every run with the same recipe"})

    location_fields = ("cache",)  # where the base is kept, not what it is


@dataclass(kw_only=True)
class DraftsSection(DraftSettings):
    """Draft ensembles (Sec. 4.3, App. B.2-B.6, Table 8): the methods and layouts to build, each with
    the fields of `drafteu train-drafts` (``train.drafts.DraftSettings``)."""

    methods: list[str] = field(default_factory=lambda: [n for n, m in DRAFT_METHODS.items() if m.default],
                               metadata={"help": "draft methods: " + ", ".join(DRAFT_METHODS)})
    layouts: list[list[int]] = field(default_factory=list, metadata={"help": "extra DDD S x M layouts (Table "
                                                                             "5), e.g. [[1, 6], [3, 2]]"})
    init_sigma: float = field(default=0.5, metadata={"help": "IDD/FDD initialization noise (sigma; "
                                                             "rank, modules and scheme from `noise`)"})
    sigma: float = field(default=0.1, metadata={"help": "untrained / K-only / GKD / MiniLLM noise (sigma)"})
    baseline_steps: int | None = field(default=None, metadata={
        "help": "max_steps of the on-policy GKD / MiniLLM drafts (None: train.max_steps); each of their steps "
                "samples from the student and runs the target, ~8x an SFT step on a CPU"})

    def __post_init__(self):
        super().__post_init__()
        bad = [m for m in self.methods if m not in DRAFT_METHODS]
        if bad:
            raise DraftEUError(f"unknown draft method(s) {bad}; choose from {', '.join(DRAFT_METHODS)}")
        if not self.methods:
            raise DraftEUError("drafts.methods is empty; name at least one of " + ", ".join(DRAFT_METHODS))
        if self.baseline_steps is not None and self.baseline_steps < 1:
            raise DraftEUError(f"drafts.baseline_steps must be >= 1 (or null), got {self.baseline_steps}")
        for lay in self.layouts:
            if len(lay) != 2 or min(lay) < 1:
                raise DraftEUError(f"drafts.layouts entries are [S, M] with S, M >= 1, got {lay}")
        for key in ("init_sigma", "sigma"):
            if getattr(self, key) < 0:
                raise DraftEUError(f"drafts.{key} must be >= 0 (a noise scale), got {getattr(self, key)}")


@dataclass(kw_only=True)
class ProxySection(ProxySettings):
    """The OSD proxy (Sec. 3.4, App. B.1, Table 7): its data, then the fields of `drafteu train-proxy`
    (``train.proxy.ProxySettings``)."""

    data: str = field(default="teachers", metadata={"help": "'teachers': answers of fixed noisy teachers (paper); "
                                                    "'samples': re-use the draft data (cheaper)"})
    teachers: int = field(default=3, metadata={"help": "fixed noisy teachers that generate the data"})
    questions: int | None = field(default=None, metadata={"help": "questions per teacher (None: all)"})
    samples: int = field(default=5, metadata={"help": "answers per question per teacher"})

    def __post_init__(self):
        super().__post_init__()
        if self.data not in ("teachers", "samples"):
            raise DraftEUError(f"proxy.data must be 'teachers' or 'samples', got {self.data!r}")
        if self.teachers < 1:
            raise DraftEUError("proxy.teachers must be >= 1")
        if self.samples < 1 or (self.questions is not None and self.questions < 1):
            raise DraftEUError(f"proxy.samples and proxy.questions must be >= 1 (questions null: all), got "
                               f"{self.samples} and {self.questions}")


def section_values(section, settings_cls) -> dict:
    """The ``settings_cls`` fields of an experiment section (to build that stage's config)."""
    return {f.name: getattr(section, f.name) for f in dataclasses.fields(settings_cls)}


@dataclass
class EvalSection:
    """Evaluation (Sec. 4.5, 5; App. B.5; docs/method.md §4, §5, §9-11)."""

    task: str | None = field(default=None, metadata={"help": "task of the evaluated questions (None: data.task; "
                                                     "give the test file when data.task is a jsonl path)"})
    split: str = field(default="test", metadata={"help": "split of the evaluated questions"})
    questions: int | None = field(default=None, metadata={"help": "first N test questions (None: all)"})
    repeats: int = field(default=3, metadata={"help": "answers per test question (App. B.5: 3)"})
    temperature: float = field(default=1.0, metadata={"help": "0 = greedy answers"})
    max_new_tokens: int = 400
    batch_size: int = field(default=8, metadata={"help": "answers generated together"})
    score_batch: int = field(default=16, metadata={"help": "answers scored together (padded batches; the numbers do "
                                                   "not depend on it, memory grows with it)"})
    family_size: int = field(default=3, metadata={"help": "K_T of the ground-truth family"})
    tokur_size: int = field(default=3, metadata={"help": "K of TokUR"})
    trials: int = field(default=5, metadata={"help": "independent trials (docs/method.md §5)"})
    retrain_per_trial: bool = field(default=False, metadata={"help": "retrain every draft ensemble "
                                                                     "per trial (GPU configs)"})
    fidelity_questions: int | None = field(default=None, metadata={"help": "questions whose first answer is scored "
                                                                           "against the ground truth (None: all)"})
    aggregations: list[str] = field(default_factory=lambda: ["mean", "max", "sum"])
    fit_fraction: float = field(default=0.5, metadata={"help": "share of questions the logistic map is fitted on"})
    bootstrap: int = field(default=1000, metadata={"help": "bootstrap resamples for confidence intervals"})
    ece_bins: int = 15
    reference_size: int = field(default=16, metadata={"help": "K_ref of the proxy-robustness reference family"})
    proxy_ks: list[int] = field(default_factory=lambda: [3, 10], metadata={"help": "K of the fresh target "
                                                                                   "copies in Table 4"})
    proxy_questions: int | None = field(default=None, metadata={"help": "questions used for proxy "
                                                                        "robustness (None: all)"})
    cost_responses: int = field(default=16, metadata={"help": "responses timed per method for the cost table"})
    heatmap_examples: int = field(default=3, metadata={"help": "answers shown as EU heat-maps in the report"})
    draft_kernel: str = field(default="recipe", metadata={"help": KERNEL_HELP})

    # how answers are batched, what the report shows
    location_fields = ("batch_size", "score_batch", "heatmap_examples")

    def __post_init__(self):
        fileio.require_finite(self)
        if self.draft_kernel not in SCORING_KERNELS:
            raise DraftEUError(f"eval.draft_kernel must be one of {', '.join(SCORING_KERNELS)}, got "
                               f"{self.draft_kernel!r}")
        if self.temperature < 0:
            raise DraftEUError(f"eval.temperature must be >= 0 (0: greedy answers), got {self.temperature}")
        if self.questions is not None and self.questions < 1:
            raise DraftEUError(f"eval.questions must be >= 1 (or null: all), got {self.questions}")
        if self.fidelity_questions is not None and self.fidelity_questions < 1:
            raise DraftEUError(f"eval.fidelity_questions must be >= 1 (or null: all), got {self.fidelity_questions}")
        if self.proxy_questions is not None and self.proxy_questions < 1:
            raise DraftEUError(f"eval.proxy_questions must be >= 1 (or null: all), got {self.proxy_questions}")
        for key in ("max_new_tokens", "batch_size", "score_batch", "bootstrap", "ece_bins", "cost_responses"):
            if getattr(self, key) < 1:
                raise DraftEUError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.heatmap_examples < 0:
            raise DraftEUError(f"eval.heatmap_examples must be >= 0, got {self.heatmap_examples}")
        bad = [a for a in self.aggregations if a not in AGGREGATIONS]
        if bad or not self.aggregations:
            raise DraftEUError(f"eval.aggregations must be from {AGGREGATIONS}, got {self.aggregations}")
        if self.trials < 1 or self.repeats < 1:
            raise DraftEUError("eval.trials and eval.repeats must be >= 1")
        if not (2 <= self.family_size <= MAX_FAMILY and 2 <= self.tokur_size <= MAX_FAMILY):
            raise DraftEUError(f"eval.family_size and eval.tokur_size must be in 2..{MAX_FAMILY} (the mutual "
                               "information of one copy is 0 by definition; the paper uses 3)")
        if not 0 < self.fit_fraction < 1:
            raise DraftEUError(f"eval.fit_fraction must be in (0, 1), got {self.fit_fraction}")
        if any(k < 1 for k in self.proxy_ks) or self.reference_size < 2:
            raise DraftEUError("eval.proxy_ks must be >= 1 and eval.reference_size >= 2")


@dataclass
class ExperimentConfig:
    """One experiment: every stage of `drafteu reproduce`, from data to report."""

    name: str = "experiment"
    target: str = field(default="embedded", metadata={"help": "target model: embedded, hub id, local dir or .gguf"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    dtype: str = "auto"
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    data: DataSection = field(default_factory=DataSection)
    generation: GenerationSection = field(default_factory=GenerationSection)
    draft_base: DraftBaseSection = field(default_factory=DraftBaseSection)
    drafts: DraftsSection = field(default_factory=DraftsSection)
    proxy: ProxySection = field(default_factory=ProxySection)
    eval: EvalSection = field(default_factory=EvalSection)
    notes: str = field(default="", metadata={"help": "free text shown at the top of the report"})

    location_fields = ("device",)


def _build(cls, value, where: str):
    """``value`` (YAML builtins) as an instance of ``cls``, with errors naming the YAML path."""
    import typing

    if dataclasses.is_dataclass(cls):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise DraftEUError(f"{where or 'the config'} must be a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise DraftEUError(f"unknown key(s) {unknown} in {where or 'the config'}; "
                               f"known: {', '.join(sorted(names))}")
        kwargs = {k: _build(hints[k], v, f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return cls(**kwargs)
        except (TypeError, DraftEUError) as e:
            raise DraftEUError(f"{where or 'the config'}: {e}") from e
    origin, args = typing.get_origin(cls), typing.get_args(cls)
    if origin in (typing.Union, __import__("types").UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise DraftEUError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else object
        out = [_build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if cls is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # YAML's .nan / .inf, or --set KEY=nan
            raise DraftEUError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if cls is Path and isinstance(value, str):
        return Path(value)
    if cls in (int, float, str, bool) and not isinstance(value, cls) or (cls is int and isinstance(value, bool)):
        raise DraftEUError(f"{where} must be {cls.__name__}, got {value!r}")
    return value


def yaml_load(text: str):
    """YAML with YAML 1.2 booleans: only true/false are booleans, so ``mixed_precision: no`` is the
    string 'no' (PyYAML's default 1.1 rules read yes/no/on/off as booleans)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return yaml.load(text, Loader=Loader)


def field_type(cls, key: str):
    """The type of dotted config key ``key`` (``drafts.train.lr``) in dataclass ``cls``."""
    import typing

    typ, where = cls, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(typ):
            raise DraftEUError(f"--set {key}: {'.'.join(where)} is a value, not a section")
        hints = typing.get_type_hints(typ)
        if part not in hints:
            known = ", ".join(f.name for f in dataclasses.fields(typ))
            raise DraftEUError(f"--set {key}: unknown key {part!r} in {'.'.join(where) or 'the config'}; "
                               f"known: {known}")
        typ = hints[part]
        where.append(part)
    return typ


def coerce(text: str, typ, key: str):
    """The --set text ``text`` as a value of the field's type ``typ`` (a str field takes it as written)."""
    import types
    import typing

    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() in ("null", "none", "~") and type(None) in args:
            return None
        return coerce(text, next(a for a in args if a is not type(None)), key)
    if typ is str:
        return text
    if typ is Path:
        return Path(text)
    if typ is bool:
        words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False,
                 "0": False}
        if text.strip().lower() not in words:
            raise DraftEUError(f"--set {key}={text}: expects true or false")
        return words[text.strip().lower()]
    if typ in (int, float):
        try:
            return typ(text)
        except ValueError:
            kind = "an integer" if typ is int else "a number"
            raise DraftEUError(f"--set {key}={text}: expects {kind}") from None
    try:  # lists and sections: YAML flow syntax, e.g. [ddd, konly] or {lr: 1e-4}
        return yaml_load(text)
    except Exception as e:
        raise DraftEUError(f"--set {key}={text}: not valid YAML ({str(e).splitlines()[0]})") from None


def _unshared(node):
    """A copy of YAML builtins in which no two places share one dict or list."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def load_experiment(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML.

    ``overrides``: dotted keys (``eval.trials``) to values; a str value (``--set KEY=VALUE`` text)
    is coerced by the type of the field it sets, other values are used as they are.
    """
    path = Path(path)
    if path.is_dir():
        raise DraftEUError(f"config {path} is a directory; pass a YAML file, e.g. configs/demo.yaml")
    if not path.is_file():
        raise DraftEUError(f"config {path} not found; the shipped ones are in configs/")
    try:
        raw = yaml_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DraftEUError(f"{path} is not UTF-8 text; pass a YAML config file") from None
    except Exception as e:
        raise DraftEUError(f"{path} is not valid YAML: {e}") from e
    if raw is None:  # an empty file, only comments, or `null`: never silently the default experiment
        raise DraftEUError(f"{path} is empty (or only comments); write the experiment's sections, e.g. start "
                           "from a copy of configs/demo.yaml")
    if not isinstance(raw, dict):
        raise DraftEUError(f"{path} must be a YAML mapping of config sections, got {type(raw).__name__}")
    raw = _unshared(raw)  # YAML anchors/aliases share one node: --set on one key must not change its aliases
    for key, val in (overrides or {}).items():
        typ = field_type(ExperimentConfig, key)
        if isinstance(val, str):
            val = coerce(val, typ, key)
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[leaf] = fileio.plain(val)
    try:
        return _build(ExperimentConfig, raw, "")
    except DraftEUError as e:
        raise DraftEUError(f"{path}: {e}") from e


__all__ += ["ExperimentConfig", "load_experiment", "DataSection", "GenerationSection", "DraftBaseSection",
            "DraftsSection",
            "ProxySection", "EvalSection"]
