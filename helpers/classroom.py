"""Run a whole class's notebooks headlessly with papermill, one folder per learner, and print who got how far.

    python -m helpers.classroom init class/ alice bob carol      # a copy of notebooks/ for each learner
    python -m helpers.classroom run class/ --profile cpu-lab     # every learner's notebooks in order, then a table
    python -m helpers.classroom run class/ --only 01 02 03       # just the first labs

Each learner's notebooks run in their own run folder (runs/<class>-<learner>/, executed copies in `executed/`).
A failing notebook stops that learner's chain (the next lab needs its results) but not the class; the table names
the notebook and the error, and counts the exercises each learner solved.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from helpers.exercises import results
from helpers.profiles import ProfileError, load_profile
from helpers.run import NOTEBOOKS_DIR, NotebookFailed, execute, notebooks
from helpers.runfolder import RunFolder


@dataclass
class LearnerResult:
    learner: str
    run: RunFolder
    seconds: dict[str, float] = field(default_factory=dict)
    failed: str = ""

    def exercises(self) -> str:
        verdicts = list(results(self.run).values())
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


def run_class(class_dir: Path, profile_name: str, only: list[str] | None = None) -> list[LearnerResult]:
    """Every learner's notebooks in order; returns one result per learner."""
    learners = sorted(p for p in class_dir.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))
    if not learners:
        raise FileNotFoundError(f"{class_dir} has no learner folders with notebooks; create them with `init`.")
    outcome = []
    for folder in learners:
        result = LearnerResult(folder.name, RunFolder.open(f"{class_dir.name}-{folder.name}", profile_name))
        for notebook in notebooks(only, folder):
            print(f"=== {folder.name}: {notebook.stem}", flush=True)
            try:
                result.seconds[notebook.stem] = execute(notebook, result.run, profile_name)
            except NotebookFailed as err:
                result.failed = str(err).splitlines()[0]
                break
        outcome.append(result)
    return outcome


def table(outcome: list[LearnerResult]) -> str:
    """One line per learner: notebooks that ran, exercises solved, minutes, and the first failure."""
    lines = ["| learner | notebooks run | exercises correct | minutes | first failure |", "|---|---|---|---|---|"]
    for r in outcome:
        ran = ", ".join(name[:2] for name in r.seconds) or "none"
        minutes = sum(r.seconds.values()) / 60
        lines.append(f"| {r.learner} | {ran} | {r.exercises()} | {minutes:.1f} | {r.failed or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("init", help="copy the student notebooks into a folder per learner")
    make.add_argument("class_dir", type=Path)
    make.add_argument("learners", nargs="+")
    go = commands.add_parser("run", help="run every learner's notebooks and print a table")
    go.add_argument("class_dir", type=Path)
    go.add_argument("--profile", default="cpu-lab")
    go.add_argument("--only", nargs="*", help="notebook prefixes, e.g. 01 02 03")
    args = parser.parse_args(argv)
    if args.command == "init":
        for path in init(args.class_dir, args.learners):
            print("created", path)
        return 0
    try:
        load_profile(args.profile)
        outcome = run_class(args.class_dir, args.profile, args.only)
    except (ProfileError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n" + table(outcome))
    return 1 if any(r.failed for r in outcome) else 0


if __name__ == "__main__":
    sys.exit(main())
