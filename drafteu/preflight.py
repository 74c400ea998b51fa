"""Every check of an experiment config that can be made before any work (``check``): one-line
errors naming the key and the fix, raised before the run directory is touched.  Value ranges are
the config types' own (``__post_init__``, finite numbers in ``config._build``); what needs the
models - their layers and linear modules - and the sizes the stages will make are checked here."""

from __future__ import annotations

import functools
from pathlib import Path

from drafteu import draft_base_kinds, hardware
from drafteu.config import ExperimentConfig
from drafteu.errors import DraftEUError
from drafteu.methods import DRAFT_METHODS


def _groups(heldout: float) -> int:
    """Question groups a held-out split makes (``draft_base.split_heldout``)."""
    return max(2, round(1 / heldout)) if heldout > 0 else 1


def check(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Every check that can be made before any work, each naming its config key: the run directory,
    the device, DRAFTEU_DIVERGENCE, the generation backend, the cache folder, the target and the
    draft base (readable; the truncation depth within the target's), the LoRA and noise modules and
    layers against the models they apply to, and whether the configured questions are enough for
    every partition the stages will make."""
    from drafteu import divergence, models

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise DraftEUError(f"--run {run_dir} is a file; give a directory (new or an earlier run of this config)")
    hardware.resolve_device(cfg.device)
    try:
        divergence.choice()  # read by the score stage, after every training stage
    except ValueError as e:
        raise DraftEUError(str(e)) from None
    from drafteu.generate import BACKENDS

    try:
        BACKENDS[cfg.generation.backend].require(cheap=True)
    except DraftEUError as e:
        raise DraftEUError(f"generation.backend is {cfg.generation.backend}: {e}") from None
    models.writable_cache()
    try:
        depth = linear_modules(cfg.target)[1]
    except DraftEUError as e:
        raise DraftEUError(f"target: {e}") from None
    db = cfg.draft_base
    kind = draft_base_kinds.kind(db.model)
    if kind is not None:
        kind.check(db, cfg.target, depth)
    else:
        try:
            linear_modules(db.model)
        except DraftEUError as e:
            raise DraftEUError(f"draft_base.model: {e} (a sibling's hub id, local directory, GGUF file or packaged "
                               f"name, or one of {', '.join(repr(k) for k in draft_base_kinds.KINDS)})") from None
        sibling(cfg.target, db.model, "draft_base.model")
    modules(cfg)
    n = cfg.data.questions if cfg.data.questions is not None else (200 if cfg.data.task == "easy-word" else None)
    if n is None:
        return  # a dataset's size is known only once it is read
    needs = []
    if (k := draft_base_kinds.kind(cfg.draft_base.model)) is not None and k.trains and cfg.draft_base.heldout > 0:
        needs.append((_groups(cfg.draft_base.heldout), f"draft_base.heldout {cfg.draft_base.heldout:g} splits them "
                      f"into {_groups(cfg.draft_base.heldout)} groups", "lower draft_base.heldout"))
    parts = [cfg.drafts.partitions] if any(DRAFT_METHODS[m].partitions for m in cfg.drafts.methods) else []
    parts += [s for s, _ in cfg.drafts.layouts]
    if parts:
        needs.append((max(parts), f"the drafts need {max(parts)} disjoint partitions", "lower drafts.partitions"))
    if cfg.drafts.heldout:
        g = _groups(cfg.drafts.heldout)  # one of g question groups held out, the rest partitioned
        need = max(g, -(-max(parts or [1]) * g // (g - 1)))
        needs.append((need, f"drafts.heldout {cfg.drafts.heldout:g} holds out 1 of {g} question groups before the "
                      f"{max(parts or [1])} partitions", "lower drafts.heldout"))
    if cfg.proxy.heldout > 0:
        pq = n if cfg.proxy.data == "samples" or cfg.proxy.questions is None else min(n, cfg.proxy.questions)
        if pq < _groups(cfg.proxy.heldout):
            raise DraftEUError(f"the proxy trains on {pq} questions, but proxy.heldout {cfg.proxy.heldout:g} splits "
                               f"them into {_groups(cfg.proxy.heldout)} groups; raise the questions or lower "
                               "proxy.heldout (0: no held-out check)")
    for need, why, fix in needs:
        if n < need:
            raise DraftEUError(f"data.questions is {n}, but {why}: raise data.questions to >= {need} or {fix}")


PROBE = "Tom has 3 apples and buys 12 more. How many apples does he have?"


def sibling(target: str, draft: str, key: str = "the drafts' base") -> None:
    """A sibling draft model fits its target: the same vocabulary (ids of the shared tokens, enough
    output logits: ``models.shared_vocab_size``) and the same prompt, token for token, from the same
    question (chat template, special tokens; ``data.format_prompt``) - the drafts are trained and
    scored on the target's prompts, so a template that differs would put them on another input.
    Tokenizers and configs only: no weights read."""
    from drafteu import data, models

    t, d = models.load(target, tokenizer_only=True), models.load(draft, tokenizer_only=True)
    try:
        models.shared_vocab_size(t, d)
    except DraftEUError as e:
        raise DraftEUError(f"{key}: {e}") from None
    a, b = data.format_prompt(t.tokenizer, PROBE), data.format_prompt(d.tokenizer, PROBE)
    if a != b:
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        raise DraftEUError(
            f"{key}: {draft!r} formats a prompt differently from the target {target!r} (their chat templates or "
            f"special tokens differ from token {at} of {len(a)}: {t.tokenizer.decode(a[at:at + 8])!r} vs "
            f"{d.tokenizer.decode(b[at:at + 8])!r}); drafts must share the target's tokenizer and chat template")


@functools.cache
def linear_modules(spec: str) -> tuple[frozenset[str], int]:
    """The names (last part) of a model's linear modules and its layer count, from its config alone
    (the model built on the meta device: no weights read or allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from drafteu import models

    config = models.model_config(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return frozenset(names), text.num_hidden_layers


def modules(cfg: ExperimentConfig) -> None:
    """drafts.lora_modules / lora_layers, proxy.lora_modules and noise.target_modules name modules
    and layers the models they apply to have: the drafts' base (the target's modules for a kind built
    from it), the target (noise, the proxy unless ``proxy.base`` is the draft base)."""
    target, depth = linear_modules(cfg.target)
    db = cfg.draft_base
    if (kind := draft_base_kinds.kind(db.model)) is not None:
        base, base_depth = target, kind.depth(db, depth)
    else:
        base, base_depth = linear_modules(db.model)
    d = cfg.drafts
    wanted = [("noise.target_modules", list(cfg.noise.target_modules), target, "the target"),
              ("proxy.lora_modules", list(cfg.proxy.lora_modules), *((base, "the draft base (proxy.base)")
                                                                        if cfg.proxy.base == "draft_base" else
                                                                        (target, "the target")))]
    if d.lora_modules != "all-linear":
        wanted.append(("drafts.lora_modules", [m.strip() for m in d.lora_modules.split(",") if m.strip()], base,
                       "the draft base"))
    if any(DRAFT_METHODS[m].trainer in ("noise", "copies") for m in d.methods) or d.init_sigma > 0:
        wanted.append(("noise.target_modules", list(cfg.noise.target_modules), base, "the draft base"))
    for key, names, have, what in wanted:
        bad = [n for n in names if n not in have]
        if bad or not names:
            raise DraftEUError(f"{key}: {', '.join(bad) or 'none given'} is not a linear module of {what}; its linear "
                               f"modules are {', '.join(sorted(have))}")
    if d.lora_layers is not None and d.lora_layers > base_depth:
        raise DraftEUError(f"drafts.lora_layers is {d.lora_layers}, but the draft base has {base_depth} layers; choose "
                           f"1..{base_depth} (or null: every layer)")
    proxy_depth = base_depth if cfg.proxy.base == "draft_base" else depth
    if cfg.proxy.lora_layers is not None and cfg.proxy.lora_layers > proxy_depth:
        raise DraftEUError(f"proxy.lora_layers is {cfg.proxy.lora_layers}, but the "
                           f"{'draft base' if cfg.proxy.base == 'draft_base' else 'target'} has {proxy_depth} layers; "
                           f"choose 1..{proxy_depth} (or null: every layer)")
