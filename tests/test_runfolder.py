"""The run folder: steps appear complete or not at all, one writer per step, and nothing lands outside runs/."""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.runfolder import MANIFEST, MissingStepError, RunFolder, RunInUseError, RunNameError, Step, fsync_path
from helpers.steps import ADAPTER, DATASET, MODEL, MODEL_INFO, PEFT, TRAIN, exercises_file

sys.path.insert(0, str(Path(__file__).parent))
from lock_holder import holding  # noqa: E402


def _lock_file(run: RunFolder, name: str) -> Path:
    return run.root / f".{name}.lock"


def test_missing_step_names_the_notebook_to_run(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    with pytest.raises(MissingStepError, match=f"run notebooks/{DATASET.notebook}.ipynb first"):
        run.require(DATASET)


def test_commit_writes_manifest_with_profile_and_versions(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    out = run.begin(MODEL)
    (out / MODEL_INFO).write_text("{}")
    final = run.commit(MODEL, {"answer": 42})
    manifest = run.require(MODEL)
    assert manifest["answer"] == 42 and manifest["profile"] == "cpu-smoke"
    assert (manifest["step"], manifest["notebook"]) == (MODEL.name, MODEL.notebook)
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])
    assert final == run.path(MODEL) and (final / MODEL_INFO).is_file()
    assert list(run.manifests()) == [MODEL.name], "manifests() finds the committed step by its folder"


