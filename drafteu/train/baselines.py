"""GKD and MiniLLM draft baselines through TRL (paper App. B.3, B.4, Tables 9 and 10).

Each baseline's registry entry (``methods.DRAFT_METHODS``) names its recipe here (``gkd_recipe``,
``minillm_recipe``: trainer class, dataset, arguments); the training around it is shared.

Both are on-policy: the student samples its own continuations and is pulled towards the
target (GKD: generalized JSD with beta, lambda; MiniLLM: reverse-KL policy gradient).  As
docs/method.md §7 asks, each draft starts from its own noise (sigma 0.1, ``posterior.apply_init_noise``)
so that a baseline ensemble has K distinct members too.

TRL pin: ``trl>=1.14,<1.15``.  GKD lives in ``trl.experimental.gkd`` in every 1.x release, but
MiniLLM was removed from TRL in 1.15; 1.14.x is the newest release that has both, and it runs
with transformers 5.x and peft 0.21.  Imported lazily: ``pip install 'drafteu[baselines]'``.

Precision: TRL's configs would default to bf16 and gradient checkpointing; both are set here
explicitly - bf16 exactly when the drafts config's ``mixed_precision`` resolves to it on the
training device (``loop.resolve_precision``: ``auto`` = native bf16 only), no checkpointing - and
the trainer runs inside ``loop.fresh_accelerate_state``, so its accelerate settings end with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

from drafteu import adapters, data, models
from drafteu.errors import DraftEUError
from drafteu.methods import DRAFT_METHODS, component
from drafteu.posterior import apply_init_noise
from drafteu.train import loop


def require_trl() -> SimpleNamespace:
    """TRL's GKD and MiniLLM classes (as attributes), or a DraftEUError naming the extra to install."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # the pin above is the deliberate choice
    try:
        import trl  # noqa: F401
        from trl.experimental.gkd import GKDConfig, GKDTrainer
        from trl.experimental.minillm import MiniLLMConfig, MiniLLMTrainer
    except ImportError as e:
        raise DraftEUError(
            "the GKD and MiniLLM baselines need TRL 1.14.x: pip install 'drafteu[baselines]' "
            f"({e})"
        ) from e
    return SimpleNamespace(GKDConfig=GKDConfig, GKDTrainer=GKDTrainer, MiniLLMConfig=MiniLLMConfig,
                           MiniLLMTrainer=MiniLLMTrainer)


def _shots(samples: Path) -> tuple:
    """The k-shot examples the samples were generated with (from their config.yaml)."""
    cfg = Path(samples).parent / "config.yaml"
    k = yaml.safe_load(cfg.read_text()).get("shots", 0) if cfg.exists() else 0
    return data.SHOTS[:k]


def _checkpointing_arg() -> str:
    """transformers renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name
    is removed in v6); TRL's configs default it to True, so it is set by whichever name exists."""
    import dataclasses

    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def _common_args(cfg, directory: Path, seed: int, precision: str, device: torch.device) -> dict:
    t = cfg.train
    return dict(
        output_dir=str(directory), learning_rate=t.lr, num_train_epochs=t.epochs,
        max_steps=t.max_steps or -1, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, weight_decay=t.weight_decay,
        bf16=precision == "bf16", fp16=False,
        **{_checkpointing_arg(): False}, save_steps=t.save_every, save_total_limit=1, logging_steps=1,
        report_to=[], seed=seed % (2**31), use_cpu=device.type == "cpu", disable_tqdm=False,
    )


def train(kind: str, cfg, rows: list[dict], name: str, seed: int, directory: Path, tokenizer) -> dict:
    """Train one GKD or MiniLLM draft (LoRA on the draft base); save its adapter to ``directory``."""
    require_trl()
    shots = _shots(cfg.samples)
    teacher = models.load(cfg.target, device=cfg.device).model
    student = models.load(cfg.base, device=cfg.device).model
    device = next(student.parameters()).device
    precision = loop.resolve_precision(cfg.train, device, f"{kind} {name}")
    with loop.fresh_accelerate_state():
        stats = _train(kind, cfg, rows, name, seed, directory, tokenizer, teacher, student, shots,
                       _common_args(cfg, directory.with_name(directory.name + ".trainer"), seed, precision, device))
    return stats | {"mixed_precision": precision}


def scheduled(trainer_cls, train: loop.TrainConfig):
    """``trainer_cls`` whose learning rate follows the own loop's schedule for ``train``
    (``loop.lr_factor``: warm-up capped at 10% of the steps, then linear or cosine decay), so a
    baseline's ``train.scheduler`` and ``warmup_steps`` mean what they mean for every other draft."""

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer,
                                                                  loop.lr_factor(train, num_training_steps))
        return self.lr_scheduler

    return type(trainer_cls.__name__, (trainer_cls,), {"create_scheduler": create_scheduler})


def gkd_recipe(trl, cfg, rows, shots, common):
    """GKD (on-policy generalized JSD, lambda = beta = 0.5): its trainer class, dataset and arguments."""
    from datasets import Dataset

    ds = Dataset.from_list([
        {"messages": data.chat_messages(r["question"], shots) + [{"role": "assistant", "content": r["response"]}]}
        for r in rows
    ])
    args = trl.GKDConfig(**common, temperature=1.0, lmbda=0.5, beta=0.5,
                         max_new_tokens=cfg.max_new_tokens, max_length=None, disable_dropout=False)
    return trl.GKDTrainer, ds, args


def minillm_recipe(trl, cfg, rows, shots, common):
    """MiniLLM (reverse-KL policy gradient over 4 generations per question): its trainer, dataset, arguments."""
    from datasets import Dataset

    questions = list(dict.fromkeys(r["question"] for r in rows))
    ds = Dataset.from_list([{"prompt": data.chat_messages(q, shots)} for q in questions])
    args = trl.MiniLLMConfig(**common, temperature=1.0, top_p=1.0,
                             num_generations=4, max_completion_length=cfg.max_new_tokens,
                             single_step_decomposition=True, disable_dropout=False)
    return trl.MiniLLMTrainer, ds, args


def _train(kind, cfg, rows, name, seed, directory, tokenizer, teacher, student, shots, common) -> dict:
    from peft import PeftModel

    method = DRAFT_METHODS.get(kind)
    if method is None or not method.recipe:
        raise DraftEUError(f"unknown baseline {kind!r}")
    trl = require_trl()
    trainer_dir = Path(common["output_dir"])
    torch.manual_seed(seed)
    trainer_cls, ds, args = component(method.recipe)(trl, cfg, rows, shots, common)
    trainer = scheduled(trainer_cls, cfg.train)(
        model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tokenizer,
        peft_config=adapters.lora_config(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_modules,
                                         adapters.top_layers(student, cfg.lora_layers), student))
    model = trainer.model
    if not isinstance(model, PeftModel):
        raise DraftEUError(f"TRL did not wrap the {kind} student in a PEFT model; check the peft install")
    adapter = model.active_adapter if isinstance(model.active_adapter, str) else model.active_adapters[0]
    apply_init_noise(model, adapter, cfg.noise, seed)
    resume = any(trainer_dir.glob("checkpoint-*"))
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    adapters.save_adapter(model, adapter, directory)
    return {"steps": int(result.global_step), "loss": float(result.training_loss),
            "seconds": round(result.metrics.get("train_runtime", 0.0), 2),
            # the learning rate logged after each optimizer step (the next step's)
            "learning_rates": [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]}
