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


def test_run_name_must_be_a_plain_name(tmp_path, monkeypatch):
    from helpers.runfolder import RunNameError

    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    for bad in ["", ".", "..", "/etc", "../x", "a/b", "~root"]:
        with pytest.raises(RunNameError, match="not a plain folder name"):
            RunFolder.open(bad, "cpu-smoke")
    assert RunFolder.open("try-2.b_c", "cpu-smoke").root == tmp_path / "try-2.b_c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["try-2.b_c"], "nothing written outside runs/"


def test_second_writer_of_a_step_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from helpers.runfolder import RunInUseError

    run = RunFolder(tmp_path / "r", "cpu-smoke")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run.root / ".05_train.lock").write_text(str(holder.pid))  # another live process writes step 05
        with pytest.raises(RunInUseError, match=f"in use by pid {holder.pid}"):
            run.begin("05_train")
    finally:
        holder.kill()
        holder.wait()
    run.begin("05_train")  # its process is gone: the stale lock is taken over
    run.commit("05_train", {})
    assert not (run.root / ".05_train.lock").exists(), "commit releases the lock"


def test_a_commit_killed_between_its_renames_is_recovered(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    run.begin("02_peft")
    run.commit("02_peft", {"version": 1})
    run.path("02_peft").rename(run.root / ".02_peft.old")  # killed after the first rename, before the second
    assert RunFolder(tmp_path / "r", "cpu-smoke").require("02_peft")["version"] == 1


def test_exercise_verdicts_are_written_atomically_and_a_torn_file_breaks_nothing(tmp_path):
    from helpers.exercises import EXERCISES_FILE, check, results

    run = RunFolder(tmp_path / "r", "cpu-smoke")
    (run.root / EXERCISES_FILE).write_text('{"01.1": "corr')  # torn by an older version or a full disk
    assert results(run) == {}
    check(run, "05.1", 2, history={"train": [(1, 3.0), (2, 2.0)]})
    assert results(run) == {"05.1": "correct"}
    assert [p.name for p in run.root.iterdir() if p.name.endswith(".tmp")] == []
