"""Interrupted training resumes: a real process is killed mid-run, rerun, and ends where an unbroken run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import ROOT
from helpers.steps import CHECKPOINTS
from helpers.trainer import DiskSpaceError, check_disk_space, resumable_checkpoint

MAX_STEPS, SAVE_STEPS = 4, 2

# What notebook 05 does, as a script: build the trainer from the profile and call run_training.
TRAIN = f"""
import json, sys
from transformers import set_seed
from helpers.data import build_splits, load_rows
from helpers.lora import add_lora
from helpers.model import load_model
from helpers.profiles import load_profile
from helpers.trainer import build_trainer, run_training

out = sys.argv[1]
profile = load_profile("cpu-smoke", {{"train": {{"max_steps": {MAX_STEPS}, "save_steps": {SAVE_STEPS},
                                                "eval_steps": None, "logging_steps": 1}}}})
set_seed(profile.train.seed)
model, tokenizer, _ = load_model(profile)
model = add_lora(model, profile)
splits, _ = build_splits(load_rows("sample").rows, tokenizer, profile.data, profile.model.max_seq_length)
trainer = build_trainer(model, tokenizer, splits, profile, out)
resumed = run_training(trainer, profile)
losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
print("RESULT " + json.dumps({{"resumed": resumed, "step": trainer.state.global_step, "losses": losses}}))
"""


def start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )


def finish(process: subprocess.Popen) -> dict:
    output, _ = process.communicate(timeout=600)
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert process.returncode == 0 and lines, output[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_killed_run_resumes_and_ends_like_an_unbroken_one(tmp_path):
    unbroken = finish(start(tmp_path / "unbroken"))

    broken = tmp_path / "broken"
    process = start(broken)
    deadline = time.monotonic() + 300
    while resumable_checkpoint(broken, MAX_STEPS) is None:  # wait for the first complete checkpoint
        assert process.poll() is None and time.monotonic() < deadline, "training ended before any checkpoint"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # no clean-up, like a dead kernel
    process.wait()
    killed_at = resumable_checkpoint(broken, MAX_STEPS)
    assert killed_at is not None

    resumed = finish(start(broken))
    assert resumed["resumed"] == killed_at
    assert resumed["step"] == unbroken["step"] == MAX_STEPS
    # Same profile and seed in another process: the steps before the kill logged the very same losses
    done = int(killed_at.rsplit("-", 1)[1])
    assert resumed["losses"][:done] == pytest.approx(unbroken["losses"][:done], rel=1e-6)
    # The resumed run's log continues the interrupted one's: the last losses agree with the unbroken run
    assert resumed["losses"][-1] == pytest.approx(unbroken["losses"][-1], rel=1e-3)
    print(f"killed after {killed_at}; final loss {resumed['losses'][-1]:.4f} vs {unbroken['losses'][-1]:.4f}")


def test_a_half_written_checkpoint_is_passed_over(tmp_path):
    for step, complete in ((2, True), (4, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    assert resumable_checkpoint(tmp_path, 6) == str(tmp_path / "checkpoint-2")
    assert resumable_checkpoint(tmp_path, 2) is None, "a finished run starts afresh"
    assert resumable_checkpoint(tmp_path / "nothing-here", 6) is None


def test_too_little_disk_for_checkpoints_stops_before_training(tmp_path, monkeypatch):
    import shutil

    import torch

    from helpers.profiles import load_profile

    profile = load_profile("cpu-smoke", {"train": {"save_steps": 2}})
    model = torch.nn.Linear(1000, 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=2**20))
    with pytest.raises(DiskSpaceError, match=r"Not enough disk space for checkpoints.*save_steps: null"):
        check_disk_space(tmp_path / CHECKPOINTS, model, profile)
    check_disk_space(tmp_path, model, load_profile("cpu-smoke"))  # no checkpoints asked for: no check
