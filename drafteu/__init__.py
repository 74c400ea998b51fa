"""drafteu: token-level epistemic uncertainty of an LLM from a small ensemble of draft models."""

import logging

__version__ = "0.1.0"

# Lines other packages log while importing, about parts drafteu never uses, silenced by logger and
# message (nothing else from those loggers): torchao's CUDA-only extensions and Triton kernels on a
# CPU build, and torch's note that torchao still registers its enums as pytree constants.
KNOWN_NOISE = {
    "torchao": ("Failed to load ", "_C"),
    "torchao.kernel.intmm": ("Detected no triton",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


class _KnownNoise(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not all(p in message for p in self.parts)


for _name, _parts in KNOWN_NOISE.items():
    logging.getLogger(_name).addFilter(_KnownNoise(_parts))
