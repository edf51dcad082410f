"""Run a whole class's notebooks headlessly with papermill, one folder per learner, and print who got how far.

    python -m helpers.classroom init class/ alice bob carol      # a copy of notebooks/ for each learner
    python -m helpers.classroom run class/ --profile cpu-lab     # every learner's notebooks in order, then a table
    python -m helpers.classroom run class/ --only 01 02 03       # just the first labs
    python -m helpers.classroom run class/ --timeout 600         # stop any notebook after 10 minutes

Each learner's notebooks run in their own run folder (runs/<class>-<learner>/, executed copies in `executed/`),
each notebook in its own process with a time limit (--timeout, else the profile's classroom.notebook_timeout_s).
A failing notebook (an error, a dead kernel, an invalid .ipynb, a timeout) stops that learner's chain (the next lab
needs its results) but not the class; the table names the notebook and the error, and counts the exercises each
learner solved. Learners' kernels get no tokens or keys from the instructor's environment or `.env` unless
--pass-secrets is given. This is separation, not a sandbox: see docs/instructor-guide.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from helpers import ROOT
from helpers.exercises import results
from helpers.profiles import ProfileError, load_profile
from helpers.runfolder import RUN_LOCK, RunFolder, RunInUseError, RunNameError
from helpers.runner import NOTEBOOKS_DIR, notebooks, papermill_run
from helpers.secrets import environment_without_secrets
from helpers.steps import executed_dir

GRACE_S = 60  # on top of the notebook's limit: kernel start and writing the executed copy


@dataclass
class LearnerResult:
    learner: str
    run: RunFolder | None  # None: the folder's name cannot be a run folder's
    seconds: dict[str, float] = field(default_factory=dict)
    failed: str = ""

    def exercises(self) -> str:
        if self.run is None:
            return "-"
        try:
            verdicts = list(results(self.run, strict=True).values())
        except ValueError as err:  # a learner's kernel wrote the file: its fault shows in their row only
            return str(err)
        return f"{verdicts.count('correct')}/{len(verdicts)}"


def init(class_dir: Path, learners: list[str]) -> list[Path]:
    """A fresh copy of the student notebooks for each learner; an existing learner folder is left as it is."""
    made = []
    for learner in learners:
        target = class_dir / learner
        if target.exists():
            print(f"{target} exists: left as it is (a learner's work is never overwritten)")
            continue
        target.mkdir(parents=True)
        for notebook in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
            shutil.copy2(notebook, target / notebook.name)
        made.append(target)
    return made


def learner_env(run: RunFolder, profile_arg: str, pass_secrets: bool = False) -> dict[str, str]:
    """The environment of a learner's kernel: the instructor's, without tokens, keys, secrets and stored logins
    (unless `pass_secrets`: see helpers.secrets), and with the learner's run folder and the class's profile fixed
    (see lesson.start_lesson)."""
    env = dict(os.environ) if pass_secrets else environment_without_secrets(run.root)
    if not pass_secrets:
        env["LLM_SCHOOL_NO_SECRETS"] = "1"  # and `.env` is not read in the kernel either
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(
        LLM_SCHOOL_HEADLESS="1",  # widgets stay quiet, nothing waits for a click
        LLM_SCHOOL_RUNS=str(run.root.parent),
        LLM_SCHOOL_RUN_NAME=run.root.name,
        LLM_SCHOOL_PROFILE=profile_arg,
    )
    return env


def _kill_tree(process: subprocess.Popen) -> None:
    """Kill the notebook's runner with its process group, and its kernel, which Jupyter starts in a session of its
    own (so that it can be interrupted) and which the runner's group therefore does not include."""
    import psutil

    try:
        groups = {os.getpgid(p.pid) for p in psutil.Process(process.pid).children(recursive=True)}
    except (psutil.Error, ProcessLookupError):
        groups = set()
    groups.add(process.pid)  # the runner leads its own session (start_new_session): its group id is its pid
    groups.discard(os.getpgrp())  # never our own group
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    process.wait()


