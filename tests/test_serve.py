"""`drafteu serve` on the embedded model, driven by the official `openai` client over loopback: answers,
streams and scores carry the EU `drafteu score` computes; bad requests get OpenAI's error envelope;
a bounded load test; SIGTERM finishes what is in flight."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from tests import serve_support  # noqa: E402
from tests.serve_support import KEY, QUESTION, Server, _free_port, untrained_ensemble  # noqa: E402


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    return untrained_ensemble(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ensemble):
    s = Server(ensemble, max_concurrency=4, max_queue=8)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(ensemble):
    return serve_support.reference(ensemble)


def _eu(tokens):
    return [getattr(t, "eu", None) if not isinstance(t, dict) else t["eu"] for t in tokens]


def test_chat_answers_carry_the_eu_drafteu_score_computes(server, reference):
    lm, ens = reference
    client = server.client()
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model="drafteu-test", messages=messages, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=2)
    choice = r.choices[0]
    tokens = choice.logprobs.content
    prompt_ids = list(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=True)["input_ids"])
    ids = lm.tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]
    # a greedy answer is the target's plain greedy decoding
    from drafteu.generate import greedy_answer

    with ens.base_target():
        assert greedy_answer(lm.model, lm.tokenizer, prompt_ids, 12) == ids
    # the EU of each token (read through the client's extra fields) is the estimator's
    want = ens.score(prompt_ids, ids)
    assert [t.eu for t in tokens] == pytest.approx(want.eu.tolist(), rel=1e-4, abs=1e-6)
    assert [t.eu_variance for t in tokens] == pytest.approx(want.variance.tolist(), rel=1e-4, abs=1e-6)
    assert [t.eu_bias for t in tokens] == pytest.approx(want.bias.tolist(), rel=1e-4, abs=1e-6)
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
    summary = choice.model_extra["eu"]
    assert summary["tokens"] == len(ids) and summary["mean"] == pytest.approx(want.eu.mean().item(), rel=1e-4)
    assert r.usage.prompt_tokens == len(prompt_ids) and r.usage.completion_tokens == len(ids)


def test_completions_streams_and_scores(server, reference, tmp_path):
    lm, ens = reference
    client = server.client()
    c = client.completions.create(model="drafteu-test", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert c.choices[0].text and len(c.choices[0].model_extra["eu_tokens"]) == c.usage.completion_tokens
    assert c.choices[0].logprobs is None  # not asked for
    # streaming: the same answer, token by token with the EU, then the finish, the usage and [DONE]
    messages = [{"role": "user", "content": QUESTION}]
    full = client.chat.completions.create(model="drafteu-test", messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="drafteu-test", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    streamed = [t for ch in chunks if ch.choices for t in (ch.choices[0].model_extra.get("eu_tokens") or [])]
    assert text == full.choices[0].message.content
    assert [t["eu"] for t in streamed] == pytest.approx([t["eu"] for t in full.choices[0].model_extra["eu_tokens"]],
                                                        rel=1e-5)
    assert all(ch.choices[0].logprobs is None for ch in chunks if ch.choices)  # not asked for
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    # /v1/score equals `drafteu score --answer` on the same question and answer
    answer = "He has 3 + 4 = 7 apples. The answer is \\boxed{7}."
    r = httpx.post(server.url + "/v1/score", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "drafteu-test", "question": QUESTION, "response": answer},
                   timeout=120)  # httpx's default 5 s: a first score on a slow 2-core CPU takes about that
    assert r.status_code == 200, r.text
    from typer.testing import CliRunner

    from drafteu.cli import app

    out = tmp_path / "s.json"
    res = CliRunner().invoke(app, ["score", "-q", QUESTION, "--answer", answer, "--method", "drafts", "--drafts",
                                   str(ens.drafts_dir), "--json", str(out)])
    assert res.exit_code == 0, res.output
    cli = json.loads(out.read_text())["tokens"]
    assert [t["id"] for t in r.json()["tokens"]] == [t["id"] for t in cli]
    assert [t["eu"] for t in r.json()["tokens"]] == pytest.approx([t["eu"] for t in cli], rel=1e-4, abs=1e-6)


def test_sampling_with_a_seed_is_reproducible_and_n_gives_distinct_answers(server):
    client = server.client()
    kw = dict(model="drafteu-test", messages=[{"role": "user", "content": QUESTION}], max_tokens=8, temperature=1.0,
              seed=11, n=3)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices] and len(set(texts)) > 1


@pytest.mark.parametrize("body, status, needle", [
    ("{not json", 400, "not valid JSON"),
    ({"model": "drafteu-test", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400,
     "temperature"),
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ({"model": "drafteu-test", "messages": [{"role": "user", "content": "x"}], "n": 20}, 400, "n"),
    ({"model": "drafteu-test", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "drafteu-test", "messages": [{"role": "user", "content": "x " * 9000}], "max_tokens": 8}, 400,
     "context"),
    ({"model": "drafteu-test", "messages": []}, 400, "messages"),
])
def test_bad_requests_get_openais_envelope(server, body, status, needle):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(server.url + "/v1/chat/completions", content=content, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"] + str(err["param"])
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_the_api_key_is_required_and_a_client_gone_mid_stream_frees_its_slot(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # /health needs no key
    assert server.client().models.list().data[0].id == "drafteu-test"
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "drafteu-test", "messages": [{"role": "user", "content": QUESTION}],
                            "max_tokens": 64, "stream": True}, timeout=60) as r:
        assert r.status_code == 200  # and the client hangs up before reading anything
    deadline = time.time() + 60
    while httpx.get(server.url + "/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.2)
    assert httpx.get(server.url + "/health").json() | {"queued": 0} == {"status": "ok", "model": "drafteu-test",
                                                                        "in_flight": 0, "queued": 0}


def test_a_bounded_load_is_answered_once_each_with_429_only_beyond_capacity(server):
    """32 clients x 2 requests on loopback against 4 running + 8 queued: every request gets exactly one
    answer (200, or 429 with Retry-After when the server is full), the server's memory stays bounded,
    and it is healthy afterwards."""
    async def load():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits,
                                     headers={"Authorization": f"Bearer {KEY}"}) as client:
            async def one(i):
                r = await client.post("/v1/completions", json={"model": "drafteu-test", "prompt": f"Count to {i}:",
                                                               "max_tokens": 4, "temperature": 0})
                return r.status_code, r.headers.get("retry-after"), r.json()

            async def user(u):
                return [await one(u * 2 + k) for k in range(2)]

            return [x for batch in await asyncio.wait_for(asyncio.gather(*(user(u) for u in range(32))), 300)
                    for x in batch]

    # warm up with a batch of the same shape first: a server's first batches allocate what every later one
    # reuses (run alone, this test would count that as growth)
    for _ in range(2):
        assert httpx.post(server.url + "/v1/completions", json={"model": "drafteu-test", "prompt": "Count to 3:",
                                                                "max_tokens": 4, "temperature": 0, "n": 4},
                          headers={"Authorization": f"Bearer {KEY}"}, timeout=120).status_code == 200
    rss = _resident_mib()
    results = asyncio.run(load())
    assert len(results) == 64
    statuses = [s for s, _, _ in results]
    # 32 clients at once against 4 running + 8 queued: the server is over capacity and says so
    assert set(statuses) == {200, 429} and statuses.count(200) >= 12
    assert all(ra is not None and body["error"]["code"] == "over_capacity" for s, ra, body in results if s == 429)
    assert all(len(body["choices"]) == 1 for s, _, body in results if s == 200)
    assert _resident_mib() - rss < 256  # the server (in this process) keeps no request's memory
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["in_flight"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'drafteu_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert "drafteu_token_eu_bucket" in metrics and "drafteu_queue_depth" in metrics


def _resident_mib() -> float:
    """This process's resident set now (the lifetime peak, ru_maxrss, was set by loading the models and
    could not show a leak)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_sigterm_finishes_the_request_in_flight_and_refuses_new_ones(ensemble):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "drafteu.cli", "serve", "--drafts", str(ensemble), "--port",
                             str(port),
                             "--model-name", "m"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DRAFTEU_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        result = {}

        def ask():
            result["r"] = httpx.post(url + "/v1/completions", timeout=120,
                                     json={"model": "m", "prompt": "Once upon a time", "max_tokens": 24})

        t = threading.Thread(target=ask)
        t.start()
        while time.time() < deadline and not httpx.get(url + "/health", timeout=2).json()["in_flight"]:
            time.sleep(0.05)  # until the request is being answered
        proc.send_signal(signal.SIGTERM)
        t.join(120)
        assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["text"]
        # uvicorn finishes the request, shuts down, then re-raises the signal it caught: the usual exit status
        assert proc.wait(60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        out = proc.stdout.read()
    assert "Traceback" not in out


def test_serve_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from drafteu.cli import app

    res = CliRunner().invoke(app, ["serve", "--drafts", str(tmp_path)])
    assert res.exit_code == 2 and "neither a run directory" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["serve", "--drafts", str(tmp_path), "--engine", "fast"])
    assert res.exit_code == 2 and "--engine must be one of" in res.output


