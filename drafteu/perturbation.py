"""How strong a noise perturbation of the target is, measured (docs/method.md §2).

The same ``noise.sigma`` is a different perturbation on models whose weights differ in scale, and the
ground truth, TokUR and the OSD teachers all rest on it: a family whose members disagree on nearly
every token (MI near its ceiling ln K) measures the noise, not the model's uncertainty; one whose
members barely differ gives every EU near zero.  ``strength`` measures, on answers, a set of noise
members' mean MI (against ln K) and their KL to the raw target (``measure``: any members' hidden
states, e.g. the noise ensembles of drafts, with their KL to the draft they perturb); ``verdict``
turns the MI share into a one-line warning near either end.  Used by the perturbation stage of `drafteu reproduce`
(``eval/perturbation.json``, shown in the report) and by `drafteu noise-check`, which measures
candidate sigmas on a new model before a run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drafteu import divergence, fileio
from drafteu.errors import DraftEUError
from drafteu.hardware import DEVICE_HELP
from drafteu.posterior import NoiseConfig, NoisyModel
from drafteu.sources import Hidden, HiddenSource, reduce_chunks

# The family's mean MI as a share of its ceiling ln K: above SATURATED the members disagree on most
# tokens (the noise is no longer a small perturbation), below VANISHING they barely differ.
SATURATED, VANISHING = 0.3, 0.002


def verdict(share: float, k: int, setting: str = "noise.sigma", relative: bool = False) -> str | None:
    """A one-line warning when ``share`` (mean MI / ln k) is near either end, else None; ``setting``:
    the config key that sets this noise; ``relative``: whether its scale is already relative."""
    hint = "" if relative else " (or use noise.scale: relative)"
    if share > SATURATED:
        return (f"the members' mean MI is {share:.0%} of its ceiling ln {k}: the noise makes them disagree on "
                f"most tokens; lower {setting}{hint}, docs/method.md §2")
    if share < VANISHING:
        return (f"the members' mean MI is {share:.2%} of its ceiling ln {k}: they barely differ and every EU "
                f"is near zero; raise {setting}{hint}, docs/method.md §2")
    return None


@torch.no_grad()
def strength(noisy: NoisyModel, slots: Sequence[Sequence[str]], pairs: Sequence[tuple[list[int], list[int]]],
             prefix_len: int | str = 0, target: HiddenSource | None = None) -> dict:
    """Per-token means over the response tokens of ``pairs``, pair i scored by the noise members
    ``slots[i]`` (K each; all of ``noisy``): ``measure`` of those members against the target.
    ``target``: a raw-target source shared by several calls on the same pairs (its last batch is kept,
    so the target runs once)."""
    ks = {len(s) for s in slots}
    if len(ks) != 1 or min(ks) < 1:
        raise ValueError(f"every pair needs the same number (>= 1) of members, got {sorted(ks)}")
    members = HiddenSource(noisy.model, list(slots[0]), prefix_len=prefix_len)
    if target is None:
        target = HiddenSource(noisy.model, None, prefix_len=prefix_len, context=noisy.base)
    return measure(members.hidden(pairs, slots), target.hidden(pairs), relative=noisy.noise.relative)


@torch.no_grad()
def measure(members: Hidden, target: Hidden, centre: Hidden | None = None, setting: str = "noise.sigma",
            relative: bool = False) -> dict:
    """Per-token means over the packed positions: the K ``members``' MI and its share of ln K, the
    mean KL(member || target) and KL(members' mean || target), and with ``centre`` (the model the
    noise perturbs, when it is not the target: a draft) the mean KL(member || centre)."""
    k = members.rows

    def fn(q, t, *c):
        mix = divergence.mixture(q)  # log-probabilities: valid logits
        out = (divergence.mutual_information(q), divergence.kl(q, t).mean(0), divergence.kl(mix, t[0]))
        return out + ((divergence.kl(q, c[0]).mean(0),) if c else ())

    mi, to_target, mean_to_target, *to_centre = reduce_chunks(fn, members, target, *([centre] if centre else []))
    mean_mi = float(mi.mean())
    ceiling = math.log(k) if k > 1 else float("nan")
    share = mean_mi / ceiling if k > 1 else float("nan")
    return {"members": k, "tokens": int(mi.numel()), "mean_mi": mean_mi, "ln_k": ceiling, "share_of_ln_k": share,
            "kl_member_to_target": float(to_target.mean()), "kl_mean_to_target": float(mean_to_target.mean()),
            **({"kl_member_to_centre": float(to_centre[0].mean())} if to_centre else {}),
            "warning": verdict(share, k, setting, relative) if k > 1 else None}


@dataclass(kw_only=True)
class NoiseCheckConfig:
    """`drafteu noise-check`: how strong candidate noise settings are on a model, before a run."""

    answers: Path = field(metadata={"help": "answers to measure on: a run directory (its evaluation answers) or a "
                                    "JSONL file as for `score --answers` "
                                    "({\"question\": ..., \"answer\": ...} per line)"})
    target: str = field(default="embedded", metadata={"help": "target model: 'embedded', a hub id, a local directory "
                                                      "or a .gguf file"})
    sigmas: str = field(default="0.1", metadata={"help": "comma-separated sigmas to measure, e.g. 0.05,0.1,0.2"})
    noise: NoiseConfig = field(default_factory=NoiseConfig, metadata={"help": "the noise (its sigma is replaced by "
                                                                      "each of --sigmas)"})
    family_size: int = field(default=3,
                             metadata={"help": "K: noise members per answer (the ground truth's family size)"})
    limit: int = field(default=8, metadata={"help": "answers measured (the first ones)"})
    shots: int = field(default=2, metadata={"help": "with a JSONL file: worked examples "
                                                    "before each question, as in score"})
    seed: int = field(default=0, metadata={"help": "seed of the members"})
    dtype: str = field(default="auto", metadata={"help": "dtype of the target: auto, float32, bfloat16, float16"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    json: Path | None = field(default=None, metadata={"help": "write the measurements as JSON here"})

    def __post_init__(self):
        self.answers = Path(self.answers)
        try:
            values = [float(s) for s in str(self.sigmas).split(",") if s.strip()]
        except ValueError:
            raise DraftEUError(f"--sigmas {self.sigmas!r}: give comma-separated numbers, e.g. 0.05,0.1,0.2") from None
        if not values or any(not (v >= 0 and math.isfinite(v)) for v in values):
            raise DraftEUError(f"--sigmas {self.sigmas!r}: give one or more finite numbers >= 0")
        self.sigma_values = values
        if self.family_size < 2:
            raise DraftEUError(f"--family-size must be >= 2 for an MI, got {self.family_size}")
        if self.limit < 1:
            raise DraftEUError(f"--limit must be >= 1, got {self.limit}")
        if not self.answers.exists():
            raise DraftEUError(f"--answers {self.answers} does not exist; give a run directory or a JSONL file")


def _pairs(cfg: NoiseCheckConfig, tokenizer) -> list[tuple[list[int], list[int]]]:
    from drafteu import data, rundir
    from drafteu.answers import read_answers

    if cfg.answers.is_dir():
        rows = rundir.eval_rows(cfg.answers)[: cfg.limit]
        return [(list(r["prompt_ids"]), list(r["response_ids"])) for r in rows if r["response_ids"]]
    items = read_answers(cfg.answers, "")[: cfg.limit]
    if any(not q for q, _ in items):
        raise DraftEUError(f"{cfg.answers}: every line needs a \"question\" for noise-check")
    shots = data.shots_for("score", cfg.shots)
    return [(data.format_prompt(tokenizer, q, shots), list(tokenizer(a, add_special_tokens=False)["input_ids"]))
            for q, a in items]


def check(cfg: NoiseCheckConfig) -> list[dict]:
    """``strength`` of a fixed K-member family for each sigma of ``cfg``, on the same answers."""
    from drafteu import models
    from drafteu.kvcache import shared_prefix
    from drafteu.posterior import family_seeds

    lm = models.load(cfg.target, dtype=cfg.dtype, device=cfg.device)
    NoisyModel(lm.model, cfg.noise)  # checks the noise modules before any work
    pairs = _pairs(cfg, lm.tokenizer)
    if not pairs:
        raise DraftEUError(f"{cfg.answers} holds no non-empty answers to measure on")
    plen = shared_prefix([p for p, _ in pairs])
    noisy, out = NoisyModel(lm.model, cfg.noise), []
    target = HiddenSource(noisy.model, None, prefix_len=plen, context=noisy.base)  # the same for every sigma
    for sigma in cfg.sigma_values:
        noisy.noise = dataclasses.replace(cfg.noise, sigma=sigma)
        names = noisy.set_members("check", family_seeds(cfg.seed, cfg.family_size))  # re-drawn in place
        out.append({"sigma": sigma, "scale": noisy.noise.scale or "absolute", "rank": noisy.noise.rank,
                    "modules": list(noisy.noise.target_modules)} | strength(noisy, [names] * len(pairs), pairs, plen,
                                                                          target=target))
    if cfg.json is not None:
        fileio.write_json(cfg.json, out)
    return out
