"""`drafteu generate`: sample answers from the target (or a noisy family member) into a jsonl.

Paper Sec. 4.2 (4 answers per question for draft data), App. B.1 (5 per question per noisy
teacher for proxy data), App. B.5 (one answer per test question, 3 repeats).

Output ``<out>/samples.jsonl``, one row per (question, sample), schema ``ROW_FIELDS``:
  qid, question, gold           the problem
  model, member                 the model spec; null or the family member index it came from
  sample                        sample index 0..n-1 for this question
  prompt_ids, response_ids      token ids (the response is cut before end-of-sequence)
  response, extracted, correct  decoded text, extract_answer(response), is_correct(extracted, gold)
  finish                        "eos" or "length" (hit max_new_tokens)
plus ``config.yaml`` and ``manifest.json``.  Resumable: rows are appended one batch at a time
(a single write + fsync); a rerun skips every (qid, sample) already written and drops a torn
last line, so nothing is duplicated or lost.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from drafteu import contract, data, fileio, models
from drafteu.errors import DraftEUError
from drafteu.hardware import DEVICE_HELP
from drafteu.kvcache import cache_kw, lcp, output_cache
from drafteu.posterior import Member, NoiseConfig, NoisyModel, family_seeds, member_seed
from drafteu.progress import progress
from drafteu.vllm_engine import EngineSettings, VLLMBackend

ROW_FIELDS = ("qid", "question", "gold", "model", "member", "sample", "prompt_ids", "response_ids",
              "response", "extracted", "correct", "finish")


@dataclass(kw_only=True)
class SamplingSettings:
    """What to sample: shared by `drafteu generate` and the data section of an experiment config."""

    task: str = field(default="easy-word", metadata={"help": "easy-word, a .jsonl path, or "
                                                             "a HF dataset id (openai/gsm8k)"})
    questions: int | None = field(default=None, metadata={"help": "use the first N questions (easy-word: generate N; "
                                                                  "default 200 there, all elsewhere)"})
    samples: int = field(default=4, metadata={"help": "answers per question (paper: 4 for "
                                                      "drafts, 5 per teacher for the proxy)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature; 0 = greedy"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    max_new_tokens: int = field(default=400, metadata={"help": "length limit of an answer (paper: 400)"})
    batch_size: int = field(default=8, metadata={"help": "sequences generated together"})
    shots: int = field(default=2, metadata={"help": "worked examples before the question (0..2)"})

    location_fields = ("batch_size",)  # how many are generated at once: the rows do not depend on it

    def __post_init__(self):
        fileio.require_finite(self)
        if self.samples < 1:
            raise DraftEUError(f"samples must be >= 1, got {self.samples}")
        if self.questions is not None and self.questions < 1:
            raise DraftEUError(f"questions must be >= 1, got {self.questions}")
        if self.temperature < 0:
            raise DraftEUError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DraftEUError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise DraftEUError("max_new_tokens and batch_size must be >= 1")
        if not 0 <= self.shots <= len(data.SHOTS):
            raise DraftEUError(f"shots must be in 0..{len(data.SHOTS)}, got {self.shots}")


@dataclass(kw_only=True)
class GenerateConfig(SamplingSettings, EngineSettings):
    """`drafteu generate`: n sampled answers per question."""

    out: Path = field(metadata={"help": "output directory (samples.jsonl, config.yaml, manifest.json)"})
    target: str = field(default="embedded", metadata={"help": "model: embedded, hub id, local dir or .gguf"})
    split: str = field(default="train", metadata={"help": "dataset split: train or test"})
    prefix_cache: bool = field(default=True, metadata={"help": "compute the prompts' shared prefix (system + shots) "
                                                               "once and reuse its KV cache"})
    member: int | None = field(default=None, metadata={"help": "sample from member k of the noisy "
                                                               "target family instead of the target"})
    family_seed: int = field(default=0, metadata={"help": "seed of the noisy family (with --member)"})
    noise: NoiseConfig = field(default_factory=NoiseConfig, metadata={"help": "with --member: the family's noise"})
    steps: int = field(default=1, metadata={"help": "easy-word: 1- or 2-step problems"})
    low: int = field(default=2, metadata={"help": "easy-word: smallest number"})
    high: int = field(default=9, metadata={"help": "easy-word: largest number"})
    seed: int = field(default=0, metadata={"help": "seed of sampling and of easy-word problems"})
    backend: str = field(default="hf", metadata={"help": "generation backend: hf (transformers' generate) or vllm "
                                                 "(vLLM's engine: paged KV cache, prefix caching, tensor parallel; "
                                                 "pip install 'drafteu[vllm]')"})
    dtype: str = field(default="auto", metadata={"help": "model dtype: auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})

    # where the run lives and how it is computed: not part of what the samples are
    location_fields = ("out", "device", "batch_size", "prefix_cache", "tensor_parallel_size",
                       "gpu_memory_utilization", "max_model_len")

    def identity(self) -> dict:
        """What the rows are made from.  The backend counts only when sampling (vLLM and the HF
        backend draw different samples for one seed; greedy answers are the same tokens); the noise
        only for a family member; the easy-word generator's ranges only for that task."""
        skip = [] if self.temperature > 0 else ["backend"]
        skip += [] if self.member is not None else ["noise", "family_seed"]
        skip += [] if self.task == "easy-word" else ["steps", "low", "high"]
        return fileio.fields_identity(self, tuple(skip))

    def __post_init__(self):
        SamplingSettings.__post_init__(self)
        EngineSettings.__post_init__(self)
        self.out = Path(self.out)
        if self.member is not None and self.member < 0:
            raise DraftEUError(f"--member must be >= 0, got {self.member}")
        if self.backend not in BACKENDS:
            raise DraftEUError(f"unknown backend {self.backend!r}; available: {', '.join(BACKENDS)}")


