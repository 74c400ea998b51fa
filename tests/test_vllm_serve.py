"""`drafteu serve --backend vllm` for real: generation on vLLM's async engine (the CPU build here;
`make test-vllm`): answers with the EU `drafteu score` computes, in OpenAI's schema; streams whose EU
arrives in segments while the answer still decodes; a short request answered while a long one decodes
(continuous batching, not a static batch); an abandoned request aborted inside the engine."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("vllm")
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

from tests import serve_support  # noqa: E402
from tests.serve_support import KEY, QUESTION, Server, abandon_and_follow, untrained_ensemble  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
H = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": QUESTION}]
COUNTING = "1, 2, 3, 4, 5, 6, 7,"  # the model counts on: an answer as long as max_tokens


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    return untrained_ensemble(tmp_path_factory.mktemp("serve-vllm"))


@pytest.fixture(scope="module")
def server(ensemble):
    s = Server(ensemble, backend="vllm", max_concurrency=4, max_queue=8)
    assert s.worker.continuous is not None and s.worker.decoding is None  # vLLM's async engine decodes
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(ensemble):
    return serve_support.reference(ensemble)


def _post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=H, timeout=kw.pop("timeout", 300), **kw)


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_answers_decode_on_vllm_and_carry_the_eu_drafteu_score_computes(server, reference):
    lm, ens = reference
    body = {"model": "drafteu-test", "messages": MSG, "max_tokens": 40, "temperature": 0, "logprobs": True,
            "top_logprobs": 2}
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    c = ChatCompletion.model_validate(r.json())
    tokens = c.choices[0].logprobs.content
    prompt_ids = list(lm.tokenizer.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True)["input_ids"])
    ids = lm.tokenizer(c.choices[0].message.content, add_special_tokens=False)["input_ids"]
    from drafteu.generate import greedy_answer

    with ens.base_target():  # vLLM's greedy answer is the target's
        assert greedy_answer(lm.model, lm.tokenizer, prompt_ids, 40) == ids
    want = ens.score(prompt_ids, ids)
    assert [t.eu for t in tokens] == pytest.approx(want.eu.tolist(), rel=1e-4, abs=1e-6)
    assert [t.eu_bias for t in tokens] == pytest.approx(want.bias.tolist(), rel=1e-4, abs=1e-6)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    # streamed: the same text, EU and logprobs, every chunk in OpenAI's schema
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=H, timeout=300,
                      json=body | {"stream": True}) as s:
        chunks = _events(s)
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch)
    parts = [ch["choices"][0] for ch in chunks if ch["choices"] and ch["choices"][0]["delta"].get("content") is not None
             and ch["choices"][0].get("eu_tokens")]
    assert "".join(p["delta"]["content"] for p in parts) == c.choices[0].message.content
    streamed = [t for p in parts for t in p["eu_tokens"]]
    assert [t["eu"] for t in streamed] == pytest.approx([t.eu for t in tokens], rel=1e-4, abs=1e-6)
    assert [t["logprob"] for p in parts for t in p["logprobs"]["content"]] == pytest.approx(
        [t.logprob for t in tokens], rel=1e-4, abs=1e-5)


def test_the_eu_streams_while_the_answer_still_decodes(server):
    before = len(server.worker.finished)
    body = {"model": "drafteu-test", "prompt": COUNTING, "max_tokens": 160, "temperature": 0, "stream": True}
    first_seen_while_decoding = None
    with httpx.stream("POST", server.url + "/v1/completions", headers=H, json=body, timeout=300) as s:
        chunks = []
        for line in s.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunks.append(json.loads(line[6:]))
            choices = chunks[-1]["choices"]
            if first_seen_while_decoding is None and choices and choices[0].get("eu_tokens"):
                first_seen_while_decoding = len(server.worker.finished) == before  # its decoding has not ended
    assert first_seen_while_decoding is True
    assert len(server.worker.finished) == before + 1 and server.worker.finished[-1][1] == 160
    for ch in chunks:  # finish_reason is null mid-stream, as OpenAI's chunks have it
        Completion.model_validate(ch | {"choices": [c | {"finish_reason": c["finish_reason"] or "length"}
                                                    for c in ch["choices"]]})
    sizes = [len(c["eu_tokens"]) for ch in chunks for c in ch["choices"] if c.get("eu_tokens")]
    assert sum(sizes) == 160 and sizes[0] >= 8  # segments of at least 8, 16, ... tokens while decoding


def test_a_short_request_is_answered_while_a_long_one_decodes(server):
    """Continuous batching: the short request joins the running batch and leaves it first (a static
    batch would hold it until the long answer ended)."""
    long_started, long_done = threading.Event(), threading.Event()

    def long_request():
        body = {"model": "drafteu-test", "prompt": COUNTING, "max_tokens": 300, "temperature": 0, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", headers=H, json=body, timeout=300) as s:
            for line in s.iter_lines():
                if line.startswith("data: {") and '"eu_tokens"' in line:
                    long_started.set()
        long_done.set()

    t = threading.Thread(target=long_request, daemon=True)
    t.start()
    assert long_started.wait(240)
    r = _post(server, "/v1/completions", {"model": "drafteu-test", "prompt": "The capital of France is",
                                          "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert not long_done.is_set()  # answered while the long one still decodes
    t.join(300)
    assert long_done.is_set()


def test_an_abandoned_request_is_aborted_in_the_engine_and_the_next_is_answered(server):
    t0 = time.time()
    abandon_and_follow(server, {"model": "drafteu-test", "prompt": COUNTING, "max_tokens": 400, "temperature": 0},
                       wait=3.0)
    processor = server.worker.continuous.engine.engine.output_processor  # vLLM (AsyncLLM) holds no request of them
    deadline = time.time() + 60
    while processor.get_num_unfinished_requests() and time.time() < deadline:
        time.sleep(0.1)
    assert processor.get_num_unfinished_requests() == 0
    assert time.time() - t0 < 120
