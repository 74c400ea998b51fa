"""The HTTP side of `drafteu serve`: OpenAI's API shapes, with per-token EU in every answer.

``POST /v1/chat/completions`` and ``/v1/completions`` answer as OpenAI does (so its clients, LangChain
and uqlm work unchanged); each token of ``choices[i].logprobs.content`` carries ``eu``,
``eu_variance`` and ``eu_bias`` next to ``token`` / ``logprob`` / ``bytes`` / ``top_logprobs``, and
each choice an ``eu`` summary (mean, max, sum, tokens; ``p_wrong`` when the run fitted a
hallucination map).  ``POST /v1/score`` gives the EU of a response the client already has.  Errors
use OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request
(never FastAPI's 422), 401 without the API key, 429 with ``Retry-After`` over capacity, 503 while
loading, draining or after an engine failure, 504 past the per-request timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, field_validator

from drafteu.serve.engine import MAX_LOGPROBS, Engine, Job

log = logging.getLogger("drafteu.serve")


class ApiError(Exception):
    """An error answered in OpenAI's envelope."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# -- requests -----------------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What every generating request shares (OpenAI's names and ranges)."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=8)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    eu: bool = True  # drafteu's own field: false skips the EU (a plain completion)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


class CompletionRequest(_Sampling):
    prompt: str
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class ScoreRequest(BaseModel):
    """The prompt (``messages``, a raw ``prompt``, or ``question`` in `drafteu score`'s format) and
    the response whose tokens are scored."""

    model_config = ConfigDict(extra="allow")
    model: str
    response: str = Field(min_length=1)
    messages: list[Message] | None = None
    prompt: str | None = None
    question: str | None = None
    shots: int = Field(default=2, ge=0, le=2)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


# -- the app ---------------------------------------------------------------------------------------------


