"""Loading draft ensembles: a drafts directory's manifest and adapters, the draft base they sit on
(loaded once per process and shared by every ensemble on it: ``DraftBases``), and where a proxy's
adapter belongs (on the target, or on the draft base as row K of the drafts' pass).  Used by
``estimators.DraftEnsemble``; every error names the damaged file and the fix."""

from __future__ import annotations

import json
from pathlib import Path

from drafteu.contract import base_identity
from drafteu.diagnostics import proxy_manifest
from drafteu.errors import DraftEUError


def rebuild(what: str = "it") -> str:
    """The fix for a damaged stage output."""
    return f"delete {what} and re-run (reproduce rebuilds only what is missing; nothing else is lost)"


def read_drafts_manifest(drafts_dir: Path) -> dict:
    """A drafts directory's manifest.json, or a DraftEUError saying what is wrong and how to fix it."""
    path = Path(drafts_dir) / "manifest.json"
    if not path.exists():
        raise DraftEUError(f"{drafts_dir} has no manifest.json: not a drafts directory (drafteu train-drafts "
                           "writes one), or its training did not finish; re-run it")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        manifest["adapters"], manifest["base"]  # noqa: B018 - the fields every ensemble needs
    except (ValueError, KeyError, TypeError):
        raise DraftEUError(f"{path} is damaged (not a complete drafts manifest); {rebuild(str(path))}") from None
    return manifest


def load_adapter(model, directory: Path, name: str):
    """``model`` with the PEFT adapter in ``directory`` added as ``name`` (a PeftModel), or a
    DraftEUError naming the missing or damaged file."""
    from peft import PeftModel
    from safetensors import SafetensorError

    for f in ("adapter_config.json", "adapter_model.safetensors"):
        if not (directory / f).is_file():
            raise DraftEUError(f"{directory / f} is missing; {rebuild(str(directory))}")
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(directory, adapter_name=name)
            return model
        return PeftModel.from_pretrained(model, directory, adapter_name=name)
    except (SafetensorError, ValueError, OSError, KeyError, RuntimeError) as e:
        raise DraftEUError(f"adapter {directory} is damaged ({str(e).splitlines()[0][:120]}); "
                           f"{rebuild(str(directory))}") from None


def manifest_base(manifest: dict, drafts_dir: Path) -> str:
    """The draft base of a drafts manifest: a path relative to the ensemble directory (so whole runs
    can be copied and moved), else - for an ensemble copied on its own - the absolute path it was
    made with; or a hub id / 'embedded'.  Older manifests hold absolute paths."""
    base = manifest["base"]
    if not manifest.get("base_is_path"):
        return base
    relative = (Path(drafts_dir) / base).resolve()
    absolute = manifest.get("base_absolute")
    if not relative.exists() and absolute and Path(absolute).exists():
        return absolute  # the ensemble was copied without its run; the base is where it was made
    return str(relative)


class DraftBases:
    """Draft bases loaded once per (base, dtype, device): every ensemble on one base adds its adapters
    to the same model under names of its own (``e<i>_<adapter>``), so a process scoring several
    ensembles (the scoring stage: untrained, DDD, K-only, ...) holds one copy of the base weights."""

    def __init__(self):
        self._models: dict[tuple, list] = {}  # key -> [model (plain, then the PeftModel), LoadedModel]
        self._count = 0

    def get(self, spec: str, dtype: str, device, kernel: str = "recipe"):
        """(the base's current model, its LoadedModel, a fresh adapter-name prefix); ``kernel``: what a
        quantized self-draft scores on (``models.load``)."""
        from drafteu import models

        key = (spec, dtype, str(device), kernel)
        if key not in self._models:
            lm = models.load(spec, dtype=dtype, device=device, kernel=kernel)
            self._models[key] = [lm.model, lm]
        self._count += 1
        model, lm = self._models[key]
        return model, lm, f"e{self._count}_"

    def put(self, spec: str, dtype: str, device, model, kernel: str = "recipe") -> None:
        """The base's model after adapters were added (PEFT wraps it on the first)."""
        self._models[(spec, dtype, str(device), kernel)][0] = model


def proxy_on_draft_base(proxy_dir: Path | None) -> dict | None:
    """The manifest of a proxy trained on a draft base (``proxy.base: draft_base``: p_mix is row K of
    the drafts' pass), else None (a proxy on the target, or none)."""
    manifest = proxy_manifest(proxy_dir)
    return manifest if (manifest or {}).get("base") == "draft_base" else None


def check_proxy_base(manifest: dict, base_spec: str, proxy_dir) -> None:
    """A proxy on a draft base runs in the drafts' pass only on the base it was trained on."""
    want, got = manifest.get("draft_base_identity"), base_identity(base_spec, resolve=True)
    if want != got:
        raise DraftEUError(f"the proxy {proxy_dir} was trained on another draft base ({manifest.get('draft_base')}) "
                           f"than these drafts' ({base_spec}); retrain it on this one (drafteu train-proxy --base "
                           f"draft_base --draft-base {base_spec}) or pass a proxy trained on the target")
