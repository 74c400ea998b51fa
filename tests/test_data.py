"""Tasks, prompts and answer checking."""

from __future__ import annotations

import json

import pytest

from drafteu.data import (
    SHOTS,
    easy_word,
    extract_answer,
    format_prompt,
    is_correct,
    load_jsonl,
    load_task,
    shots_for,
)
from drafteu.errors import DraftEUError

from .conftest import shared_data


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Janet sells 9 eggs.\nShe makes 9 * 2 = $18 every day.\n#### 18", "18"),
        ("So the total is 7. The answer is \\boxed{7}.", "7"),
        ("\\boxed{\\frac{1}{2}}", "1/2"),
        ("\\boxed{\\dfrac{3}{4}}", "3/4"),
        ("the result is \\boxed{{12}}", "12"),
        ("\\boxed{\\text{18 dollars}}", "18"),
        ("\\boxed{18 dollars}", "18"),
        ("\\boxed{\\$1,200}", "1200"),
        ("It costs $1,234,567.50 in total. The answer is $1,234,567.50", "1234567.5"),
        ("first \\boxed{3} then corrected \\boxed{5}", "5"),
        ("The temperature drops to \\boxed{-4} degrees", "-4"),
        ("The answer is -12.", "-12"),
        ("Final answer: 0.75", "0.75"),
        ("answer: 3.0", "3"),
        ("I think 4 + 5 = 9 apples", "9"),
        ("x = 2, so \\boxed{x = 2 + 3 = 5}", "5"),
        ("\\boxed{40\\%}", "40"),
        ("There is no number here.", None),
        ("", None),
        (None, None),
        ("\\boxed{}", None),
        ("The answer is 7 apples, and 3 were left over.", "7"),
        ("#### 1,000", "1000"),
        # found by cross-checking against math-verify on model answers (docs/method.md §14)
        ("\\boxed{2\\frac{1}{2}}", "5/2"),  # a mixed number is a sum, not the digits "21/2"
        ("\\boxed{-2\\frac{1}{2}}", "-5/2"),
        ("The answer is 12 - 5 = 7.", "7"),  # an equation after the phrase: the result
        ("The answer is 3.5. Then 2 = 2.", "3.5"),  # an "=" in a later sentence does not count
        ("\\boxed{3 \\times 10^4}", "30000"),
        ("\\boxed{3 \\times 10^{-3}}", "3/1000"),
        ("\\boxed{1\\,000}", "1000"),  # a thin space inside a number (math-verify reads 1*0)
        # answers cut off at the token limit (embedded study): no final answer, not a prefix of one
        ("... 6 x 6 = 36. The answer is \\boxed{3", None),  # may have become 36; math-verify reads 36
        ("\\boxed{5} then \\boxed{4", None),  # the final box was being rewritten
        ("we add: 4 x 6 = 24. The final answer is 24 + 6 = ", None),  # the result never came
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "pred, gold, ok",
    [
        ("18", "18", True),
        ("18.0", "18", True),
        ("18.00", "18", True),
        ("1/2", "0.5", True),
        ("0.5", "1/2", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("1,000", "1000", True),
        ("$18", "18", True),
        ("17.999999999", "18", True),
        ("17.9", "18", False),
        (None, "18", False),
        ("18", None, False),
        ("x", "x", True),
        ("", "", False),
        ("1/0", "1", False),
    ],
)
def test_is_correct(pred, gold, ok):
    assert is_correct(pred, gold) is ok


def test_easy_word_deterministic_disjoint_and_correct():
    train = easy_word("train", n=300, seed=0)
    test = easy_word("test", n=100, seed=0)
    assert train == easy_word("train", n=300, seed=0)
    assert {p.question for p in train}.isdisjoint(p.question for p in test)
    assert len({p.question for p in train}) == 300
    # a different seed gives a different stream with the same split rule
    other = easy_word("test", n=100, seed=1)
    assert other != test and {p.question for p in other}.isdisjoint(p.question for p in train)
    for p in train + test:
        nums = [int(x) for x in __import__("re").findall(r"\d+", p.question)]
        assert all(2 <= x <= 9 for x in nums), p
        a, b = nums
        assert int(p.gold) in {a + b, a - b, a * b}
        if "gives" in p.question:
            assert int(p.gold) == a - b > 0
    shot_qs = {q for q, _ in SHOTS}
    assert shot_qs.isdisjoint(p.question for p in train + test)


def test_easy_word_knobs():
    two = easy_word("train", n=50, steps=2, low=2, high=20)
    assert all(("finds" in p.question) or ("loses" in p.question) for p in two)
    assert all(int(p.gold) > 0 for p in two)
    with pytest.raises(DraftEUError, match="only"):
        easy_word("train", n=100_000, low=2, high=3)
    with pytest.raises(DraftEUError, match="split"):
        easy_word("dev")


