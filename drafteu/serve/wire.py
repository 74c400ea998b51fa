"""An answer's wire form: each token's own bytes and top alternatives, the protocol's logprobs and
per-token EU (``Tokens``), usage, and the server-sent events of a streamed request (``Chunks``)."""

from __future__ import annotations

import functools
import json

import drafteu.serve.protocol as P
from drafteu.serve.jobs import Answer

# -- tokens: bytes and top alternatives ------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _byte_decoder(tokenizer) -> dict[str, int] | None:
    """GPT-2's byte-to-character table inverted, when ``tokenizer`` is byte-level (else None)."""
    try:
        decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    except (AttributeError, ValueError):
        return None
    kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
    if "ByteLevel" not in kinds:
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes token ``token_id`` stands for - its own, also for a token that holds part of a
    multi-byte character (its decoded text would be U+FFFD's bytes)."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    table = _byte_decoder(tokenizer)
    if table is not None and piece is not None and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])  # SentencePiece's byte fallback
    return tokenizer.decode([int(token_id)], skip_special_tokens=False).encode("utf-8")


def top_token(tokenizer, token_id: int) -> tuple[str, list[int]]:
    """(text, bytes) of an alternative token; one that is not whole UTF-8 text is written as OpenAI
    writes it, ``bytes:\\xe2\\x80``."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8"), list(raw)
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)


# -- answers -> response parts -----------------------------------------------------------------------------


class Tokens:
    """An answer's (or a streamed round's) tokens as the protocol's parts."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def top(self, pairs: list[tuple[int, float]]) -> list[P.TopLogprob]:
        out = []
        for tid, lp in pairs:
            text, raw = top_token(self.tokenizer, tid)
            out.append(P.TopLogprob(token=text, bytes=raw, logprob=lp))
        return out

    def content(self, a: Answer) -> list[P.TokenLogprob]:
        """``logprobs.content``: each token's text, own bytes, logprob, top alternatives and EU."""
        out = []
        for j, (tid, text) in enumerate(zip(a.token_ids, a.pieces, strict=True)):
            eu = {} if a.eu is None else {"eu": a.eu[j], "eu_variance": a.variance[j], "eu_bias": a.bias[j]}
            out.append(P.TokenLogprob(token=text, bytes=list(token_bytes(self.tokenizer, tid)), logprob=a.logprobs[j],
                                      top_logprobs=self.top(a.top[j]) if a.top else [], **eu))
        return out

    @staticmethod
    def eu(a: Answer) -> list[P.TokenEU] | None:
        if a.eu is None:
            return None
        return [P.TokenEU(token=t, eu=e, eu_variance=v, eu_bias=b)
                for t, e, v, b in zip(a.pieces, a.eu, a.variance, a.bias, strict=True)]

    def legacy(self, a: Answer, offset: int = 0) -> P.LegacyLogprobs:
        """The completions API's logprobs; ``offset``: characters of the choice's text before the
        answer's (the prompt, with ``echo``; a stream's earlier chunks)."""
        offsets = []
        for text in a.pieces:
            offsets.append(offset)
            offset += len(text)
        return P.LegacyLogprobs(tokens=list(a.pieces), token_logprobs=list(a.logprobs),
                                top_logprobs=[{t.token: t.logprob for t in self.top(pairs)} for pairs in a.top or
                                              [[] for _ in a.pieces]],
                                text_offset=offsets)


def usage(prompt_ids: list[int], answers: list[Answer]) -> P.Usage:
    completion = sum(len(a.token_ids) for a in answers)
    return P.Usage(prompt_tokens=len(prompt_ids), completion_tokens=completion,
                   total_tokens=len(prompt_ids) + completion)


# -- a streamed request's events -----------------------------------------------------------------------


class Chunks:
    """The server-sent events of one streamed request: a chunk of an answer's tokens (its EU, and its
    logprobs when asked; completions count the characters sent per choice for ``text_offset``), the
    echoed prompt, the usage chunk."""

    def __init__(self, tokens, req, rid: str, created: int, chat: bool):
        self.tokens, self.req, self.rid, self.created, self.chat = tokens, req, rid, created, chat
        self.logprobs = req.logprobs if chat else req.logprobs is not None
        self.offsets: dict[int, int] = {}

    def __call__(self, choice: int, part: Answer | None, finish: str | None = None, summary: dict | None = None,
                 first: bool = False) -> str:
        tokens, req = self.tokens, self.req
        eu_tokens = tokens.eu(part) if part is not None else None
        if self.chat:
            delta = P.Delta(role="assistant" if first else None, content=part.text if part is not None else None)
            body = P.ChatChunk(id=self.rid, created=self.created, model=req.model, choices=[P.ChatChunkChoice(
                index=choice, delta=delta, finish_reason=finish, eu=summary, eu_tokens=eu_tokens,
                logprobs=P.Logprobs(content=tokens.content(part)) if self.logprobs and part is not None else None)])
        else:
            legacy = None
            if self.logprobs and part is not None:
                legacy = tokens.legacy(part, self.offsets.get(choice, 0))
                self.offsets[choice] = self.offsets.get(choice, 0) + len(part.text)
            body = P.CompletionChunk(id=self.rid, created=self.created, model=req.model, choices=[
                P.CompletionChunkChoice(index=choice, text=part.text if part is not None else "", finish_reason=finish,
                                        eu=summary, eu_tokens=eu_tokens, logprobs=legacy)])
        return event(body)

    def echo(self, choice: int, text: str) -> str:
        """A completion's echoed prompt (its characters count towards the choice's ``text_offset``)."""
        self.offsets[choice] = len(text)
        return event(P.CompletionChunk(id=self.rid, created=self.created, model=self.req.model,
                                        choices=[P.CompletionChunkChoice(index=choice, text=text)]))

    def usage(self, usage) -> str:
        model = P.ChatChunk if self.chat else P.CompletionChunk
        return event(model(id=self.rid, created=self.created, model=self.req.model, choices=[], usage=usage))


def event(body) -> str:
    return "data: " + body.model_dump_json() + "\n\n"


def slice_answer(a: Answer, start: int, end: int) -> Answer:
    """Tokens ``start:end`` of an answer (a stream's chunk)."""
    def cut(values):
        return None if values is None else values[start:end]

    return Answer(a.token_ids[start:end], a.pieces[start:end], a.finish_reason, cut(a.eu), cut(a.variance),
                  cut(a.bias), cut(a.logprobs), cut(a.top))
