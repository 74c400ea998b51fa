"""Every numeric value of the experiment config checked before any work: NaN / inf refused, 0 and
-1 refused wherever they mean nothing, each with a one-line error naming the key."""

from __future__ import annotations

import yaml


def _numeric_fields(cls, prefix: str = ""):
    """(dotted key, int or float) of every numeric field of the experiment config, sections included."""
    import dataclasses
    import types
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        base = args[0] if typing.get_origin(t) in (typing.Union, types.UnionType) and args else t
        if dataclasses.is_dataclass(base):
            yield from _numeric_fields(base, f"{prefix}{f.name}.")
        elif base in (int, float):
            yield f"{prefix}{f.name}", base


# 0 and -1 are meaningful here (everything else numeric is a count, a size, a rate or a scale > 0)
ZERO_OK = {"seed", "noise.sigma", "data.temperature", "data.shots", "draft_base.heldout", "draft_base.data.temperature",
           "draft_base.data.shots", "draft_base.train.warmup_steps", "draft_base.train.weight_decay",
           "drafts.train.warmup_steps", "drafts.train.weight_decay", "drafts.init_sigma", "drafts.sigma",
           "proxy.train.warmup_steps", "proxy.train.weight_decay", "proxy.warmup_ratio", "proxy.heldout",
           "eval.temperature", "eval.heatmap_examples", "drafts.lora_dropout", "proxy.lora_dropout"}
NEGATIVE_OK = {"seed"}


def test_every_numeric_config_value_is_checked(tmp_path):
    """Each numeric field of the experiment config, set to NaN, inf, 0 and -1 (a float field to all four,
    an int field to the last two): NaN and inf are always refused, 0 and -1 are refused wherever they
    mean nothing - each a one-line DraftEUError naming the key, before anything is read or written."""
    from drafteu.config import ExperimentConfig, load_experiment
    from drafteu.errors import DraftEUError

    cfg = tmp_path / "c.yaml"
    # every optional section present, so that its fields are checked too
    cfg.write_text(yaml.safe_dump({"draft_base": {"data": {"task": "easy-word"}}, "drafts": {"lora_layers": 2,
                                  "heldout": 0.2, "baseline_steps": 2, "train": {"max_steps": 2, "eval_every": 1}},
                                   "proxy": {"questions": 4, "train": {"eval_every": 1}}, "eval": {"questions": 4}}))
    load_experiment(cfg)
    fields = list(_numeric_fields(ExperimentConfig))
    assert len(fields) > 80
    wrong = []
    for key, typ in fields:
        leaf = key.rsplit(".", 1)[-1]
        for value in (["nan", "inf", "-inf"] if typ is float else []) + ["0", "-1"]:
            try:
                load_experiment(cfg, {key: value})
            except DraftEUError as e:
                message = str(e)
                if "\n" in message or leaf not in message or "." in key and key.rsplit(".", 1)[0] not in message:
                    wrong.append(f"{key} = {value}: {message}")
                continue
            if not (value == "0" and key in ZERO_OK or value == "-1" and key in NEGATIVE_OK):
                wrong.append(f"{key} = {value} is accepted")
    assert not wrong, "\n".join(wrong)
