"""The model side of `drafteu serve`: one worker thread that owns the models and runs their work one
forward at a time, fed by a queue of futures that it drains into batches.

Requests arrive on the event loop; ``Engine.submit`` puts a ``Job`` (a generation or a scoring) on a
thread-safe queue and returns an asyncio future.  The worker takes the first job, waits up to
``batch_wait_ms`` for more (up to ``max_batch``), then runs the batch: generations through the
generation backend in one batched call per sampling setting (the HF backend's batched ``generate``),
then the EU of every answer of the batch in one pass of ``estimators.DraftEnsemble.score_batch`` - the
estimator `drafteu score --method drafts` calls, so a response carries the numbers the command prints -
with the target's logprobs from the same pass.  With ``engine: speculative`` a generation is
speculative decoding by the same drafts (EU comes with every token, streamed per round), one request at
a time.  With a backend that has an async engine of its own (``--backend vllm``: vLLM's ``AsyncLLM``)
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
import functools
import queue
import threading
import time
from pathlib import Path

import torch

from drafteu.serve.continuous import ContinuousDecoder
from drafteu.serve.jobs import Answer, Job

__all__ = ["Answer", "Engine", "Job"]


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
        return self.engine == "speculative" or self.continuous is not None

    def submit(self, job: Job) -> asyncio.Future:
        """Queue ``job``; the future resolves to a list of ``Answer`` (or raises the job's error).  On
        the continuous engine a generation is a task on this event loop instead (``_continuous``):
        cancelling the future aborts its decoding in the engine."""
        job.loop = asyncio.get_running_loop()
        if self.continuous is not None and job.kind == "generate" and job.generated is None:
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
            _give_back_memory()

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
        # an upper bound on any token's UTF-8 bytes: a text longer than context x this cannot fit
        self.max_token_bytes = 4 * max((len(t) for t in self.tokenizer.get_vocab()), default=1)
        self.eos = models.eos_ids(self.lm.model, self.tokenizer)
        backend = BACKENDS[s["backend"]]
        if backend.serving is not None and self.engine != "speculative":  # continuous batching in its engine
            self.continuous = ContinuousDecoder(
                backend.serving(s["target"], self.tokenizer, dtype=s["dtype"], device=s["device"],
                                settings=s["settings"], max_len=self.context),
                self.tokenizer, self.submit, self.finished)
            self.backend = None
        else:
            with self.ensemble.base_target():
                self.backend = backend(s["target"], self.tokenizer, model=self.lm.model, dtype=s["dtype"],
                                       device=s["device"], prefix_cache=True, settings=s["settings"],
                                       max_len=self.context)
        self.decoder = None
        if self.engine == "speculative":
            self.decoder = SpeculativeDecoder.from_ensemble(self.ensemble, self.ensemble.target, gamma=2)
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
        scoring = [j for j in batch if j.kind == "score"]
        generating = [j for j in batch if j.kind == "generate" and j.generated is None]
        decoded = [(j, ids, f, known) for j in batch if j.generated is not None and not j.cancelled
                   for ids, f, known in j.generated]  # by the continuous engine (counted in ``finished`` there)
        work: list[tuple[Job, list[int], str, Answer | None]] = []  # (job, answer ids, finish, what decoding knew)
        if self.engine == "speculative":
            for job in generating:
                if not job.cancelled:
                    work.append(self._speculate(job))
        else:
            answers = self._generate(generating)  # one batched call per sampling setting
            work += [(job, r, f, None) for job, ids in zip(generating, answers, strict=True) for r, f in ids]
        for job, ids, *_ in work:
            self.finished.append((job.kind, len(ids), job.cancelled))
        work = [w for w in work if not w[0].cancelled] + decoded
        work += [(job, job.response_ids, "length", None) for job in scoring if not job.cancelled]
        results = self._answers(work)
        for job in {id(j): j for j, *_ in work}.values():
            if not job.cancelled:
                self._resolve(job, [a for (j, *_), a in zip(work, results, strict=True) if j is job])

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> list[list[tuple[list[int], str]]]:
        """Every job's n answers: jobs that sample alike run as one batch (row seeds keep each
        answer independent of the batch it ran in); each is cut at its own max_tokens.  A job whose
        client went away stops at the next decoding step (its rows end; the batch ends when all have)."""
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
                row_jobs = [jobs[i] for i, _ in rows]
                answers = self.backend.generate([j.prompt_ids for j in row_jobs], Sampling(
                    temperature, top_p, longest, seeds, cancelled=lambda rj=row_jobs: [j.cancelled for j in rj]))
                for (i, _), (ids, finish) in zip(rows, answers, strict=True):
                    if len(ids) > jobs[i].max_tokens:
                        ids, finish = ids[: jobs[i].max_tokens], "length"
                    out[i].append((ids, finish))
        return out

    def _speculate(self, job: Job) -> tuple:
        """Speculative decoding, EU (and, when asked, the target's logprobs from its verifying pass)
        streamed with every round's tokens (one choice: n is 1 here); the answer keeps what its rounds
        computed (it is not scored again).  A cancelled job stops at the next round."""
        from drafteu.data import TextStops, turn_stops
        from drafteu.score import StreamPieces

        pieces = StreamPieces(self.tokenizer)
        top = job.top_logprobs if job.logprobs or job.top_logprobs else None

        def on_tokens(ids, variance, bias, lps=None):
            texts = pieces(ids)
            if job.on_tokens is not None and not job.cancelled:
                job.on_tokens(0, Answer(list(ids), texts, **_terms(variance, bias),
                                        logprobs=[c for c, _ in lps] if lps is not None else None,
                                        top=[t for _, t in lps] if lps is not None else None))

        res = self.decoder.generate(job.prompt_ids, job.max_tokens, temperature=job.temperature, seed=job.seed,
                                    eos_ids=self.eos, on_tokens=on_tokens, logprobs=top,
                                    cancelled=lambda: job.cancelled,
                                    stops=TextStops(self.tokenizer, turn_stops(self.tokenizer) + tuple(job.stop or ())))
        known = Answer(list(res.token_ids), [], logprobs=res.logprobs, top=res.top,
                       **(_terms(res.variance, res.bias) if job.eu else {}))
        return job, list(res.token_ids), res.finish, known

    def _answers(self, work: list[tuple]) -> list[Answer]:
        """Every answer of a batch: cut exactly at its first stop string, its EU from one batched
        scoring pass (``DraftEnsemble.score_batch``, as `drafteu score`) and the target's logprobs
        from the same pass.  What decoding already computed of an answer (``known``: the speculative
        engine's rounds, the continuous engine's streamed segments) is kept; only the tokens after it
        are scored, with it as their context."""
        from drafteu import estimators, spans
        from drafteu.evaluate.hallucination import p_wrong
        from drafteu.score import token_pieces

        cut = []
        for job, ids, finish, known in work:
            kept, text = _cut_at_stop(self.tokenizer, ids, job.stop)
            pieces = token_pieces(self.tokenizer, kept)
            if text is not None:  # the stop string begins inside the last kept token: its text ends there
                pieces[-1] = text[len("".join(pieces[:-1])):] if pieces else ""
            answer = Answer(kept, pieces, "stop" if text is not None or finish == "eos" else "length")
            if known is not None:  # the values of its first tokens (all of them, or a prefix)
                for name in ("eu", "variance", "bias", "logprobs", "top"):
                    value = getattr(known, name)
                    setattr(answer, name, None if value is None else list(value[:len(kept)]))
            cut.append((job, answer))

        def rest(i: int, done: list | None) -> tuple[list[int], list[int]]:  # (context, tokens to score)
            job, a = cut[i]
            m = len(done or [])
            return job.prompt_ids + a.token_ids[:m], a.token_ids[m:]

        def partial(values: list | None, a: Answer) -> bool:
            return values is None or len(values) < len(a.token_ids)

        need = [i for i, (job, a) in enumerate(cut) if a.token_ids and job.eu and partial(a.eu, a)]
        if need:
            scores = self.ensemble.score_batch([rest(i, cut[i][1].eu) for i in need])
            for i, s in zip(need, scores, strict=True):
                a = cut[i][1]
                m = len(a.eu or [])
                for name, value in _terms(s.variance, s.bias, s.eu).items():
                    setattr(a, name, (getattr(a, name) or [])[:m] + value)
        want = [i for i, (job, a) in enumerate(cut)
                if a.token_ids and (job.logprobs or job.top_logprobs) and partial(a.logprobs, a)]
        if want:
            top = max(cut[i][0].top_logprobs for i in want)
            lps = self.ensemble.target_logprobs([rest(i, cut[i][1].logprobs) for i in want], top)
            for i, (chosen, values, indices) in zip(want, lps, strict=True):
                a, k = cut[i][1], cut[i][0].top_logprobs
                m = len(a.logprobs or [])
                a.logprobs = (a.logprobs or [])[:m] + chosen.tolist()
                a.top = (a.top or [[] for _ in range(m)])[:m] + [
                    list(zip(x.tolist(), v.tolist(), strict=True))
                    for v, x in zip(values[:, :k], indices[:, :k], strict=True)]
        for job, a in cut:
            if job.eu:
                ok = a.token_ids and a.eu is not None
                a.summary = {how: estimators.TokenScores(a.token_ids, torch.tensor(a.eu)).aggregate(how) if ok else 0.0
                             for how in estimators.AGGREGATIONS} | {"tokens": len(a.token_ids)}
                a.summary["spans"] = spans.ranked(a.pieces, a.eu) if ok else []
                if self.hallucination_map is not None:
                    how = self.hallucination_map["aggregation"]
                    a.summary["p_wrong"] = p_wrong(a.summary[how], self.hallucination_map) if ok else None
                    a.summary["p_wrong_map"] = self.hallucination_map["provenance"]
            else:
                a.eu = a.variance = a.bias = None
        return [a for _, a in cut]


def _terms(variance, bias, eu=None) -> dict:
    """An answer's EU fields from its (T,) variance and bias terms (and their sum, when the scorer gave
    it); none when either term is missing."""
    if variance is None or bias is None:
        return {}
    return {"eu": (variance + bias if eu is None else eu).tolist(), "variance": variance.tolist(),
            "bias": bias.tolist()}


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def _give_back_memory() -> None:
    """Hand freed heap pages back to the system after a batch (glibc keeps a long request's buffers
    otherwise: the server's resident memory would stay at its largest batch's)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _cut_at_stop(tokenizer, ids: list[int], stop: list[str]) -> tuple[list[int], str | None]:
    """(the tokens that begin before the first stop string, the answer's text before it; None when
    no stop string occurs)."""
    from drafteu.data import TextStops

    found = TextStops(tokenizer, stop).find(ids)
    if found is None:
        return ids, None
    k, text = found
    return ids[:k], text


