"""Shared fixtures: tiny random Llama models with a locally trained tokenizer (no downloads)."""

from __future__ import annotations

import os
import sys
import warnings

import pytest
import torch

# DRAFTEU_THREADS pins torch's threads, e.g. to 1 on a machine shared with another busy process; unset
# keeps torch's default (all cores), so bigger machines are not held back.  Under pytest-xdist (`make
# test` runs 2 workers, a test file per worker) each worker takes its share of the cores, and the
# commands its tests start inherit it: never more torch threads than cores (no test asserts a time).
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
if _workers > 1 and not os.environ.get("DRAFTEU_THREADS"):
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    os.environ["DRAFTEU_THREADS"] = str(max(1, _cores // _workers))
if os.environ.get("DRAFTEU_THREADS"):
    torch.set_num_threads(int(os.environ["DRAFTEU_THREADS"]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=FutureWarning)

# A deprecation that transformers, peft, trl or accelerate raise on one of drafteu's own calls fails
# the test that made it: the next release removes what it warns about (transformers 5.24 warned that
# `past_key_values` goes in 5.40 while drafteu passed it on every forward).  "drafteu's own call":
# going up from the library frame that warns, past the frames of those libraries and torch, the
# first other frame is drafteu's.  Deprecations inside a library's own calls are not ours to fix.
# A library's own use of another's deprecated API still passes "through" to a drafteu frame (PEFT
# wrapping a model); those are listed here with where they come from, and are not failures.
LIBRARIES = ("transformers", "peft", "trl", "accelerate")
PASSED_THROUGH = LIBRARIES + ("torch", "contextlib", "functools")
NOT_OURS = {
    "`is_gradient_checkpointing` is deprecated": "peft 0.21 reads it when it wraps a model (peft_model.py:184)",
}
_deprecations: list[str] = []
_real_warn = warnings.warn


def _watching_warn(message, category=None, stacklevel=1, source=None, **kwargs):
    cat = category or (type(message) if isinstance(message, Warning) else UserWarning)
    if issubclass(cat, (FutureWarning, DeprecationWarning)):
        frame = sys._getframe(1)
        emitter = frame.f_globals.get("__name__", "")
        if emitter.split(".")[0] in LIBRARIES:
            while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in PASSED_THROUGH:
                frame = frame.f_back
            caller = frame.f_globals.get("__name__", "") if frame is not None else ""
            if caller.startswith("drafteu") and not any(m in str(message) for m in NOT_OURS):
                _deprecations.append(f"{cat.__name__} from {emitter}, called at {caller}:{frame.f_lineno}: {message}")
    return _real_warn(message, category, stacklevel + 1, source, **kwargs)


warnings.warn = _watching_warn


@pytest.fixture(autouse=True)
def _no_deprecated_calls():
    _deprecations.clear()
    yield
    if _deprecations:
        pytest.fail("drafteu calls a deprecated library API:\n" + "\n".join(dict.fromkeys(_deprecations)))


@pytest.fixture(autouse=True, scope="session")
def _test_cache(tmp_path_factory):
    """Draft bases the tests train go to a temporary cache, not the user's; the converted embedded
    GGUF (slow to redo) stays shared through a link to the real cache's ``gguf`` folder."""
    from drafteu import models

    real = models.cache_dir()
    (real / "gguf").mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_factory.mktemp("drafteu-cache")
    (tmp / "gguf").symlink_to(real / "gguf", target_is_directory=True)
    old = os.environ.get("DRAFTEU_CACHE")
    os.environ["DRAFTEU_CACHE"] = str(tmp)
    yield tmp
    if old is None:
        os.environ.pop("DRAFTEU_CACHE", None)
    else:
        os.environ["DRAFTEU_CACHE"] = old


def shared_data(*parts: str):
    """A file under the project's shared/ data (``$DRAFTEU_SHARED`` or ../shared); skip if absent."""
    from pathlib import Path

    root = Path(os.environ.get("DRAFTEU_SHARED") or Path(__file__).resolve().parents[2] / "shared")
    path = root.joinpath("data", *parts)
    if not path.exists():
        pytest.skip(f"{path} not found (set DRAFTEU_SHARED to the shared/ folder)")
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have now? The answer is 7.",
    "Solve the following problem step by step. Put the final answer in \\boxed{}.",
    "Sara had 9 pencils and gave 2 to a friend, so she has 7 left. 12 + 30 = 42, 6 * 7 = 42.",
    "There are 5 bags with 8 marbles each, 40 marbles in total. #### 40",
]


def make_tokenizer(vocab_size: int = 300, corpus: list[str] = CORPUS):
    """A byte-level BPE tokenizer trained on a tiny corpus, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(vocab_size: int, layers: int = 2, seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM with tied embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )
    return _spread(LlamaForCausalLM(LlamaConfig(**{**kwargs, **overrides})))


def _spread(model):
    """Larger-than-default weights so that noise and models give clearly non-uniform outputs."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A saved tiny model directory (4 layers), loadable with drafteu.models.load."""
    path = tmp_path_factory.mktemp("tiny-target")
    model = make_model(len(tokenizer), layers=4)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tiny(tiny_dir):
    """A freshly loaded tiny target (each test may mutate it, e.g. by adding noise adapters)."""
    from drafteu import models

    return models.load(str(tiny_dir))


def tiny_answers(root, tiny_dir):
    """8 questions x 2 target answers of the tiny target under ``root/data``; their samples.jsonl."""
    from drafteu import generate

    generate.run(generate.GenerateConfig(out=root / "data", target=str(tiny_dir), questions=8, samples=2,
                                         max_new_tokens=6, batch_size=8))
    return root / "data" / "samples.jsonl"


def make_gemma3(vocab_size: int, layers: int = 4, seed: int = 0, sliding_window: int = 6, **overrides):
    """A tiny random Gemma3ForCausalLM: sliding-window layers (a small window, so tests cross it),
    q/k norms, tied embeddings, the architecture of Gemma 3 270M at toy size."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=2048,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        query_pre_attn_scalar=8, tie_word_embeddings=True, eos_token_id=2, pad_token_id=0, bos_token_id=1,
    )
    return _spread(Gemma3ForCausalLM(Gemma3TextConfig(**{**kwargs, **overrides})))
