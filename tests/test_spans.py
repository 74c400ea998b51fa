"""The riskiest spans of an answer (drafteu.spans): the splitting rule on numbers, lists, code and
abbreviations, tokens assigned to spans, and the ranking by EU."""

from __future__ import annotations

import pytest

from drafteu import spans


def _texts(text: str) -> list[str]:
    ends = spans.boundaries(text)
    return [text[a:b].strip() for a, b in zip([0, *ends[:-1]], ends, strict=True) if text[a:b].strip()]


def test_sentences_end_at_punctuation_and_whitespace_but_not_in_numbers_or_abbreviations():
    text = "She pays $3.50 per box, e.g. for 12 boxes. That is 12 * 3.5 = 42! Is it? Dr. Lee says yes."
    assert _texts(text) == ["She pays $3.50 per box, e.g. for 12 boxes.", "That is 12 * 3.5 = 42!", "Is it?",
                            "Dr. Lee says yes."]


def test_lines_lists_and_code_stand_alone():
    text = ("Steps:\n1. Add 2 and 3.\n2. Multiply by 4. Then stop.\na) skip\n"
            "```python\nx = np.array([1.5, 2])\nprint(x.sum())\n```\nThe answer is \\boxed{20}.")
    assert _texts(text) == ["Steps:", "1. Add 2 and 3.", "2. Multiply by 4.", "Then stop.", "a) skip", "```python",
                            "x = np.array([1.5, 2])", "print(x.sum())", "```", "The answer is \\boxed{20}."]


def test_tokens_go_to_the_span_their_first_character_is_in_and_spans_rank_by_eu():
    pieces = ["Tom", " has", " 3", ".", "5", " kg", ".", " He", " eats", " 1", ".", "\n", "So", " 2", ".", "5"]
    eu = [0.1, 0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.3, 0.0, 0.0, 0.2, 0.4, 0.0, 0.5]
    assert spans.split(pieces) == [(0, 7), (7, 11), (12, 16)]  # the lone line break is a blank span: left out
    ranked = spans.ranked(pieces, eu)
    assert [s["text"] for s in ranked] == ["He eats 1.", "So 2.5", "Tom has 3.5 kg."]
    assert ranked[0] == {"text": "He eats 1.", "start": 7, "end": 11, "max_eu": 0.9, "mean_eu": pytest.approx(1.3 / 4)}
    assert spans.ranked([], []) == [] and spans.split(["  ", "\n"]) == []
    with pytest.raises(ValueError, match="2 token texts but 1 EU"):
        spans.ranked(["a", "b"], [0.1])
