"""The HTTP side of `drafteu serve`: routes, the request envelope (key, body size, metrics) and
errors, over ``serving`` (the work) and ``protocol`` (the shapes) - vLLM's split of its OpenAI
server into protocol, serving and router.

``POST /v1/chat/completions`` and ``/v1/completions`` answer as OpenAI does (so its clients, LangChain
and uqlm work unchanged), with the EU in extra fields (``protocol``).  ``POST /v1/score`` gives the EU
of a response the client already has.  Errors use OpenAI's envelope ``{"error": {"message", "type",
"param", "code"}}``, every one of them (404, 405, malformed bodies included): 400 for a bad request
(never FastAPI's 422), 401 without the API key, 413 over the body limit, 429 with ``Retry-After``
over capacity, 503 while loading, draining or after the worker failed to load, 504 past the per-request
timeout.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

import drafteu.serve.protocol as P
from drafteu.serve.serving import Admission, ApiError, Serving
from drafteu.serve.worker import Worker

log = logging.getLogger("drafteu.serve")
MAX_BODY_BYTES = 8 * 2**20


class BodyTooLarge(StarletteHTTPException):
    """A body past the limit (raised while it is read, so FastAPI's body parser passes it on)."""

    def __init__(self):
        super().__init__(413)


class Metrics:
    """The server's Prometheus series; endpoints are labelled by route (unknown paths as one label)."""

    def __init__(self, worker: Worker, admission: Admission):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("drafteu_requests", "requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.latency = Histogram("drafteu_request_seconds", "request latency", ["endpoint"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.tokens = Counter("drafteu_tokens", "tokens by kind", ["kind"], registry=r)
        self.token_eu = Histogram("drafteu_token_eu", "per-token EU (nats) of the answers given", registry=r,
                                  buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10))
        Gauge("drafteu_queue_depth", "requests waiting for the model", registry=r).set_function(lambda: worker.queued)
        Gauge("drafteu_in_flight", "requests admitted and not answered",
              registry=r).set_function(lambda: admission.in_flight)

    def observe(self, answers, prompt_ids) -> None:
        self.tokens.labels("prompt").inc(len(prompt_ids))
        self.tokens.labels("completion").inc(sum(len(a.token_ids) for a in answers))
        for a in answers:
            for eu in a.eu or ():
                self.token_eu.observe(eu)


def _router(serving: Serving, admission: Admission, metrics: Metrics) -> APIRouter:
    router = APIRouter()
    worker = serving.worker

    @router.get("/health")
    async def health():
        if worker.failure is not None:
            return JSONResponse({"status": "failed", "error": worker.failure}, status_code=503)
        if not worker.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": serving.names[0], "in_flight": admission.in_flight, "queued": worker.queued}

    @router.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v1/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=name) for name in serving.names])

    @router.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest, request: Request, response: Response):
        return _decision_header(await serving.chat(req, request), response)

    @router.post("/v1/completions")
    async def completions(req: P.CompletionRequest, request: Request, response: Response):
        return _decision_header(await serving.completions(req, request), response)

    @router.post("/v1/score", response_model=P.ScoreResponse)
    async def score(req: P.ScoreRequest, request: Request):
        return await serving.score(req, request)

    return router


def _decision_header(result, response: Response):
    """A one-choice answer's routing decision also as response headers (``x-drafteu-decision``,
    ``x-drafteu-p-wrong``): clients that keep headers but not extra fields (LangChain's
    ``include_response_headers``) can route on it."""
    choices = getattr(result, "choices", None)
    decision = ((choices[0].eu or {}).get("decision") if choices and len(choices) == 1 else None)
    if decision is not None:
        response.headers["x-drafteu-decision"] = decision["action"]
        if decision["p_wrong"] is not None:
            response.headers["x-drafteu-p-wrong"] = f"{decision['p_wrong']:.6f}"
    return result


def build_app(worker: Worker, *, model_name: str | list[str], api_key: str | None = None, max_concurrency: int = 16,
              max_queue: int = 64, timeout: float = 120.0, max_body_bytes: int = MAX_BODY_BYTES,
              thresholds: tuple[float | None, float | None] = (None, None)) -> FastAPI:
    """The FastAPI app over a started ``worker``; ``model_name``: the id clients ask for (or several
    aliases, the first the main one)."""
    names = [model_name] if isinstance(model_name, str) else list(model_name)
    app = FastAPI(title="drafteu", docs_url=None, redoc_url=None, openapi_url=None)
    admission = Admission(worker, max_concurrency, max_queue)
    metrics = Metrics(worker, admission)
    serving = Serving(worker, names, admission, timeout, observe=metrics.observe, thresholds=thresholds)
    router = _router(serving, admission, metrics)
    app.include_router(router)
    routes = {r.path for r in router.routes}  # the metrics' endpoint labels; any other path is "other"

    _error_handlers(app, max_body_bytes)
    _envelope(app, api_key, max_body_bytes, metrics, routes)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.state.drain = lambda: setattr(admission, "draining", True)
    app.state.in_flight = lambda: admission.in_flight
    return app


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every error as OpenAI's error object: ours, the request's validation, Starlette's HTTP errors
    (404, 405, 413, unreadable JSON) and anything unexpected (500, logged)."""

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        kind = first.get("type", "")
        message = "the request body is not valid JSON" if kind == "json_invalid" else \
            f"{where or 'the request'}: {first.get('msg', 'invalid').removeprefix('Value error, ')}"
        return _error_response(ApiError(400, message, param=where, code=kind or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
        message = {404: f"no such endpoint: {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}",
                   413: f"the request body is over the server's limit of {max_body_bytes} bytes",
                   400: "the request body could not be read as JSON (invalid UTF-8, or nested too deeply)"
                   }.get(e.status_code, str(e.detail))
        return _error_response(ApiError(e.status_code, message, code=codes.get(e.status_code, "invalid_request"),
                                        headers=dict(e.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request, e: Exception):
        log.exception("unexpected error")
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error"))


def _envelope(app: FastAPI, api_key: str | None, max_body_bytes: int, metrics: Metrics,
              routes: set[str]) -> None:
    """Around every request: its id (``x-request-id``, given or made), the API key on ``/v1/*``, the
    declared body length against the limit, the metrics by endpoint and status, one log line."""

    @app.middleware("http")
    async def _around(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        t0 = time.perf_counter()
        path = request.url.path
        if path.startswith("/v1/") and api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                response = _error_response(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                                    "authentication_error", code="invalid_api_key"))
                return _done(request, response, rid, t0)
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > max_body_bytes:
            return _done(request, _error_response(ApiError(
                413, f"the request body ({length} bytes) is over the server's limit of {max_body_bytes} bytes",
                code="body_too_large")), rid, t0)
        response = await call_next(request)
        return _done(request, response, rid, t0)

    def _done(request, response, rid, t0):
        response.headers["x-request-id"] = rid
        seconds = time.perf_counter() - t0
        path = request.url.path
        label = path if path in routes else "other"
        if path.startswith("/v1/") or label == "other":
            metrics.requests.labels(label, str(response.status_code)).inc()
            metrics.latency.labels(label).observe(seconds)
        log.info("%s %s %s %d %.3fs", rid, request.method, path, response.status_code, seconds)
        return response


class _BodyLimit:
    """ASGI middleware: a body sent without a length (chunked) that grows past ``max_bytes`` stops
    being read (``BodyTooLarge``, answered 413)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        return await self.app(scope, limited, send)


__all__ = ["ApiError", "MAX_BODY_BYTES", "build_app"]
