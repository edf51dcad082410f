"""Lessons 04 and 05: configure trl's SFTTrainer from a profile, train, and keep the figures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from helpers.data import DataError, check_end_of_turn_trained
from helpers.profiles import Profile

# The SFTConfig fields a learner should look at, in the order notebook 04 shows them.
KEY_FIELDS = (
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "optim",
    "weight_decay",
    "max_length",
    "packing",
    "completion_only_loss",
    "gradient_checkpointing",
    "bf16",
    "fp16",
    "eval_strategy",
    "eval_steps",
    "save_strategy",
    "save_steps",
    "seed",
)


def sft_config(profile: Profile, output_dir: str | Path) -> SFTConfig:
    """Every SFTConfig choice comes from the profile; only hardware-dependent ones are derived here."""
    train = profile.train
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    return SFTConfig(
        output_dir=str(output_dir),
        max_steps=train.max_steps,
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        optim=train.optim,
        max_length=profile.model.max_seq_length,
        packing=False,
        completion_only_loss=True,  # loss on the answer only (prompt-completion rows)
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=bf16,  # trl defaults bf16 to True; on CPU it would silently change the numbers
        fp16=cuda and not bf16,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=2,
        seed=train.seed,
        data_seed=train.seed,
        report_to="none",
        dataset_num_proc=None,
        dataloader_pin_memory=cuda,  # pinning only helps copies to a GPU
    )


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: DatasetDict,
    profile: Profile,
    output_dir: str | Path,
    callbacks: list[TrainerCallback] | None = None,
) -> SFTTrainer:
    """An SFTTrainer over the train/eval splits, with the end-of-turn check run on what it will train."""
    trainer = SFTTrainer(
        model=model,
        args=sft_config(profile, output_dir),
        train_dataset=splits["train"],
        eval_dataset=splits["eval"],
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    eot_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for name, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if "labels" not in dataset.column_names:
            raise DataError(f"The trainer's {name} dataset has no labels column; cannot verify masking.")
        for index, labels in enumerate(dataset["labels"]):
            check_end_of_turn_trained(labels, eot_id, f"{name} example {index}")
    return trainer


def key_settings(config: SFTConfig) -> dict[str, Any]:
    """The SFTConfig fields worth reading, as plain values."""
    return {name: getattr(config, name) for name in KEY_FIELDS}


def train_figures(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Real (non-padding) tokens trained on, training seconds (evaluations excluded) and tokens/s."""
    seconds, eval_seconds, tokens = float("nan"), 0.0, 0
    for entry in log_history:
        tokens = max(tokens, int(entry.get("num_tokens", 0)))
        if "train_runtime" in entry:
            seconds = entry["train_runtime"]
            break
        eval_seconds += entry.get("eval_runtime", 0.0)
    seconds -= eval_seconds
    return {"train_tokens": tokens, "train_seconds": round(seconds, 1), "tokens_per_second": round(tokens / seconds, 1)}


def perplexity(loss: float) -> float:
    """exp(loss), the 'how many tokens was it choosing between' reading of a loss."""
    return math.exp(loss) if loss < 50 else float("inf")


def loss_history(
    log_history: list[dict[str, Any]], eval_before: float | None = None
) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) pairs for training and evaluation from `trainer.state.log_history`.

    `eval_before`, the eval loss measured before `train()` (which resets the log), becomes step 0.
    """
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = sorted({e["step"]: e["eval_loss"] for e in log_history if "eval_loss" in e}.items())
    if eval_before is not None:
        evals.insert(0, (0, eval_before))
    return {"train": train, "eval": evals}


def out_of_memory_advice(profile: Profile) -> str:
    """What to turn down when a GPU runs out of memory."""
    t = profile.train
    return (
        f"Out of GPU memory with profile {profile.name!r}. Lower per_device_train_batch_size "
        f"({t.per_device_train_batch_size}) and raise gradient_accumulation_steps to keep the effective batch, "
        f"shorten model.max_seq_length ({profile.model.max_seq_length}), or set train.gradient_checkpointing: true."
    )