# ---------------------------------------------------------------------------------------------
# Backends: a seam for other engines (e.g. vLLM) that take token ids and return token ids.


@dataclass
class Sampling:
    """How to decode a batch.  ``seeds``: one per prompt (sampling draws depend on a row's own seed
    only, never on the batch it is in); None with temperature 0."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seeds: list[int] | None = None
    # which rows are no longer wanted (a client went away), asked once per decoding step: those rows
    # stop there, and the batch ends when every row has
    cancelled: Callable[[], Sequence[bool]] | None = None


class RowsCancelled:
    """A stopping criterion: the rows ``cancelled()`` flags end at this step (``model.generate``
    checks it per step, as a serving engine aborts a request)."""

    def __init__(self, cancelled: Callable[[], Sequence[bool]]):
        self.cancelled = cancelled

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.tensor(list(self.cancelled()), dtype=torch.bool, device=input_ids.device)


class RowSeededSampler:
    """A logits processor that turns greedy decoding into sampling with a seed per row.

    Each step it returns log softmax(logits / T) restricted to the top-p nucleus, plus Gumbel noise
    drawn from (the row's seed, the step): the argmax of log p + Gumbel is an exact sample from p
    (the Gumbel-max trick), so ``generate(do_sample=False)`` samples, and what a row draws depends
    on its seed alone - not on the batch size, the other rows, or where a killed run resumed.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float, start: int):
        self.seeds, self.temperature, self.top_p, self.start = list(seeds), temperature, top_p, start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        if self.top_p < 1.0:
            sorted_logp, order = logp.sort(dim=-1, descending=True)
            before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()  # mass of the tokens ranked above
            drop = torch.zeros_like(logp, dtype=torch.bool).scatter(-1, order, before >= self.top_p)
            logp = logp.masked_fill(drop, float("-inf"))  # the top token always stays (its `before` is 0)
        step = input_ids.shape[1] - self.start
        noise = torch.stack([
            torch.rand(logp.shape[-1], generator=torch.Generator().manual_seed(member_seed("sample", s, step)),
                       dtype=torch.float64) for s in self.seeds])
        gumbel = -torch.log(-torch.log(noise.clamp_min(1e-300)))  # (B, V) standard Gumbel
        return logp + gumbel.to(device=logp.device, dtype=logp.dtype)


