"""The riskiest spans of an answer: its sentences and lines, ranked by their tokens' EU.

An application that shows or re-checks an answer rarely wants 200 per-token numbers; it wants the
sentence (or line of code, or list item) where the model was guessing.  The rule that splits an answer
(``boundaries``), on the answer's text:

- a line break always ends a span (a line of code, a list item, a displayed equation each stand alone);
- ``.``, ``!`` or ``?`` followed by whitespace ends a sentence, except a list marker (``1.``, ``a.``,
  ``iv.`` alone at the start of a line) and the abbreviations in ``ABBREVIATIONS`` (``e.g.``, ``Dr.``);
  a decimal point (``3.5``) or a dot inside a name (``np.array``) has no whitespace after it, so never
  splits.

A token belongs to the span its first character falls in; each span keeps its token range, its text and
the max and mean EU of its tokens.  ``ranked`` orders them by max EU, then mean EU.  Whitespace-only
spans (the blank between two sentences) are left out.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

ABBREVIATIONS = frozenset({"e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "approx", "fig", "eq"})
_LIST_MARKER = re.compile(r"^\s*(?:\d+|[a-zA-Z]|[ivxlcdm]+)[.)]$")
_END = re.compile(r"[.!?](?=\s)")


def boundaries(text: str) -> list[int]:
    """Character offsets where a span ends (exclusive), by the module's rule; the last is ``len(text)``."""
    ends = set()
    for i, ch in enumerate(text):
        if ch == "\n":
            ends.add(i + 1)
    for m in _END.finditer(text):
        line = text[text.rfind("\n", 0, m.start()) + 1: m.end()]
        word = re.findall(r"[\w.]+$", text[: m.start()])
        if _LIST_MARKER.match(line) or (word and word[0].lower().rstrip(".") in ABBREVIATIONS):
            continue
        ends.add(m.end())
    return sorted(ends | {len(text)})


def split(pieces: Sequence[str]) -> list[tuple[int, int]]:
    """Token ranges [start, end) of the spans of an answer whose tokens' texts are ``pieces``."""
    text = "".join(pieces)
    if not pieces:
        return []
    ends = boundaries(text)
    out, start, pos, span = [], 0, 0, 0
    for i, piece in enumerate(pieces):
        while span < len(ends) - 1 and pos >= ends[span]:  # this token starts after the current span's end
            if i > start:
                out.append((start, i))
            start, span = i, span + 1
        pos += len(piece)
    out.append((start, len(pieces)))
    return [(a, b) for a, b in out if "".join(pieces[a:b]).strip()]


def ranked(pieces: Sequence[str], eu: Sequence[float]) -> list[dict]:
    """Every span of the answer with its token range, text and the max / mean EU of its tokens, the
    riskiest first (max EU, then mean)."""
    if len(pieces) != len(eu):
        raise ValueError(f"{len(pieces)} token texts but {len(eu)} EU values")
    spans = []
    for a, b in split(pieces):
        values = [float(x) for x in eu[a:b]]
        spans.append({"text": "".join(pieces[a:b]).strip(), "start": a, "end": b,
                      "max_eu": max(values), "mean_eu": sum(values) / len(values)})
    return sorted(spans, key=lambda s: (-s["max_eu"], -s["mean_eu"], s["start"]))
