"""Notebook 05's training as one command, on one process or, under `accelerate launch`, on many.

    python -m helpers.train --profile cpu-smoke --run-name s
    accelerate launch --config_file configs/accelerate/cpu-2proc.yaml -m helpers.train --profile cpu-smoke --run-name s
    accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml -m helpers.train --profile multi-gpu-70b

It builds the same trainer from the same helpers as notebooks 04-05 (`steps.load_trainable`, `trainer.build_trainer`,
`trainer.run_training`, `steps.save_training`), so it writes the same `05_train` step folder and resumes from the
same checkpoints. It needs notebooks 02 and 03 (or `python -m helpers.run --only 01 02 03`) in the run folder.

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

from helpers.backend import HardwareError, check_hardware, cuda_available, uses_unsloth
from helpers.profiles import Profile, ProfileError, load_profile
from helpers.runfolder import MissingStepError, RunFolder, RunNameError, runs_dir

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


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher), read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_stack(profile: Profile, processes: int) -> None:
    """Unsloth trains on one GPU per job; several processes need plain transformers + peft (+ bitsandbytes)."""
    backend = profile.model.backend
    wants_unsloth = backend == "unsloth" or (backend == "auto" and profile.model.requires_gpu)
    if processes > 1 and wants_unsloth:
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
    from helpers.steps import load_trainable, save_training
    from helpers.trainer import build_trainer, run_training
    from helpers.training_log import loss_history, train_figures

    set_seed(profile.train.seed)
    with state.main_process_first():  # opening may repair an interrupted commit: one process at a time
        run = RunFolder.open(run_name, profile.name, seed=profile.train.seed)
    _log(state, f"{state.distributed_type} backend={state.backend} device={state.device} run folder {run.root}")
    model, tokenizer, card, splits = load_trainable(run, profile)
    trainer = build_trainer(model, tokenizer, splits, profile, run.checkpoints, callbacks=[_rank_log_callback(state)])
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
        _log(state, f"saved {run.path('05_train')}")
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
        print(f"runs folder: {runs_dir()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


# Launching from a notebook (lesson 09): a run folder per launch, the launcher's output kept, the figures read back.

CPU_CONFIG = "configs/accelerate/cpu-2proc.yaml"


def fork_run(run: RunFolder, name: str, steps: tuple[str, ...] = ("02_peft", "03_dataset")) -> RunFolder:
    """A sibling run folder `name` holding copies of `run`'s steps (through begin/commit), so a launch can train
    and write its own 05_train without touching the lesson's run."""
    import shutil

    child = RunFolder(run.root.parent / name, run.profile_name, run.seed)
    for step in steps:
        manifest = run.require(step)
        out = child.begin(step)
        shutil.copytree(run.path(step), out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        child.commit(step, {k: v for k, v in manifest.items() if k not in {"step", "notebook", "profile", "seed"}})
    return child


def free_port() -> int:
    """A free TCP port for the processes to meet on (several launches on one machine must not share 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(profile: str, run_name: str, processes: int, *extra: str) -> list[str]:
    """`python -m helpers.train ...` for one process, `accelerate launch --config_file cpu-2proc.yaml ...` for more."""
    from helpers import ROOT

    args = ["-m", "helpers.train", "--profile", profile, "--run-name", run_name, *extra]
    if processes == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / CPU_CONFIG),
            "--num_processes", str(processes), "--main_process_port", str(free_port()),
            "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes)), *args]  # fmt: skip


def launch(profile: str, run: RunFolder, processes: int, *extra: str) -> tuple[dict[str, Any], str]:
    """Run a launch to the end in a child process (its output streamed to a log under the runs folder, since the
    notebook's kernel is one process and the launch is several); return the main process's figures and the log."""
    import subprocess

    from helpers import ROOT

    command = launch_command(profile, run.root.name, processes, *extra)
    env = {**os.environ, "LLM_SCHOOL_RUNS": str(run.root.parent), "PYTHONPATH": str(ROOT)}
    env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
    shown = ["accelerate", "launch", *command[3:]] if processes > 1 else ["python", *command[1:]]
    print("$", " ".join(shown), flush=True)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"The {processes}-process launch failed (exit {done.returncode}):\n{log[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), log


def rank_lines(log: str) -> dict[int, list[str]]:
    """A launch's output split by process: the `[rank i/n]` lines of each."""
    import re

    lines: dict[int, list[str]] = {}
    # processes share one pipe, so a line may run into another process's: each message ends at the next prefix
    for match in re.finditer(r"\[rank (\d+)/\d+\] (.*?)(?=\[rank \d+/\d+\]|[\r\n]|$)", log):
        lines.setdefault(int(match.group(1)), []).append(match.group(2))
    return lines