def run_notebook(
    notebook: Path, run: RunFolder, profile_arg: str, timeout_s: int, pass_secrets: bool = False
) -> tuple[float, str]:
    """Execute one learner notebook in its own process within `timeout_s`; returns (seconds, "" or the failure)."""
    executed = executed_dir(run) / notebook.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llm-school-") as scratch:
        outcome_file = Path(scratch) / "outcome.json"
        command = [sys.executable, "-m", "helpers.classroom", "_execute", str(notebook), str(executed)]
        command += [profile_arg, run.root.name, str(timeout_s), str(outcome_file)]
        start = time.perf_counter()
        process = subprocess.Popen(
            command, env=learner_env(run, profile_arg, pass_secrets), cwd=str(ROOT), start_new_session=True
        )
        try:
            process.wait(timeout=timeout_s + GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_tree(process)
            return time.perf_counter() - start, f"{notebook.stem} timed out: stopped after {timeout_s} s (killed)"
        seconds = time.perf_counter() - start
        try:
            failure = json.loads(outcome_file.read_text(encoding="utf-8"))["failure"]
        except (OSError, ValueError, KeyError):
            failure = f"{notebook.stem}: its runner process died (exit code {process.returncode})"
    return seconds, failure


def _failure(notebook: Path, err: BaseException, timeout_s: int) -> str:
    """One line naming the notebook and what went wrong, for the learner's row."""
    import nbformat
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    from papermill import PapermillExecutionError

    name = notebook.stem
    if isinstance(err, PapermillExecutionError):
        return f"{name} failed in cell {err.exec_count} (cell index {err.cell_index}): {err.ename}: {err.evalue}"
    if isinstance(err, CellTimeoutError):
        return f"{name} timed out: a cell ran past the limit of {timeout_s} s"
    if isinstance(err, DeadKernelError):
        return f"{name}: the kernel died (os._exit, a crash or out of memory): {err}"
    if isinstance(err, (json.JSONDecodeError, nbformat.reader.NotJSONError, nbformat.ValidationError)):
        return f"{name}: not a valid notebook file ({str(err).splitlines()[0][:200]})"
    return f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"


def _execute(argv: list[str]) -> int:
    """The child process for one notebook: papermill with a per-cell limit; the outcome goes to a JSON file."""
    notebook, executed, profile_arg, run_name, timeout_s, outcome_file = argv
    failure = ""
    try:
        papermill_run(Path(notebook), Path(executed), profile_arg, run_name, execution_timeout=int(timeout_s))
    except Exception as err:  # every failure of a learner's notebook is reported in their row, never raised
        failure = _failure(Path(notebook), err, int(timeout_s))
    Path(outcome_file).write_text(json.dumps({"failure": failure}), encoding="utf-8")
    return 0


def run_class(
    class_dir: Path,
    profile_name: str,
    only: list[str] | None = None,
    timeout_s: int | None = None,
    pass_secrets: bool = False,
) -> list[LearnerResult]:
    """Every learner's notebooks in order, each in its own process within the time limit; one result per learner."""
    learners = sorted(p for p in class_dir.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))
    if not learners:
        raise FileNotFoundError(f"{class_dir} has no learner folders with notebooks; create them with `init`.")
    profile = load_profile(profile_name)
    limit = timeout_s or profile.classroom.notebook_timeout_s
    outcome = []
    for folder in learners:
        result = LearnerResult(folder.name, None)
        outcome.append(result)
        try:
            result.run = RunFolder.open(f"{class_dir.name}-{folder.name}", profile.name)
            result.run.lock(RUN_LOCK)
        except (RunNameError, RunInUseError) as err:
            result.failed = str(err)
            continue
        try:
            for notebook in notebooks(only, folder):
                print(f"=== {folder.name}: {notebook.stem} (limit {limit} s)", flush=True)
                seconds, failure = run_notebook(notebook, result.run, profile_name, limit, pass_secrets)
                result.seconds[notebook.stem] = seconds
                if failure:
                    result.failed = failure
                    break
        finally:
            result.run.unlock(RUN_LOCK)
    return outcome


def table(outcome: list[LearnerResult]) -> str:
    """One line per learner: notebooks that ran, exercises solved, minutes, and the first failure."""
    lines = ["| learner | notebooks run | exercises correct | minutes | first failure |", "|---|---|---|---|---|"]
    for r in outcome:
        # notebooks that ran through (the failed one still counts in the minutes)
        ran = ", ".join(name[:2] for name in r.seconds if not r.failed.startswith(name)) or "none"
        minutes = sum(r.seconds.values()) / 60
        lines.append(f"| {_cell(r.learner)} | {ran} | {_cell(r.exercises())} | {minutes:.1f} | {_cell(r.failed)} |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    """Text that stays in its Markdown table cell, whatever a learner's notebook put in it."""
    return text.replace("|", "\\|").replace("\r", " ").replace("\n", " ") or "-"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_execute"]:  # internal: one notebook, in the process run_notebook started
        return _execute(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("init", help="copy the student notebooks into a folder per learner")
    make.add_argument("class_dir", type=Path)
    make.add_argument("learners", nargs="+")
    go = commands.add_parser("run", help="run every learner's notebooks and print a table")
    go.add_argument("class_dir", type=Path)
    go.add_argument("--profile", default="cpu-lab", help="profile name or YAML path (default: cpu-lab)")
    go.add_argument("--only", nargs="*", help="notebook prefixes, e.g. 01 02 03")
    go.add_argument(
        "--timeout", type=int, default=None, help="seconds per notebook (default: profile classroom.notebook_timeout_s)"
    )
    go.add_argument(
        "--pass-secrets",
        action="store_true",
        help="give learners' kernels the instructor's tokens and keys (HF_TOKEN, OPENAI_API_KEY, .env): off by default",
    )
    args = parser.parse_args(argv)
    if args.command == "init":
        for path in init(args.class_dir, args.learners):
            print("created", path)
        return 0
    # A profile given as a path is resolved here: the kernels run in notebooks/, not in the caller's folder.
    profile_arg = str(Path(args.profile).resolve()) if Path(args.profile).suffix in {".yaml", ".yml"} else args.profile
    if args.timeout is not None and args.timeout < 1:
        print("error: --timeout must be at least 1 second", file=sys.stderr)
        return 2
    try:
        outcome = run_class(args.class_dir, profile_arg, args.only, args.timeout, args.pass_secrets)
    except (ProfileError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + table(outcome))
    return 1 if any(r.failed for r in outcome) else 0


if __name__ == "__main__":
    sys.exit(main())
