"""The model side of `drafteu serve`: one worker thread that owns the models and runs their work one
forward at a time, fed by a queue of futures that it drains into batches.

Requests arrive on the event loop; ``Engine.submit`` puts a ``Job`` (a generation or a scoring) on a
thread-safe queue and returns an asyncio future.  The worker takes the first job, waits up to
``batch_wait_ms`` for more (up to ``max_batch``), then runs the batch: generations through the
generation backend in one batched call per sampling setting (the HF backend's batched ``generate``,
or vLLM's engine), then the EU of every answer of the batch in one pass of
``estimators.DraftEnsemble.score_batch`` - the estimator `drafteu score --method drafts` calls, so a
response carries the numbers the command prints - with the target's logprobs from the same pass.  With
``engine: speculative`` a generation is speculative decoding by the same drafts (EU comes with
every token, streamed per round), one request at a time.  Model work never runs on the event loop.

A job whose client went away (or timed out) is marked cancelled: it is dropped if still queued, and
its result is discarded if it was already running.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu.errors import DraftEUError

MAX_LOGPROBS = 20  # top_logprobs, as OpenAI's API


@dataclass
class Job:
    """One request's model work.  ``kind``: "generate" (``prompt_ids`` -> ``n`` answers) or "score"
    (``prompt_ids`` + ``response_ids`` -> their EU)."""

    kind: str
    prompt_ids: list[int]
    response_ids: list[int] | None = None
    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    eu: bool = True  # score the answer's tokens (off: a plain completion, for the benchmark's baseline)
    logprobs: bool = True  # the target's log-probability of each token
    top_logprobs: int = 0
    on_tokens: Callable[[int, list[dict]], None] | None = None  # speculative streaming: (choice, tokens)
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    started: float = 0.0


@dataclass
class Answer:
    """One choice: its tokens with their EU (and logprobs), why it ended, and the sequence summary."""

    token_ids: list[int]
    tokens: list[dict]
    finish_reason: str
    summary: dict


class Engine:
    """Target, proxy and draft ensemble of a run, and the worker that runs them."""

    def __init__(self, drafts: Path, *, target: str = "embedded", proxy: Path | None = None, backend: str = "hf",
                 engine: str = "batched", dtype: str = "auto", device: str = "auto", max_batch: int = 8,
                 batch_wait_ms: float = 5.0, shots: int = 0, settings=None):
        self.spec = dict(drafts=Path(drafts), target=target, proxy=proxy, backend=backend, dtype=dtype, device=device,
                         settings=settings)
        self.engine, self.max_batch, self.batch_wait = engine, max_batch, batch_wait_ms / 1000
        self.shots = shots
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.ready = threading.Event()
        self.failure: str | None = None
        self.hallucination_map: dict | None = None
        self._thread = threading.Thread(target=self._main, name="drafteu-engine", daemon=True)

    # -- the event-loop side ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (/metrics, /health)."""
        return self.jobs.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.jobs.put(None)

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; the future resolves to a list of ``Answer`` (or raises the job's error)."""
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        self.jobs.put(job)
        return job.future

    # -- the worker ----------------------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._load()
        except Exception as e:  # the server reports it on /health and refuses requests
            self.failure = f"loading failed: {e}"
            self.ready.set()
            return
        self.ready.set()
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    self.jobs.put(None)
                    break
                batch.append(job)
            batch = [j for j in batch if not j.cancelled]
            try:
                self._run(batch)
            except Exception as e:  # an engine failure: every job of the batch gets it; /health says so
                if not isinstance(e, DraftEUError):
                    self.failure = f"{type(e).__name__}: {e}"
                for job in batch:
                    self._resolve(job, error=e)

    def _load(self) -> None:
        from drafteu import estimators, models, rundir
        from drafteu.generate import BACKENDS
        from drafteu.speculative import SpeculativeDecoder

        s = self.spec
        drafts_dir, proxy_dir = rundir.resolve_drafts(s["drafts"], s["proxy"])
        self.lm = models.load(s["target"], dtype=s["dtype"], device=s["device"])
        self.tokenizer = self.lm.tokenizer
        self.ensemble = estimators.DraftEnsemble(drafts_dir, self.lm, proxy_dir, device=s["device"], dtype=s["dtype"],
                                                 target_rows=True,  # logprobs ride in the proxy's pass
                                                 prefix_len="auto")  # requests' shared system prompt, once
        self.context = getattr(self.lm.model.config, "max_position_embeddings", None)
        self.eos = models.eos_ids(self.lm.model, self.tokenizer)
        with self.ensemble.base_target():
            self.backend = BACKENDS[s["backend"]](s["target"], self.tokenizer, model=self.lm.model, dtype=s["dtype"],
                                                  device=s["device"], prefix_cache=True, settings=s["settings"],
                                                  max_len=self.context)
        self.decoder = None
        if self.engine == "speculative":
            self.decoder = SpeculativeDecoder.from_ensemble(self.ensemble, self.ensemble.target, gamma=2)
        self.hallucination_map = _fitted_map(Path(s["drafts"]), self.ensemble.method)

    def _resolve(self, job: Job, result=None, error: Exception | None = None) -> None:
        def finish():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        job.loop.call_soon_threadsafe(finish)

    def _run(self, batch: list[Job]) -> None:
        scoring = [j for j in batch if j.kind == "score"]
        generating = [j for j in batch if j.kind == "generate"]
        work: list[tuple[Job, list[int], str, object]] = []  # (job, answer ids, finish, its EU if known)
        if self.engine == "speculative":
            for job in generating:
                if not job.cancelled:
                    work.append(self._speculate(job))
        else:
            answers = self._generate(generating)  # one batched call per sampling setting
            work += [(job, r, f, None) for job, ids in zip(generating, answers, strict=True) if not job.cancelled
                     for r, f in ids]
        work += [(job, job.response_ids, "length", None) for job in scoring if not job.cancelled]
        results = self._answers(work)
        for job in {id(j): j for j, *_ in work}.values():
            if not job.cancelled:
                self._resolve(job, [a for (j, *_), a in zip(work, results, strict=True) if j is job])

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> list[list[tuple[list[int], str]]]:
        """Every job's n answers: jobs that sample alike run as one batch (row seeds keep each
        answer independent of the batch it ran in); each is cut at its own max_tokens."""
        from drafteu.generate import Sampling
        from drafteu.posterior import member_seed

        out: list[list[tuple[list[int], str]]] = [[] for _ in jobs]
        groups: dict[tuple, list[int]] = {}
        for i, job in enumerate(jobs):
            if not job.cancelled:
                groups.setdefault((job.temperature, job.top_p if job.temperature > 0 else 1.0), []).append(i)
        with self.ensemble.base_target():  # the target answers, the proxy adapter off
            for (temperature, top_p), idx in groups.items():
                rows = [(i, c) for i in idx for c in range(jobs[i].n)]
                longest = max(jobs[i].max_tokens for i in idx)
                seeds = [member_seed("serve", jobs[i].seed, c) for i, c in rows] if temperature > 0 else None
                answers = self.backend.generate([jobs[i].prompt_ids for i, _ in rows],
                                                Sampling(temperature, top_p, longest, seeds))
                for (i, _), (ids, finish) in zip(rows, answers, strict=True):
                    if len(ids) > jobs[i].max_tokens:
                        ids, finish = ids[: jobs[i].max_tokens], "length"
                    out[i].append((ids, finish))
        return out

    def _speculate(self, job: Job) -> tuple:
        """Speculative decoding, EU streamed with every round's tokens (one choice: n is 1 here); the
        answer keeps the EU its rounds computed (it is not scored again)."""
        from drafteu.estimators import TokenScores
        from drafteu.score import StreamPieces

        pieces = StreamPieces(self.tokenizer)

        def on_tokens(ids, variance, bias):
            if job.on_tokens is not None and not job.cancelled:
                texts = pieces(ids)
                job.on_tokens(0, [{"token": t, "id": int(i), "eu": float(v + b), "eu_variance": float(v),
                                   "eu_bias": float(b)} for i, t, v, b in zip(ids, texts, variance, bias, strict=True)])
        from drafteu.data import TextStops, turn_stops

        res = self.decoder.generate(job.prompt_ids, job.max_tokens, temperature=job.temperature, seed=job.seed,
                                    eos_ids=self.eos, on_tokens=on_tokens,
                                    stops=TextStops(self.tokenizer, turn_stops(self.tokenizer) + tuple(job.stop or ())))
        scores = None
        if res.variance is not None and res.bias is not None:
            scores = TokenScores(token_ids=list(res.token_ids), eu=res.variance + res.bias, variance=res.variance,
                                 bias=res.bias)
        return job, res.token_ids, res.finish, scores

    def _answers(self, work: list[tuple]) -> list[Answer]:
        """Every answer of a batch: cut at its first stop string, its EU from one batched scoring pass
        (``DraftEnsemble.score_batch``, as `drafteu score`) unless its decoding computed it, and the
        target's logprobs from the same pass."""
        from drafteu import estimators
        from drafteu.evaluate.hallucination import p_wrong
        from drafteu.score import token_pieces

        cut = []
        for job, ids, finish, scores in work:
            kept, stopped = _cut_at_stop(self.tokenizer, ids, job.stop)
            if scores is not None and len(kept) < len(ids):
                scores = estimators.TokenScores(kept, scores.eu[: len(kept)], scores.variance[: len(kept)],
                                                scores.bias[: len(kept)])
            cut.append((job, kept, "stop" if stopped or finish == "eos" else finish, scores))
        need = [i for i, (job, ids, _, scores) in enumerate(cut) if ids and job.eu and scores is None]
        pairs = [(cut[i][0].prompt_ids, cut[i][1]) for i in need]
        scored = dict(zip(need, self.ensemble.score_batch(pairs), strict=True)) if need else {}
        want = [i for i, (job, ids, _, _) in enumerate(cut) if ids and (job.logprobs or job.top_logprobs)]
        top = max([cut[i][0].top_logprobs for i in want], default=0)
        lp_pairs = [(cut[i][0].prompt_ids, cut[i][1]) for i in want]
        logprobs = dict(zip(want, self.ensemble.target_logprobs(lp_pairs, top), strict=True)) if want else {}
        out = []
        for i, (job, ids, finish, scores) in enumerate(cut):
            scores = scored.get(i, scores)
            texts = token_pieces(self.tokenizer, ids)
            tokens: list[dict] = [{"token": text, "bytes": list(text.encode("utf-8"))} for text in texts]
            summary = {"mean": 0.0, "max": 0.0, "sum": 0.0, "tokens": len(ids)}
            if ids and job.eu and scores is not None:
                for j, tok in enumerate(tokens):
                    tok |= {"eu": float(scores.eu[j]), "eu_variance": float(scores.variance[j]),
                            "eu_bias": float(scores.bias[j])}
                summary = {how: scores.aggregate(how) for how in estimators.AGGREGATIONS} | {"tokens": len(ids)}
            if i in logprobs:
                chosen, values, indices = logprobs[i]
                for j, tok in enumerate(tokens):
                    tok["logprob"], tok["top_logprobs"] = float(chosen[j]), []
                    if job.top_logprobs:
                        tok["top_logprobs"] = [
                            {"token": (t := self.tokenizer.decode([int(x)])), "logprob": float(v), "bytes": list(t.encode())}
                            for v, x in zip(values[j, : job.top_logprobs], indices[j, : job.top_logprobs], strict=True)]
            if not job.eu:
                summary = None
            elif self.hallucination_map is not None:
                how = self.hallucination_map["aggregation"]
                summary["p_wrong"] = p_wrong(summary[how], self.hallucination_map) if ids else None
            out.append(Answer(ids, tokens, finish, summary))
        return out


def _cut_at_stop(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[int], bool]:
    """The answer before the first stop string (the tokens that end before it begins)."""
    from drafteu.data import TextStops

    k = TextStops(tokenizer, stop).cut(ids)
    return (ids, False) if k is None else (ids[:k], True)


def _fitted_map(drafts: Path, method: str) -> dict | None:
    """The hallucination stage's logistic map of the ensemble's method (mean token EU), when the
    run has one: P(wrong) for each answer the server gives."""
    import json

    path = drafts / "eval" / "hallucination.json"
    if not path.exists():
        return None
    try:
        fitted = json.loads(path.read_text(encoding="utf-8"))["methods"][method]
        how = next(iter(fitted))
        m = fitted[how]
        if not all(k in m for k in ("coef", "intercept", "score_mean", "score_std")) or not math.isfinite(m["coef"]):
            return None
        return {"aggregation": how, **{k: m[k] for k in ("coef", "intercept", "score_mean", "score_std")}}
    except (OSError, ValueError, KeyError, StopIteration):
        return None
