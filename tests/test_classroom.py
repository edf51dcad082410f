"""The classroom runner against real, tiny learner notebooks (no model is loaded): a kernel that kills itself, an
invalid .ipynb, an endless loop, a learner reading the instructor's tokens, a notebook that lost its parameters tag,
a notebook that writes garbage into its exercise record. Each failure lands in that learner's row and the class goes
on."""

import json
import os
import time

import nbformat
import pytest

from helpers.classroom import LearnerResult, learner_env, main, run_class, run_notebook, table
from helpers.exercises import check, results
from helpers.runfolder import RunFolder
from helpers.steps import EXERCISES, MODEL, executed_dir, exercises_file

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
        "print('HF_TOKEN', os.environ.get('HF_TOKEN'), os.environ.get('OPENAI_API_KEY'), os.environ.get('MY_SECRET'))\n"
        "import huggingface_hub, requests.utils\n"
        "print(dict(os.environ), huggingface_hub.get_token(), requests.utils.get_netrc_auth('https://hub.example'))",
    ),
    "e-notag": notebook(
        PARAMETERS,
        "from helpers.lesson import start_lesson\nlesson = start_lesson(PROFILE, RUN_NAME)\n"
        "print('RUN_ROOT', lesson.run.root, lesson.profile.name)",
        tagged=False,
    ),
    # 100,000 nested brackets: json.loads raises RecursionError, which once ended the class run without a table
    "f-records": notebook(
        PARAMETERS,
        "import os, pathlib\nrun = pathlib.Path(os.environ['LLM_SCHOOL_RUNS'], os.environ['LLM_SCHOOL_RUN_NAME'])\n"
        f"(run / {EXERCISES!r}).write_text('[' * 100_000 + ']' * 100_000)",
    ),
}
# Credentials under names no list foresaw, and under innocent names: none may reach a learner's kernel.
PATTERN_SECRETS = {
    "PGPASSWORD": CANARY,
    "MYSQL_PWD": CANARY,
    "DATABASE_URL": f"postgres://app:{CANARY}@db/app",
    "SENTRY_DSN": f"https://{CANARY}@sentry.example/1",
    "CI_JOB_JWT": CANARY,
    "SESSION_COOKIE": CANARY,
    "GOOGLE_APPLICATION_CREDENTIALS": CANARY,
    "SIGNING_PRIVATE_PEM": CANARY,
    "BASIC_AUTH": CANARY,
    "GIT_ASKPASS": CANARY,
    "REDIS_URL": f"redis://default:{CANARY}@cache:6379",
    "SOME_SETTING": "hf_" + "a1B2" * 9,  # a token's shape under an innocent name
}


@pytest.fixture
def classroom(tmp_path, monkeypatch):
    """A class folder with one learner per adversarial notebook (as 01; the last learner has a harmless 02 too)."""
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path / "runs"))
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "MY_SECRET"):
        monkeypatch.setenv(name, CANARY)
    for name, value in PATTERN_SECRETS.items():
        monkeypatch.setenv(name, value)
    # the instructor's stored logins, which the Hub libraries and requests use without being asked
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text(CANARY)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".netrc").write_text(f"machine hub.example login me password {CANARY}\n")
    env_file = tmp_path / "instructor.env"
    env_file.write_text(f"GITHUB_TOKEN={CANARY}\nHF_TOKEN={CANARY}\n")
    class_dir = tmp_path / "class"
    for learner, first in LEARNERS.items():
        folder = class_dir / learner
        folder.mkdir(parents=True)
        (folder / "01_load_model.ipynb").write_text(first.replace("ENV_FILE", repr(str(env_file))))
    (class_dir / "e-notag" / "02_peft_setup.ipynb").write_text(SECOND)
    return class_dir


