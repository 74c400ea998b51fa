"""Where models run and in which precision: ``device: auto``, ``dtype: auto``, ``mixed_precision: auto``.

drafteu's users run it on GPUs and on every kind of CPU, so no precision is assumed fast.  bf16 is
native on CUDA devices of compute capability >= 8.0 and on CPUs with AMX or AVX512-BF16; elsewhere
(e.g. AVX2-only CPUs) torch emulates it, and training under bf16 autocast measured 15.6x slower
than float32 on such a machine (19 vs 297 tokens/s, draft-base training).  The ``auto`` values
resolve from what torch reports about the hardware:

- device ``auto``: ``cuda`` when torch sees a CUDA device, else ``cpu`` (``mps`` only when asked).
- dtype ``auto``: bfloat16 on a device with native bf16 *that is a GPU*; float32 everywhere else
  (on a CPU a float32 model also keeps the embedded GGUF's dequantized weights exactly).
- mixed precision ``auto``: bf16 autocast where bf16 is native (GPU or CPU), none elsewhere.

Configs store the value as written (``auto``), so a run directory means the same on every machine;
the resolved choice is logged and written to the stage manifests.
"""

from __future__ import annotations

import functools

import torch

from drafteu.errors import DraftEUError

DEVICE_HELP = "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The torch device for ``spec`` ('auto', 'cpu', 'cuda', 'cuda:1', 'mps'), or a clear error."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DraftEUError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DraftEUError(f"--device {spec}: this torch build sees no CUDA device "
                               f"(torch {torch.__version__}); use --device auto or cpu, or install a CUDA "
                               "build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DraftEUError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible "
                               f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DraftEUError(f"--device {spec}: MPS is not available on this machine; use auto or cpu")
    elif device.type != "cpu":
        raise DraftEUError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


@functools.cache
def _cpu_bf16() -> tuple[bool, str]:
    """(native bf16 on this CPU, what torch reports)."""
    cpu = getattr(torch, "cpu", None)
    amx = bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)())
    avx512_bf16 = bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    capability = torch.backends.cpu.get_cpu_capability()
    found = [n for n, ok in (("AMX", amx), ("AVX512-BF16", avx512_bf16)) if ok]
    return bool(found), (", ".join(found) if found else f"{capability}, no AMX / AVX512-BF16")


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively, and why (for logs and manifests)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}"
    if device.type == "cpu":
        ok, why = _cpu_bf16()
        return ok, f"CPU: {why}"
    return False, f"{device.type}: bf16 not assumed native"


def resolve_mixed_precision(value: str, device: torch.device) -> tuple[str, str]:
    """('bf16' or 'no', the reason) for a TrainConfig.mixed_precision value on ``device``."""
    native, why = native_bf16(device)
    if value == "auto":
        return ("bf16" if native else "no"), f"auto: {why}"
    if value == "bf16" and not native:
        return "bf16", f"asked for bf16, but it is emulated here ({why}); 'auto' would train in float32"
    return value, "as configured"


def resolve_dtype(value: str | None, device: torch.device) -> str:
    """The model dtype name for ``value`` on ``device``: 'auto' -> bfloat16 on GPUs with native bf16,
    float32 elsewhere; any other value is returned as given."""
    if value not in (None, "auto"):
        return value
    if device.type != "cpu" and native_bf16(device)[0]:
        return "bfloat16"
    return "float32"


def describe(device: torch.device, mixed_precision: str | None = None) -> dict:
    """What a manifest records about the hardware a stage ran on."""
    native, why = native_bf16(device)
    out = {"device": str(device), "native_bf16": native, "hardware": why, "threads": torch.get_num_threads()}
    if mixed_precision is not None:
        out["mixed_precision"] = mixed_precision
    return out


COMPILE_HELP = ("compiled decoding steps (static KV cache + torch.compile): auto (on CUDA, with CUDA graphs; off on "
                "CPUs, where it measured 1.07x at batch 1 for 8-55 s of compilation per shape), on, off")


def resolve_compile(value: str | bool | None, device: torch.device) -> bool:
    """Whether decoding steps run compiled on ``device`` for ``value`` ('auto', 'on', 'off' or a bool).

    ``auto``: on for CUDA, where a decode step is launch-bound and CUDA graphs remove the launches
    (docs/benchmarks.md); off on CPUs, where the step is compute-bound and compiling measured a few
    percent at batch 1 (bench/speculative.py --compile).  ``on`` on a CPU needs a C++ compiler
    (torch inductor's CPU backend)."""
    if isinstance(value, bool):
        on = value
    else:
        v = (value or "auto").strip().lower()
        if v not in ("auto", "on", "off", "true", "false"):
            raise DraftEUError(f"compile must be auto, on or off; got {value!r}")
        on = device.type == "cuda" if v == "auto" else v in ("on", "true")
    if on and device.type == "cpu":
        if not has_cxx_compiler():
            raise DraftEUError("compiled steps on a CPU need a C++ compiler (torch inductor); install g++ "
                               "(e.g. apt install g++) or use compile off")
    return on


