"""`drafteu serve` as OpenAI's schema and hostile clients see it: every response and stream chunk
validates with the `openai` package's own types, logprobs only when asked; an abandoned request's
generation stops; one job's error is its own; bodies, paths and options are bounded and checked."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.serve_support import (
    KEY,
    QUESTION,
    Server,
    _free_port,
    abandon_and_follow,
    untrained_ensemble,
)

pytestmark = pytest.mark.slow
pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402

H = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def ensemble(tmp_path_factory):
    return untrained_ensemble(tmp_path_factory.mktemp("serve-protocol"))


@pytest.fixture(scope="module")
def server(ensemble):
    s = Server(ensemble, max_concurrency=4, max_queue=8, served_model_name=("alias",))
    yield s
    s.close()


def _post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, headers=H, timeout=120, **kw)


def _events(server, path, body) -> list[dict]:
    out = []
    with httpx.stream("POST", server.url + path, headers=H, json=body | {"stream": True}, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                out.append(json.loads(line[6:]))
    return out


@pytest.mark.parametrize("logprobs", [False, True])
@pytest.mark.parametrize("eu", [False, True])
def test_every_chat_answer_and_chunk_is_openais_schema(server, logprobs, eu):
    body = {"model": "drafteu-test", "messages": MSG, "max_tokens": 6, "temperature": 1.0, "seed": 3, "n": 2,
            "logprobs": logprobs, "eu": eu} | ({"top_logprobs": 2} if logprobs else {})
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    c = ChatCompletion.model_validate(r.json())
    for choice in c.choices:
        assert (choice.logprobs is not None) == logprobs
        if logprobs:
            assert all(isinstance(t.logprob, float) and len(t.top_logprobs) == 2 for t in choice.logprobs.content)
        assert ("eu_tokens" in choice.model_extra) == eu
    chunks = _events(server, "/v1/chat/completions", body | {"stream_options": {"include_usage": True}})
    for ch in chunks:
        ChatCompletionChunk.model_validate(ch)
        for choice in ch["choices"]:
            assert (choice.get("logprobs") is not None) == (logprobs and "content" in choice["delta"])
    for i in range(2):  # the stream's text is the answer's (same seed)
        text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks
                       if ch["choices"] and ch["choices"][0]["index"] == i)
        assert text == c.choices[i].message.content


@pytest.mark.parametrize("echo", [False, True])
def test_completions_are_openais_schema_and_text_offsets_point_into_the_text(server, echo):
    prompt = "The capital of France is"
    body = {"model": "alias", "prompt": prompt, "max_tokens": 6, "temperature": 0, "logprobs": 2, "echo": echo}
    r = _post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    c = Completion.model_validate(r.json())
    lp, text = c.choices[0].logprobs, c.choices[0].text
    assert text.startswith(prompt) == echo
    assert all(text[o:o + len(t)] == t for o, t in zip(lp.text_offset, lp.tokens, strict=True))
    assert all(isinstance(x, float) for x in lp.token_logprobs)
    plain = Completion.model_validate(_post(server, "/v1/completions", body | {"logprobs": None}).json())
    assert plain.choices[0].logprobs is None
    chunks = _events(server, "/v1/completions", body)
    for ch in chunks:  # mid-stream chunks carry finish_reason null, as OpenAI's do (its type has no null)
        Completion.model_validate(ch | {"choices": [c | {"finish_reason": c["finish_reason"] or "length"}
                                                    for c in ch["choices"]]})
    streamed = [o for ch in chunks for c in ch["choices"] for o in ((c.get("logprobs") or {}).get("text_offset") or [])]
    assert streamed == lp.text_offset and "".join(c["text"] for ch in chunks for c in ch["choices"]) == text


def test_top_logprobs_carry_each_tokens_own_bytes(server):
    from drafteu.serve.wire import token_bytes, top_token

    tok = server.worker.tokenizer
    ids = tok("日本", add_special_tokens=False)["input_ids"]
    raw = b"".join(token_bytes(tok, i) for i in ids)
    assert raw == "日本".encode()  # a character split over tokens: each token's own bytes, not U+FFFD's
    partial = [i for i in ids if tok.decode([i]) == "\ufffd"]
    assert partial and all(top_token(tok, i)[0].startswith("bytes:\\x") for i in partial)


def test_a_stop_string_inside_a_token_keeps_the_text_before_it(server):
    body = {"model": "drafteu-test", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    full = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    tokens = [t["token"] for t in _post(server, "/v1/completions", body).json()["choices"][0]["eu_tokens"]]
    j = next(j for j, t in enumerate(tokens) if len(t.strip()) >= 3)  # a token of 3+ characters
    start = len("".join(tokens[:j])) + len(tokens[j]) - 2  # the stop begins inside it
    stop = full[start:start + 3]
    got = _post(server, "/v1/completions", body | {"stop": [stop]}).json()["choices"][0]
    assert got["text"] == full[:full.find(stop)] and got["finish_reason"] == "stop"


def test_an_abandoned_request_stops_generating_and_the_next_is_answered(server):
    abandon_and_follow(server, {"model": "drafteu-test", "prompt": "1, 2, 3, 4, 5,", "max_tokens": 400,
                                "temperature": 0}, wait=2.0)


def test_one_jobs_error_fails_that_job_only(server):
    import asyncio

    from drafteu.errors import DraftEUError
    from drafteu.serve.jobs import Job

    tok = server.worker.tokenizer
    good = tok(QUESTION, add_special_tokens=False)["input_ids"]

    async def both():
        bad = server.worker.submit(Job("score", [], response_ids=[5]))
        ok = server.worker.submit(Job("score", good, response_ids=good[:3]))
        return await asyncio.gather(bad, ok, return_exceptions=True)

    bad, ok = asyncio.run(both())
    assert isinstance(bad, DraftEUError) and "empty" in str(bad)
    assert len(ok) == 1 and len(ok[0].eu) == 3
    r = _post(server, "/v1/score", {"model": "drafteu-test", "prompt": "", "response": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


@pytest.mark.parametrize("extra, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0"),  # OpenAI: null only with tool_calls
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user"}]}, "messages.1"),
])
def test_what_is_not_done_is_refused_naming_the_field(server, extra, param):
    r = _post(server, "/v1/chat/completions", {"model": "drafteu-test", "messages": MSG, "max_tokens": 2} | extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    if param.startswith("messages.") and param != "messages.0.content":
        assert "needs content" in r.json()["error"]["message"]


def test_a_prompt_of_token_ids_is_the_same_prompt_and_ids_are_checked(server):
    """OpenAI's completions take a prompt as token ids (or a list holding one prompt): the same answer
    as the text they encode; an id outside the vocabulary, several prompts and non-integers are 400s."""
    tok = server.worker.tokenizer
    prompt = "The capital of France is"
    ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    body = {"model": "alias", "max_tokens": 5, "temperature": 0, "echo": True}
    want = _post(server, "/v1/completions", body | {"prompt": prompt}).json()
    for form in (ids, [ids], [prompt]):
        got = _post(server, "/v1/completions", body | {"prompt": form})
        assert got.status_code == 200, got.text
        assert got.json()["choices"][0]["text"] == want["choices"][0]["text"]
        assert got.json()["usage"]["prompt_tokens"] == len(ids)
    for form, needle in ((ids + [len(tok) + 5], "outside the model's vocabulary"), ([prompt, prompt], "one prompt "
                                                                                                      "per request"),
                         ([ids, ids], "one prompt per request"), ([1.5, 2], "token ids"), ([], "empty"), (7, "string")):
        r = _post(server, "/v1/completions", body | {"prompt": form})
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "prompt" and needle in error["message"], r.text


def test_malformed_unknown_and_oversized_requests_get_the_envelope_and_bounded_metrics(server):
    cases = [
        (httpx.post, "/v1/nope", b"{}", 404), (httpx.get, "/v1/chat/completions", None, 405),
        (httpx.post, "/v1/chat/completions", b'{"model": "\xff"}', 400),
        (httpx.post, "/v1/chat/completions", b"[" * 100_000, 400),
        (httpx.post, "/v1/chat/completions", b'{"model": "' + b"a" * (9 * 2**20) + b'"}', 413),
    ]
    for method, path, content, status in cases:
        kw = {"content": content} if content is not None else {}
        r = method(server.url + path, headers=H | {"content-type": "application/json"}, timeout=60, **kw)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    for i in range(200):
        httpx.get(server.url + f"/v1/made-up-{i}", headers={"Authorization": "Bearer wrong"})
    metrics = httpx.get(server.url + "/metrics").text
    assert "made-up" not in metrics and 'endpoint="other"' in metrics
    assert [m["id"] for m in httpx.get(server.url + "/v1/models", headers=H).json()["data"]] == ["drafteu-test",
                                                                                                 "alias"]


@pytest.mark.parametrize("args, needle", [
    (["--dtype", "bogus"], "unknown dtype"), (["--device", "bogus"], "unknown device"),
    (["--timeout", "nan"], "--timeout"), (["--timeout", "inf"], "--timeout"),
    (["--batch-wait-ms", "nan"], "batch-wait"),
    (["--api-key", ""], "--api-key is empty"), (["--gamma", "0"], "--gamma must be in 1..16"),
    (["--review-above", "0.7", "--abstain-above", "0.5"], "must not exceed"),
])
def test_options_are_checked_before_listening(ensemble, args, needle):
    from typer.testing import CliRunner

    from drafteu.cli import app

    res = CliRunner().invoke(app, ["serve", "--drafts", str(ensemble), *args])
    assert res.exit_code == 2 and needle in res.output and "Traceback" not in res.output, res.output


def test_a_failed_load_exits_with_one_line_and_never_listens(ensemble, tmp_path):
    from drafteu.errors import DraftEUError
    from drafteu.serve import ServeConfig, run

    lines = []
    cfg = ServeConfig(drafts=ensemble, target=str(tmp_path / "missing"), host="0.0.0.0")
    assert not cfg.loopback and ServeConfig(drafts=ensemble).loopback
    with pytest.raises(DraftEUError, match="loading failed"):
        run(cfg, log=lines.append)
    assert any("without an API key" in line for line in lines)


def test_ctrl_c_while_loading_or_serving_exits_quietly(ensemble):
    """SIGINT (Ctrl-C) during the model load exits 130 without a traceback and never listens;
    SIGINT while serving stops the server cleanly (exit 0)."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    def start():
        port = _free_port()
        # SIGINT at its default: a test run in the background (`cmd &` in a script) inherits it ignored,
        # and Python then installs no Ctrl-C handler
        proc = subprocess.Popen([sys.executable, "-m", "drafteu.cli", "serve", "--drafts", str(ensemble), "--port",
                                 str(port), "--model-name", "m"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env={**os.environ, "DRAFTEU_API_KEY": ""},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        return proc, f"http://127.0.0.1:{port}"

    def wait_for(proc, text):
        seen = []
        for line in iter(proc.stdout.readline, ""):
            seen.append(line)
            if text in line:
                return seen
        raise AssertionError(f"{text!r} never printed: {''.join(seen)}")

    def finish(proc):  # the rest of its output, read to the end (a full pipe would block the server's exit)
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            out = proc.stdout.read()
        finally:
            watchdog.cancel()
        proc.wait(timeout=30)
        return out

    proc, url = start()
    try:
        seen = wait_for(proc, "loading the models")
        proc.send_signal(signal.SIGINT)
        out = finish(proc)
        assert proc.returncode == 130, "".join(seen) + out
        assert "Traceback" not in out and "interrupted while loading" in out
        with pytest.raises(httpx.HTTPError):
            httpx.get(url + "/health", timeout=2)
    finally:
        proc.kill()
    proc, url = start()
    try:
        seen = wait_for(proc, "serving m on")
        assert httpx.get(url + "/health", timeout=10).status_code == 200
        proc.send_signal(signal.SIGINT)
        out = finish(proc)
        assert proc.returncode == 0 and "Traceback" not in out, "".join(seen) + out
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def routed(ensemble, tmp_path_factory):
    """A server over a run whose hallucination stage fitted a map (here a constant P(wrong) = 0.5), with
    --review-above 0.3 --abstain-above 0.6."""
    run = tmp_path_factory.mktemp("routed-run")
    (run / "drafts").mkdir()
    (run / "drafts" / "ddd").symlink_to(ensemble, target_is_directory=True)
    (run / "eval").mkdir()
    (run / "eval" / "hallucination.json").write_text(json.dumps({"methods": {}, "calibration": {
        "method": "untrained", "aggregation": "mean", "chosen": "isotonic", "n_fit": 30, "folds": 5,
        "map": {"kind": "isotonic", "x": [0.0, 1e9], "y": [0.5, 0.5]}, "test": {"isotonic": {"ece": 0.04}}}}))
    s = Server(run, max_concurrency=2, max_queue=4, review_above=0.3, abstain_above=0.6)
    yield s
    s.close()


def test_the_server_routes_answers_on_p_wrong_and_withholds_only_when_asked(routed, server):
    body = {"model": "drafteu-test", "messages": MSG, "max_tokens": 4, "temperature": 0}
    r = _post(routed, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    ChatCompletion.model_validate(r.json())
    choice = r.json()["choices"][0]
    assert choice["eu"]["decision"] == {"action": "review", "p_wrong": 0.5, "review_above": 0.3, "abstain_above": 0.6,
                                        "withheld": False}
    assert choice["eu"]["p_wrong_map"]["map"] == "isotonic" and choice["message"]["content"]
    assert r.headers["x-drafteu-decision"] == "review" and float(r.headers["x-drafteu-p-wrong"]) == 0.5
    strict = _post(routed, "/v1/chat/completions", body | {"abstain_above": 0.4, "review_above": 0.2})
    assert strict.json()["choices"][0]["eu"]["decision"]["action"] == "abstain"
    assert strict.json()["choices"][0]["message"]["content"]  # never withheld unless asked
    withheld = _post(routed, "/v1/chat/completions", body | {"abstain_above": 0.4, "withhold": True})
    assert withheld.json()["choices"][0]["message"]["content"] == ""
    assert withheld.json()["choices"][0]["eu"]["decision"]["withheld"] is True
    chunks = _events(routed, "/v1/chat/completions", body)
    assert [c["choices"][0]["eu"]["decision"]["action"] for c in chunks if c["choices"] and c["choices"][0].get("eu")] \
        == ["review"]
    for extra, param in (({"withhold": True, "stream": True}, "withhold needs"),
                         ({"abstain_above": 1.5}, "abstain_above"),
                         ({"review_above": 0.7, "abstain_above": 0.6}, "review_above must not exceed")):
        bad = _post(routed, "/v1/chat/completions", body | extra)
        assert bad.status_code == 400 and param in bad.text, bad.text
    # a server without a map, or a request without the EU, cannot decide: a 400 before any work
    none = _post(server, "/v1/chat/completions", body | {"abstain_above": 0.5})
    assert none.status_code == 400 and "fitted a map" in none.json()["error"]["message"]
    no_eu = _post(routed, "/v1/chat/completions", body | {"eu": False})
    assert no_eu.status_code == 400 and no_eu.json()["error"]["param"] == "eu"


def test_the_langchain_example_routes_on_the_decision(routed):
    """examples/langchain/route.py: ChatOpenAI with include_response_headers reads the decision and a
    RunnableBranch routes on it."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("langchain_openai")
    example = Path(__file__).resolve().parents[1] / "examples" / "langchain" / "route.py"
    spec = importlib.util.spec_from_file_location("route", example)
    route = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(route)
    out = route.chain(route.model(routed.url + "/v1", "drafteu-test", KEY)).invoke(QUESTION)
    assert out["route"] == "queued for review" and out["p_wrong"] == 0.5 and out["text"]
    out = route.chain(route.model(routed.url + "/v1", "drafteu-test", KEY, abstain_above=0.4)).invoke(QUESTION)
    assert out["route"] == "abstained" and "0.50" in out["text"]


def test_thresholds_without_a_map_are_refused_before_listening(ensemble):
    from drafteu.errors import DraftEUError
    from drafteu.serve import ServeConfig, build

    with pytest.raises(DraftEUError, match="fitted a map"):
        build(ServeConfig(drafts=ensemble, abstain_above=0.5))
    with pytest.raises(DraftEUError, match="must not exceed"):
        ServeConfig(drafts=ensemble, review_above=0.7, abstain_above=0.6)