def executed_text(tmp_path, learner: str, name: str = f"{MODEL.notebook}.ipynb") -> str:
    return (executed_dir(RunFolder(tmp_path / "runs" / f"class-{learner}", "cpu-smoke")) / name).read_text()


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

    # no secret reached a learner's kernel: not from the environment, not from a .env file, not from a stored login
    spy = executed_text(tmp_path, "d-spy")
    assert "HF_TOKEN None None None" in spy and "} None None" in spy and CANARY not in spy

    # a learner's unreadable exercise record is named in their own row; every other row is still printed
    records = rows["f-records"].split("|")
    assert records[2].strip() == "01" and records[-2].strip() == "-", table
    assert "class-f-records/exercises.json is unreadable: nested too deeply" in records[3], table

    # the notebook without a parameters tag still wrote into its learner's run folder, with the class's profile
    notag = executed_text(tmp_path, "e-notag")
    assert f"RUN_ROOT {tmp_path / 'runs' / 'class-e-notag'} cpu-smoke" in notag
    assert not (tmp_path / "runs" / "default-run").exists()


def test_pass_secrets_is_an_explicit_opt_in(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "MY_SECRET"):
        monkeypatch.setenv(name, CANARY)
    monkeypatch.setenv("SSH_AUTH_SOCK", CANARY)
    for name, value in PATTERN_SECRETS.items():
        monkeypatch.setenv(name, value)
    kept = {"KEYBOARD_LAYOUT": "us", "TOKENIZERS_PARALLELISM": "false", "PWD": "/work", "HF_HUB_OFFLINE": "1",
            "HTTP_PROXY": "http://proxy:3128", "PASSAGE_COUNT": "3", "OMP_NUM_THREADS": "1"}  # fmt: skip
    for name, value in kept.items():  # not secrets: kept
        monkeypatch.setenv(name, value)
    run = RunFolder.open("class-x", "cpu-smoke")
    closed = learner_env(run, "cpu-smoke")
    assert CANARY not in json.dumps(closed) and "a1B2" not in json.dumps(closed)
    assert {name: closed.get(name) for name in kept} == kept
    # the instructor's stored logins are out of reach of the Hub libraries and requests
    assert closed["HF_TOKEN_PATH"] == closed["NETRC"] == str(run.root / ".no-stored-login")
    assert closed["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert closed["LLM_SCHOOL_NO_SECRETS"] == "1" and closed["LLM_SCHOOL_RUN_NAME"] == "class-x"
    opened = learner_env(run, "cpu-smoke", pass_secrets=True)
    assert opened["HF_TOKEN"] == CANARY and "LLM_SCHOOL_NO_SECRETS" not in opened


@pytest.mark.parametrize(
    ("content", "fault"),
    [
        ("[1]", "it holds a list, not an object of verdicts"),
        ('"x"', "it holds a str, not an object of verdicts"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('{"01.1": ["correct"]}', "the verdict of '01.1' is not text (got list)"),
        ('{"01.1": "correct", "| x\\n|": 1}', "is not text (got int)"),
        ('{"01.1": "corr', "Unterminated string"),
        (" " * 1_000_001, "larger than 1,000,000 bytes"),
    ],
    ids=["list", "string", "deep", "list-verdict", "pipe-key", "torn", "huge"],
)
def test_an_unreadable_exercise_record_is_named_in_its_learners_row(tmp_path, monkeypatch, content, fault):
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    hostile, fine = RunFolder.open("class-h", "cpu-smoke"), RunFolder.open("class-f", "cpu-smoke")
    hostile.root.mkdir(parents=True, exist_ok=True)
    exercises_file(hostile).write_text(content)
    check(fine, "05.1", 1, history={"train": [(1, 0.5), (2, 0.7)]})
    lines = table([LearnerResult("h", hostile), LearnerResult("f", fine)]).splitlines()
    assert len(lines) == 4 and all(line.count(" | ") == 4 for line in lines[2:]), lines  # one cell each, no row broken
    assert f"{exercises_file(hostile)} is unreadable: " in lines[2] and fault in lines[2], lines[2]
    assert lines[3] == "| f | none | 1/1 | 0.0 | - |"
    # the learner's next check replaces the unreadable record instead of failing on it
    assert results(hostile) == {}
    check(hostile, "05.1", 2, history={"train": [(1, 0.5), (2, 0.7)]})
    assert results(hostile, strict=True) == {"05.1": "wrong"}


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
