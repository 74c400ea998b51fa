"""Tasks, prompts and answer checking (paper Sec. 4.2, App. B.5).

- Tasks: GSM8K from a jsonl path or the HF dataset id, any jsonl with ``question`` and a
  numeric ``answer``, and the embedded default ``easy-word`` (seeded easy word problems).
- Prompts: one function, ``format_prompt``, for generation, training and scoring alike.
- Answers: ``extract_answer`` and ``is_correct`` (a public contract).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from drafteu.errors import DraftEUError

INSTRUCTION = (
    "Solve the following problem step by step. "
    "Put the final answer in \\boxed{}, e.g. \"The answer is \\boxed{42}.\""
)

# Two worked examples in the style the embedded model learns to copy (it never writes \boxed{}
# zero-shot).  Their names (Mia, Leo) never occur in generated easy-word problems.
SHOTS: tuple[tuple[str, str], ...] = (
    (
        "Mia has 2 pencils. She buys 5 more. How many pencils does Mia have now?",
        "Mia starts with 2 pencils and buys 5 more, so she has 2 + 5 = 7 pencils. "
        "The answer is \\boxed{7}.",
    ),
    (
        "Leo has 4 boxes with 3 toys in each box. How many toys does Leo have in total?",
        "Each of the 4 boxes holds 3 toys, so Leo has 4 * 3 = 12 toys. The answer is \\boxed{12}.",
    ),
)


@dataclass(frozen=True)
class Problem:
    """One question with its gold answer (a number as text)."""

    qid: str
    question: str
    gold: str


# ---------------------------------------------------------------------------------------------
# Prompts


def chat_messages(question: str, shots: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """Chat messages: optional k-shot (question, worked answer) turns, then the question."""
    if not question or not question.strip():
        raise DraftEUError("the question is empty; pass the problem text")
    messages = []
    for q, a in shots:
        messages += [
            {"role": "user", "content": f"{INSTRUCTION}\n\n{q}"},
            {"role": "assistant", "content": a},
        ]
    messages.append({"role": "user", "content": f"{INSTRUCTION}\n\n{question.strip()}"})
    return messages


def format_prompt(tokenizer, question: str, shots: Sequence[tuple[str, str]] = ()) -> list[int]:
    """Prompt token ids with the model's chat template and the generation prompt appended."""
    messages = chat_messages(question, shots)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
            ids = ids["input_ids"]
        return list(ids)
    # Base models without a template: plain "Question/Answer" text.
    text = "".join(
        f"Question: {m['content']}\nAnswer:" if m["role"] == "user" else f" {m['content']}\n\n"
        for m in messages
    )
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


# Where the plain format's next turn begins: a base model that has answered goes on to ask itself the
# next "Question:" (its EOS rarely comes); an answer ends there.
PLAIN_TURN = "\nQuestion:"


def turn_stops(tokenizer) -> tuple[str, ...]:
    """The text that ends an answer in ``format_prompt``'s format: nothing for a chat template (its
    end-of-turn token is an EOS id), the plain format's next-turn delimiter otherwise."""
    return () if getattr(tokenizer, "chat_template", None) else (PLAIN_TURN,)


class TextStops:
    """Where an answer's text reaches one of ``stops`` (a turn delimiter, a request's ``stop``).

    ``cut(ids)``: how many tokens the answer keeps - the tokens that end before the first stop string
    begins (a token reaching into it is dropped with it) - or None when no stop string occurs;
    ``find(ids)``: the tokens that begin before it and the exact text before it (a server's cut);
    ``held(ids)``: how many trailing tokens could be the beginning of a stop string (a stream holds
    them back until the next tokens tell)."""

    def __init__(self, tokenizer, stops: Sequence[str] | None = ()):
        self.tokenizer, self.stops = tokenizer, tuple(s for s in (stops or ()) if s)

    def __bool__(self) -> bool:
        return bool(self.stops)

    def _text(self, ids: Sequence[int]) -> tuple[str, list[int]]:
        """The decoded text and the character offset where each token's text ends."""
        ends, text = [], ""
        for i in range(len(ids)):
            text = self.tokenizer.decode(list(ids[: i + 1]), skip_special_tokens=False)
            ends.append(len(text.rstrip("\ufffd")))  # an incomplete UTF-8 character ends later
        return text, ends

    def _first(self, ids: Sequence[int]) -> tuple[str, list[int], int] | None:
        """(text, token ends, where the first stop string begins), or None when none occurs."""
        if not self.stops or not ids:
            return None
        text, ends = self._text(ids)
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return (text, ends, min(found)) if found else None

    def cut(self, ids: Sequence[int]) -> int | None:
        first = self._first(ids)
        return None if first is None else sum(1 for e in first[1] if e <= first[2])

    def find(self, ids: Sequence[int]) -> tuple[int, str] | None:
        """(how many tokens begin before the first stop string, the text before it), or None: the
        exact cut a server makes (the token the stop string begins in keeps its text before it)."""
        first = self._first(ids)
        if first is None:
            return None
        text, ends, start = first
        return sum(1 for e in [0, *ends[:-1]] if e < start), text[:start]

    def end(self, ids: list[int], finish: str) -> tuple[list[int], str]:
        """``(ids, finish)`` of an answer cut at its first stop string (finish "eos" there: it ended)."""
        k = self.cut(ids)
        return (ids, finish) if k is None else (list(ids[:k]), "eos")

    def held(self, ids: Sequence[int]) -> int:
        if not self.stops or not ids:
            return 0
        text, ends = self._text(ids)
        tail = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return sum(1 for e in ends if e > len(text) - tail) if tail else 0