def test_the_speculative_engine_answers_with_the_eu_and_logprobs_drafteu_score_computes(ensemble, reference):
    """`--engine speculative`, tested like the batched engine: greedy answers are the target's, every
    token carries the estimator's EU and the target's logprobs (from the verifying pass), and the
    answer and its stream are OpenAI's schema."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    lm, ens = reference
    s = Server(ensemble, engine="speculative", max_concurrency=2, max_queue=2, gamma=3)
    try:
        assert s.worker.decoding.decoder.gamma == 3 and s.worker.live  # --gamma reaches the decoder
        messages = [{"role": "user", "content": QUESTION}]
        body = {"model": "drafteu-test", "messages": messages, "max_tokens": 12, "temperature": 0, "logprobs": True,
                "top_logprobs": 2}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=300)
        assert r.status_code == 200, r.text
        choice = ChatCompletion.model_validate(r.json()).choices[0]
        prompt_ids = list(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                           tokenize=True)["input_ids"])
        ids = lm.tokenizer(choice.message.content, add_special_tokens=False)["input_ids"]
        from drafteu.generate import greedy_answer

        with ens.base_target():
            assert greedy_answer(lm.model, lm.tokenizer, prompt_ids, 12) == ids
        tokens = choice.logprobs.content
        want = ens.score(prompt_ids, ids)
        # the rounds' own passes, with their caches: equal to full forwards to float rounding
        assert [t.eu for t in tokens] == pytest.approx(want.eu.tolist(), rel=1e-3, abs=1e-4)
        assert [t.eu_bias for t in tokens] == pytest.approx(want.bias.tolist(), rel=1e-3, abs=1e-4)
        chosen, values, _ = ens.target_logprobs([(prompt_ids, ids)], 2)[0]
        assert [t.logprob for t in tokens] == pytest.approx(chosen.tolist(), rel=1e-3, abs=1e-4)
        assert [x.logprob for t in tokens for x in t.top_logprobs] == pytest.approx(values.flatten().tolist(), rel=1e-3,
                                                                                     abs=1e-4)
        with httpx.stream("POST", s.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json=body | {"stream": True}, timeout=300) as st:
            chunks = [json.loads(line[6:]) for line in st.iter_lines() if line.startswith("data: {")]
        for ch in chunks:
            ChatCompletionChunk.model_validate(ch)
        streamed = [t for ch in chunks for c in ch["choices"] for t in (c.get("eu_tokens") or [])]
        assert [t["eu"] for t in streamed] == pytest.approx([t.eu for t in tokens], rel=1e-3, abs=1e-4)
        streamed = "".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"])
        assert streamed == choice.message.content
    finally:
        s.close()


def test_the_speculative_engine_decodes_concurrent_requests_together(ensemble, reference):
    """Requests that wait together are decoded speculatively in one batch (one forward per step for all of
    them, ``spec_decoding_batch``): each answer is still the target's greedy answer with the EU of
    `drafteu score`; a lone request keeps the single-request decoder (its prompt cache)."""
    lm, ens = reference
    s = Server(ensemble, engine="speculative", max_concurrency=4, max_queue=4, gamma=2)
    try:
        decoding = s.worker.decoding
        assert decoding.batched is not None and decoding.batched.gamma == 2
        sizes, single = [], decoding.decoder.generate

        def slow_single(*a, **kw):  # the first request holds the worker while the others queue
            time.sleep(0.5)
            return single(*a, **kw)

        def spy(requests, **kw):
            sizes.append(len(requests))
            return batched(requests, **kw)

        batched = decoding.batched.generate
        decoding.decoder.generate, decoding.batched.generate = slow_single, spy
        questions = [QUESTION, "What is 6 times 7?", "Add 12 and 30.", "Name a colour."]
        out = [None] * len(questions)

        def ask(i):
            body = {"model": "drafteu-test", "messages": [{"role": "user", "content": questions[i]}], "max_tokens": 8,
                    "temperature": 0}
            out[i] = httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                                timeout=300)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert sizes and max(sizes) >= 2, sizes  # some requests were decoded together
        from drafteu.generate import greedy_answer

        for q, r in zip(questions, out, strict=True):
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            messages = [{"role": "user", "content": q}]
            prompt_ids = list(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                               tokenize=True)["input_ids"])
            ids = lm.tokenizer(choice["message"]["content"], add_special_tokens=False)["input_ids"]
            with ens.base_target():
                assert greedy_answer(lm.model, lm.tokenizer, prompt_ids, 8) == ids
            want = ens.score(prompt_ids, ids)
            assert [t["eu"] for t in choice["eu_tokens"]] == pytest.approx(want.eu.tolist(), rel=1e-3, abs=1e-4)
        # "eu": false decodes on the decoders without the EU's work: the same answer, no EU fields
        body = {"model": "drafteu-test", "messages": [{"role": "user", "content": questions[1]}], "max_tokens": 8,
                "temperature": 0, "eu": False}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                       timeout=300)
        assert r.status_code == 200 and "eu_tokens" not in r.json()["choices"][0]
        assert r.json()["choices"][0]["message"]["content"] == out[1].json()["choices"][0]["message"]["content"]
        plain, _ = decoding.decoders(False)
        assert not plain.eu and decoding.decoders(True)[0].eu
    finally:
        s.close()


def test_a_draining_server_refuses_new_requests_with_503_and_says_so_on_health(ensemble):
    """What SIGTERM switches on before uvicorn stops (serve.run's handle_exit): new requests on open
    connections get 503 'draining' in OpenAI's envelope, /health reports draining - deterministic here,
    where the SIGTERM test can only see the process gone afterwards."""
    s = Server(ensemble, max_concurrency=2, max_queue=2)
    try:
        body = {"model": "drafteu-test", "prompt": "Count to 3:", "max_tokens": 2}
        h = {"Authorization": f"Bearer {KEY}"}
        assert httpx.post(s.url + "/v1/completions", json=body, headers=h, timeout=120).status_code == 200
        s.app.state.drain()
        r = httpx.post(s.url + "/v1/completions", json=body, headers=h, timeout=120)
        assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
        health = httpx.get(s.url + "/health", timeout=10)
        assert health.status_code == 503 and health.json() == {"status": "draining"}
    finally:
        s.close()
