"""Generations on a backend's own async engine (`drafteu serve --backend vllm`: vLLM's ``AsyncLLM``).

Each generation is a task on the server's event loop: its choices decode in that engine's running batch
(continuous batching: a request joins and leaves it at any step), token ids streamed as they come;
cancelling the task closes the stream, which aborts the request inside the engine.  Only scoring goes
through the serve worker (``submit``: its batches, one ``DraftEnsemble.score_batch`` per batch).
A streamed answer is scored in segments of doubling length while it decodes - each with the answer so
far as its context, so the streamed EU equals the whole answer's - and the rest once it has ended.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import uuid
from collections.abc import Awaitable, Callable

from drafteu import models
from drafteu.data import StreamPieces, TextStops
from drafteu.posterior import member_seed
from drafteu.serve.decoding import Decoded
from drafteu.serve.jobs import Answer, Job

SEGMENT, MAX_SEGMENT = 8, 128  # a streamed answer's first scored segment, and the longest (doubling between)
CONTEXT = 4  # tokens decoded before a stream's unsent ones (the text at their boundary decodes as in the whole)
FIELDS = ("token_ids", "eu", "variance", "bias", "logprobs", "top")


class ContinuousDecoder:
    """``generate(job)``: a generation job's answers, decoded by ``engine`` (an async engine with
    ``stream``, ``turns`` and ``eos``: ``vllm_engine.AsyncVLLM``) and scored through ``submit`` (the
    serve worker's queue).  ``finished`` records (kind, tokens decoded, cancelled) per choice."""

    def __init__(self, engine, tokenizer, submit: Callable[[Job], Awaitable[list[Answer]]],
                 finished: collections.deque):
        self.engine, self.tokenizer, self.submit, self.finished = engine, tokenizer, submit, finished

    async def _scored(self, job: Job) -> list[Answer]:
        """``job`` through the worker (its scoring batches); cancelled with the caller."""
        try:
            return await self.submit(job)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def generate(self, job: Job) -> list[Answer]:
        """The n choices decode in the engine's running batch; their EU and logprobs come from the
        worker's scoring batches - while decoding goes on, in segments, when the job streams
        (``job.on_tokens``) - and the answers are finished (cut at a stop string, the rest scored,
        summarized) like the batched engine's."""
        stops = TextStops(self.tokenizer, self.engine.turns.stops + tuple(job.stop or ()))
        decoded = await asyncio.gather(*(self._choice(job, c, stops) for c in range(job.n)))
        return await self._scored(dataclasses.replace(job, kind="finish", decoded=list(decoded), on_tokens=None,
                                                      future=None, cancelled=False))

    async def _choice(self, job: Job, choice: int, stops: TextStops) -> Decoded:
        """Choice ``choice`` of ``job``: its ids cut at EOS and at a turn delimiter, the finish, and what was
        streamed of it (ids and their scores; None when it did not stream)."""
        scoring = job.eu or job.logprobs or job.top_logprobs > 0
        streamed = Answer([], [], eu=[], variance=[], bias=[], logprobs=[], top=[]) if job.on_tokens else None
        pieces = StreamPieces(self.tokenizer)
        pending: asyncio.Task | None = None
        segment = SEGMENT
        ids: list[int] = []
        reason = None

        def emit(part: Answer) -> None:
            part.pieces = pieces(part.token_ids)
            for name in FIELDS:
                value, kept = getattr(part, name), getattr(streamed, name)
                setattr(streamed, name, None if value is None or kept is None else kept + list(value))
            job.on_tokens(choice, part)

        async def segment_of(start: int, end: int) -> Answer:
            if not scoring:
                return Answer(ids[start:end], [])
            part = (await self._scored(Job("score", job.prompt_ids + ids[:start], response_ids=ids[start:end],
                                           eu=job.eu, logprobs=job.logprobs or job.top_logprobs > 0,
                                           top_logprobs=job.top_logprobs)))[0]
            return Answer(part.token_ids, [], eu=part.eu, variance=part.variance, bias=part.bias,
                          logprobs=part.logprobs, top=part.top)

        decoding = self.engine.stream(
            job.prompt_ids, temperature=job.temperature, top_p=job.top_p, max_tokens=job.max_tokens,
            seed=member_seed("serve", job.seed, choice) if job.temperature > 0 else None, stop=list(stops.stops),
            request_id=f"drafteu-{uuid.uuid4().hex}")
        try:
            async with contextlib.aclosing(decoding):  # leaving early (cancelled) aborts the request in the engine
                async for new, reason in decoding:
                    ids += new
                    if streamed is None or reason is not None:
                        continue
                    if pending is not None and pending.done():
                        emit(pending.result())
                        pending = None
                    start, least = len(streamed.token_ids), segment if scoring else 1  # unscored tokens go at once
                    if pending is None and len(ids) - start >= least:
                        end = await asyncio.to_thread(streamable, stops, ids, self.engine.eos, start)
                        if end - start >= least:
                            pending = asyncio.ensure_future(segment_of(start, end))
                            segment = min(2 * segment, MAX_SEGMENT)
            if pending is not None:
                emit(await pending)
                pending = None
        finally:
            if pending is not None:
                pending.cancel()
            self.finished.append((job.kind, len(ids), job.cancelled or reason is None))
        kept, finish = self.engine.turns.end(*models.cut_at_eos(ids, self.engine.eos, reason == "stop"))
        if streamed is not None and len(streamed.token_ids) > len(kept):  # never: segments end before any stop
            streamed = None
        return Decoded(kept, finish, streamed)


def streamable(stops: TextStops, ids: list[int], eos: list[int], start: int = 0) -> int:
    """How many of ``ids`` a stream may send: those before an EOS id that end before a stop string
    begins - and, while none has occurred, before the trailing tokens that could begin one.  The first
    ``start`` were sent already (no stop string begins before them), so only the text from a few
    tokens before ``start`` is decoded."""
    end = next((i for i, t in enumerate(ids) if t in eos), len(ids))
    context = max(0, start - CONTEXT)
    tail = ids[context:end]
    k = stops.cut(tail)
    return context + (k if k is not None else len(tail) - stops.held(tail))
