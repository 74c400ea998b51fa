"""Answers end where the model starts the next turn: a base model (no chat template) prompted in the
plain "Question: ... Answer:" format goes on to ask itself the next question; every generation path
stops there and cuts the delimiter from the answer."""

from __future__ import annotations

import copy

import torch

from drafteu import data
from drafteu.generate import HFBackend, Sampling

from .conftest import make_model, make_tokenizer


def plain_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = None
    return tok


def looping_model(tok, answer: str):
    """A tiny Llama that, after any prompt ending in "Answer:", says ``answer`` and then starts
    "\\nQuestion:" over and over (its layers off; each token's embedding selects the next one)."""
    seq = tok(answer + data.PLAIN_TURN, add_special_tokens=False)["input_ids"]
    last = tok("Question: x\nAnswer:", add_special_tokens=False)["input_ids"][-1]
    chain = [last] + seq
    model = make_model(len(tok), tie_word_embeddings=False, hidden_size=64, intermediate_size=64)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # every layer adds nothing: the last hidden state is the token's embedding
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        emb.normal_(0, 0.01)
        head.zero_()
        basis = torch.eye(emb.shape[1])
        slots = {t: i for i, t in enumerate(dict.fromkeys(chain))}
        for t, i in slots.items():
            emb[t] = basis[i]
        for a, b in zip(chain, chain[1:] + seq[: len(seq)], strict=False):
            head[b] += 50 * basis[slots[a]]
    return model


def test_the_plain_format_has_a_turn_and_chat_templates_none():
    assert data.turn_stops(plain_tokenizer()) == (data.PLAIN_TURN,)
    assert data.turn_stops(make_tokenizer()) == ()


def test_text_stops_cut_before_the_token_the_stop_begins_in_and_hold_back_its_start():
    tok = plain_tokenizer()
    stops = data.TextStops(tok, (data.PLAIN_TURN,))
    ids = tok("The answer is 7.\nQuestion: what", add_special_tokens=False)["input_ids"]
    k = stops.cut(ids)
    assert tok.decode(ids[:k]) == "The answer is 7."
    assert stops.cut(ids[:k]) is None and stops.end(ids, "length") == (ids[:k], "eos")
    partial = tok("The answer is 7.\nQues", add_special_tokens=False)["input_ids"]
    held = stops.held(partial)
    assert held >= 1 and tok.decode(partial[:-held]) == "The answer is 7."  # "\nQues" may begin the turn
    assert stops.held(tok("The answer is 7", add_special_tokens=False)["input_ids"]) == 0
    assert not data.TextStops(tok, ()) and data.TextStops(tok, ()).cut(ids) is None


def test_a_stream_sends_only_tokens_no_stop_string_or_eos_can_reach():
    """The continuous engine's segments (``serve.continuous.streamable``): tokens before an EOS id that
    end before a stop string, holding back a tail that may begin one; the same from any sent prefix."""
    from drafteu.serve.continuous import streamable

    tok = plain_tokenizer()
    stops = data.TextStops(tok, (data.PLAIN_TURN,))
    ids = tok("The answer is 7 because 3 + 4 = 7.\nQuestion: what", add_special_tokens=False)["input_ids"]
    k = stops.cut(ids)
    assert all(streamable(stops, ids, [], start) == k for start in range(k + 1))
    partial = tok("The answer is 7 because 3 + 4 = 7.\nQues", add_special_tokens=False)["input_ids"]
    assert streamable(stops, partial, [], 3) == len(partial) - stops.held(partial) < len(partial)
    eos = tok.eos_token_id
    assert streamable(stops, ids[:5] + [eos] + ids[5:], [eos], 2) == 5


def test_hf_generation_stops_at_the_next_turn():
    tok = plain_tokenizer()
    model = looping_model(tok, " 7.")
    prompt = data.format_prompt(tok, "Tom has 3 apples and buys 4 more. How many apples?")
    backend = HFBackend("tiny", tok, model=model, prefix_cache=False)
    want = tok(" 7.", add_special_tokens=False)["input_ids"]
    raw = model.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)[0, len(prompt):].tolist()
    assert data.PLAIN_TURN in tok.decode(raw)  # left alone, it runs on into the next question
    for sampling in (Sampling(0.0, 1.0, 30), Sampling(1e-4, 1.0, 30, [3, 4])):
        out = backend.generate([prompt, copy.copy(prompt)], sampling)
        assert out == [(want, "eos"), (want, "eos")]


def test_speculative_decoding_stops_at_the_next_turn_and_never_streams_it():
    from peft import LoraConfig, get_peft_model

    from drafteu.spec_decoding import SpeculativeDecoder

    tok = plain_tokenizer()
    target = looping_model(tok, " 7.")
    drafts = get_peft_model(looping_model(tok, " 7."), LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="d0")
    drafts.add_adapter("d1", LoraConfig(r=2, target_modules=["q_proj"]))
    dec = SpeculativeDecoder.from_models(target, drafts.eval(), ["d0", "d1"], len(tok), gamma=3, compile=False)
    prompt = data.format_prompt(tok, "Tom has 3 apples and buys 4 more. How many apples?")
    streamed = []
    res = dec.generate(prompt, 30, on_tokens=lambda ids, v, b: streamed.extend(ids),
                       stops=data.TextStops(tok, data.turn_stops(tok)))
    want = tok(" 7.", add_special_tokens=False)["input_ids"]
    assert res.token_ids == want and res.finish == "eos" and streamed == want
    assert res.variance.shape == res.bias.shape == (len(want),)
