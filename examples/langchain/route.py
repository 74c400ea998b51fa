"""Route an answer on drafteu's P(wrong) with LangChain: post it, send it to review, or abstain.

`drafteu serve` decides per answer when it is given thresholds (`--review-above 0.3 --abstain-above 0.6`,
or per request as here): the decision rides in the choice's `eu.decision` and, for a one-choice answer,
in the `x-drafteu-decision` / `x-drafteu-p-wrong` response headers, which LangChain's `ChatOpenAI` keeps
with `include_response_headers=True` (in `response_metadata["headers"]`).

    drafteu serve --drafts runs/qwen-gsm8k --review-above 0.3 --abstain-above 0.6
    python examples/langchain/route.py --question "Tom has 3 apples and buys 4 more. How many?"

Needs `pip install langchain-openai`.
"""

from __future__ import annotations

import argparse

from langchain_core.runnables import RunnableBranch, RunnableLambda
from langchain_openai import ChatOpenAI


def model(base_url: str, name: str, api_key: str = "unused", review_above: float = 0.3,
          abstain_above: float = 0.6) -> ChatOpenAI:
    """A chat model on a drafteu server whose answers come back with their routing decision."""
    return ChatOpenAI(base_url=base_url, model=name, api_key=api_key, temperature=0, max_tokens=256,
                      include_response_headers=True,
                      extra_body={"review_above": review_above, "abstain_above": abstain_above})


def decision(message) -> dict:
    """The server's decision on one answer: action ('answer', 'review', 'abstain') and P(wrong)."""
    headers = message.response_metadata.get("headers", {})
    p = headers.get("x-drafteu-p-wrong")
    return {"action": headers.get("x-drafteu-decision", "answer"), "p_wrong": None if p is None else float(p),
            "text": message.content}


def chain(llm: ChatOpenAI):
    """question -> the answer posted, flagged for review, or replaced by an abstention."""
    post = RunnableLambda(lambda d: {"route": "posted", "text": d["text"]})
    review = RunnableLambda(lambda d: {"route": "queued for review", "text": d["text"], "p_wrong": d["p_wrong"]})
    abstain = RunnableLambda(lambda d: {
        "route": "abstained", "text": f"I am not confident enough to answer (P(wrong) = {d['p_wrong']:.2f})."})
    branch = RunnableBranch((lambda d: d["action"] == "abstain", abstain), (lambda d: d["action"] == "review", review),
                            post)
    return llm | RunnableLambda(decision) | branch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--question", required=True)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None, help="the served model id (default: the server's first)")
    ap.add_argument("--api-key", default="unused")
    args = ap.parse_args()
    name = args.model
    if name is None:
        import openai

        name = openai.OpenAI(base_url=args.base_url, api_key=args.api_key).models.list().data[0].id
    print(chain(model(args.base_url, name, args.api_key)).invoke(args.question))


if __name__ == "__main__":
    main()
