"""The chunked training losses (drafteu.train.losses): the same loss and gradients as the full
(B, W, V) logits computation, for every kind, on tiny Llama and Gemma 3 models (soft-capping, a
sliding window), with K teachers, a trainable head, the shared-prefix layout, a vocabulary cut and
bf16 autocast; and no chunk of logits larger than the chunk asked for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from drafteu import divergence
from drafteu.train import losses
from drafteu.train.batches import Example, collate, window_hidden, window_logits
from drafteu.train.loop import activation_checkpointing
from tests.conftest import make_gemma3, make_model

EXAMPLES = [Example([1, 5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]),
            Example([1, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15], [30, 31, 32, 33, 34, 35, 36]),
            Example([1, 5, 6, 7, 8, 9, 10, 11, 40], [41, 42])]


def _models(arch: str, vocab: int, seed: int = 0):
    if arch == "llama":
        return make_model(vocab, seed=seed)
    return make_gemma3(vocab, seed=seed, sliding_window=6, final_logit_softcapping=5.0)


def _student(arch: str, vocab: int):
    model = get_peft_model(_models(arch, vocab), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a LoRA that changes the outputs, so its gradient is not degenerate
    return model


def _full(kind: str, student: torch.Tensor, teachers: torch.Tensor | None, targets, mask) -> torch.Tensor:
    """The loss from whole (B, W, V) logits, written out independently of drafteu.train.losses."""
    s = student.float()
    if kind == "ce":
        per = F.cross_entropy(s.transpose(1, 2), targets, reduction="none")
    else:
        t = teachers.float()
        if kind == "forward_kl":
            per = divergence.kl(t, s).mean(0)
        elif kind == "reverse_kl":
            per = divergence.kl(s, t).mean(0)
        else:
            p, q = t.softmax(-1), s.softmax(-1).expand_as(t)
            m = (p + q) / 2
            per = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean(0)
    return (per * mask).sum() / mask.sum()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def _close(a: dict, b: dict, rtol: float) -> None:
    assert a.keys() == b.keys() and a
    for n in a:
        scale = b[n].abs().max().clamp_min(1e-8)
        assert float((a[n] - b[n]).abs().max() / scale) < rtol, n


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("share_prefix", [False, True], ids=["whole", "shared-prefix"])
@pytest.mark.parametrize("kind", losses.KINDS)
def test_chunked_loss_and_gradients_equal_the_full_logits(tokenizer, arch, share_prefix, kind):
    vocab = len(tokenizer)
    student = _student(arch, vocab)
    teachers = get_peft_model(_models(arch, vocab, seed=3), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                              adapter_name="t0")
    teachers.add_adapter("t1", LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    teachers.eval()
    batch = collate(EXAMPLES, 0, "cpu", share_prefix=share_prefix)
    assert ("prefix_ids" in batch) == share_prefix
    mask, targets = batch["loss_mask"], batch["targets"]
    t_window = None
    if kind != "ce":
        with torch.no_grad():
            t_window = window_hidden(teachers, batch, adapters=["t0", "t1"])  # K = 2 teachers, (2, B, W, H)
    want = _full(kind, window_logits(student, batch), None if t_window is None else t_window.logits(), targets, mask)
    want.backward()
    g_want = _grads(student)

    window = window_hidden(student, batch)
    assert window.head is not None and window.states.shape[-1] == 32  # hidden states, not logits
    if arch == "gemma3":
        assert window.head.cap == 5.0
    kw = {"targets": targets} if kind == "ce" else {"teachers": t_window}
    got = losses.window_loss(window, mask, kind=kind, chunk_elements=3 * vocab, **kw)  # chunks of 8 positions
    got.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5, abs=1e-7)
    _close(_grads(student), g_want, 1e-4)
    with torch.no_grad():  # a measurement: the same number, no graph
        measured = losses.window_loss(window_hidden(student, batch), mask, kind=kind, **kw)
    assert not measured.requires_grad and float(measured) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("share_prefix", [False, True], ids=["whole", "shared-prefix"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tokenizer, arch, share_prefix):
    """train.activation_checkpointing recomputes the decoder layers in the backward - with a shared
    prefix, against its replayed KV cache (Gemma 3: sliding-window layers too) - and the loss and the
    gradients are those of the kept activations."""
    student = _student(arch, len(tokenizer)).train()  # no dropout: both passes compute the same thing
    batch = collate(EXAMPLES, 0, "cpu", share_prefix=share_prefix)
    layer = student.get_base_model().model.layers[0]
    runs = []
    # inside the layer, so its recomputation counts too; training passes only (not the head's check)
    hook = layer.mlp.register_forward_pre_hook(lambda m, _: runs.append(1) if m.training else None)
    got = {}
    for on in (False, True):
        runs.clear()
        with activation_checkpointing(student, on):
            loss = losses.window_loss(window_hidden(student, batch), batch["loss_mask"], kind="ce",
                                      targets=batch["targets"])
            loss.backward()
        got[on] = float(loss.detach()), _grads(student), len(runs)
    hook.remove()
    # the prefix's forward (one row) is kept; the sequences' forward runs once more in the backward
    assert got[False][2] == 1 + share_prefix and got[True][2] == got[False][2] + 1
    assert got[True][0] == pytest.approx(got[False][0], rel=1e-6)
    _close(got[True][1], got[False][1], 1e-5)
    assert not student.get_base_model().is_gradient_checkpointing and "_can_checkpoint_with_cache" not in vars(layer)


def test_a_trainable_head_gets_the_full_computations_gradient(tokenizer):
    """The draft base's full fine-tune trains the (tied) head: its gradient from the chunks equals
    the full logits' one, with a target teacher of another model."""
    vocab = len(tokenizer)
    draft, target = make_model(vocab, seed=1), make_model(vocab, layers=4, seed=2)
    draft.train()
    batch = collate(EXAMPLES, 0, "cpu")
    with torch.no_grad():
        teacher = window_hidden(target, batch)
    want = _full("forward_kl", window_logits(draft, batch), teacher.logits()[None], None, batch["loss_mask"])
    want.backward()
    g_want = _grads(draft)
    got = losses.window_loss(window_hidden(draft, batch), batch["loss_mask"], kind="forward_kl", teachers=teacher,
                             chunk_elements=vocab)
    got.backward()
    g_got = _grads(draft)
    assert "lm_head.weight" in g_got or "model.embed_tokens.weight" in g_got
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    _close(g_got, g_want, 1e-4)


