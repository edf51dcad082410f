import json

import pytest

from helpers.runfolder import MissingStepError, RunFolder


def test_missing_step_names_the_notebook_to_run(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    with pytest.raises(MissingStepError, match="run notebooks/03_format_white_rabbit.ipynb first"):
        run.require("03_dataset")


def test_commit_writes_manifest_with_profile_and_versions(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    out = run.begin("01_model")
    (out / "card.json").write_text("{}")
    final = run.commit("01_model", {"answer": 42})
    manifest = run.require("01_model")
    assert manifest["answer"] == 42 and manifest["profile"] == "cpu-smoke"
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])
    assert (final / "card.json").is_file()


def test_failed_rerun_keeps_the_last_good_step(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    run.begin("02_peft")
    run.commit("02_peft", {"version": 1})
    staging = run.begin("02_peft")  # a rerun that dies before commit
    (staging / "half.bin").write_text("partial")
    assert run.require("02_peft")["version"] == 1
    assert not (run.path("02_peft") / "half.bin").exists()
    run.commit("02_peft", {"version": 2})
    assert run.require("02_peft")["version"] == 2
    assert json.loads((run.path("02_peft") / "manifest.json").read_text())["version"] == 2


def test_step_from_another_profile_is_refused(tmp_path):
    RunFolder(tmp_path / "r", "cpu-lab").begin("01_model")
    RunFolder(tmp_path / "r", "cpu-lab").commit("01_model", {})
    with pytest.raises(MissingStepError, match="made with profile 'cpu-lab', not 'cpu-smoke'"):
        RunFolder(tmp_path / "r", "cpu-smoke").require("01_model")
