"""Lesson 09: launch `helpers.train` from a notebook, on one process or several, and read back what it did.

The notebook's kernel is one process and a launch is several, so each launch runs in a child process: its own run
folder (a fork of the lesson's), its output kept as a log, the main process's figures read from its last line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from typing import Any

from helpers import ROOT
from helpers.lesson import shown_path
from helpers.runfolder import RunFolder
from helpers.serve import free_port
from helpers.steps import DATASET, PEFT, Step
from helpers.train import RESULT_PREFIX

CPU_CONFIG = "configs/accelerate/cpu-2proc.yaml"


def fork_run(run: RunFolder, name: str, steps: tuple[Step, ...] = (PEFT, DATASET)) -> RunFolder:
    """A sibling run folder `name` holding copies of `run`'s steps (through begin/commit), so a launch can train
    and write its own 05_train without touching the lesson's run."""
    child = RunFolder(run.root.parent / name, run.profile_name, run.seed)
    for step in steps:
        manifest = run.require(step)
        out = child.begin(step)
        shutil.copytree(run.path(step), out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        child.commit(step, {k: v for k, v in manifest.items() if k not in {"step", "notebook", "profile", "seed"}})
    return child


def launch_command(profile: str, run_name: str, processes: int, *extra: str) -> list[str]:
    """`python -m helpers.train ...` for one process, `accelerate launch --config_file cpu-2proc.yaml ...` for more."""
    args = ["-m", "helpers.train", "--profile", profile, "--run-name", run_name, *extra]
    if processes == 1:
        return [sys.executable, *args]
    # a port of its own: several launches on one machine must not all meet on accelerate's default 29500
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / CPU_CONFIG),
            "--num_processes", str(processes), "--main_process_port", str(free_port()),
            "--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // processes)), *args]  # fmt: skip


def launch(profile: str, run: RunFolder, processes: int, *extra: str) -> tuple[dict[str, Any], str]:
    """Run a launch to the end in a child process; return the main process's figures and the launch's output."""
    command = launch_command(profile, run.root.name, processes, *extra)
    env = {**os.environ, "LLM_SCHOOL_RUNS": str(run.root.parent), "PYTHONPATH": str(ROOT)}
    env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""
    shown = ["accelerate", "launch", *command[3:]] if processes > 1 else ["python", *command[1:]]
    print("$", " ".join(shown).replace(str(ROOT / CPU_CONFIG), CPU_CONFIG), flush=True)
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    # the log as a lesson shows it and the step folder keeps it: no absolute path of this machine
    log = (done.stdout + done.stderr).replace(str(run.root.parent), shown_path(run.root.parent))
    if done.returncode != 0:
        raise RuntimeError(f"The {processes}-process launch failed (exit {done.returncode}):\n{log[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), log


def rank_lines(log: str) -> dict[int, list[str]]:
    """A launch's output split by process: the `[rank i/n]` lines of each."""
    lines: dict[int, list[str]] = {}
    # processes share one pipe, so a line may run into another process's: each message ends at the next prefix
    for match in re.finditer(r"\[rank (\d+)/\d+\] (.*?)(?=\[rank \d+/\d+\]|[\r\n]|$)", log):
        lines.setdefault(int(match.group(1)), []).append(match.group(2))
    return lines
