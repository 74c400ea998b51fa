"""Prompt formatting shared by generation, training and scoring (one function for all three)."""

from __future__ import annotations

from collections.abc import Sequence

from drafteu.errors import DraftEUError

INSTRUCTION = (
    "Solve the following problem step by step. "
    "Put the final answer in \\boxed{}, e.g. \"The answer is \\boxed{42}.\""
)


def chat_messages(question: str, shots: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """Chat messages: optional k-shot (question, worked answer) turns, then the question."""
    if not question or not question.strip():
        raise DraftEUError("the question is empty; pass the problem text to score")
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
    text = "".join(f"Question: {m['content']}\nAnswer:" if m["role"] == "user" else f" {m['content']}\n\n" for m in messages)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])
