"""Cost per method (Table 6; docs/method.md §11): parameter-equivalent FLOPs and measured wall time.

FLOPs per scored token = 2 x parameters x passes: TokUR and the ground truth K_T target passes,
draft ensembles K draft passes + 1 proxy pass (with LoRA on the top layers only, the layers below
run once for the K drafts: ``shared_params`` once, the rest K times), predictive entropy one target
pass.  Parameters
are counted once per tensor (tied embeddings once), embeddings included: for small models the
vocabulary projection is a large share of the work.
"""

from __future__ import annotations


def parameters(model) -> int:
    """Distinct base parameters of ``model``: shared tensors counted once, LoRA adapters (noise
    members, drafts, the proxy: small next to the base) left out."""
    seen, total = set(), 0
    for name, p in model.named_parameters():
        # a quantized weight (a tensor subclass) has no storage of its own: data_ptr() is 0 for all of them
        key = p.data_ptr() or id(p)
        if "lora_" in name or key in seen:
            continue
        seen.add(key)
        total += p.numel()
    return total


def trunk_parameters(model, trunk: int) -> int:
    """Parameters of the first ``trunk`` decoder layers of ``model`` (the K drafts' shared trunk)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "model", None), "layers", None)
    if not trunk or layers is None:
        return 0
    return sum(parameters(layer) for layer in layers[:trunk])


def flops_per_token(*, target_params: int, target_passes: int, draft_params: int = 0, draft_passes: int = 0,
                    shared_params: int = 0) -> float:
    """Parameter-equivalent FLOPs per scored token: 2 x parameters x passes (the passes of each
    estimator are in ``drafteu.methods.ESTIMATORS``); ``shared_params`` of the drafts run once."""
    draft = shared_params + (draft_params - shared_params) * draft_passes if draft_passes else 0
    return 2.0 * (target_params * target_passes + draft)


def relative(values: dict, reference: str) -> dict:
    """Each value divided by ``values[reference]`` (empty when the reference is missing or 0)."""
    ref = values.get(reference)
    if not ref:
        return {}
    return {k: v / ref for k, v in values.items()}