# ---------------------------------------------------------------------------------------------
# Answers

_NUM = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+"
_NUM_RE = re.compile(_NUM)
_PHRASE_RE = re.compile(
    r"(?:####|(?:final\s+)?answer\s*(?:is|:|=|would be|will be)?)\s*:?\s*\$?\s*(" + _NUM + ")",
    re.IGNORECASE,
)


def _boxed_contents(text: str) -> list[str | None]:
    """Contents of every \\boxed{...} / \\fbox{...}, with nested braces; None for one never closed."""
    out = []
    for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.end() : i - 1] if depth == 0 else None)
    return out


_MIXED_RE = re.compile(r"(-?\d+)\s*\\[dt]?frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}")
_SCI_RE = re.compile(r"(-?\d*\.?\d+)\s*(?:\\times|\\cdot|×)\s*10\s*\^\s*\{?\s*(-?\d+)\s*\}?")


def _fraction_text(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _mixed(m: re.Match) -> str:
    """``2\\frac{1}{2}`` -> ``5/2`` (a whole number followed by a fraction is their sum)."""
    whole, num, den = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if den == 0:
        return m.group(0)
    frac = Fraction(num, den)
    return _fraction_text(whole - frac if m.group(1).startswith("-") else whole + frac)


def _scientific(m: re.Match) -> str:
    """``3 \\times 10^4`` -> ``30000``."""
    return _fraction_text(Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)))


