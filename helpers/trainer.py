"""Lessons 04 and 05: configure trl's SFTTrainer from a profile, and train safely (resume, disk, GPU memory).

The CPU loss lives in `helpers/cpu_loss.py`, reading the trainer's log in `helpers/training_log.py`.
"""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import torch
from datasets import DatasetDict
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from transformers.integrations import TrackioCallback
from transformers.utils.notebook import NotebookProgressCallback
from trl import SFTConfig, SFTTrainer

from helpers.backend import cuda_available, mixed_precision
from helpers.cpu_loss import AnswerHeadSFTTrainer
from helpers.data import DataError, check_end_of_turn_trained
from helpers.profiles import Profile
from helpers.tracking import LocalTrackioCallback, report_to, tracking_names
from helpers.training_log import TidyProgressCallback

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

# What each setting does and its usual range: notebook 04 prints these beside the run's values, with the profile's
# own reason (`train.why`) where it has one. The two derived rows are worked out from the run.
EFFECTIVE_BATCH, PASSES = "effective batch", "passes over the training rows"
GUIDE = {
    "max_steps": "how long to train: optimizer updates (see the passes over the training rows below)",
    "per_device_train_batch_size": "1-8 rows per step on a CPU or a 24 GB GPU; bigger is faster per token until "
    "memory runs out",
    "gradient_accumulation_steps": "1-16: steps summed into one update, a bigger batch at no memory cost",
    EFFECTIVE_BATCH: "batch x accumulation: rows behind each update; bigger gives smoother steps",
    PASSES: "1-3 is usual for LoRA; more passes learn the training rows by heart (over-fitting)",
    "learning_rate": "1e-4 to 1e-3 for LoRA, far higher than full fine-tuning's ~2e-5: only the small adapters move",
    "lr_scheduler_type": "linear or cosine: the rate decays after the warm-up, so late updates are gentle",
    "warmup_steps": "a few steps (up to ~10% of max_steps) of rising rate keep the first updates gentle",
    "optim": "adamw_torch on a CPU; adamw_8bit on a GPU saves optimizer memory",
    "weight_decay": "0-0.1: pulls weights towards zero; matters little in a short LoRA run",
    "max_length": "at least the longest example in tokens; memory grows with it",
    "packing": "off here: each row is one example, so the eval loss is per answer",
    "completion_only_loss": "on: the loss falls on the answer only (prompt-completion rows)",
    "gradient_checkpointing": "on: less activation memory, slower steps; off for a small model",
    "bf16": "16-bit training where the GPU supports it; a CPU trains in float32",
    "fp16": "16-bit training on older GPUs without bfloat16",
    "eval_strategy": "steps: the held-out loss is measured every eval_steps",
    "eval_steps": "how often the held-out loss is measured",
    "save_strategy": "steps: checkpoints to resume from every save_steps",
    "save_steps": "how often a checkpoint is written (unused when save_strategy is no)",
    "seed": "the same seed gives the same run",
}
USUAL = {  # numeric ranges a value is checked against (inclusive)
    "learning_rate": (1e-4, 1e-3),
    "per_device_train_batch_size": (1, 8),
    "gradient_accumulation_steps": (1, 16),
    PASSES: (1.0, 3.0),
}


def sft_config(
    profile: Profile, output_dir: str | Path, tracking_dir: str | Path | None = None, run_name: str | None = None
) -> SFTConfig:
    """Every SFTConfig choice comes from the profile; only hardware-dependent ones are derived here. Local trackers
    write into `tracking_dir` (`steps.tracking_dir(run)` in the lessons; None: into `output_dir`), as project
    `run_name` (the run folder's name; None: the profile's)."""
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
        **tracking_names(run_name, profile.name),
        trackio_static_space_id=False,  # never a Hub Space for the dashboard: it stays on this machine
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
    run_name: str | None = None,
) -> SFTTrainer:
    """An SFTTrainer over the train/eval splits, with the end-of-turn check run on what it will train.

    `config` replaces the profile's SFTConfig (the throughput benchmark varies it); `run_name` names the tracked
    run's project (the run folder's name). Preparing the splits shows no progress bars; in a notebook the progress
    table rounds its figures, and trackio logs locally without output (`helpers.tracking`).
    """
    # trl's own fused head is the better one where Triton runs (GPU): it never builds the full logits
    trainer_class = SFTTrainer if cuda_available() else AnswerHeadSFTTrainer
    with _no_dataset_progress_bars():  # trl tokenises, labels, truncates and filters each split: eight bars
        trainer = trainer_class(
            model=model,
            args=config or sft_config(profile, output_dir, tracking_dir, run_name),
            train_dataset=splits["train"],
            eval_dataset=splits["eval"],
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    if trainer.pop_callback(NotebookProgressCallback) is not None:
        trainer.add_callback(TidyProgressCallback)
    if trainer.pop_callback(TrackioCallback) is not None:
        trainer.add_callback(LocalTrackioCallback)
    eot_id = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for name, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if "labels" not in dataset.column_names:
            raise DataError(f"The trainer's {name} dataset has no labels column; cannot verify masking.")
        for index, labels in enumerate(dataset["labels"]):
            check_end_of_turn_trained(labels, eot_id, f"{name} example {index}")
    return trainer


@contextmanager
def _no_dataset_progress_bars():
    was_off = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            datasets.enable_progress_bars()


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value  # SchedulerType.COSINE -> "cosine"


def key_settings(config: SFTConfig) -> dict[str, Any]:
    """The SFTConfig fields worth reading, as plain values (enums as their names in a profile: "cosine")."""
    return {name: _plain(getattr(config, name)) for name in KEY_FIELDS}


def _in_usual_range(name: str, value: Any) -> str:
    if name not in USUAL or not isinstance(value, int | float):
        return ""
    low, high = USUAL[name]
    return "below the usual range" if value < low else "above the usual range" if value > high else ""


def settings_table(trainer: SFTTrainer, profile: Profile) -> pd.DataFrame:
    """Notebook 04's table: each key setting's value in this run, what it does and its usual range, and the
    profile's reason for it (`train.why`), flagged where the value is outside the usual range. Two rows are
    worked out from the run: the effective batch and the passes over the training rows that max_steps makes."""
    args = trainer.args
    values = key_settings(args)
    effective = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    rows_seen = args.max_steps * effective
    train_rows = len(trainer.train_dataset)
    derived = {
        EFFECTIVE_BATCH: effective,
        PASSES: round(rows_seen / train_rows, 2),
    }
    shown = {
        **{k: values[k] for k in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps")},
        **derived,
        **{k: v for k, v in values.items() if k not in derived},
    }
    rows = []
    for name, value in shown.items():
        flag = _in_usual_range(name, value)
        # the reason for max_steps is a reason for the passes it makes: shown there, where the range is checked
        reason = "" if name == "max_steps" else profile.train.why.get("max_steps" if name == PASSES else name, "")
        if name == PASSES:
            value = f"{value} ({rows_seen:,} rows seen, {train_rows:,} training rows)"
        rows.append(
            {
                "this run": value,
                "what it does, usual range": GUIDE.get(name, ""),
                f"profile {profile.name}": " ".join(x for x in (flag and f"{flag.capitalize()}.", reason) if x),
            }
        )
    return pd.DataFrame(rows, index=pd.Index(list(shown), name="setting"))


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
