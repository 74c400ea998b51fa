"""The model side of `drafteu serve`: one worker thread that owns the models and runs their work one
forward at a time, fed by a queue of futures that it drains into batches.

Requests arrive on the event loop; ``Worker.submit`` puts a ``Job`` (a generation or a scoring) on a
thread-safe queue and returns an asyncio future.  The worker takes the first job, waits up to
``batch_wait_ms`` for more (up to ``max_batch``), then runs the batch: its generations through the
generation strategy chosen once at load (``decoding.Decoding``: ``Batched``, the backend's batched
``generate``, or ``Speculative``, speculative decoding by the same drafts with EU streamed per round),
then the EU of every answer of the batch in one pass of ``estimators.DraftEnsemble.score_batch`` - the
estimator `drafteu score --method drafts` calls, so a response carries the numbers the command prints -
with the target's logprobs from the same pass; each answer is built whole from what decoding computed and
what scoring added.  With a backend that has an async engine of its own (``--backend vllm``: vLLM's ``AsyncLLM``)
generations do not wait for the worker: ``continuous.ContinuousDecoder`` runs each as a task on the
event loop in that engine's continuous batch, and only their scoring is queued here.  Model work never
runs on the event loop.

A job whose client went away (or timed out) is marked cancelled: it is dropped if still queued; if
it is running, its generation stops at the next decoding step (a stopping criterion per row; the
speculative decoder asks per round) and it is not scored.  The engine returns plain values
(``Answer``); ``serving`` turns them into OpenAI's shapes.  A batch that fails is re-run job by job,
so one request's error fails that request only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
import time
from pathlib import Path

import torch

from drafteu.errors import DraftEUError
from drafteu.hardware import give_back_memory
from drafteu.serve.continuous import ContinuousDecoder
from drafteu.serve.decoding import Batched, Decoded, Decoding, Speculative, terms
from drafteu.serve.jobs import Answer, Job

log = logging.getLogger("drafteu.serve")

__all__ = ["Answer", "Job", "Worker"]


class Worker:
    """Target, proxy and draft ensemble of a run, and the thread that runs them (one forward at a time)."""

    def __init__(self, drafts: Path, *, target: str = "embedded", proxy: Path | None = None, backend: str = "hf",
                 engine: str = "batched", dtype: str = "auto", device: str = "auto", max_batch: int = 8,
                 batch_wait_ms: float = 5.0, shots: int = 0, settings=None, gamma: int = 2):
        self.spec = dict(drafts=Path(drafts), target=target, proxy=proxy, backend=backend, dtype=dtype, device=device,
                         settings=settings, engine=engine, gamma=gamma)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.shots = shots
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.ready = threading.Event()
        self.failure: str | None = None
        self.hallucination_map: dict | None = None
        self.decoding: Decoding | None = None  # the worker's generation strategy (``decoding.choose``), or
        self.continuous: ContinuousDecoder | None = None  # generation on the backend's async engine (vLLM)
        # the last jobs run: (kind, tokens generated before any cut, cancelled) - what a cancellation stopped
        self.finished: collections.deque[tuple[str, int, bool]] = collections.deque(maxlen=64)
        self._thread = threading.Thread(target=self._main, name="drafteu-engine", daemon=True)

    # -- the event-loop side ------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Jobs waiting for the worker (/metrics, /health)."""
        return self.jobs.qsize()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the worker after the jobs queued before this, and wait for it (and a continuous engine's
        own process) to end."""
        self.jobs.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def live(self) -> bool:
        """Whether a generation's tokens reach the client while it decodes (``Job.on_tokens``): the
        speculative engine's rounds, the continuous engine's segments; else the answer comes whole."""
        return self.continuous is not None or (self.decoding is not None and self.decoding.live)

    def refuses(self, job: Job) -> tuple[str, str] | None:
        """Why the chosen generation strategy cannot run ``job`` (a message and the request field), or None."""
        return self.decoding.refuses(job) if self.decoding is not None else None

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; the future resolves to a list of ``Answer`` (or raises the job's error).  On
        the continuous engine a generation is a task on this event loop instead (``_continuous``):
        cancelling the future aborts its decoding in the engine."""
        job.loop = asyncio.get_running_loop()
        if self.continuous is not None and job.kind == "generate":
            job.future = job.loop.create_task(self.continuous.generate(job))
            return job.future
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
                if self.continuous is not None:  # its engine process goes with the server
                    self.continuous.engine.close()
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
            self._run_isolated([j for j in batch if not j.cancelled])

    def _run_isolated(self, batch: list[Job]) -> None:
        """Run a batch; when it fails, run its jobs one by one, so that a job's error (its own bad
        input, say) fails that job only, with its own message."""
        try:
            self._run(batch)
        except Exception as e:
            if len(batch) == 1:
                self._resolve(batch[0], error=e)
                return
            for job in batch:
                if not job.cancelled and not (job.future is not None and job.future.done()):
                    self._run_isolated([job])
        finally:
            give_back_memory()

    def _load(self) -> None:
        from drafteu import estimators, models, rundir
        from drafteu.generate import BACKENDS
        from drafteu.methods import ESTIMATORS, named
        from drafteu.spec_decoding import SpeculativeDecoder
        from drafteu.spec_decoding_batch import BatchedSpeculativeDecoder

        s = self.spec
        drafts_dir, proxy_dir = rundir.resolve_drafts(s["drafts"], s["proxy"])
        self.lm = models.load(s["target"], dtype=s["dtype"], device=s["device"])
        self.tokenizer = self.lm.tokenizer
        self.ensemble = ESTIMATORS[named("estimate")].build(estimators.BuildContext(
            target=self.lm, drafts=drafts_dir, proxy=proxy_dir, device=s["device"], dtype=s["dtype"],
            target_rows=True,  # logprobs ride in the proxy's pass
            prefix_len="auto"))  # requests' shared system prompt, once
        self.context = getattr(self.lm.model.config, "max_position_embeddings", None)
        # an upper bound on any token's UTF-8 bytes: a text longer than context x this cannot fit
        self.max_token_bytes = 4 * max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.eos = models.eos_ids(self.lm.model, self.tokenizer)
        backend = BACKENDS[s["backend"]]
        # the generation strategy, chosen once: speculative decoding by the drafts, the backend's own async
        # engine (continuous batching, on the event loop), or the backend's batched generate in this worker
        if s["engine"] == "speculative":
            def build(eu: bool):
                decoder = SpeculativeDecoder.from_ensemble(self.ensemble, self.ensemble.target, gamma=s["gamma"], eu=eu)
                try:  # several requests in one forward per step; a sliding-window model decodes them one by one
                    batched = BatchedSpeculativeDecoder.from_ensemble(self.ensemble, self.ensemble.target,
                                                                      gamma=s["gamma"], eu=eu)
                except DraftEUError as e:
                    log.info("speculative engine: one request at a time (%s)", e)
                    batched = None
                return decoder, batched

            self.decoding = Speculative(build, self.tokenizer, self.eos)
        elif backend.serving is not None:
            self.continuous = ContinuousDecoder(
                backend.serving(s["target"], self.tokenizer, dtype=s["dtype"], device=s["device"],
                                settings=s["settings"], max_len=self.context),
                self.tokenizer, self.submit, self.finished)
        else:
            with self.ensemble.base_target():
                generator = backend(s["target"], self.tokenizer, model=self.lm.model, dtype=s["dtype"],
                                    device=s["device"], prefix_cache=True, settings=s["settings"], max_len=self.context)
            self.decoding = Batched(generator, self.ensemble.base_target)
        self.hallucination_map = rundir.hallucination_map(Path(s["drafts"]), self.ensemble.method)

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
        generating = [j for j in batch if j.kind == "generate"]
        decoded = self.decoding.decode(generating) if generating else []
        for job, choices in zip(generating, decoded, strict=True):
            self.finished.extend((job.kind, len(d.token_ids), job.cancelled) for d in choices)
        work = [(job, d) for job, choices in zip(generating, decoded, strict=True) if not job.cancelled
                for d in choices]
        # decoded by the continuous engine (counted in ``finished`` there): only finished here
        work += [(job, d) for job in batch if job.kind == "finish" and not job.cancelled for d in job.decoded]
        work += [(job, Decoded(job.response_ids, "length")) for job in batch
                 if job.kind == "score" and not job.cancelled]
        results = self._answers(work)
        for job in {id(j): j for j, _ in work}.values():
            if not job.cancelled:
                self._resolve(job, [a for (j, _), a in zip(work, results, strict=True) if j is job])

    def _answers(self, work: list[tuple[Job, Decoded]]) -> list[Answer]:
        """Every answer of a batch, built whole: cut exactly at its first stop string, its EU from one
        batched scoring pass (``DraftEnsemble.score_batch``, as `drafteu score`) and the target's logprobs
        from the same pass.  What decoding already computed of an answer (``Decoded.known``: the
        speculative engine's rounds, the continuous engine's streamed segments) is kept; only the tokens
        after it are scored, with it as their context."""
        from drafteu.data import token_pieces

        items = []  # (job, kept ids, their texts, finish, the values known per token so far)
        for job, d in work:
            kept, text = _cut_at_stop(self.tokenizer, d.token_ids, job.stop)
            pieces = token_pieces(self.tokenizer, kept)
            if text is not None:  # the stop string begins inside the last kept token: its text ends there
                pieces[-1] = text[len("".join(pieces[:-1])):] if pieces else ""
            known = {} if d.known is None else {
                name: list(v[:len(kept)]) for name in KNOWN if (v := getattr(d.known, name)) is not None}
            items.append((job, kept, pieces, "stop" if text is not None or d.finish == "eos" else "length", known))

        def rest(i: int, name: str) -> tuple[list[int], list[int]]:  # (context, the tokens without ``name``)
            job, kept, *_, known = items[i]
            m = len(known.get(name, []))
            return job.prompt_ids + kept[:m], kept[m:]

        def missing(i: int, name: str) -> bool:
            return len(items[i][4].get(name, [])) < len(items[i][1])

        need = [i for i, (job, kept, *_) in enumerate(items) if kept and job.eu and missing(i, "eu")]
        if need:
            for i, s in zip(need, self.ensemble.score_batch([rest(i, "eu") for i in need]), strict=True):
                known = items[i][4]
                m = len(known.get("eu", []))
                for name, value in terms(s.variance, s.bias, s.eu).items():
                    known[name] = known.get(name, [])[:m] + value
        want = [i for i, (job, kept, *_) in enumerate(items)
                if kept and (job.logprobs or job.top_logprobs) and missing(i, "logprobs")]
        if want:
            top = max(items[i][0].top_logprobs for i in want)
            lps = self.ensemble.target_logprobs([rest(i, "logprobs") for i in want], top)
            for i, (chosen, values, indices) in zip(want, lps, strict=True):
                known, k = items[i][4], items[i][0].top_logprobs
                m = len(known.get("logprobs", []))
                known["logprobs"] = known.get("logprobs", [])[:m] + chosen.tolist()
                known["top"] = (known.get("top") or [[] for _ in range(m)])[:m] + [
                    list(zip(x.tolist(), v.tolist(), strict=True))
                    for v, x in zip(values[:, :k], indices[:, :k], strict=True)]
        return [self._answer(*item) for item in items]

    def _answer(self, job: Job, kept: list[int], pieces: list[str], finish: str, values: dict) -> Answer:
        """One finished answer: its tokens, texts, EU terms (when asked), logprobs and EU summary."""
        from drafteu import estimators, spans
        from drafteu.calibration import p_wrong

        eu = values.get("eu") if job.eu else None
        summary = None
        if job.eu:
            ok = bool(kept) and eu is not None
            summary = {how: estimators.TokenScores(kept, torch.tensor(eu)).aggregate(how) if ok else 0.0
                       for how in estimators.AGGREGATIONS} | {"tokens": len(kept)}
            summary["spans"] = spans.ranked(pieces, eu) if ok else []
            if self.hallucination_map is not None:
                how = self.hallucination_map["aggregation"]
                summary["p_wrong"] = p_wrong(summary[how], self.hallucination_map) if ok else None
                summary["p_wrong_map"] = self.hallucination_map["provenance"]
        return Answer(kept, pieces, finish, eu=eu, variance=values.get("variance") if job.eu else None,
                      bias=values.get("bias") if job.eu else None, logprobs=values.get("logprobs"),
                      top=values.get("top"), summary=summary)


KNOWN = ("eu", "variance", "bias", "logprobs", "top")  # an answer's per-token values decoding may have computed


def _cut_at_stop(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[int], str | None]:
    """(the tokens that begin before the first stop string, the answer's text before it; None when
    no stop string occurs)."""
    from drafteu.data import TextStops

    found = TextStops(tokenizer, stop).find(ids)
    if found is None:
        return ids, None
    k, text = found
    return ids[:k], text


