"""The wire shapes of `drafteu serve`: pydantic models of every request and every response.

Responses are OpenAI's shapes (the tests validate each one, streamed chunks included, with the
``openai`` package's own types); drafteu's EU rides in *extra* fields, which OpenAI's types accept:

- ``choices[i].eu``: the answer's summary (``mean``, ``max``, ``sum``, ``tokens``, ``spans``; ``p_wrong``
  and ``p_wrong_map`` when the run fitted a hallucination map; ``decision`` when thresholds are set); in a
  stream, on the chunk that ends the choice;
- ``choices[i].eu_tokens``: ``{token, eu, eu_variance, eu_bias}`` per answer token (in a stream, per
  chunk: the tokens of that chunk), whether or not logprobs were asked for;
- with ``logprobs`` asked for, each ``logprobs.content[j]`` also carries ``eu``, ``eu_variance``,
  ``eu_bias`` next to OpenAI's ``token`` / ``logprob`` / ``bytes`` / ``top_logprobs`` (so clients that
  keep logprobs - LangChain's ``ChatOpenAI(logprobs=True)`` - keep the EU).

``logprobs`` itself appears only when asked for, as OpenAI sends it: a token entry without its
``logprob`` breaks OpenAI's schema.  Requests refuse, with a 400 naming the field, what the server
does not do (image parts, tools, response formats other than text, logit bias, penalties) instead
of silently ignoring it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_LOGPROBS = 20  # top_logprobs, as OpenAI's API


class Wire(BaseModel):
    """A response model: fields in ``omit_if_none`` are left out when None (OpenAI leaves them out);
    every other field is sent, null included."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        data = handler(self)
        kept = {k: v for k, v in data.items() if not (v is None and k in self.omit_if_none)}
        return {k: v for k, v in kept.items() if k not in LAST} | {k: kept[k] for k in LAST if k in kept}


LAST = ("eu", "eu_tokens")  # drafteu's fields go after OpenAI's


# -- requests -----------------------------------------------------------------------------------------


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v):
        if isinstance(v, list):
            other = sorted({str(p.get("type")) for p in v if p.get("type") != "text"})
            if other:
                raise ValueError(f"only text content parts are supported (this model reads no {', '.join(other)})")
        return v

    @model_validator(mode="after")
    def _content_given(self):
        # OpenAI: only an assistant message that calls tools may leave its content null (or out)
        if self.content is None and not (self.role == "assistant" and getattr(self, "tool_calls", None)):
            raise ValueError(f"a {self.role} message needs content (a string or text parts); null content is only "
                             "valid for an assistant message with tool_calls")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class _Sampling(BaseModel):
    """What every generating request shares (OpenAI's names and ranges); fields the server does not
    implement are refused unless they ask for nothing (an empty ``logit_bias``, zero penalties)."""

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
    # drafteu's routing fields: P(wrong) thresholds of the answer's decision (answer / review / abstain; the
    # server's --review-above / --abstain-above when left out), and whether an 'abstain' answer's text is withheld
    review_above: float | None = Field(default=None, ge=0, le=1)
    abstain_above: float | None = Field(default=None, ge=0, le=1)
    withhold: bool = False
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @model_validator(mode="after")
    def _routing(self):
        if None not in (self.review_above, self.abstain_above) and self.review_above > self.abstain_above:
            raise ValueError("review_above must not exceed abstain_above")
        if self.withhold and self.stream:
            raise ValueError("withhold needs a request that is not streamed: a streamed answer's text is sent before "
                             "its P(wrong) is known")
        return self

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        return v

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:
            raise ValueError("penalties are not supported by this server; leave them out or send 0")
        return v

    @property
    def max_new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v):
        if v:
            raise ValueError("tools are not supported by this server (the model does not call functions); leave "
                             "them out")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, v):
        if v is not None and v != "none":
            raise ValueError("tool_choice other than 'none' is not supported by this server")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported by this server; only 'text'")
        return v


class CompletionRequest(_Sampling):
    """``prompt``: a string or a list of token ids (OpenAI's forms; a list holding one of them is that
    prompt).  Several prompts in one request are refused: one request per prompt."""

    prompt: str | list[int]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):  # OpenAI's batch of prompts
            if len(v) != 1:
                raise ValueError(f"one prompt per request ({len(v)} given); send a request for each prompt")
            v = v[0]
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt is empty")
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in v):
                raise ValueError("a prompt given as a list takes token ids (integers), or one string in a list")
        elif not isinstance(v, str):
            raise ValueError("prompt takes a string or a list of token ids")
        return v


class ScoreRequest(BaseModel):
    """The prompt (``messages``, a raw ``prompt``, or ``question`` in `drafteu score`'s format) and
    the response whose tokens are scored."""

    model_config = ConfigDict(extra="allow")
    model: str
    response: str = Field(min_length=1)
    messages: list[Message] | None = None
    prompt: str | None = Field(default=None, min_length=1)
    question: str | None = Field(default=None, min_length=1)
    shots: int = Field(default=2, ge=0, le=2)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)


# -- responses ------------------------------------------------------------------------------------------


class TopLogprob(Wire):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprob(TopLogprob):
    """A ``logprobs.content`` entry: OpenAI's fields, and the token's EU when it was computed."""

    omit_if_none = frozenset({"eu", "eu_variance", "eu_bias"})
    top_logprobs: list[TopLogprob]
    eu: float | None = None
    eu_variance: float | None = None
    eu_bias: float | None = None


class TokenEU(BaseModel):
    token: str
    eu: float
    eu_variance: float
    eu_bias: float


class Logprobs(Wire):
    content: list[TokenLogprob] | None
    refusal: None = None


class LegacyLogprobs(BaseModel):
    """The completions API's logprobs: ``text_offset`` counts characters of the choice's ``text``."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class _EUChoice(Wire):
    omit_if_none = frozenset({"eu", "eu_tokens"})
    index: int
    eu: dict | None = None
    eu_tokens: list[TokenEU] | None = None


class ChatChoice(_EUChoice):
    message: AssistantMessage
    logprobs: Logprobs | None
    finish_reason: Literal["stop", "length"]


class _Answer(Wire):
    """What every completion response and chunk starts with."""

    id: str
    created: int
    model: str


class _Chunk(_Answer):
    """A streamed chunk: the usage only on the last one, when asked for."""

    omit_if_none = frozenset({"usage"})
    usage: Usage | None = None


class ChatCompletion(_Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_EUChoice):
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: Literal["stop", "length"]


class Completion(_Answer):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage


class Delta(Wire):
    omit_if_none = frozenset({"role", "content"})
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_EUChoice):
    delta: Delta
    logprobs: Logprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(_Chunk):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]


class CompletionChunkChoice(_EUChoice):
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionChunk(_Chunk):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChunkChoice]


class ScoredToken(Wire):
    omit_if_none = frozenset({"top_logprobs"})
    id: int
    token: str
    bytes: list[int]
    logprob: float
    top_logprobs: list[TopLogprob] | None = None
    eu: float
    eu_variance: float
    eu_bias: float


class ScoreUsage(BaseModel):
    prompt_tokens: int
    response_tokens: int


class ScoreResponse(BaseModel):
    id: str
    object: Literal["score"] = "score"
    model: str
    tokens: list[ScoredToken]
    eu: dict
    usage: ScoreUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "drafteu"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorInfo
