"""LoRA adapters as drafteu uses them: configs from plain values, standalone saving, and the one
place that chooses how K adapters on one base run together (fused batched matmuls or PEFT).

Every draft, noise member and proxy is a PEFT LoRA adapter on a shared base, so an ensemble is
one base plus K adapter directories.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from drafteu import fileio
from drafteu.errors import DraftEUError


def check_lora(r: int, alpha: float, dropout: float) -> None:
    """LoRA rank, alpha and dropout that PEFT can use, or a DraftEUError naming the bad one."""
    if r < 1:
        raise DraftEUError(f"lora_r must be >= 1 (the adapter's rank), got {r}")
    if not alpha > 0:
        raise DraftEUError(f"lora_alpha must be > 0 (the adapter's scale is alpha / r), got {alpha}")
    if not 0 <= dropout < 1:
        raise DraftEUError(f"lora_dropout must be in [0, 1), got {dropout}")


def lora_config(r: int, alpha: int, dropout: float, modules: str | list[str] | tuple[str, ...],
                layers: list[int] | None = None, model=None):
    """A PEFT ``LoraConfig`` for a causal LM; ``modules`` is 'all-linear', a comma-separated
    string or a list of module names; ``layers`` the decoder layers that get LoRA (None: all; with
    'all-linear', ``model`` names its linear layers, which PEFT needs spelled out then)."""
    import torch
    from peft import LoraConfig

    if isinstance(modules, str):
        modules = "all-linear" if modules == "all-linear" else [m.strip() for m in modules.split(",") if m.strip()]
    if modules == "all-linear" and layers is not None:
        modules = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear) and ".layers." in n})
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules if isinstance(modules, str)
                      else list(modules), bias="none", task_type="CAUSAL_LM", layers_to_transform=layers,
                      layers_pattern="layers" if layers is not None else None)


def top_layers(model, count: int | None, key: str = "drafts.lora_layers") -> list[int] | None:
    """The indices of ``model``'s last ``count`` decoder layers (None: every layer)."""
    if count is None:
        return None
    total = model.config.num_hidden_layers
    if not 1 <= count <= total:
        raise DraftEUError(f"{key} is {count}, but the model it applies to has {total} layers; choose 1..{total} "
                           "(or null: every layer)")
    return list(range(total - count, total))


def save_adapter(peft_model, name: str, directory: Path) -> None:
    """Save adapter ``name`` of ``peft_model`` as a standalone PEFT adapter directory (atomically;
    under ``accelerate launch`` the main process saves)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if not fileio.is_main_process():
        return
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / "adapter_model.safetensors")
    peft_model.peft_config[name].save_pretrained(tmp)
    shutil.rmtree(directory, ignore_errors=True)
    tmp.rename(directory)


def k_adapter_model(peft_model, names: list[str], fused: bool = True):
    """What runs ``names`` (adapter-major rows, PEFT's ``"__base__"`` allowed) in one forward - the one
    place that chooses: ``FusedDrafts`` (two batched LoRA matmuls per module) when ``fused`` and the
    adapters allow it (plain LoRA; ranks and modules may differ), else the PEFT model's mixed-adapter batch.  Both give
    the same numbers (tested); called like the PEFT model with ``adapter_names``."""
    from drafteu.fused import FusedDrafts

    if not fused:
        return peft_model
    try:
        return FusedDrafts(peft_model, names)
    except DraftEUError:
        return peft_model