def test_gsm8k_jsonl_gold_and_limits():
    probs = load_task(str(shared_data("gsm8k", "test.jsonl")), n=5)
    assert len(probs) == 5 and probs[0].gold == "18" and "Janet" in probs[0].question
    assert all(p.qid.startswith("test-") for p in probs)


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "1"}\n{not json\n')
    with pytest.raises(DraftEUError, match="bad.jsonl:2: malformed JSON"):
        load_jsonl(bad)
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"question": "a"}\n')
    with pytest.raises(DraftEUError, match="missing.jsonl:1: missing field\\(s\\) answer"):
        load_jsonl(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DraftEUError, match="no problems"):
        load_jsonl(empty)
    nonum = tmp_path / "nonum.jsonl"
    nonum.write_text(json.dumps({"question": "q", "answer": "no idea"}) + "\n")
    with pytest.raises(DraftEUError, match="has no number"):
        load_jsonl(nonum)
    numeric = tmp_path / "numeric.jsonl"
    numeric.write_text(json.dumps({"question": "q", "answer": 42}) + "\n")
    assert load_jsonl(numeric)[0].gold == "42"
    with pytest.raises(DraftEUError, match="not found"):
        load_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DraftEUError, match=">= 1"):
        load_task("easy-word", n=0)
    with pytest.raises(DraftEUError, match="unknown task"):
        load_task("not a task")


def test_format_prompt_with_shots(tokenizer):
    zero = format_prompt(tokenizer, "How many?")
    two = format_prompt(tokenizer, "How many?", shots_for("easy-word", 2))
    assert len(two) > len(zero)
    text = tokenizer.decode(two)
    assert text.count("<|im_start|>user") == 3 and text.endswith("<|im_start|>assistant\n")
    assert "\\boxed{12}" in text
    with pytest.raises(DraftEUError, match="shots"):
        shots_for("easy-word", 5)
    with pytest.raises(DraftEUError, match="empty"):
        format_prompt(tokenizer, " ")


def test_hf_dataset_id_maps_rows(monkeypatch):
    import sys
    import types

    calls = {}

    def load_dataset(name, config, split):
        calls["args"] = (name, config, split)
        return [{"question": "Q1?", "answer": "work\n#### 1,234"}, {"question": "Q2?", "answer": "#### -5"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    probs = load_task("openai/gsm8k", split="test")
    assert calls["args"] == ("openai/gsm8k", "main", "test")
    assert [(p.qid, p.gold) for p in probs] == [("gsm8k-test-0", "1234"), ("gsm8k-test-1", "-5")]


def test_hf_dataset_errors_are_clear(monkeypatch):
    import sys
    import types

    def load_dataset(*a, **k):
        raise ConnectionError("could not reach the hub\nlong trace")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DraftEUError, match="could not load dataset 'openai/gsm8k'.*could not reach the hub$"):
        load_task("openai/gsm8k", split="test")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DraftEUError, match="pip install datasets"):
        load_task("openai/gsm8k", split="test")


def test_labels_cross_check_with_math_verify():
    """Both checkers over answers: agreement counted, each disagreement listed with both verdicts."""
    pytest.importorskip("math_verify")
    from drafteu.evaluate.labels import cross_check

    texts = {"a": ("So the answer is \\boxed{7}.", "7"), "b": ("\\boxed{2\\frac{1}{2}} cups", "2.5"),
             "c": ("That makes \\boxed{1\\,000} apples", "1000"), "d": ("\\boxed{9}", "8")}
    rows = []
    for qid, (text, gold) in texts.items():
        extracted = extract_answer(text)
        rows.append({"qid": qid, "response": text, "gold": gold, "extracted": extracted,
                     "correct": is_correct(extracted, gold)})
    out = cross_check(rows)
    assert out["answers"] == 4
    assert [d["qid"] for d in out["disagreements"]] == ["c"]  # math-verify reads 1\,000 as 1 * 0
    assert out["agree"] == 3 and out["drafteu_only_correct"] == 1 and out["math_verify_only_correct"] == 0
    assert out["disagreements"][0]["extracted"] == "1000" and out["disagreements"][0]["math_verify"] is False


def test_relabel_applies_todays_checker_to_stored_rows():
    """Labels frozen at generation time are recomputed from the text, and the changes counted."""
    from drafteu.evaluate.labels import relabel

    rows = [{"response": "The final answer is 24 + 6 = ", "gold": "24", "extracted": "24", "correct": True},
            {"response": "So \\boxed{24}.", "gold": "24", "extracted": "24", "correct": True},
            {"response": "So \\boxed{2\\frac{1}{2}}", "gold": "2.5", "extracted": "21/2", "correct": False}]
    out, changed = relabel(rows)
    assert [r["correct"] for r in out] == [False, True, True] and changed == 2
    assert [r["extracted"] for r in out] == [None, "24", "5/2"]
    assert rows[0]["correct"] is True  # the input rows are not modified
