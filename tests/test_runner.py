"""The headless runner's own behaviour, without running the notebooks (those are in test_notebooks.py)."""

import sys
from pathlib import Path

import helpers.runner
from helpers.profiles import load_profile
from helpers.runfolder import RUN_LOCK, RunFolder

sys.path.insert(0, str(Path(__file__).parent))
from lock_holder import holding  # noqa: E402


def test_a_profile_given_as_a_relative_path_reaches_the_kernels_as_an_absolute_one(tmp_path, monkeypatch, capsys):
    # Kernels run in notebooks/, so "profiles/cpu-smoke.yaml" resolved there would be "Unknown profile" in every one.
    root = Path(helpers.runner.__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    seen = []
    monkeypatch.setattr(helpers.runner, "execute", lambda notebook, run, profile, log: seen.append(profile) or 0.0)
    assert helpers.runner.main(["--profile", "profiles/cpu-smoke.yaml", "--run-name", "p", "--only", "01"]) == 0
    assert seen == [str(root / "profiles" / "cpu-smoke.yaml")]
    monkeypatch.chdir(tmp_path)  # from anywhere else, as a kernel would
    assert load_profile(seen[0]).name == "cpu-smoke"
    assert not (tmp_path / "p" / f".{RUN_LOCK}.lock").exists(), "the chain's lock is released at the end"


def test_a_bad_run_name_or_a_busy_run_folder_stops_before_any_notebook(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    monkeypatch.setattr(helpers.runner, "execute", lambda *a: (_ for _ in ()).throw(AssertionError("ran a notebook")))
    assert helpers.runner.main(["--profile", "cpu-smoke", "--run-name", "../outside"]) == 2
    assert "not a plain folder name" in capsys.readouterr().err
    RunFolder(tmp_path / "busy", "cpu-smoke")
    with holding(tmp_path / "busy", RUN_LOCK) as other:  # another chain run, alive, on the same run folder
        assert helpers.runner.main(["--profile", "cpu-smoke", "--run-name", "busy"]) == 2
        assert f"in use by pid {other.pid} (a chain run)" in capsys.readouterr().err