def _clean_latex(s: str) -> str:
    s = _MIXED_RE.sub(_mixed, s)
    s = _SCI_RE.sub(_scientific, s)
    s = re.sub(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"\1/\2", s)
    s = re.sub(r"\\text\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = s.replace("\\,", "").replace("\\!", "").replace("\\ ", " ").replace("{", "").replace("}", "")
    return s.strip()


def _normalize_number(s: str) -> str:
    s = s.replace(",", "").replace(" ", "")
    if "/" in s:
        return s
    if "." in s:
        s = s.rstrip("0").rstrip(".") if not s.startswith(".") and not s.startswith("-.") else s
    return s or "0"


def extract_answer(text: str | None) -> str | None:
    """The final answer of a response, as a normalized number string (or raw boxed text).

    Order: the last ``\\boxed{...}`` (nested braces allowed); else a final-answer phrase ("The
    answer is 7", GSM8K's "#### 7"); else the last number.  ``$``, thousands separators, trailing
    units and LaTeX fractions are stripped ("\\boxed{\\$1,200 dollars}" -> "1200", "\\frac{1}{2}" ->
    "1/2").  None when nothing answer-like is found, and when the final answer was cut off: a last
    box never closed ("... \\boxed{3" may have become 36), or a final-answer sentence whose "="
    has nothing after it ("The final answer is 24 + 6 = ").
    """
    if not text:
        return None
    boxes = _boxed_contents(text)
    if boxes:
        if boxes[-1] is None:
            return None
        content = _clean_latex(boxes[-1])
        nums = _NUM_RE.findall(content)
        if nums:
            return _normalize_number(nums[0] if len(nums) == 1 or "=" not in content else nums[-1])
        return content or None
    phrases = list(_PHRASE_RE.finditer(text))
    if phrases:
        m = phrases[-1]
        # "The answer is 12 - 5 = 7.": the result is after the sentence's last "="
        sentence = re.split(r"[.!?](?:\s|$)|\n", text[m.start(1):], maxsplit=1)[0]
        if "=" in sentence:
            after = _NUM_RE.findall(_clean_latex(sentence.rsplit("=", 1)[1]))
            return _normalize_number(after[0]) if after else None
        return _normalize_number(m.group(1))
    nums = _NUM_RE.findall(_clean_latex(text))
    return _normalize_number(nums[-1]) if nums else None


def _to_fraction(s: str) -> Fraction | None:
    s = _clean_latex(str(s)).replace(",", "").replace(" ", "")
    m = re.fullmatch(r"(-?\d*\.?\d+)(?:/(-?\d*\.?\d+))?", s)
    if not m:
        nums = _NUM_RE.findall(s)
        if len(nums) != 1:
            return None
        return _to_fraction(nums[0])
    try:
        num = Fraction(m.group(1))
        return num / Fraction(m.group(2)) if m.group(2) else num
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(pred: str | None, gold: str | None, tol: float = 1e-6) -> bool:
    """Numeric comparison with a relative tolerance (fractions and decimals); None is never correct."""
    if pred is None or gold is None:
        return False
    a, b = _to_fraction(pred), _to_fraction(gold)
    if a is None or b is None:
        return _clean_latex(str(pred)).lower() == _clean_latex(str(gold)).lower() != ""
    return abs(float(a - b)) <= tol * max(1.0, abs(float(b)))


# ---------------------------------------------------------------------------------------------
# Tasks

EASY_NAMES = ("Tom", "Sara", "Ben", "Ana", "Max", "Lily", "Sam", "Emma", "Noah", "Zoe", "Omar", "Ivy")
EASY_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards")
EASY_SPLITS = ("train", "test")


def _pronoun(name: str) -> str:
    return "She" if name in {"Sara", "Ana", "Lily", "Emma", "Zoe", "Ivy"} else "He"


def _easy_problem(rng: random.Random, steps: int, low: int, high: int) -> tuple[str, int]:
    name, items = rng.choice(EASY_NAMES), rng.choice(EASY_ITEMS)
    he = _pronoun(name)
    kind = rng.choice(("add", "sub", "mul"))
    if kind == "add":
        a, b = rng.randint(low, high), rng.randint(low, high)
        text, value = f"{name} has {a} {items}. {he} buys {b} more.", a + b
    elif kind == "sub":
        b = rng.randint(low, high - 1)
        a = rng.randint(b + 1, high)
        text, value = f"{name} has {a} {items}. {he} gives {b} to a friend.", a - b
    else:
        a, b = rng.randint(low, high), rng.randint(low, high)
        text, value = f"{name} has {a} bags with {b} {items} in each bag.", a * b
    if steps == 2:
        if rng.random() < 0.5 or value <= 1:
            c = rng.randint(low, high)
            text, value = f"{text} Then {he.lower()} finds {c} more.", value + c
        else:
            c = rng.randint(1, min(high, value - 1))
            text, value = f"{text} Then {he.lower()} loses {c}.", value - c
    question = f"{text} How many {items} does {name} have now?"
    return question, value


def easy_word(split: str = "train", n: int = 200, seed: int = 0, steps: int = 1, low: int = 2,
              high: int = 9) -> list[Problem]:
    """Seeded easy GSM8K-style word problems (the embedded default task).

    One-step problems with numbers ``low``..``high`` (buys more -> add, gives to a friend ->
    subtract, bags of items -> multiply); ``steps=2`` adds a second add/subtract step.  A question
    belongs to "test" when a hash of its text falls in the lowest 20%, so the splits are disjoint
    whatever the seed; the same arguments always give the same problems.
    """
    if split not in EASY_SPLITS:
        raise DraftEUError(f"easy-word split must be one of {EASY_SPLITS}, got {split!r}")
    if steps not in (1, 2):
        raise DraftEUError(f"easy-word steps must be 1 or 2, got {steps}")
    if not 1 <= low < high:
        raise DraftEUError(f"easy-word needs 1 <= low < high, got low={low}, high={high}")
    rng = random.Random(f"easy-word:{seed}:{steps}:{low}:{high}")
    seen, out, misses = set(), [], 0
    while len(out) < n and misses < 20_000:  # 20k draws in a row without a new problem: exhausted
        q, v = _easy_problem(rng, steps, low, high)
        h = int(hashlib.sha256(q.encode()).hexdigest()[:8], 16) % 10
        if q in seen or (h < 2) != (split == "test"):
            misses += 1
            continue
        misses = 0
        seen.add(q)
        out.append(Problem(qid=f"easy-{split}-{hashlib.sha1(q.encode()).hexdigest()[:10]}", question=q, gold=str(v)))
    if len(out) < n:
        raise DraftEUError(
            f"easy-word has only {len(out)} distinct {split} problems for steps={steps}, "
            f"numbers {low}..{high}; ask for fewer or widen the number range"
        )
    return out


def _gold_from_answer(answer) -> str | None:
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        return _normalize_number(str(answer))
    if not isinstance(answer, str):
        return None
    if "####" in answer:
        tail = answer.rsplit("####", 1)[1]
        nums = _NUM_RE.findall(tail)
        return _normalize_number(nums[0]) if nums else None
    return extract_answer(answer)


def load_jsonl(path: str | Path) -> list[Problem]:
    """Problems from a jsonl file with fields ``question`` and ``answer`` (GSM8K or numeric)."""
    path = Path(path)
    if not path.is_file():
        raise DraftEUError(f"dataset file not found: {path}")
    problems = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DraftEUError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); pass a jsonl file "
                           "with question and answer fields") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DraftEUError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DraftEUError(f"{path}:{lineno}: expected a JSON object with question and answer")
        missing = [k for k in ("question", "answer") if k not in row]
        if missing:
            raise DraftEUError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        gold = _gold_from_answer(row["answer"])
        if gold is None:
            raise DraftEUError(f"{path}:{lineno}: answer has no number: {str(row['answer'])[:60]!r}")
        qid = str(row.get("id", f"{path.stem}-{lineno}"))
        problems.append(Problem(qid=qid, question=str(row["question"]), gold=gold))
    if not problems:
        raise DraftEUError(f"{path} holds no problems")
    return problems