def build_app(engine: Engine, *, model_name: str, api_key: str | None = None, max_concurrency: int = 16,
              max_queue: int = 64, timeout: float = 120.0):
    """The FastAPI app over a started ``engine``."""
    app = FastAPI(title="drafteu", docs_url=None, redoc_url=None)
    registry = CollectorRegistry()
    requests_total = Counter("drafteu_requests", "requests by endpoint and status", ["endpoint", "status"],
                             registry=registry)
    latency = Histogram("drafteu_request_seconds", "request latency", ["endpoint"], registry=registry,
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
    tokens_total = Counter("drafteu_tokens", "tokens by kind", ["kind"], registry=registry)
    queue_depth = Gauge("drafteu_queue_depth", "requests waiting for the model", registry=registry)
    in_flight_gauge = Gauge("drafteu_in_flight", "requests admitted and not answered", registry=registry)
    eu_hist = Histogram("drafteu_token_eu", "per-token EU (nats) of the answers given", registry=registry,
                        buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10))
    queue_depth.set_function(lambda: engine.queued)
    state = {"in_flight": 0, "draining": False}
    in_flight_gauge.set_function(lambda: state["in_flight"])

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        kind = first.get("type", "")
        message = "the request body is not valid JSON" if kind == "json_invalid" else \
            f"{where or 'the request'}: {first.get('msg', 'invalid')}"
        return error_response(ApiError(400, message, param=where, code=kind or None))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")
        return error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))

    @app.middleware("http")
    async def _envelope(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        path = request.url.path
        if path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                response = error_response(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                                   "authentication_error", code="invalid_api_key"))
                return _done(request, response, rid, t0)
        response = await call_next(request)
        return _done(request, response, rid, t0)

    def _done(request, response, rid, t0):
        response.headers["x-request-id"] = rid
        seconds = time.perf_counter() - t0
        path = request.url.path
        if path.startswith("/v1/"):
            requests_total.labels(path, str(response.status_code)).inc()
            latency.labels(path).observe(seconds)
        log.info("%s %s %s %d %.3fs", rid, request.method, path, response.status_code, seconds)
        return response

    # -- admission, cancellation, timeout -----------------------------------------------------------------

    def admit():
        if not engine.ready.is_set():
            raise ApiError(503, "the model is loading; retry shortly", "server_error", code="loading",
                           headers={"Retry-After": "5"})
        if engine.failure is not None:
            raise ApiError(503, f"the engine failed: {engine.failure}", "server_error", code="engine_failure")
        if state["draining"]:
            raise ApiError(503, "the server is shutting down", "server_error", code="draining")
        if state["in_flight"] >= max_concurrency + max_queue:
            raise ApiError(429, f"over capacity ({max_concurrency} running + {max_queue} queued); retry later",
                           "rate_limit_error", code="over_capacity", headers={"Retry-After": "1"})
        state["in_flight"] += 1

    async def wait_for(job: Job, request) -> list:
        """The job's result; its work is cancelled if the client leaves or the timeout passes."""
        future = engine.submit(job)

        async def watch():
            while not future.done():
                if await request.is_disconnected():
                    job.cancelled = True
                    future.cancel()
                    return
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            job.cancelled = True
            raise ApiError(504, f"the request took longer than the server's timeout ({timeout:g} s)", "timeout",
                           code="timeout") from None
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        finally:
            watcher.cancel()

    def release():
        state["in_flight"] -= 1

    # -- request -> job ---------------------------------------------------------------------------------

    def check_model(name: str):
        if name != model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def job_for(req: _Sampling, prompt_ids: list[int], logprobs: bool, top_logprobs: int) -> Job:
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        if engine.context and len(prompt_ids) + max_tokens > engine.context:
            raise ApiError(400, f"the prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceed the "
                           f"model's context of {engine.context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        if engine.engine == "speculative" and (req.n > 1 or req.top_p < 1 or req.stop):
            raise ApiError(400, "n > 1, top_p < 1 and stop need the batched engine (drafteu serve --engine batched)",
                           param="n" if req.n > 1 else "top_p" if req.top_p < 1 else "stop")
        seed = req.seed if req.seed is not None else uuid.uuid4().int % (2**31)
        return Job("generate", prompt_ids, n=req.n, max_tokens=max_tokens, temperature=req.temperature,
                   top_p=req.top_p, seed=seed, stop=req.stop, eu=req.eu, logprobs=logprobs, top_logprobs=top_logprobs)

    def chat_prompt(messages: list[Message]) -> list[int]:
        try:
            ids = engine.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                       add_generation_prompt=True, tokenize=True)
        except Exception as e:  # a template that refuses the roles given
            raise ApiError(400, f"messages: {e}", param="messages") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5

    def usage(prompt_ids, answers) -> dict:
        completion = sum(len(a.token_ids) for a in answers)
        tokens_total.labels("prompt").inc(len(prompt_ids))
        tokens_total.labels("completion").inc(completion)
        return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
                "total_tokens": len(prompt_ids) + completion}

    def observe(answers):
        for a in answers:
            for t in a.tokens:
                if "eu" in t:
                    eu_hist.observe(t["eu"])

    # -- endpoints ----------------------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse({"status": "failed", "error": engine.failure}, status_code=503)
        if not engine.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if state["draining"]:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": model_name, "in_flight": state["in_flight"], "queued": engine.queued}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "drafteu"}]}

    async def generation(req: _Sampling, request, prompt_of, logprobs: bool, top_logprobs: int, chat: bool):
        """Admit the request and either hand its job to a stream (which releases its slot when it ends)
        or wait for its answers: (streaming response, None) or (None, (answers, id, created, prompt ids))."""
        admit()
        handed = False
        try:
            prompt_ids = prompt_of()
            job = job_for(req, prompt_ids, logprobs, top_logprobs)
            rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
            if req.stream:
                handed = True
                include_usage = req.stream_options.include_usage if req.stream_options else False
                return streaming(job, request, rid, created, "chat.completion.chunk" if chat else "text_completion",
                                 prompt_ids, include_usage, chat=chat), None
            answers = await wait_for(job, request)
        finally:
            if not handed:
                release()
        observe(answers)
        return None, (answers, rid, created, prompt_ids)

    def completion(kind: str, done, fields) -> dict:
        """A non-streamed response of ``kind``: each choice's own ``fields`` plus what every choice has."""
        answers, rid, created, prompt_ids = done
        return {"id": rid, "object": kind, "created": created, "model": model_name,
                "choices": [{"index": i, **fields(a), "finish_reason": a.finish_reason, "eu": a.summary}
                            for i, a in enumerate(answers)],
                "usage": usage(prompt_ids, answers)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        stream, done = await generation(req, request, lambda: chat_prompt(req.messages), req.logprobs,
                                        (req.top_logprobs or 0) if req.logprobs else 0, chat=True)
        if stream is not None:
            return stream
        return completion("chat.completion", done, lambda a: {
            "message": {"role": "assistant", "content": _text(a)},
            "logprobs": {"content": a.tokens} if req.eu or req.logprobs else None})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)

        def prompt_of():
            ids = list(engine.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
            if not ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            return ids

        stream, done = await generation(req, request, prompt_of, req.logprobs is not None, req.logprobs or 0,
                                        chat=False)
        if stream is not None:
            return stream
        return completion("text_completion", done, lambda a: {
            "text": (req.prompt if req.echo else "") + _text(a),
            "logprobs": _legacy_logprobs(a) if req.eu or req.logprobs is not None else None})

    @app.post("/v1/score")
    async def score(req: ScoreRequest, request: Request):
        check_model(req.model)
        given = [k for k in ("messages", "prompt", "question") if getattr(req, k) is not None]
        if len(given) != 1:
            raise ApiError(400, "give exactly one of messages, prompt or question", param="messages")
        admit()
        try:
            if req.messages is not None:
                prompt_ids = chat_prompt(req.messages)
            elif req.prompt is not None:
                prompt_ids = list(engine.tokenizer(req.prompt, add_special_tokens=False)["input_ids"])
            else:
                from drafteu import data

                prompt_ids = data.format_prompt(engine.tokenizer, req.question, data.shots_for("score", req.shots))
            response_ids = list(engine.tokenizer(req.response, add_special_tokens=False)["input_ids"])
            if engine.context and len(prompt_ids) + len(response_ids) > engine.context:
                raise ApiError(400, f"the prompt + response ({len(prompt_ids) + len(response_ids)} tokens) exceed the "
                               f"model's context of {engine.context} tokens", param="response",
                               code="context_length_exceeded")
            job = Job("score", prompt_ids, response_ids=response_ids, logprobs=True, top_logprobs=req.top_logprobs or 0)
            answers = await wait_for(job, request)
        finally:
            release()
        observe(answers)
        a = answers[0]
        return {"id": f"score-{uuid.uuid4().hex[:24]}", "object": "score", "model": model_name,
                "tokens": [t | {"id": int(i)} for t, i in zip(a.tokens, a.token_ids, strict=True)], "eu": a.summary,
                "usage": {"prompt_tokens": len(prompt_ids), "response_tokens": len(response_ids)}}

    # -- streaming ------------------------------------------------------------------------------------------

    def streaming(job: Job, request, rid: str, created: int, obj: str, prompt_ids, include_usage: bool, chat: bool):
        """Server-sent events: the answer's tokens (with their EU) as chunks, then a final chunk with the
        finish reason and the EU summary, the usage chunk when asked, and ``data: [DONE]``.  With the
        speculative engine tokens go out as each round verifies them; an error after the stream
        started is a ``data: {"error": ...}`` event."""
        live: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        if engine.engine == "speculative":
            job.on_tokens = lambda choice, tokens: loop.call_soon_threadsafe(live.put_nowait, (choice, tokens))

        def chunk(choice: int, tokens: list[dict] | None, finish: str | None = None, summary: dict | None = None):
            text = "".join(t["token"] for t in tokens or [])
            body = {"index": choice, "finish_reason": finish}
            if chat:
                body["delta"] = ({"role": "assistant", "content": text} if tokens is not None else {})
                body["logprobs"] = {"content": tokens or []}
            else:
                body["text"] = text
                body["logprobs"] = {"content": tokens or []}
            if summary is not None:
                body["eu"] = summary
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                          "choices": [body]}) + "\n\n"

        async def events():
            future = engine.submit(job)
            sent: dict[int, int] = {}
            started = time.monotonic()
            try:
                while not future.done() or not live.empty():
                    if await request.is_disconnected():
                        job.cancelled = True
                        return
                    if time.monotonic() - started > timeout:
                        job.cancelled = True
                        yield "data: " + json.dumps(ApiError(504, "timeout", "timeout", code="timeout").body()) + "\n\n"
                        return
                    try:
                        choice, tokens = await asyncio.wait_for(live.get(), 0.05)
                    except asyncio.TimeoutError:
                        continue
                    sent[choice] = sent.get(choice, 0) + len(tokens)
                    yield chunk(choice, tokens)
                try:
                    answers = future.result()
                except Exception as e:
                    yield "data: " + json.dumps(ApiError(500, str(e), "server_error").body()) + "\n\n"
                    return
                observe(answers)
                for i, a in enumerate(answers):
                    rest = a.tokens[sent.get(i, 0):]
                    for j in range(0, len(rest), 8):  # the unsent tokens, a few per event
                        yield chunk(i, rest[j:j + 8])
                    yield chunk(i, None, a.finish_reason, a.summary)
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                                 "choices": [], "usage": usage(prompt_ids, answers)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not future.done():
                    job.cancelled = True
                    future.cancel()
                release()

        return StreamingResponse(events(), media_type="text/event-stream")

    app.state.drain = lambda: state.update(draining=True)
    app.state.in_flight = lambda: state["in_flight"]
    return app


def _text(answer) -> str:
    return "".join(t["token"] for t in answer.tokens)


def _legacy_logprobs(answer) -> dict:
    """The completions API's logprobs (tokens, token_logprobs, top_logprobs, text_offset), with the
    chat-style ``content`` list that carries the EU."""
    offset, offsets = 0, []
    for t in answer.tokens:
        offsets.append(offset)
        offset += len(t["token"])
    return {"tokens": [t["token"] for t in answer.tokens], "token_logprobs": [t.get("logprob") for t in answer.tokens],
            "top_logprobs": [{x["token"]: x["logprob"] for x in t.get("top_logprobs", [])} for t in answer.tokens],
            "text_offset": offsets, "content": answer.tokens}
