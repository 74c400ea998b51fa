"""What the serve tests share: an untrained ensemble on the embedded target, and `drafteu serve` in a
thread of the test process on a free loopback port."""

from __future__ import annotations

import socket
import threading
import time

import httpx

from drafteu import fileio
from drafteu.train import drafts

KEY = "sk-test-key"
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def untrained_ensemble(root) -> object:
    """Three noisy copies of the embedded target (no training: untrained drafts on the target itself)."""
    fileio.append_jsonl(root / "samples.jsonl", [{"qid": "q0", "sample": 0, "prompt_ids": [1, 2], "response_ids": [3],
                                                 "correct": True, "finish": "eos"}])
    drafts.run(drafts.DraftsConfig(samples=root / "samples.jsonl", out=root / "drafts", base="embedded",
                                   target="embedded", method="untrained", partitions=1, per_partition=3))
    return root / "drafts" / "untrained"


class Server:
    """`drafteu serve` in a thread of this process, on a free loopback port."""

    def __init__(self, drafts_dir, **kw):
        import uvicorn

        from drafteu.serve import ServeConfig, build

        self.port = _free_port()
        self.cfg = ServeConfig(drafts=drafts_dir, port=self.port, api_key=KEY, model_name="drafteu-test", **kw)
        self.worker, self.app = build(self.cfg)
        self.worker.start()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server never became healthy")

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.worker.stop()




def reference(ensemble) -> tuple:
    """(the target, the estimator `drafteu score --method drafts` uses on it), loaded on their own."""
    from drafteu import estimators, models

    lm = models.load("embedded")
    return lm, estimators.DraftEnsemble(ensemble, lm)


def abandon_and_follow(server, body: dict, wait: float) -> None:
    """``body`` (a long completion) abandoned by its client after ``wait`` seconds, then streamed and
    dropped unread: each time its generation stops where the client left (``engine.finished``), its
    slot is freed, and a short request is answered."""
    import pytest

    headers = {"Authorization": f"Bearer {KEY}"}
    longest = body["max_tokens"]

    def short_is_answered():
        r = httpx.post(server.url + "/v1/completions", json=body | {"max_tokens": 2}, headers=headers, timeout=300)
        assert r.status_code == 200, r.text
        gone = [f for f in server.worker.finished if f[2]]
        assert gone and gone[-1][1] < longest  # the abandoned one stopped where the client left

    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json=body, headers=headers, timeout=wait)
    short_is_answered()
    with httpx.stream("POST", server.url + "/v1/completions", headers=headers, json=body | {"stream": True},
                      timeout=60) as s:
        assert s.status_code == 200  # and hangs up before reading
    deadline = time.time() + 60
    while httpx.get(server.url + "/health").json()["in_flight"] and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(server.url + "/health").json()["in_flight"] == 0
    short_is_answered()