class HFBackend:
    """Batched ``model.generate`` with left padding and an optional shared-prefix KV cache.

    Constructed like every backend (``BACKENDS``): the model spec and its tokenizer, then keywords;
    ``model`` an already loaded target (else it is loaded), ``member`` a noisy family member to
    sample from instead of the target.  With ``prefix_cache``, the longest common prefix of the
    prompts (system prompt + k-shot examples + instruction) runs once; each batch starts from a copy
    of its cache expanded to the batch.  Prompts are laid out as [prefix, padding, suffix] with the
    padding masked, so position ids stay those of an unpadded prompt.
    """

    owns_weights = False
    chunk = 1
    serving = None  # `drafteu serve` batches requests itself (engine.Engine) and calls ``generate``

    def __init__(self, target: str, tokenizer, *, model=None, dtype: str = "auto", device: str = "auto", seed: int = 0,
                 max_len: int | None = None, member: Member | None = None, workdir: Path | None = None,
                 prefix_cache: bool = True, settings: EngineSettings | None = None):
        if model is None:
            model = models.load(target, dtype=dtype, device=device).model
        if member is not None:
            noisy = NoisyModel(model, member.noise)
            name = f"family{member.index}"
            noisy.set_member(name, member.seed)
            noisy.model.set_adapter(name)
            model = noisy.model
        self.model, self.tokenizer, self.prefix_cache = model, tokenizer, prefix_cache
        self.device = next(model.parameters()).device
        self.eos = models.eos_ids(model, tokenizer)
        self.stops = data.TextStops(tokenizer, data.turn_stops(tokenizer))  # the plain format's next turn
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._prefix: tuple[tuple[int, ...], object] | None = None

    @classmethod
    def require(cls, cheap: bool = False) -> None:
        """transformers is a dependency: nothing to check."""

    def _cache_for(self, prefix: list[int]):
        if self._prefix is None or self._prefix[0] != tuple(prefix):
            with torch.no_grad():
                out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True)
            self._prefix = (tuple(prefix), output_cache(out))
        return self._prefix[1]

    @torch.no_grad()
    def generate(self, prompts, sampling: Sampling) -> list[tuple[list[int], str]]:
        """(response ids before EOS or the format's next turn, "eos" | "length") per prompt."""
        if not prompts:
            return []
        plen = lcp(prompts) if self.prefix_cache and len(prompts) > 0 else 0
        plen = min(plen, min(len(p) for p in prompts) - 1)  # every prompt keeps >= 1 own token
        prefix = prompts[0][:plen] if plen >= 8 else []
        suffixes = [p[len(prefix):] for p in prompts]
        width = max(len(s) for s in suffixes)
        ids, mask = [], []
        for s in suffixes:
            pad = width - len(s)
            ids.append(prefix + [self.pad] * pad + s)
            mask.append([1] * len(prefix) + [0] * pad + [1] * len(s))
        ids_t = torch.tensor(ids, device=self.device)
        kwargs = {}
        if prefix:
            cache = copy.deepcopy(self._cache_for(prefix))
            cache.batch_repeat_interleave(len(prompts))
            kwargs |= cache_kw(cache)
        if sampling.temperature > 0:
            from transformers import LogitsProcessorList

            if sampling.seeds is None or len(sampling.seeds) != len(prompts):
                raise DraftEUError("sampling needs one seed per prompt")
            kwargs["logits_processor"] = LogitsProcessorList([RowSeededSampler(
                sampling.seeds, sampling.temperature, sampling.top_p, ids_t.shape[1])])
        if self.stops:  # a row stops once its text reaches the next turn
            kwargs |= {"stop_strings": list(self.stops.stops), "tokenizer": self.tokenizer}
        if sampling.cancelled is not None:
            from transformers import StoppingCriteriaList

            kwargs["stopping_criteria"] = StoppingCriteriaList([RowsCancelled(sampling.cancelled)])
        out = self.model.generate(
            input_ids=ids_t, attention_mask=torch.tensor(mask, device=self.device),
            max_new_tokens=sampling.max_new_tokens, do_sample=False, pad_token_id=self.pad, **kwargs,
        )[:, ids_t.shape[1]:].tolist()
        return [self.stops.end(*models.cut_at_eos(row, self.eos)) for row in out]

    def close(self) -> None:
        """Nothing to free: the model belongs to the caller."""