def test_failed_rerun_keeps_the_last_good_step(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    run.begin(PEFT)
    run.commit(PEFT, {"version": 1})
    staging = run.begin(PEFT)  # a rerun that dies before commit
    (staging / "half.bin").write_text("partial")
    assert run.require(PEFT)["version"] == 1
    assert not (run.path(PEFT) / "half.bin").exists()
    run.commit(PEFT, {"version": 2})
    assert run.require(PEFT)["version"] == 2
    assert json.loads((run.path(PEFT) / MANIFEST).read_text())["version"] == 2


def test_step_from_another_profile_is_refused(tmp_path):
    RunFolder(tmp_path / "r", "cpu-lab").begin(MODEL)
    RunFolder(tmp_path / "r", "cpu-lab").commit(MODEL, {})
    with pytest.raises(MissingStepError, match="made with profile 'cpu-lab', not 'cpu-smoke'"):
        RunFolder(tmp_path / "r", "cpu-smoke").require(MODEL)


def test_run_name_must_be_a_plain_name(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    for bad in ["", ".", "..", "/etc", "../x", "a/b", "~root"]:
        with pytest.raises(RunNameError, match="not a plain folder name"):
            RunFolder.open(bad, "cpu-smoke")
    assert RunFolder.open("try-2.b_c", "cpu-smoke").root == tmp_path / "try-2.b_c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["try-2.b_c"], "nothing written outside runs/"


def test_a_symlinked_run_folder_is_refused(tmp_path, monkeypatch):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    elsewhere.mkdir()
    (runs / "x").symlink_to(elsewhere)
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(runs))
    with pytest.raises(RunNameError, match="symbolic link") as refused:
        RunFolder.open("x", "cpu-smoke")
    assert str(runs / "x") in str(refused.value), "the message names the link"
    assert list(elsewhere.iterdir()) == [], "nothing written where the link points"


def test_second_writer_of_a_step_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    with holding(run.root, TRAIN.name) as holder:  # another live process writes step 05
        with pytest.raises(RunInUseError, match=f"in use by pid {holder.pid} \\(step {TRAIN.name}\\)"):
            run.begin(TRAIN)
    assert _lock_file(run, TRAIN.name).read_text() == str(holder.pid), "a killed holder leaves its lock file"
    # a lock file alone is no lock: one naming a live process that holds nothing (its pid reused) is free too
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _lock_file(run, TRAIN.name).write_text(str(bystander.pid))
        run.begin(TRAIN)  # the stale lock is taken over
        assert _lock_file(run, TRAIN.name).read_text() == str(os.getpid())
    finally:
        bystander.kill()
        bystander.wait()
    run.commit(TRAIN, {})
    assert not _lock_file(run, TRAIN.name).exists(), "commit releases the lock"
    run.begin(TRAIN)  # and the step can be written again
    run.commit(TRAIN, {})


# Each racer runs as if on a slow disk (each open, stat or unlink of a file in the run folder takes 2 ms): a lock
# that checks and then writes lets both in, whatever the timing; an atomic one lets exactly one in.
RACER = """
import fcntl, io, mmap, os, sys, time

def slow(call):
    def slowly(path, *args, **kwargs):
        if str(path).startswith(sys.argv[2]):
            time.sleep(0.002)
        return call(path, *args, **kwargs)
    return slowly

os.open, io.open, os.stat, os.unlink = slow(os.open), slow(io.open), slow(os.stat), slow(os.unlink)

from helpers.runfolder import RunFolder, RunInUseError
from helpers.steps import STEPS

me = int(sys.argv[1])
while line := sys.stdin.readline():  # one trial: its run folder, its barrier file and the step, then "release"
    folder, barrier, name = line.split()
    step = next(s for s in STEPS if s.name == name)
    run = RunFolder(folder, "cpu-smoke")
    fd = os.open(barrier, os.O_RDWR)
    shared = mmap.mmap(fd, 2)
    print("ready", flush=True)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits until the test lets go of the barrier: the kernel wakes both racers
    shared[me] = 1  # then each says it is here and waits for the other (when both have a core: microseconds)
    deadline = time.monotonic() + 0.1
    while shared[1 - me] == 0 and time.monotonic() < deadline:
        pass
    try:
        run.begin(step)
        print("won", flush=True)
    except RunInUseError as err:
        print("lost", str(err).replace(chr(10), " "), flush=True)
    shared.close()
    os.close(fd)
    sys.stdin.readline()
    run.unlock(step.name)
    print("released", flush=True)
"""


def race(tmp_path: Path, steps: tuple[Step, Step], trials: int) -> list[list[str]]:
    """Two live processes begin `steps[0]` and `steps[1]` of one run folder at the same instant, `trials` times (a
    fresh run folder each time); what each said: "won", or "lost" and RunInUseError's message."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True, "env": env}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(me), str(tmp_path / "trial-")], **pipes) for me in (0, 1)
    ]

    def say(*lines: str) -> None:  # one line to each racer, or the same line to both
        for racer, line in zip(racers, lines if len(lines) == 2 else lines * 2, strict=True):
            racer.stdin.write(line + "\n")
            racer.stdin.flush()

    def hear() -> list[str]:
        return [racer.stdout.readline().strip() for racer in racers]

    outcomes = []
    try:
        for trial in range(trials):
            barrier = tmp_path / f"barrier-{trial}"
            barrier.write_bytes(bytes(2))
            gate = os.open(barrier, os.O_RDONLY)
            fcntl.flock(gate, fcntl.LOCK_EX)  # the barrier, closed
            say(*(f"{tmp_path / f'trial-{trial}'} {barrier} {step.name}" for step in steps))
            assert hear() == ["ready", "ready"]
            time.sleep(0.01)  # both racers are now waiting on the barrier
            os.close(gate)  # open it
            outcomes.append(hear())
            say("release")
            assert hear() == ["released", "released"]
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
    return outcomes


def test_two_processes_beginning_a_step_at_once_never_both_win(tmp_path):
    start = time.monotonic()
    outcomes = race(tmp_path, (TRAIN, TRAIN), trials=40)
    for trial, outcome in enumerate(outcomes):
        assert sorted(o.split()[0] for o in outcome) == ["lost", "won"], f"trial {trial}: {outcome}"
    assert time.monotonic() - start < 20


def test_two_processes_beginning_different_steps_at_once_both_win(tmp_path):
    outcomes = race(tmp_path, (PEFT, DATASET), trials=20)
    assert [o for o in outcomes if o != ["won", "won"]] == []


def test_a_commit_killed_between_its_renames_is_recovered(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    run.begin(PEFT)
    run.commit(PEFT, {"version": 1})
    run.path(PEFT).rename(run.root / f".{PEFT.name}.old")  # killed after the first rename, before the second
    assert RunFolder(tmp_path / "r", "cpu-smoke").require(PEFT)["version"] == 1
    assert not (run.root / f".{PEFT.name}.old").exists()


def test_recovery_leaves_a_live_commit_between_its_renames_alone(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    run.begin(PEFT)
    run.commit(PEFT, {"version": 1})
    old = run.root / f".{PEFT.name}.old"
    with holding(run.root, PEFT.name):  # a live writer of 02, between moving the old step aside and its new one in
        run.path(PEFT).rename(old)
        RunFolder(tmp_path / "r", "cpu-smoke")  # another notebook opens the run folder meanwhile
        assert old.is_dir() and not run.path(PEFT).exists(), "the live writer's swap was not touched"
    # its writer is gone (killed between the renames): the last good step is put back
    assert RunFolder(tmp_path / "r", "cpu-smoke").require(PEFT)["version"] == 1
    assert not old.exists()


def test_fsync_reaches_every_file_and_subfolder_deepest_first(tmp_path, monkeypatch):
    opened: dict[int, Path] = {}
    synced: list[Path] = []
    real_open, real_fsync = os.open, os.fsync

    def recording_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        opened[fd] = Path(path)
        return fd

    def recording_fsync(fd):
        synced.append(opened.get(fd))
        real_fsync(fd)

    monkeypatch.setattr(os, "open", recording_open)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    step = tmp_path / "step"
    (step / "a" / "b").mkdir(parents=True)
    (step / "a" / "b" / "weights.bin").write_bytes(b"w")
    (step / "top.json").write_text("{}")
    fsync_path(step)
    expected = [step / "a" / "b" / "weights.bin", step / "a" / "b", step / "a", step]
    assert set(expected) | {step / "top.json"} <= set(synced), synced
    assert [p for p in synced if p in expected] == expected, "contents before the folder that lists them"

    synced.clear()  # a commit flushes the staged step's subfolders (the adapter's) before swapping it in
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    (run.begin(TRAIN) / ADAPTER / "nested").mkdir(parents=True)
    run.commit(TRAIN, {})
    staging = run.root / f".{TRAIN.name}.partial"
    assert {staging / ADAPTER / "nested", staging / ADAPTER, staging, run.root} <= set(synced), synced


def test_exercise_verdicts_are_written_atomically_and_a_torn_file_breaks_nothing(tmp_path):
    from helpers.exercises import check, results

    run = RunFolder(tmp_path / "r", "cpu-smoke")
    exercises_file(run).write_text('{"01.1": "corr')  # torn by an older version or a full disk
    assert results(run) == {}
    check(run, "05.1", 2, history={"train": [(1, 3.0), (2, 2.0)]})
    assert results(run) == {"05.1": "correct"}
    assert [p.name for p in run.root.iterdir() if p.name.endswith(".tmp")] == []
