"""Lessons 04 and 05: configure trl's SFTTrainer from a profile, train, and keep the figures."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import is_peft_model
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


class _CrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy whose backward writes softmax minus one-hot in place.

    PyTorch's own backward zero-fills a (positions x vocabulary) gradient, scatters into it and runs the log-softmax
    backward: three passes over ~25 M numbers per step on the embedded model. This is one.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = logits.log_softmax(-1)
        ctx.save_for_backward(log_probs, targets)
        return -log_probs.gather(1, targets[:, None]).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        log_probs, targets = ctx.saved_tensors
        grad_logits = log_probs.exp_()  # the softmax, reusing the saved buffer (a step runs backward once)
        grad_logits[torch.arange(len(targets)), targets] -= 1
        return grad_logits.mul_(grad), None


def _hidden_through_wrapper(model: torch.nn.Module, decoder: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The decoder's last hidden state, computed by calling the outer (DistributedDataParallel) model.

    DDP averages gradients across processes only for a forward pass through its own wrapper: calling the inner
    decoder directly would leave each process training alone. So the whole model runs, scoring only the last
    position (`logits_to_keep=1`, cheap), and a hook on the decoder's final norm keeps its output.
    """
    captured: list[torch.Tensor] = []
    handle = decoder.norm.register_forward_hook(lambda _module, _args, output: captured.append(output))
    try:
        model(**inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[-1]


class AnswerHeadSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss sends only the answer positions through the LM head.

    Without Triton (on CPU), trl's fused LM head scores every position, prompt and padding included, over the whole
    vocabulary, and again in the backward pass: half of a training step on the embedded model. Projecting only the
    positions that carry a label gives the same loss and gradients in about two thirds of the time
    (benchmarks/train_throughput.py). Of trl's metrics it logs token accuracy and the token count; entropy, another
    pass over the whole vocabulary per position, is left out.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:  # only asked for when logits are wanted; keep trl's path for that
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if model.training else "eval"
        causal_lm = self.accelerator.unwrap_model(model)
        causal_lm = causal_lm.get_base_model() if is_peft_model(causal_lm) else causal_lm
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids") if k in inputs}
        if self.accelerator.num_processes > 1:
            hidden = _hidden_through_wrapper(model, causal_lm.base_model, model_inputs)
        else:
            hidden = causal_lm.base_model(**model_inputs, use_cache=False).last_hidden_state
        labels = inputs["labels"][:, 1:]
        answer = labels != -100
        targets = labels[answer]
        logits = causal_lm.get_output_embeddings()(hidden[:, :-1][answer]).float()
        count = num_items_in_batch if num_items_in_batch is not None else answer.sum().clamp(min=1)
        loss = _CrossEntropySum.apply(logits, targets) / count
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # Like Trainer.compute_loss: `count` holds every process's answer tokens and DDP averages the gradients
            # across processes, so scale back up (1 on one process); without it 2 processes learn half as fast.
            loss = loss * self.accelerator.num_processes
        with torch.no_grad():
            metrics = self._metrics[mode]
            metrics["mean_token_accuracy"].append((logits.argmax(-1) == targets).float().mean().item())
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["position_ids"].size(1))
                # every process's tokens, as trl counts them, so tokens/s is the whole job's
                self._total_train_tokens += int(self.accelerator.gather(local.to(hidden.device)).sum())
            metrics["num_tokens"] = [self._total_train_tokens]
        return loss


def build_trainer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: DatasetDict,
    profile: Profile,
    output_dir: str | Path,
    callbacks: list[TrainerCallback] | None = None,
    config: SFTConfig | None = None,
) -> SFTTrainer:
    """An SFTTrainer over the train/eval splits, with the end-of-turn check run on what it will train.

    `config` replaces the profile's SFTConfig (the throughput benchmark varies it).
    """
    # trl's own fused head is the better one where Triton runs (GPU): it never builds the full logits
    trainer_class = SFTTrainer if torch.cuda.is_available() else AnswerHeadSFTTrainer
    trainer = trainer_class(
        model=model,
        args=config or sft_config(profile, output_dir),
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
    """Real (non-padding) tokens trained on, training seconds (evaluations excluded) and tokens/s.

    After a resume the Trainer times only the resumed part and trl counts its tokens from zero again, so the
    figures cover that part.
    """
    seconds, eval_seconds, tokens = float("nan"), 0.0, 0
    for entry in log_history:
        if "train_runtime" in entry:
            seconds = entry["train_runtime"]
            break
        if entry.get("num_tokens", tokens) < tokens:  # the token counter restarted: a resumed run
            eval_seconds = 0.0
        tokens = int(entry.get("num_tokens", tokens))
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