class GenerationBackend(Protocol):
    """What ``generate``, ``drafteu serve`` and the pipeline call a generation backend through.

    A backend is constructed as ``cls(target, tokenizer, *, model, dtype, device, seed, max_len, member,
    workdir, prefix_cache, settings)`` (``model``: a loaded target it may use; ``member``: a noisy
    family member to sample from) and registered in ``BACKENDS``; adding one is its class plus that
    entry (docs/architecture.md, "How to add ...")."""

    owns_weights: ClassVar[bool]  # loads the target itself: callers load only the tokenizer around it
    chunk: ClassVar[int]          # the fewest prompts worth handing it at once (appended per chunk)
    # the async engine `drafteu serve` drives instead (continuous batching: ``stream(prompt_ids, ...)``
    # yields token ids as they are decoded, and stops the request when its consumer stops), or None
    serving: ClassVar[type | None]

    @classmethod
    def require(cls, cheap: bool = False) -> None:
        """A DraftEUError naming the install when the backend's library is missing (``cheap``: without
        importing it, for preflight)."""

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[tuple[list[int], str]]:
        """(response ids, finish reason) per prompt."""

    def close(self) -> None:
        """Free what the backend holds."""


BACKENDS: dict[str, type[GenerationBackend]] = {"hf": HFBackend, "vllm": VLLMBackend}


# ---------------------------------------------------------------------------------------------
# Partitions (DDD): disjoint by question.


def partition(samples: list[dict], s: int, seed: int = 0) -> list[list[dict]]:
    """S disjoint partitions by question (all samples of a question stay together; docs/method.md §6).

    Questions are shuffled with ``seed`` and dealt round-robin, so sizes differ by at most one
    question.  Deterministic given (samples, S, seed).
    """
    qids = sorted({r["qid"] for r in samples})
    if s < 1:
        raise DraftEUError(f"number of partitions must be >= 1, got {s}")
    if len(qids) < s:
        raise DraftEUError(f"cannot make {s} partitions from {len(qids)} questions; generate more questions")
    random.Random(f"partition:{seed}").shuffle(qids)
    part_of = {q: i % s for i, q in enumerate(qids)}
    parts: list[list[dict]] = [[] for _ in range(s)]
    for r in samples:
        parts[part_of[r["qid"]]].append(r)
    return parts


def partition_stats(parts: list[list[dict]]) -> list[dict]:
    """Size, question count and accuracy of each partition (for logs and manifests)."""
    return [
        {"partition": i, "samples": len(p), "questions": len({r["qid"] for r in p}),
         "accuracy": sum(bool(r["correct"]) for r in p) / len(p) if p else 0.0}
        for i, p in enumerate(parts)
    ]


# ---------------------------------------------------------------------------------------------
# The stage.


def _backend(cfg: GenerateConfig, lm, max_len: int):
    """The configured backend on the target or on noise member ``cfg.member``."""
    member = None
    if cfg.member is not None:
        member = Member(cfg.noise, family_seeds(cfg.family_seed, cfg.member + 1)[cfg.member], cfg.member)
    return BACKENDS[cfg.backend](
        cfg.target, lm.tokenizer, model=lm.model, dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, max_len=max_len,
        member=member, workdir=cfg.out, prefix_cache=cfg.prefix_cache,
        settings=EngineSettings(**{k: getattr(cfg, k) for k in EngineSettings.__dataclass_fields__}))


def run(cfg: GenerateConfig) -> dict:
    """Generate the missing samples, append them, and write config.yaml + manifest.json (one process
    writes OUT at a time)."""
    with fileio.locked(cfg.out, "samples folder"):
        return _run(cfg)


