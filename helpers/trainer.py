"""Lessons 04 and 05: configure trl's SFTTrainer from a profile, and train safely (resume, disk, GPU memory).

The CPU loss lives in `helpers/cpu_loss.py`, reading the trainer's log in `helpers/training_log.py`.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import SFTConfig, SFTTrainer

from helpers.backend import cuda_available, mixed_precision
from helpers.cpu_loss import AnswerHeadSFTTrainer
from helpers.data import DataError, check_end_of_turn_trained
from helpers.profiles import Profile
from helpers.tracking import report_to

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


def sft_config(profile: Profile, output_dir: str | Path, tracking_dir: str | Path | None = None) -> SFTConfig:
    """Every SFTConfig choice comes from the profile; only hardware-dependent ones are derived here. Local trackers
    write into `tracking_dir` (`steps.tracking_dir(run)` in the lessons; None: into `output_dir`)."""
    train = profile.train
    cuda = cuda_available()
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
        neftune_noise_alpha=train.neftune_noise_alpha,  # None: off
        **mixed_precision(),
        logging_steps=train.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if train.eval_steps else "no",
        eval_steps=train.eval_steps,
        save_strategy="steps" if train.save_steps else "no",
        save_steps=train.save_steps or 500,
        save_total_limit=2,
        seed=train.seed,
        data_seed=train.seed,
        report_to=report_to(train.report_to, tracking_dir or output_dir),
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
    config: SFTConfig | None = None,
    tracking_dir: str | Path | None = None,
) -> SFTTrainer:
    """An SFTTrainer over the train/eval splits, with the end-of-turn check run on what it will train.

    `config` replaces the profile's SFTConfig (the throughput benchmark varies it).
    """
    # trl's own fused head is the better one where Triton runs (GPU): it never builds the full logits
    trainer_class = SFTTrainer if cuda_available() else AnswerHeadSFTTrainer
    trainer = trainer_class(
        model=model,
        args=config or sft_config(profile, output_dir, tracking_dir),
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


class DiskSpaceError(OSError):
    """Not enough free disk for the checkpoints a profile asks for."""


def resumable_checkpoint(output_dir: str | Path, max_steps: int) -> str | None:
    """The newest complete checkpoint of an unfinished run in `output_dir`, or None to start from step 0.

    The Trainer writes `trainer_state.json` last, so a folder without a readable one was cut off mid-save (the
    laptop slept, the kernel was killed) and the one before it is used instead.
    """
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            step = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))["global_step"]
        except (OSError, ValueError, KeyError):
            continue
        return str(folder) if step < max_steps else None
    return None


def check_disk_space(output_dir: str | Path, model: torch.nn.Module, profile: Profile) -> None:
    """Stop before training, not at the first checkpoint, when the disk cannot hold the checkpoints."""
    if not profile.train.save_steps:
        return
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    needed = 2 * 3 * trainable_bytes + 50 * 2**20  # two kept checkpoints of weights + Adam's two moments, + slack
    folder = Path(output_dir)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"Not enough disk space for checkpoints in {output_dir}: about {needed / 2**20:.0f} MiB needed, "
            f"{free / 2**20:.0f} MiB free. Free some space (old runs/ folders), point LLM_SCHOOL_RUNS at a bigger "
            "disk, or set train.save_steps: null in the profile to train without checkpoints (no resume)."
        )


def out_of_memory_advice(profile: Profile) -> str:
    """What to turn down when a GPU runs out of memory."""
    t = profile.train
    return (
        f"Out of GPU memory with profile {profile.name!r}. Lower per_device_train_batch_size "
        f"({t.per_device_train_batch_size}) and raise gradient_accumulation_steps to keep the effective batch, "
        f"shorten model.max_seq_length ({profile.model.max_seq_length}), or set train.gradient_checkpointing: true."
    )


def run_training(trainer: SFTTrainer, profile: Profile) -> str | None:
    """Train, resuming from the last complete checkpoint of an interrupted run, with a clear message when the GPU
    memory or the disk runs out. Returns the checkpoint it resumed from (None: it started at step 0)."""
    output_dir = trainer.args.output_dir
    check_disk_space(output_dir, trainer.model, profile)
    resume = resumable_checkpoint(output_dir, trainer.args.max_steps)
    try:
        trainer.train(resume_from_checkpoint=resume)
    except torch.OutOfMemoryError as err:
        raise RuntimeError(out_of_memory_advice(profile)) from err
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        raise DiskSpaceError(
            f"The disk filled up while writing a checkpoint in {output_dir}. Free some space and rerun: training "
            "resumes from the last complete checkpoint."
        ) from err
    return resume
