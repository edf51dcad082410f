"""Tracked runs: `train.report_to` reaches the trainer, and trackio logs offline into the run folder."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, steps
from helpers.profiles import ProfileError, load_profile
from helpers.runfolder import RunFolder
from helpers.steps import CHECKPOINTS, checkpoints_dir, tracking_dir
from helpers.tracking import TrackingError, report_to

# Trains two steps under cpu-smoke with report_to trackio in a fresh process (trackio reads TRACKIO_DIR once, at
# import), with the Hub unreachable on purpose; as notebooks 04-05 do, into the run folder's checkpoints and tracking.
TRAIN_TWO_STEPS = """
import json, sys
from helpers.data import build_splits, load_rows
from helpers.lora import add_lora
from helpers.model import load_model
from helpers.profiles import load_profile
from helpers.runfolder import RunFolder
from helpers.steps import checkpoints_dir, tracking_dir
from helpers.trainer import build_trainer

profile = load_profile("cpu-smoke", {"data": {"max_rows": 12, "eval_rows": 4},
                                     "train": {"max_steps": 2, "eval_steps": None, "report_to": ["trackio"]}})
model, tokenizer, _ = load_model(profile)
splits, _ = build_splits(load_rows("sample").rows, tokenizer, profile.data, profile.model.max_seq_length)
run = RunFolder(sys.argv[1], profile.name)
trainer = build_trainer(add_lora(model, profile), tokenizer, splits, profile, checkpoints_dir(run),
                        tracking_dir=tracking_dir(run), run_name=run.root.name)
print(json.dumps({"report_to": trainer.args.report_to}))
trainer.evaluate()  # 05 measures the loss before training: the first report starts the tracked run
trainer.train()
print("TRAINED")
"""


def test_trackio_logs_offline_into_the_run_folder(tmp_path):
    pytest.importorskip("trackio")
    run = RunFolder(tmp_path / "run", "cpu-smoke")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRACKIO_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", TRAIN_TWO_STEPS, str(run.root)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert '"report_to": ["trackio"]' in result.stdout
    # quiet: no start-up lines, no "Uploading logs", no dashboard URL (with its write token) in any output
    printed = result.stdout.split('"report_to": ["trackio"]}')[1].replace("TRAINED", "").splitlines()
    assert [line for line in printed if line and not line.startswith("{'")] == []  # only the trainer's own log lines
    for text in ("Trackio", "Uploading", "write_token", "http"):
        assert text not in result.stdout + result.stderr, text
    databases = list((tracking_dir(run) / "trackio").glob("*.db"))
    assert [d.stem for d in databases] == ["run"], "the project is named after the run folder, not 'huggingface'"
    with sqlite3.connect(databases[0]) as db:
        rows = db.execute("SELECT run_name, metrics FROM metrics").fetchall()
    assert {name.split()[0] for name, _ in rows} == {"cpu-smoke"}, "each run is named by its profile and start time"
    logged = [json.loads(r[1]) for r in rows]
    assert any("train/loss" in m for m in logged), logged[:3]
    assert any("eval/loss" in m for m in logged), "the evaluation before training is tracked too"


def test_trackio_is_called_without_a_dashboard_a_remote_or_output(tmp_path, monkeypatch, capsys):
    from helpers.tracking import _QuietLocalTrackio

    calls = []

    class Module:
        version = "x"

        def init(self, **kwargs):
            print("* Trackio project initialized: huggingface")
            calls.append(kwargs)

        def finish(self):
            print("* Run finished. Uploading logs to Trackio (please wait...)")

    quiet = _QuietLocalTrackio(Module())
    quiet.init(project="lab", name="cpu-lab 2026", space_id="someone/space", bucket_id="b", embed=True)
    quiet.finish()
    assert calls == [{"project": "lab", "name": "cpu-lab 2026", "space_id": None, "bucket_id": None, "embed": False}]
    assert capsys.readouterr().out == "" and quiet.version == "x"
    monkeypatch.setenv("TRACKIO_SERVER_URL", "http://localhost:1")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    with pytest.raises(TrackingError, match="TRACKIO_SERVER_URL is set in the environment: trackio would send"):
        report_to(["trackio"], tmp_path)


def test_report_to_defaults_to_none_and_rejects_unknown_trackers(tmp_path, monkeypatch):
    assert load_profile("cpu-smoke").train.report_to == ["none"]
    assert report_to(["none"], tmp_path) == ["none"]
    with pytest.raises(ProfileError, match="report_to"):
        load_profile("cpu-smoke", {"train": {"report_to": ["mlflow-typo"]}})
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)  # stands in for a venv without wandb
    with pytest.raises(TrackingError, match="wandb"):
        report_to(["wandb"], tmp_path)


def test_tensorboard_dir_lands_in_the_run_folder(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run", "cpu-smoke")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # stands in for installed tensorboard
    assert report_to(["tensorboard"], tracking_dir(run)) == ["tensorboard"]
    assert Path(os.environ["TENSORBOARD_LOGGING_DIR"]) == run.root / steps.TRACKING / "tensorboard"


def test_trackers_write_into_the_tracking_dir_given_else_into_the_output_dir(tmp_path, monkeypatch):
    import helpers.trainer

    seen = []
    monkeypatch.setattr(helpers.trainer, "report_to", lambda targets, folder: seen.append(Path(folder)) or ["none"])
    run = RunFolder(tmp_path / "run", "cpu-smoke")
    profile = load_profile("cpu-smoke")
    helpers.trainer.sft_config(profile, checkpoints_dir(run), tracking_dir(run))
    helpers.trainer.sft_config(profile, tmp_path / CHECKPOINTS)
    assert seen == [run.root / steps.TRACKING, tmp_path / CHECKPOINTS]


def test_paths_are_shown_relative_to_the_project_or_the_runs_folder(tmp_path, monkeypatch):
    from helpers.lesson import shown_path
    from helpers.tracking import dashboard_command

    monkeypatch.delenv("LLM_SCHOOL_RUNS", raising=False)
    assert shown_path(ROOT / "runs" / "cpu-lab" / steps.TRAINER.name) == f"runs/cpu-lab/{steps.TRAINER.name}"
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    assert shown_path(tmp_path / "lab" / steps.TRAIN.name) == f"$LLM_SCHOOL_RUNS/lab/{steps.TRAIN.name}"
    assert shown_path(tmp_path) == "$LLM_SCHOOL_RUNS"
    command = dashboard_command(tracking_dir(RunFolder(tmp_path / "lab", "cpu-lab")), "lab")
    assert command.startswith("TRACKIO_DIR=$LLM_SCHOOL_RUNS/lab/tracking/trackio ")
    assert command.endswith("trackio show --project lab") and str(tmp_path) not in command
