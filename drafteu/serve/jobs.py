"""The plain values between `drafteu serve`'s layers: a request's model work (``Job``) and what comes
back for each choice (``Answer``).  The engine and the continuous decoder fill them; ``serving`` turns
them into OpenAI's shapes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Job:
    """One request's model work.  ``kind``: "generate" (``prompt_ids`` -> ``n`` answers), "score"
    (``prompt_ids`` + ``response_ids`` -> their EU) or "finish" (choices decoded elsewhere - the continuous
    engine's - ``decoded``, to be cut, scored where decoding did not and summarized)."""

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
    on_tokens: Callable[[int, Answer], None] | None = None  # live streaming: (choice, the tokens just known)
    decoded: list | None = None  # "finish": one ``decoding.Decoded`` per choice
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    started: float = 0.0


@dataclass
class Answer:
    """One choice (or, streamed, one round of its tokens) as plain values - the serving layer turns it
    into OpenAI's shapes: the token ids and the text of each (``pieces`` concatenate to ``text``, the
    answer cut exactly at a stop string), why it ended ("stop" | "length"), the EU terms and the raw
    target's log-probabilities per token when computed (``top``: (id, logprob) pairs), and the summary."""

    token_ids: list[int]
    pieces: list[str]
    finish_reason: str = "length"
    eu: list[float] | None = None
    variance: list[float] | None = None
    bias: list[float] | None = None
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None
    summary: dict | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)