def _run(cfg: GenerateConfig) -> dict:
    started = time.time()
    contract.claim(cfg.out, fileio.identity(cfg), what="samples")  # resume only the same samples
    problems = data.load_task(cfg.task, cfg.split, n=cfg.questions, seed=cfg.seed, steps=cfg.steps,
                              low=cfg.low, high=cfg.high)
    shots = data.shots_for(cfg.task, cfg.shots)
    backend_cls = BACKENDS[cfg.backend]
    backend_cls.require()  # a missing library is an error before any work
    if backend_cls.owns_weights:  # the engine loads the weights itself: only the tokenizer here
        lm = models.load(cfg.target, tokenizer_only=True)
        model_config = models.model_config(cfg.target)
    else:
        lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
        model_config = lm.model.config
    prompts = {p.qid: data.format_prompt(lm.tokenizer, p.question, shots) for p in problems}
    longest = max(prompts.values(), key=len)
    models.check_context(model_config, len(longest) + cfg.max_new_tokens, "the longest prompt + --max-new-tokens",
                         "lower --max-new-tokens or --shots", cfg.target)

    cfg.out.mkdir(parents=True, exist_ok=True)
    fileio.write_config(cfg.out, cfg)
    path = cfg.out / "samples.jsonl"
    done = {(r["qid"], r["sample"]) for r in fileio.read_jsonl(path, repair=True)}
    work = [(p, k) for p in problems for k in range(cfg.samples) if (p.qid, k) not in done]
    backend = _backend(cfg, lm, len(longest) + cfg.max_new_tokens) if work else None
    member = cfg.member
    new_tokens = 0
    t0 = time.time()
    # a backend that schedules its own batches (vLLM) gets larger chunks (each is appended: a kill loses one)
    chunk = max(cfg.batch_size, backend_cls.chunk)
    closing = contextlib.closing(backend) if backend else contextlib.nullcontext()
    with progress("generate", total=len(work) + len(done), completed=len(done)) as bar, closing:
        for start in range(0, len(work), chunk):
            batch = work[start : start + chunk]
            # one seed per (question, sample): the same samples however the work is batched or resumed
            seeds = [member_seed("generate", cfg.seed, member, p.qid, k) for p, k in batch]
            outs = backend.generate([prompts[p.qid] for p, _ in batch],
                                    Sampling(cfg.temperature, cfg.top_p, cfg.max_new_tokens, seeds))
            rows = []
            for (p, k), (resp, finish) in zip(batch, outs, strict=True):
                text = lm.tokenizer.decode(resp, skip_special_tokens=True)
                extracted = data.extract_answer(text)
                rows.append(dict(zip(ROW_FIELDS, (
                    p.qid, p.question, p.gold, cfg.target, member, k, prompts[p.qid], resp, text,
                    extracted, data.is_correct(extracted, p.gold), finish), strict=True)))
                new_tokens += len(resp)
            fileio.append_jsonl(path, rows)
            el = max(time.time() - t0, 1e-9)
            bar.update(advance=len(batch), info=f"{(start + len(batch)) / el:.2f} samples/s, "
                                                f"{new_tokens / el:.1f} tok/s")

    rows = fileio.read_jsonl(path)
    accuracy = sum(bool(r["correct"]) for r in rows) / len(rows)
    elapsed = time.time() - t0
    summary = {
        "rows": len(rows), "questions": len({r["qid"] for r in rows}), "accuracy": accuracy,
        "new_rows": len(work), "new_tokens": new_tokens,
        "samples_per_s": len(work) / elapsed if work else None,
        "tokens_per_s": new_tokens / elapsed if work else None,
    }
    fileio.write_manifest(cfg.out, "generate", cfg, started, **summary)
    return summary


def greedy_answer(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy response token ids, cut before the first end-of-sequence token."""
    backend = HFBackend(getattr(model, "name_or_path", ""), tokenizer, model=model, prefix_cache=False)
    return backend.generate([prompt_ids], Sampling(temperature=0.0, max_new_tokens=max_new_tokens))[0][0]
