"""Notebook 05's training as one command, on one process or, under `accelerate launch`, on many.

    python -m helpers.train --profile cpu-smoke --run-name s
    accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m helpers.train --profile cpu-smoke --run-name s
    accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml -m helpers.train --profile multi-gpu-70b

It builds the same trainer from the same helpers as notebooks 04-05 (`steps.load_trainable`, `trainer.build_trainer`,
`trainer.run_training`, `steps.save_training`), so it writes the same `05_train` step folder and resumes from the
same checkpoints. It needs notebooks 02 and 03 (or `python -m helpers.runner --only 01 02 03`) in the run folder.
Lesson 09 starts it from a notebook with `helpers.launch`.

Under `accelerate launch` every process trains on its share of each batch (data parallel: DDP, or FSDP/DeepSpeed
when the launcher config says so) and only the main process writes the step folder, its plots and its log. Each
process prints its own lines, prefixed `[rank i/n]`, so a launcher's output shows them all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import yaml

from helpers.backend import HardwareError, check_hardware, cuda_available, uses_unsloth, wants_unsloth
from helpers.lesson import shown_path
from helpers.profiles import Profile, ProfileError, load_profile
from helpers.runfolder import MissingStepError, RunFolder, RunNameError, runs_dir
from helpers.steps import TRAIN, checkpoints_dir, load_trainable, save_training, tracking_dir

RESULT_PREFIX = "RESULT "  # the main process's last line: the figures as JSON, for a caller to read


class UnsupportedSetupError(RuntimeError):
    """A profile asks for a stack that cannot run with this many processes."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`train.max_steps=8` -> {"train": {"max_steps": 8}}; values are read as YAML (numbers, booleans, null)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ProfileError(f"--set {pair!r}: write section.field=value, e.g. train.max_steps=8")
        *sections, field = key.split(".")
        node = overrides
        for section in sections:
            node = node.setdefault(section, {})
        node[field] = yaml.safe_load(value)
    return overrides


def check_stack(profile: Profile, processes: int) -> None:
    """Unsloth trains on one GPU per job; several processes need plain transformers + peft (+ bitsandbytes)."""
    if processes > 1 and wants_unsloth(profile):
        raise UnsupportedSetupError(
            f"Profile {profile.name!r} uses Unsloth (model.backend: {profile.model.backend}), which trains on one "
            f"process only, and this launch started {processes}. Set model.backend: transformers in the profile "
            "(plain transformers + peft + bitsandbytes, as profiles/multi-gpu-70b.yaml does) to train on several "
            "GPUs, or launch one process."
        )


def _log(state: Any, message: str) -> None:
    # One write per line: the processes share one pipe, unbuffered under the launcher, and print() would write the
    # message and its newline apart, letting another process's line land in between.
    sys.stdout.write(f"[rank {state.process_index}/{state.num_processes}] {message}\n")
    sys.stdout.flush()


def _rank_log_callback(state: Any) -> Any:
    """Every process prints each logged step with a checksum of its trainable weights: equal on all ranks proves
    that the engine keeps the copies in step (DDP averages the gradients before each update)."""
    from transformers import TrainerCallback

    class RankLog(TrainerCallback):
        def on_log(self, args, train_state, control, logs=None, model=None, **kwargs):
            if logs and "loss" in logs and model is not None:
                checksum = sum(float(p.detach().double().sum()) for p in model.parameters() if p.requires_grad)
                _log(state, f"step {train_state.global_step} loss {logs['loss']:.6f} weights-checksum {checksum:.9e}")

    return RankLog()


