"""`drafteu serve`: an OpenAI-compatible server whose answers carry per-token EU.

``run(cfg)`` loads the run's target, proxy and draft ensemble in the worker thread
(``worker.Worker``), serves ``api.build_app`` with uvicorn on ``cfg.host`` (127.0.0.1 by default),
and on SIGTERM stops taking requests, finishes those in flight and exits.  Requests are independent,
so N servers behind any HTTP load balancer scale out (README, "Serving").
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from drafteu.errors import DraftEUError
from drafteu.hardware import DEVICE_HELP
from drafteu.vllm_engine import EngineSettings

ENGINES = ("batched", "speculative")


@dataclass(kw_only=True)
class ServeConfig(EngineSettings):
    """`drafteu serve`: the HTTP API over a run's draft ensemble."""

    drafts: Path = field(metadata={"help": "a reproduce run directory (its target's drafts, proxy and hallucination "
                                           "map) or a drafts directory"})
    target: str = field(default="embedded", metadata={"help": "target model: embedded, hub id, local dir or .gguf"})
    proxy: Path | None = field(default=None, metadata={"help": "the proxy (train-proxy output) when DRAFTS is a drafts "
                                                       "directory (without one the bias term uses the raw target)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0: every interface)"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    api_key: str | None = field(default=None, metadata={"help": "require 'Authorization: "
                                                                "Bearer KEY' on /v1/* (default: "
                                                        "$DRAFTEU_API_KEY; unset: no key)"})
    model_name: str | None = field(default=None, metadata={"help": "the model id clients ask for (default: "
                                                           "drafteu/<run directory name>)"})
    served_model_name: tuple[str, ...] = field(default=(), metadata={
        "help": "more ids the API answers to (comma-separated aliases; /v1/models lists them after --model-name)"})
    engine: str = field(default="batched", metadata={
        "help": "batched (requests that arrive together are generated in one batch, then scored) or speculative "
                "(speculative decoding by the drafts: EU streamed with every token, one request at a time)"})
    backend: str = field(default="hf", metadata={
        "help": "generation backend of the batched engine: hf (transformers' generate; requests that arrive together "
                "decode as one batch) or vllm (vLLM's async engine: continuous batching, tokens and their EU streamed "
                "in segments while decoding, a request aborted when its client leaves)"})
    max_concurrency: int = field(default=8, metadata={"help": "requests processed at once (a "
                                                              "batch holds up to this many)"})
    max_queue: int = field(default=32, metadata={"help": "requests waiting beyond that; more get 429 with Retry-After"})
    timeout: float = field(default=120.0, metadata={"help": "seconds a request may take (504 after)"})
    batch_wait_ms: float = field(default=5.0, metadata={"help": "how long the engine waits for more requests to batch"})
    max_body_mb: float = field(default=8.0, metadata={"help": "largest request body accepted, in MiB (413 beyond)"})
    dtype: str = field(default="auto", metadata={"help": "dtype of every model: auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    gamma: int = field(default=2, metadata={
        "help": "the speculative engine: tokens the drafts propose per round (on a CPU 1-2; more where verifying a "
                "round costs little more than one step, a GPU)"})
    review_above: float | None = field(default=None, metadata={
        "help": "P(wrong) above which an answer's decision is 'review' (needs a run with a hallucination map; a "
                "request's review_above overrides it)"})
    abstain_above: float | None = field(default=None, metadata={
        "help": "P(wrong) above which an answer's decision is 'abstain' (the "
                "text is still sent unless the request asks withhold: true)"})

    def __post_init__(self):
        super().__post_init__()
        self.drafts = Path(self.drafts)
        if not 1 <= self.gamma <= 16:
            raise DraftEUError(f"--gamma must be in 1..16 (tokens proposed per speculative round), got {self.gamma}")
        for name, value in (("review-above", self.review_above), ("abstain-above", self.abstain_above)):
            if value is not None and not 0 <= value <= 1:
                raise DraftEUError(f"--{name} is a probability of a wrong answer: give a number in [0, 1], got {value}")
        if None not in (self.review_above, self.abstain_above) and self.review_above > self.abstain_above:
            raise DraftEUError(f"--review-above ({self.review_above}) must not exceed --abstain-above "
                               f"({self.abstain_above})")
        if self.engine not in ENGINES:
            raise DraftEUError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        from drafteu.generate import BACKENDS

        if self.backend not in BACKENDS:
            raise DraftEUError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.max_concurrency < 1 or self.max_queue < 0:
            raise DraftEUError("--max-concurrency must be >= 1 and --max-queue >= 0")
        for name, value, low in (("timeout", self.timeout, 0.0), ("max-body-mb", self.max_body_mb, 0.0)):
            if not (math.isfinite(value) and value > low):
                raise DraftEUError(f"--{name} must be a finite number > 0, got {value}")
        if not (math.isfinite(self.batch_wait_ms) and self.batch_wait_ms >= 0):
            raise DraftEUError(f"--batch-wait-ms must be a finite number >= 0, got {self.batch_wait_ms}")
        if not 0 < self.port < 65536:
            raise DraftEUError(f"--port must be in 1..65535, got {self.port}")
        from drafteu.hardware import resolve_device
        from drafteu.models import check_dtype

        resolve_device(self.device)  # an unknown or absent device is an error before anything starts
        check_dtype(self.dtype)
        if self.api_key is not None and not self.api_key.strip():
            raise DraftEUError("--api-key is empty: give a key, or leave the option out to serve without one")
        if self.api_key is None:  # an empty variable counts as unset
            self.api_key = os.environ.get("DRAFTEU_API_KEY", "").strip() or None
        blank_alias = self.model_name is not None and not self.model_name.strip()
        if any(not n.strip() for n in self.served_model_name) or blank_alias:
            raise DraftEUError("--model-name / --served-model-name: model ids must not be empty")

    @property
    def names(self) -> list[str]:
        """Every id the API answers to, the main one first."""
        return list(dict.fromkeys([self.served_name, *self.served_model_name]))

    @property
    def loopback(self) -> bool:
        import ipaddress

        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def served_name(self) -> str:
        return self.model_name or f"drafteu/{self.drafts.resolve().name}"


def build(cfg: ServeConfig):
    """(worker, app) for ``cfg``; the worker loads its models in its own thread once started."""
    from drafteu import ensembles, rundir
    from drafteu.serve.api import build_app
    from drafteu.serve.worker import Worker

    drafts_dir, _ = rundir.resolve_drafts(cfg.drafts, cfg.proxy)  # a wrong --drafts is an error before anything starts
    if (cfg.review_above, cfg.abstain_above) != (None, None):
        method = ensembles.read_drafts_manifest(drafts_dir).get("method", "drafts")
        if rundir.hallucination_map(cfg.drafts, method) is None:
            raise DraftEUError("--review-above / --abstain-above decide on P(wrong), which needs a run directory "
                               f"whose hallucination stage fitted a map for {method!r}; {cfg.drafts} has none")
    from drafteu.generate import BACKENDS

    BACKENDS[cfg.backend].require()
    worker = Worker(cfg.drafts, target=cfg.target, proxy=cfg.proxy, backend=cfg.backend, engine=cfg.engine,
                    gamma=cfg.gamma,
                    dtype=cfg.dtype, device=cfg.device, max_batch=cfg.max_concurrency, batch_wait_ms=cfg.batch_wait_ms,
                    settings=EngineSettings(**{f: getattr(cfg, f) for f in EngineSettings.__dataclass_fields__}))
    app = build_app(worker, model_name=cfg.names, api_key=cfg.api_key, max_concurrency=cfg.max_concurrency,
                    thresholds=(cfg.review_above, cfg.abstain_above),
                    max_queue=cfg.max_queue, timeout=cfg.timeout, max_body_bytes=int(cfg.max_body_mb * 2**20))
    return worker, app


def run(cfg: ServeConfig, log=print) -> None:
    """Load the models, then serve until SIGTERM / Ctrl-C: new requests are refused (503, and the
    socket closes), those in flight finish, then the worker stops.  A failed load is a
    ``DraftEUError`` (one line, a non-zero exit) before anything listens; Ctrl-C while loading is a
    quiet exit."""
    import uvicorn

    try:  # Ctrl-C anywhere before serving (building, starting the worker thread, loading) is quiet
        worker, app = build(cfg)
        if not cfg.loopback and cfg.api_key is None:
            log(f"warning: serving on {cfg.host} without an API key: anyone who can reach this address can use the "
                "model (give --api-key or $DRAFTEU_API_KEY)")
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        log(f"loading the models for {cfg.served_name} ...")
        worker.start()
        while not worker.ready.wait(0.2):
            pass
    except KeyboardInterrupt:
        log("interrupted while loading; nothing was served")
        raise SystemExit(130) from None
    if worker.failure is not None:
        raise DraftEUError(f"drafteu serve: {worker.failure}")

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.drain()
            super().handle_exit(sig, frame)

    log(f"serving {', '.join(cfg.names)} on http://{cfg.host}:{cfg.port}/v1")
    server = Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                   timeout_graceful_shutdown=cfg.timeout))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        worker.stop()


__all__ = ["ServeConfig", "build", "run"]
