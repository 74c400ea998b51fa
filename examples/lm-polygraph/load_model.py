"""The model loader `polygraph_eval` calls (``model.path_to_load_script`` in drafteu.yaml): the
target through drafteu's loader, so ``model.path`` may be 'embedded', a hub id, a local directory
or a .gguf file, exactly as for ``drafteu score --target``."""

from __future__ import annotations

import copy

from drafteu import models


def load_model(model_path: str, device: str = "auto", dtype: str = "auto"):
    return models.load(model_path, device=device, dtype=dtype).model


def load_tokenizer(model_path: str):
    tokenizer = copy.deepcopy(models.load(model_path, tokenizer_only=True).tokenizer)  # drafteu's is shared
    tokenizer.padding_side = "left"  # batched generation pads on the left
    return tokenizer
