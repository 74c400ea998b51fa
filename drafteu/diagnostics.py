"""When a draft-ensemble EU is not epistemic (docs/method.md §15): the bias term's share of the
estimate, the draft base's measured KL to the target, and the proxy's held-out fit to the family mean,
each with a plain warning.  Used by `score`, `speculate` and the report."""

from __future__ import annotations

import json
from pathlib import Path

import torch

# When the drafts are too far from the target for their EU to be epistemic (docs/method.md §15): the
# bias term is over this share of the estimate (a truncated 6-layer base: 0.99+; the int8
# self-draft's DDD: 0.89), or the draft base's measured KL to the target is over this many nats per
# token (the truncated base: 2.6; int8: 0.003).
BIAS_WARN_SHARE = 0.95
BASE_KL_WARN = 0.5
# The proxy p_mix has not learned the family mean when, on held-out answers, its KL from the mean of a
# reference family is over this fraction of the raw target's (it closed less than half the gap): the
# bias term then measures the proxy's misfit (docs/method.md §15).
PROXY_FIT_WARN = 0.5


def proxy_manifest(proxy_dir: Path | None) -> dict | None:
    """The manifest a drafteu-trained proxy has next to or above its adapter directory (None: none)."""
    if proxy_dir is None:
        return None
    for path in (Path(proxy_dir) / "manifest.json", Path(proxy_dir).parent / "manifest.json"):
        try:
            man = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(man, dict):
            return man
    return None


def proxy_fit(proxy_dir: Path | None) -> dict | None:
    """The held-out fit a drafteu-trained proxy records (its manifest next to or above the adapter):
    KL(reference family mean || p_mix) and || raw target per token, and whether OSD reached its
    held-out plateau (None: not checked).  None when nothing was held out or there is no manifest."""
    man = proxy_manifest(proxy_dir)
    held = (man or {}).get("heldout") or {}
    if "kl_ref_mean_to_proxy" not in held:
        return None
    train = man.get("train") or {}
    return {"kl_to_family_mean": held["kl_ref_mean_to_proxy"], "raw_target_kl": held["kl_ref_mean_to_target"],
            "plateau": train.get("plateau") if train.get("eval_every") else None}


def proxy_fit_warning(fit: dict | None) -> str | None:
    """A plain warning when the proxy closed less than PROXY_FIT_WARN of the raw target's gap to the
    family mean on held-out answers, or trained without reaching its plateau."""
    if not fit:
        return None
    why = []
    if fit["raw_target_kl"] > 0 and fit["kl_to_family_mean"] > PROXY_FIT_WARN * fit["raw_target_kl"]:
        why.append(f"the proxy is {fit['kl_to_family_mean']:.3f} nats/token from the family mean on held-out answers "
                   f"(the raw target: {fit['raw_target_kl']:.3f})")
    if fit.get("plateau") is False:
        why.append("its training ended before the held-out KL stopped improving")
    if not why:
        return None
    return (f"{' and '.join(why)}: the bias term then measures the proxy's misfit; train it longer (proxy.train) "
            "or lower the noise (noise.sigma, docs/method.md §2, §15)")


def bias_diagnostic(variance: torch.Tensor, bias: torch.Tensor, base_kl: float | None = None,
                    fit: dict | None = None) -> dict:
    """How much of a draft-ensemble estimate is its bias term KL(q_mix || p), the draft base's
    measured KL to the target (a drafteu-built base records it), the proxy's held-out fit
    (``proxy_fit``), and a plain warning when they say the drafts are too far from the target or the
    proxy from the family mean (docs/method.md §15)."""
    total = float(variance.sum() + bias.sum())
    share = float(bias.sum()) / total if total > 0 else 0.0
    why = []
    if share > BIAS_WARN_SHARE:
        why.append(f"the bias term is {share:.0%} of this EU")
    if base_kl is not None and base_kl > BASE_KL_WARN:
        why.append(f"the draft base's KL to the target is {base_kl:.2f} nats/token")
    warnings = []
    if why:
        warnings.append(f"{' and '.join(why)}: these drafts are too far from the target for their EU to be epistemic "
                        "(docs/method.md §15); a closer draft base - the target "
                        "quantized (draft_base.model: quantize) or a sibling - fixes it")
    if proxy_fit_warning(fit):
        warnings.append(proxy_fit_warning(fit))
    return {"bias_share": share, "base_kl_to_target": base_kl, "proxy_fit": fit, "warn_share_above": BIAS_WARN_SHARE,
            "warn_base_kl_above": BASE_KL_WARN, "warning": "; ".join(warnings) or None}


def draft_fit(ensemble_dir: Path) -> dict | None:
    """How an ensemble's drafts ended on their held-out questions (``drafts.heldout``): the mean over
    drafts of the first, best and last held-out SFT loss, and how many stopped on their plateau.  None when
    the drafts measured nothing held out."""
    try:
        man = json.loads((Path(ensemble_dir) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    curves = {n: t for n, t in (man.get("train") or {}).items() if t.get("heldout_curve")}
    if not curves:
        return None
    def mean(pick) -> float:
        values = [pick([v for _, v in t["heldout_curve"]]) for t in curves.values()]
        return sum(values) / len(values)

    return {"count": len(curves), "questions": man.get("heldout_questions"), "first": mean(lambda c: c[0]),
            "best": mean(min), "last": mean(lambda c: c[-1]),
            "plateau": sum(bool(t.get("plateau")) for t in curves.values()),
            "steps": [t["steps"] for t in curves.values()]}