def load_hf(name: str, split: str, config: str = "main") -> list[Problem]:
    """Problems from a HF dataset id such as ``openai/gsm8k`` (config ``main``)."""
    try:
        import datasets
    except ImportError as e:
        raise DraftEUError("loading a HF dataset id needs the datasets package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # the hub client raises many types; all mean "could not load"
        raise DraftEUError(f"could not load dataset {name!r} ({config}, {split}): {str(e).splitlines()[0]}") from e
    return [
        Problem(qid=f"{name.split('/')[-1]}-{split}-{i}", question=r["question"], gold=_gold_from_answer(r["answer"]))
        for i, r in enumerate(ds)
    ]


def load_task(task: str, split: str = "train", n: int | None = None, seed: int = 0, steps: int = 1,
              low: int = 2, high: int = 9) -> list[Problem]:
    """``easy-word``, a jsonl path, or a HF dataset id (``openai/gsm8k``); the first ``n`` problems."""
    if n is not None and n < 1:
        raise DraftEUError(f"number of questions must be >= 1, got {n}")
    if task == "easy-word":
        return easy_word(split, n=n or 200, seed=seed, steps=steps, low=low, high=high)
    if task.endswith(".jsonl") or Path(task).exists():
        problems = load_jsonl(task)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", task):
        problems = load_hf(task, split)
    else:
        raise DraftEUError(f"unknown task {task!r}: use easy-word, a .jsonl path, or a HF dataset id")
    return problems[:n] if n else problems


def shots_for(task: str, k: int) -> tuple[tuple[str, str], ...]:
    """The first ``k`` worked examples (0 <= k <= 2)."""
    if not 0 <= k <= len(SHOTS):
        raise DraftEUError(f"shots must be in 0..{len(SHOTS)}, got {k}")
    return SHOTS[:k]


class StreamPieces:
    """Token texts for streaming: decodes the growing answer so multi-byte characters stay whole."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.text = tokenizer, [], ""

    def __call__(self, ids: list[int]) -> list[str]:
        out = []
        for t in ids:
            self.ids.append(t)
            text = self.tok.decode(self.ids, skip_special_tokens=False)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
                out.append("")
                continue
            out.append(text[len(self.text):])
            self.text = text
        return out


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Text of each token such that the pieces concatenate to the decoded response.

    Decoding prefixes (not single ids) keeps multi-byte characters split across tokens intact.
    """
    pieces = StreamPieces(tokenizer)(ids)
    full = tokenizer.decode(ids, skip_special_tokens=False)
    if pieces and "".join(pieces) != full:  # the answer ends inside a multi-byte character
        pieces[-1] += full[len("".join(pieces)):]
    return pieces
