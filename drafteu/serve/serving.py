"""Between the wire and the worker: requests become ``jobs.Job``s, the worker's plain ``Answer``s
become the response models of ``protocol`` (or a stream of chunks).  One class per endpoint family,
as vLLM's ``OpenAIServingChat`` / ``OpenAIServingCompletion``; the routes (``api``) only call them.

Every model-facing step is off the event loop (tokenizing runs in a thread pool, model work in the
worker's thread), and a request's job is cancelled - its generation stops at the next decoding step - when
its client disconnects (awaited, not polled) or its time runs out.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool

import drafteu.serve.protocol as P
from drafteu.errors import DraftEUError
from drafteu.serve.jobs import Answer, Job
from drafteu.serve.wire import Chunks, Tokens, slice_answer, token_bytes, usage
from drafteu.serve.worker import Worker


class ApiError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param,
                                                 code=self.code)).model_dump()


def engine_error(e: Exception) -> ApiError:
    """A job's own error: its input was at fault (a ``DraftEUError``: 400 with its message) or the
    server was (500, the message kept)."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, DraftEUError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error")


# -- the request's life: admission, the job, its cancellation -------------------------------------------


class Admission:
    """Slots for requests in flight (running + queued); over capacity is 429 with Retry-After."""

    def __init__(self, worker: Worker, max_concurrency: int, max_queue: int):
        self.worker, self.max_concurrency, self.max_queue = worker, max_concurrency, max_queue
        self.in_flight, self.draining = 0, False

    def admit(self) -> None:
        worker = self.worker
        if not worker.ready.is_set():
            raise ApiError(503, "the model is loading; retry shortly", "server_error", code="loading",
                           headers={"Retry-After": "5"})
        if worker.failure is not None:
            raise ApiError(503, f"the engine failed: {worker.failure}", "server_error", code="engine_failure")
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_error", code="draining")
        if self.in_flight >= self.max_concurrency + self.max_queue:
            raise ApiError(429, f"over capacity ({self.max_concurrency} running + {self.max_queue} queued); retry "
                           "later", "rate_limit_error", code="over_capacity", headers={"Retry-After": "1"})
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