def test_a_shared_vocabulary_cut_and_bf16_autocast_match_the_full_path(tokenizer):
    vocab = len(tokenizer)
    student = _student("llama", vocab)
    teacher = make_model(vocab, seed=5)
    batch = collate(EXAMPLES, 0, "cpu", share_prefix=True)
    mask, cut = batch["loss_mask"], vocab - 7
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            t = window_hidden(teacher, batch).cut(cut)
        want = _full("forward_kl", window_logits(student, batch)[..., :cut], t.logits()[None], None, mask)
        want.backward()
        g_want = _grads(student)
        got = losses.window_loss(window_hidden(student, batch).cut(cut), mask, kind="forward_kl", teachers=t)
        got.backward()
    assert t.head.vocab == cut and t.logits().shape[-1] == cut
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-3)
    _close(_grads(student), g_want, 2e-2)  # bf16 matmuls on both sides, rounded in another order


def test_no_chunk_of_logits_exceeds_the_chunk(tokenizer, monkeypatch):
    """The head only ever sees a chunk of masked positions: the loss never holds a (B, W, V) tensor."""
    vocab = len(tokenizer)
    student = _student("llama", vocab)
    batch = collate(EXAMPLES * 4, 0, "cpu")
    seen = []
    real = losses.per_token

    def spy(kind, s, t, y, beta=0.5):
        seen.append(s.shape)
        return real(kind, s, t, y, beta)

    monkeypatch.setattr(losses, "per_token", spy)
    n = int(batch["loss_mask"].sum())
    step = losses.positions_per_chunk(1, vocab, 8 * vocab)
    losses.window_loss(window_hidden(student, batch), batch["loss_mask"], kind="ce", targets=batch["targets"],
                       chunk_elements=8 * vocab).backward()
    assert step == 8 and len(seen) == -(-n // step)
    assert all(s[0] <= step and s[-1] == vocab for s in seen)
    assert sum(s[0] for s in seen) == n < batch["loss_mask"].numel()  # padding never reaches the head


def test_bad_arguments_are_value_errors(tokenizer):
    student = _student("llama", len(tokenizer))
    batch = collate(EXAMPLES, 0, "cpu")
    w = window_hidden(student, batch)
    with pytest.raises(ValueError, match="unknown loss"):
        losses.window_loss(w, batch["loss_mask"], kind="kl", targets=batch["targets"])
    with pytest.raises(ValueError, match="ce takes targets"):
        losses.window_loss(w, batch["loss_mask"], kind="forward_kl", targets=batch["targets"])


def test_a_model_passed_through_the_window_is_freed_without_the_cycle_collector(tokenizer):
    """window_hidden keeps only the head check's answer on the model, no object referring back to it: a
    trained draft (gigabytes for a real one) is freed when its last reference goes, not when Python's
    cycle collector next runs (the Qwen study's drafts stage grew ~3.5 GB per draft before)."""
    import gc
    import weakref

    student = _student("llama", len(tokenizer))
    batch = collate(EXAMPLES, 0, "cpu", share_prefix=True)
    losses.window_loss(window_hidden(student, batch), batch["loss_mask"], kind="ce",
                       targets=batch["targets"]).backward()
    gone = weakref.ref(student.get_base_model())
    gc.disable()
    try:
        del student
        assert gone() is None
    finally:
        gc.enable()