def has_cxx_compiler() -> bool:
    """Whether torch inductor's CPU backend finds a C++ compiler here."""
    import shutil

    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def compile_mode(device: torch.device) -> str | None:
    """torch.compile mode for a decode step: CUDA graphs on CUDA (launch overhead is the cost there)."""
    return "reduce-overhead" if device.type == "cuda" else None


# ``scoring_kernel``: what the members of an int8 self-draft score on.  The measured shape - 512 rows
# (K = 4 members x 128 positions, a scoring pass) through a 1024 x 1024 linear layer - and the
# speed-ups that choose int8 dynamic activations (below KERNEL_GAIN x float32's time) or float weights
# (int8 weight-only above FLOAT_GAIN x float32's: its per-matmul conversion costs more than it saves).
KERNEL_ROWS, KERNEL_WIDTH, KERNEL_GAIN, FLOAT_GAIN = 512, 1024, 0.8, 1.05
SCORING_KERNELS = ("recipe", "dynamic", "float", "auto")
KERNEL_HELP = ("what an int8 weight-only self-draft's members score on: recipe (the weights they trained on), "
               "dynamic (int8 activations x int8 weights: torchao's int8 GEMM; KL ~0.01 nats/token on the embedded "
               "model), float (the same weights dequantized once to float: float GEMMs, the recipe's numbers to float "
               "rounding, 4x the weights' memory) or auto (dynamic where a short measurement finds it faster than "
               "float32 on this machine, else float where the int8 weights' per-matmul conversion is slower than float "
               "weights, else the recipe); training always uses the recipe")


def _linear_speed(scheme: str) -> float | None:
    """Median time of a 512-row linear with torchao's int8 ``scheme`` over a float32 one on this CPU."""
    import copy
    import statistics
    import time

    try:
        import torchao.quantization as tq
    except ImportError:
        return None
    g = torch.Generator().manual_seed(0)
    dense = torch.nn.Linear(KERNEL_WIDTH, KERNEL_WIDTH, bias=False)
    x = torch.randn(KERNEL_ROWS, KERNEL_WIDTH, generator=g)
    quant = copy.deepcopy(dense)
    config = tq.Int8DynamicActivationInt8WeightConfig() if scheme == "dynamic" else tq.Int8WeightOnlyConfig()
    try:
        tq.quantize_(quant, config)
    except Exception:  # noqa: BLE001 - any failure means: not this machine's kernel
        return None
    times: dict[str, list[float]] = {"float": [], "int8": []}
    with torch.no_grad():
        for m in (dense, quant):
            m(x)  # warm-up
        for r in range(7):
            for name, m in (("float", dense), ("int8", quant)) if r % 2 == 0 else (("int8", quant), ("float", dense)):
                t0 = time.perf_counter()
                m(x)
                times[name].append(time.perf_counter() - t0)
    return statistics.median(times["int8"]) / statistics.median(times["float"])


@functools.cache
def int8_dynamic_speed(device_type: str) -> float | None:
    """An int8-dynamic linear's time over float32's on this machine's CPU (< 1: faster; None off the
    CPU or without torchao).  Measured once per process, ~0.5 s."""
    return _linear_speed("dynamic") if device_type == "cpu" else None


@functools.cache
def int8_weight_only_speed(device_type: str) -> float | None:
    """An int8 weight-only linear's time over float32's on this machine's CPU (> 1: the per-matmul
    conversion of its weights costs; None off the CPU or without torchao).  Measured once per process."""
    return _linear_speed("weight-only") if device_type == "cpu" else None


def scoring_kernel(value: str, device: torch.device) -> tuple[str, str]:
    """(``recipe`` | ``dynamic`` | ``float``, why) for ``value`` in ``SCORING_KERNELS`` on ``device``."""
    if value not in SCORING_KERNELS:
        raise DraftEUError(f"unknown scoring kernel {value!r}; choose one of {', '.join(SCORING_KERNELS)}")
    if value != "auto":
        return value, "as asked"
    dynamic = int8_dynamic_speed(device.type)
    if dynamic is None:
        return "recipe", f"auto: no int8 dynamic kernel measured on {device.type}"
    said = f"auto: an int8 dynamic linear took {dynamic:.2f}x float32's time at {KERNEL_ROWS} rows here"
    if dynamic < KERNEL_GAIN:
        return "dynamic", said
    weight_only = int8_weight_only_speed(device.type)
    if weight_only is not None and weight_only > FLOAT_GAIN:
        return "float", f"{said}, int8 weight-only {weight_only:.2f}x"
    return "recipe", said + (f", int8 weight-only {weight_only:.2f}x" if weight_only is not None else "")


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def give_back_memory(collect: bool = False) -> None:
    """Hand freed heap pages back to the system (glibc keeps a large step's buffers otherwise: a long
    process's resident memory would stay at its largest step's, and grow with fragmentation); with
    ``collect``, first free what reference cycles hold (Python's collector counts objects, not bytes)."""
    if collect:
        import gc

        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