async def _disconnected(request) -> None:
    """Returns when the client has gone: awaits ASGI's ``http.disconnect`` (the body was read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_job(worker: Worker, job: Job, request, timeout: float) -> list[Answer]:
    """The job's answers; when the client disconnects or ``timeout`` passes first, the job is
    cancelled (its generation stops at the next step, its slot is freed by the caller) and this
    raises (``CancelledError`` / a 504)."""
    future = worker.submit(job)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({future, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if future in done:
            try:
                return future.result()
            except Exception as e:
                raise engine_error(e) from None
        job.cancelled = True
        if gone in done:
            raise asyncio.CancelledError("the client disconnected")
        raise ApiError(504, f"the request took longer than the server's timeout ({timeout:g} s)", "timeout",
                       code="timeout")
    finally:
        gone.cancel()
        if not future.done():
            job.cancelled = True
            future.cancel()


# -- the endpoints' work ------------------------------------------------------------------------------------


class Serving:
    """Chat, completions and score over one worker: request model -> job -> response model (or SSE)."""

    def __init__(self, worker: Worker, names: list[str], admission: Admission, timeout: float,
                 observe: Callable[[list[Answer], list[int]], None] = lambda answers, prompt: None,
                 thresholds: tuple[float | None, float | None] = (None, None)):
        self.worker, self.names, self.admission, self.timeout = worker, names, admission, timeout
        self.observe, self.thresholds = observe, thresholds

    def routing(self, req: P._Sampling) -> tuple[float | None, float | None]:
        """The (review, abstain) thresholds a request is decided with: its own, else the server's; a 400 before
        any work when they are set but nothing gives a P(wrong)."""
        review = req.review_above if req.review_above is not None else self.thresholds[0]
        abstain = req.abstain_above if req.abstain_above is not None else self.thresholds[1]
        if (review, abstain) != (None, None) and (self.worker.hallucination_map is None or not req.eu):
            param = "eu" if not req.eu else "abstain_above" if req.abstain_above is not None else "review_above"
            raise ApiError(400, "review_above / abstain_above decide on P(wrong): it needs the EU (eu: true) and a run "
                           "whose hallucination stage fitted a map, which this server " +
                           ("has" if self.worker.hallucination_map is not None else "does not have"), param=param)
        return review, abstain

    def decide(self, req: P._Sampling, answers: list[Answer]) -> list[Answer]:
        """Each answer's routing decision from its P(wrong) and the request's (else the server's) thresholds:
        ``abstain`` above ``abstain_above``, ``review`` above ``review_above``, else ``answer``; the thresholds
        are stated with it.  An abstaining answer's text is withheld only when the request asks (``withhold``)."""
        review, abstain = self.routing(req)
        if review is None and abstain is None:
            return answers
        for a in answers:
            p = (a.summary or {}).get("p_wrong")
            action = "answer" if p is None else "abstain" if abstain is not None and p > abstain else \
                "review" if review is not None and p > review else "answer"
            a.summary["decision"] = {"action": action, "p_wrong": p, "review_above": review, "abstain_above": abstain,
                                     "withheld": bool(req.withhold and action == "abstain")}
            if a.summary["decision"]["withheld"]:
                a.pieces = [""] * len(a.pieces)
        return answers

    @property
    def tokens(self) -> Tokens:
        return Tokens(self.worker.tokenizer)

    def check_model(self, name: str) -> None:
        if name not in self.names:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{', '.join(map(repr, self.names))}",
                           param="model", code="model_not_found")

    # -- tokenizing (in a worker thread; the length checked before) ------------------------------------------

    def _check_length(self, text: str, param: str) -> None:
        context = self.worker.context
        if context and len(text.encode("utf-8")) > context * self.worker.max_token_bytes:
            raise ApiError(400, f"{param} is longer than the model's context of {context} tokens could hold; "
                           "shorten it", param=param, code="context_length_exceeded")

    async def encode(self, text: str, param: str) -> list[int]:
        self._check_length(text, param)
        return await run_in_threadpool(lambda: list(self.worker.tokenizer(text, add_special_tokens=False)["input_ids"]))

    async def chat_prompt(self, messages: list[P.Message]) -> list[int]:
        for i, m in enumerate(messages):
            self._check_length(m.text(), f"messages.{i}.content")

        def template():
            try:
                chat = [{"role": m.role, "content": m.text()} for m in messages]
                ids = self.worker.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            except Exception as e:  # a template that refuses the roles given
                raise ApiError(400, f"messages: {e}", param="messages") from None
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5

        return await run_in_threadpool(template)

    def job_for(self, req: P._Sampling, prompt_ids: list[int], logprobs: bool, top_logprobs: int) -> Job:
        worker, max_tokens = self.worker, req.max_new_tokens
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if worker.context and len(prompt_ids) + max_tokens > worker.context:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the "
                           f"model's context of {worker.context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        seed = req.seed if req.seed is not None else uuid.uuid4().int % (2**31)
        job = Job("generate", prompt_ids, n=req.n, max_tokens=max_tokens, temperature=req.temperature,
                  top_p=req.top_p, seed=seed, stop=req.stop, eu=req.eu, logprobs=logprobs, top_logprobs=top_logprobs)
        refused = worker.refuses(job)  # what the server's generation strategy cannot do
        if refused is not None:
            raise ApiError(400, refused[0], param=refused[1])
        return job

    async def _answers(self, job: Job, request) -> list[Answer]:
        answers = await run_job(self.worker, job, request, self.timeout)
        self.observe(answers, job.prompt_ids)
        return answers

    # -- chat ----------------------------------------------------------------------------------------------

    async def _generation(self, req, request, prompt_of, logprobs: bool, top: int, chat: bool):
        """Admit the request, tokenize its prompt, and either hand its job to a stream (which frees the
        slot when it ends) or wait for the answers: (stream, None) or (None, (answers, prompt, id, created))."""
        self.check_model(req.model)
        self.admission.admit()
        handed = False
        try:
            self.routing(req)
            prompt = await prompt_of()
            job = self.job_for(req, prompt, logprobs, top)
            rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
            if req.stream:
                handed = True
                return self._stream(job, request, rid, created, req, chat=chat), None
            return None, (await self._answers(job, request), prompt, rid, created)
        finally:
            if not handed:
                self.admission.release()

    async def chat(self, req: P.ChatRequest, request):
        stream, done = await self._generation(req, request, lambda: self.chat_prompt(req.messages), req.logprobs,
                                              (req.top_logprobs or 0) if req.logprobs else 0, chat=True)
        if stream is not None:
            return stream
        answers, prompt, rid, created = done
        answers, tokens = self.decide(req, answers), self.tokens
        return P.ChatCompletion(id=rid, created=created, model=req.model, usage=usage(prompt, answers), choices=[
            P.ChatChoice(index=i, message=P.AssistantMessage(content=a.text), finish_reason=a.finish_reason,
                         logprobs=P.Logprobs(content=tokens.content(a)) if req.logprobs else None,
                         eu=a.summary, eu_tokens=tokens.eu(a))
            for i, a in enumerate(answers)])

    # -- completions --------------------------------------------------------------------------------------------

    async def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """A completion's prompt as token ids: a string tokenized, token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            return await self.encode(prompt, "prompt")
        vocab = len(self.worker.tokenizer)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the model's vocabulary (0..{vocab - 1})",
                           param="prompt")
        return list(prompt)

    def echo_text(self, req: P.CompletionRequest, prompt_ids: list[int]) -> str:
        """The prompt as ``echo`` returns it: the string sent, or the token ids sent, decoded."""
        return req.prompt if isinstance(req.prompt, str) else self.worker.tokenizer.decode(prompt_ids)

    async def completions(self, req: P.CompletionRequest, request):
        stream, done = await self._generation(req, request, lambda: self.prompt_ids(req.prompt),
                                              req.logprobs is not None, req.logprobs or 0, chat=False)
        if stream is not None:
            return stream
        answers, prompt, rid, created = done
        answers = self.decide(req, answers)
        tokens, before = self.tokens, self.echo_text(req, prompt) if req.echo else ""
        return P.Completion(id=rid, created=created, model=req.model, usage=usage(prompt, answers), choices=[
            P.CompletionChoice(index=i, text=before + a.text, finish_reason=a.finish_reason,
                               logprobs=tokens.legacy(a, len(before)) if req.logprobs is not None else None,
                               eu=a.summary, eu_tokens=tokens.eu(a))
            for i, a in enumerate(answers)])

    # -- score ------------------------------------------------------------------------------------------------

    async def score(self, req: P.ScoreRequest, request) -> P.ScoreResponse:
        self.check_model(req.model)
        given = [k for k in ("messages", "prompt", "question") if getattr(req, k) is not None]
        if len(given) != 1:
            raise ApiError(400, "give exactly one of messages, prompt or question", param="messages")
        self.admission.admit()
        try:
            if req.messages is not None:
                prompt = await self.chat_prompt(req.messages)
            elif req.prompt is not None:
                prompt = await self.encode(req.prompt, "prompt")
            else:
                from drafteu import data

                self._check_length(req.question, "question")
                prompt = await run_in_threadpool(data.format_prompt, self.worker.tokenizer, req.question,
                                                 data.shots_for("score", req.shots))
            response = await self.encode(req.response, "response")
            if not prompt or not response:
                which = "response" if prompt else given[0]
                raise ApiError(400, f"{which} has no tokens", param=which)
            context = self.worker.context
            if context and len(prompt) + len(response) > context:
                raise ApiError(400, f"the prompt + response ({len(prompt) + len(response)} tokens) exceed the "
                               f"model's context of {context} tokens", param="response", code="context_length_exceeded")
            job = Job("score", prompt, response_ids=response, logprobs=True, top_logprobs=req.top_logprobs or 0)
            answers = await self._answers(job, request)
        finally:
            self.admission.release()
        a = answers[0]
        tokens = self.tokens
        return P.ScoreResponse(id=f"score-{uuid.uuid4().hex[:24]}", model=req.model, eu=a.summary,
                               usage=P.ScoreUsage(prompt_tokens=len(prompt), response_tokens=len(response)), tokens=[
            P.ScoredToken(id=t, token=text, bytes=list(token_bytes(tokens.tokenizer, t)), logprob=a.logprobs[j],
                          top_logprobs=tokens.top(a.top[j]) if req.top_logprobs else None,
                          eu=a.eu[j], eu_variance=a.variance[j], eu_bias=a.bias[j])
            for j, (t, text) in enumerate(zip(a.token_ids, a.pieces, strict=True))])

    # -- streaming -----------------------------------------------------------------------------------------------

    def _stream(self, job: Job, request, rid: str, created: int, req, chat: bool):
        from fastapi.responses import StreamingResponse

        return StreamingResponse(self._events(job, request, rid, created, req, chat), media_type="text/event-stream")

    async def _events(self, job: Job, request, rid: str, created: int, req, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: the answer's tokens as chunks (with the speculative engine as each round
        verifies them), a chunk per choice with its finish reason and EU summary, the usage chunk when
        asked, then ``data: [DONE]``.  An error after the stream started is a ``data: {"error": ...}``
        event.  The client leaving (the response's send fails, Starlette cancels this generator) or
        the timeout cancels the job."""
        live: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if self.worker.live:  # the speculative rounds, the continuous engine's segments
            job.on_tokens = lambda choice, part: loop.call_soon_threadsafe(live.put_nowait, (choice, part))
        chunk = Chunks(self.tokens, req, rid, created, chat)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        future = self.worker.submit(job)
        sent: dict[int, int] = {}
        deadline = time.monotonic() + self.timeout
        try:
            if chat:
                for i in range(job.n):
                    yield chunk(i, Answer([], []), first=True)
            if not chat and req.echo:
                echoed = self.echo_text(req, job.prompt_ids)
                for i in range(job.n):
                    yield chunk.echo(i, echoed)
            while not future.done() or not live.empty():
                getter = asyncio.ensure_future(live.get())
                done, _ = await asyncio.wait({future, getter}, timeout=max(0.0, deadline - time.monotonic()),
                                             return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    choice, part = getter.result()
                    sent[choice] = sent.get(choice, 0) + len(part.token_ids)
                    yield chunk(choice, part)
                    continue
                getter.cancel()
                if not done:
                    job.cancelled = True
                    yield "data: " + json.dumps(ApiError(504, "the request took longer than the server's timeout",
                                                         "timeout", code="timeout").body()) + "\n\n"
                    return
            try:
                answers = future.result()
            except Exception as e:
                yield "data: " + json.dumps(engine_error(e).body()) + "\n\n"
                return
            self.observe(answers, job.prompt_ids)
            for i, a in enumerate(self.decide(req, answers)):  # the decision rides on the choice's last chunk
                start = sent.get(i, 0)
                for j in range(start, len(a.token_ids), 8):  # the unsent tokens, a few per event
                    yield chunk(i, slice_answer(a, j, min(len(a.token_ids), j + 8)))
                yield chunk(i, None, a.finish_reason, a.summary)
            if include_usage:
                yield chunk.usage(usage(job.prompt_ids, answers))
            yield "data: [DONE]\n\n"
        finally:
            if not future.done():
                job.cancelled = True
                future.cancel()
            self.admission.release()
