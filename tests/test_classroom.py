"""The classroom runner against real, tiny learner notebooks (no model is loaded): a kernel that kills itself, an
invalid .ipynb, an endless loop, a learner reading the instructor's tokens, a notebook that lost its parameters tag.
Each failure lands in that learner's row and the class goes on."""

import json
import os
import time

import nbformat
import pytest

from helpers.classroom import learner_env, main, run_class, run_notebook
from helpers.runfolder import RunFolder

CANARY = "hf_canary_instructor_token_5519"
LIMIT_S = 20


def notebook(*cells: str, tagged: bool = True) -> str:
    """A notebook whose first cell is the `parameters` cell (unless `tagged` is False), as JSON text."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    if tagged:
        nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nbformat.writes(nb)


PARAMETERS = 'PROFILE = "cpu-smoke"\nRUN_NAME = "default-run"'
SECOND = notebook(PARAMETERS, 'print("second notebook ran")')
LEARNERS = {
    "a-crash": notebook(PARAMETERS, "import os\nos._exit(1)"),
    "b-broken": '{"cells": [ this is not json',
    "c-loop": notebook(PARAMETERS, "while True:\n    pass"),
    "d-spy": notebook(
        PARAMETERS,
        "import os\nfrom helpers.secrets import load_secrets\nload_secrets(__import__('pathlib').Path(ENV_FILE))\n"
        "print('HF_TOKEN', os.environ.get('HF_TOKEN'), os.environ.get('OPENAI_API_KEY'), os.environ.get('MY_SECRET'))",
    ),
    "e-notag": notebook(
        PARAMETERS,
        "from helpers.lesson import start_lesson\nlesson = start_lesson(PROFILE, RUN_NAME)\n"
        "print('RUN_ROOT', lesson.run.root, lesson.profile.name)",
        tagged=False,
    ),
}


@pytest.fixture
def classroom(tmp_path, monkeypatch):
    """A class folder with one learner per adversarial notebook (as 01; the last learner has a harmless 02 too)."""
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path / "runs"))
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "MY_SECRET"):
        monkeypatch.setenv(name, CANARY)
    env_file = tmp_path / "instructor.env"
    env_file.write_text(f"GITHUB_TOKEN={CANARY}\nHF_TOKEN={CANARY}\n")
    class_dir = tmp_path / "class"
    for learner, first in LEARNERS.items():
        folder = class_dir / learner
        folder.mkdir(parents=True)
        (folder / "01_load_model.ipynb").write_text(first.replace("ENV_FILE", repr(str(env_file))))
    (class_dir / "e-notag" / "02_peft_setup.ipynb").write_text(SECOND)
    return class_dir


def executed_text(tmp_path, learner: str, name: str = "01_load_model.ipynb") -> str:
    return (tmp_path / "runs" / f"class-{learner}" / "executed" / name).read_text()


def test_every_failure_is_recorded_in_its_row_and_the_class_goes_on(classroom, tmp_path, capsys):
    start = time.perf_counter()
    code = main(["run", str(classroom), "--profile", "cpu-smoke", "--timeout", str(LIMIT_S)])
    seconds = time.perf_counter() - start
    table = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert code == 1 and set(LEARNERS) <= set(rows), table
    assert "01_load_model: the kernel died" in rows["a-crash"]
    assert "01_load_model: not a valid notebook file" in rows["b-broken"]
    assert f"01_load_model timed out: a cell ran past the limit of {LIMIT_S} s" in rows["c-loop"]
    # the others ran all their notebooks, after the failures
    for learner, ran in (("d-spy", "01"), ("e-notag", "01, 02")):
        assert rows[learner].split("|")[2].strip() == ran and rows[learner].rstrip().endswith("| - |"), table
    assert "second notebook ran" in executed_text(tmp_path, "e-notag", "02_peft_setup.ipynb")
    # the time limit held: the loop was stopped at about LIMIT_S, not left running
    assert seconds < LIMIT_S + 120

    # no secret reached a learner's kernel: not from the environment, not from a .env file
    spy = executed_text(tmp_path, "d-spy")
    assert "HF_TOKEN None None None" in spy and CANARY not in spy

    # the notebook without a parameters tag still wrote into its learner's run folder, with the class's profile
    notag = executed_text(tmp_path, "e-notag")
    assert f"RUN_ROOT {tmp_path / 'runs' / 'class-e-notag'} cpu-smoke" in notag
    assert not (tmp_path / "runs" / "default-run").exists()


def test_pass_secrets_is_an_explicit_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "MY_SECRET"):
        monkeypatch.setenv(name, CANARY)
    monkeypatch.setenv("SSH_AUTH_SOCK", CANARY)
    monkeypatch.setenv("KEYBOARD_LAYOUT", "us")  # not a secret: kept
    run = RunFolder.open("class-x", "cpu-smoke")
    closed = learner_env(run, "cpu-smoke")
    assert CANARY not in json.dumps(closed) and closed["KEYBOARD_LAYOUT"] == "us"
    assert closed["LLM_SCHOOL_NO_SECRETS"] == "1" and closed["LLM_SCHOOL_RUN_NAME"] == "class-x"
    opened = learner_env(run, "cpu-smoke", pass_secrets=True)
    assert opened["HF_TOKEN"] == CANARY and "LLM_SCHOOL_NO_SECRETS" not in opened


def test_a_notebook_past_its_limit_is_killed_with_its_kernel(tmp_path, monkeypatch):
    """The runner's own limit (the per-cell one normally fires first): the process group and the kernel, which
    Jupyter starts in a session of its own, are killed."""
    import helpers.classroom

    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path / "runs"))
    monkeypatch.setattr(helpers.classroom, "GRACE_S", 0)  # kill at the notebook's limit, before the cell's fires
    pid_file = tmp_path / "kernel.pid"
    path = tmp_path / "01_load_model.ipynb"
    path.write_text(
        notebook(PARAMETERS, f"import os\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))", "while 1: 0")
    )
    run = RunFolder.open("class-k", "cpu-smoke")
    seconds, failure = run_notebook(path, run, "cpu-smoke", timeout_s=15)
    assert failure == "01_load_model timed out: stopped after 15 s (killed)" and seconds < 25
    assert pid_file.is_file(), "the kernel did not start within the limit (machine too busy?)"
    kernel = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(kernel) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(kernel), "the learner's kernel outlived the runner"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    return status != "Z"  # a zombie is dead, only not yet reaped


def test_a_class_without_learners_is_an_error(tmp_path):
    (tmp_path / "class").mkdir()
    with pytest.raises(FileNotFoundError, match="no learner folders"):
        run_class(tmp_path / "class", "cpu-smoke")


def test_the_profile_holds_the_default_limit(smoke):
    assert smoke.classroom.notebook_timeout_s == 1800