def train(profile: Profile, run_name: str, evaluate: bool = True) -> dict[str, Any]:
    """Train the run's model with the profile on this process's share of the data; the main process saves 05.

    `evaluate=False` skips the held-out loss before and after (quicker tests).
    """
    if not cuda_available():
        # torchrun-started processes on a machine without CUDA: accelerate then joins them with gloo on the CPU
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")
        # plain "cpu": accelerate names it "cpu:0" on several processes, and torch.load cannot map a checkpoint's
        # optimizer state to "cpu:0", so resuming would fail
        os.environ.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    from accelerate import PartialState

    state = PartialState(cpu=not cuda_available())
    check_hardware(profile)
    check_stack(profile, state.num_processes)
    if uses_unsloth(profile):
        import unsloth  # noqa: F401  (before transformers, trl and peft, to patch them)
    from transformers import set_seed

    from helpers.backend import gpu_memory
    from helpers.plots import before_after_bars, loss_curve
    from helpers.trainer import build_trainer, run_training
    from helpers.training_log import loss_history, train_figures

    set_seed(profile.train.seed)
    with state.main_process_first():  # opening may repair an interrupted commit: one process at a time
        run = RunFolder.open(run_name, profile.name, seed=profile.train.seed)
    where = shown_path(run.root)  # relative to the project or $LLM_SCHOOL_RUNS: the log is shown in notebook 09
    _log(state, f"{state.distributed_type} backend={state.backend} device={state.device} run folder {where}")
    model, tokenizer, card, splits = load_trainable(run, profile)
    rank_log = _rank_log_callback(state)
    trainer = build_trainer(
        model,
        tokenizer,
        splits,
        profile,
        checkpoints_dir(run),
        callbacks=[rank_log],
        tracking_dir=tracking_dir(run),
        run_name=run.root.name,
    )
    batch = profile.train.per_device_train_batch_size
    total = batch * state.num_processes * profile.train.gradient_accumulation_steps
    _log(state, f"{len(splits['train'])} training rows; {batch} rows per step here, {total} per step in all")
    memory_before = gpu_memory()
    before = trainer.evaluate()["eval_loss"] if evaluate else None
    # An evaluation marks the bare model "prepared" (accelerate 1.15), and training then skips wrapping it in DDP:
    # each process would train alone, the copies drifting apart (the weights checksums show it). Clear the mark.
    trainer.model.__dict__.pop("_is_accelerate_prepared", None)
    trainer.model_wrapped = trainer.model
    started = time.perf_counter()
    resumed_from = run_training(trainer, profile)
    wall = time.perf_counter() - started
    after = trainer.evaluate()["eval_loss"] if evaluate else None
    figures = train_figures(trainer.state.log_history)
    history = loss_history(trainer.state.log_history, eval_before=before)
    result = {
        "steps": trainer.state.global_step,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss_first": history["train"][0][1],
        "train_loss_last": history["train"][-1][1],
        "train_losses": history["train"],
        "resumed_from": resumed_from,
        "gpu_before": memory_before,
        "gpu_after": gpu_memory(),
        "processes": state.num_processes,
        "distributed_type": str(state.distributed_type),
        "backend": state.backend,
        "wall_seconds": round(wall, 1),
        **figures,
    }
    if state.is_main_process:
        curve = loss_curve(history, title=f"{card.name}, profile {profile.name}, {state.num_processes} process(es)")
        plots = {"loss_curve": curve}
        if evaluate:
            plots["eval_loss"] = before_after_bars({"before": before, "after": after})
        save_training(run, trainer, tokenizer, result, plots)
        _log(state, f"saved {shown_path(run.path(TRAIN))}")
    else:
        # FSDP and ZeRO-3 gather the full weights in a collective every process joins; the others write nothing
        trainer.save_model()
    state.wait_for_everyone()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-lab", help="profile name or YAML path (default: cpu-lab)")
    parser.add_argument("--run-name", default=None, help="run folder name under runs/ (default: the profile name)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a profile field, e.g. --set train.max_steps=8 (repeatable)")  # fmt: skip
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out loss before and after training")
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile, parse_overrides(args.overrides))
        result = train(profile, args.run_name or profile.name, evaluate=not args.no_eval)
    except (ProfileError, RunNameError, MissingStepError, HardwareError, UnsupportedSetupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(RESULT_PREFIX + json.dumps(result, default=str))
        print(f"runs folder: {shown_path(runs_dir())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
