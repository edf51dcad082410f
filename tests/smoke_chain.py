"""The notebook chain under cpu-smoke, run once per test session and shared by the tests that need its results.

The notebooks run in copies where each exercise comes twice: first the student's empty answer and its check (a
learner's path, which must say "not answered yet"), then the worked solution and the same check (which must say
"correct"). One chain thus executes what a student copy and a solution copy each execute, in half the time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import nbformat

from helpers import ROOT
from helpers.launch import fork_run
from helpers.runfolder import RunFolder
from helpers.solutions import load_answers
from helpers.steps import CHAIN, TRAIN

RUN_NAME = "smoke"


@dataclass
class Chain:
    run_dir: Path
    output: str  # the runner's stdout and stderr, cell outputs included (--log-output)
    canaries: dict[str, str]  # made-up token values the kernels could see and must never write anywhere
    returncode: int

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({**asdict(self), "run_dir": str(self.run_dir)}))

    @classmethod
    def load(cls, path: Path) -> Chain:
        saved = json.loads(path.read_text())
        return cls(**{**saved, "run_dir": Path(saved["run_dir"])})


def write_checked_copies(out: Path) -> None:
    """Copies of the notebooks with each exercise's solution and check cells added after the student's."""
    answers = load_answers()
    out.mkdir(parents=True, exist_ok=True)
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(notebook, as_version=4)
        cells = []
        for index, cell in enumerate(nb.cells):
            cells.append(cell)
            previous = nb.cells[index - 1] if index else None
            if previous is None or "exercise" not in previous.metadata.get("tags", []):
                continue
            exercise = previous.metadata["exercise"]
            assert f'"{exercise}"' in cell.source, f"{notebook.name}: exercise {exercise}'s check must follow it"
            solution = nbformat.v4.new_code_cell(answers[exercise])
            cells += [solution, nbformat.v4.new_code_cell(cell.source)]
        nb.cells = cells
        nbformat.write(nb, out / notebook.name)


def run_chain(base: Path, profile: str = "cpu-smoke", only: list[str] | None = None) -> Chain:
    """Run the notebooks (00-09, or the `only` ones) as an instructor would (a separate process), with canary
    tokens in its environment. Under cpu-smoke each exercise runs twice (see the module's docstring)."""
    copies = base / "notebooks"
    if profile == "cpu-smoke":
        write_checked_copies(copies)
    else:
        copies = ROOT / "notebooks"
    canaries = {name: f"canary-{name}-{uuid.uuid4().hex}" for name in ("HF_TOKEN", "OPENAI_API_KEY")}
    env = {**os.environ, **canaries, "LLM_SCHOOL_RUNS": str(base), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "helpers.runner", "--profile", profile, "--run-name", RUN_NAME]
    selection = ["--only", *only] if only else []
    done = subprocess.run(
        [*command, "--log-output", "--notebooks", str(copies), *selection],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    return Chain(base / RUN_NAME, done.stdout + done.stderr, canaries, done.returncode)


def fork_through_training(chain: Chain, name: str) -> RunFolder:
    """A sibling of the shared chain's run folder holding its steps 00-05 (data to trained adapter), for a test that
    writes into a run (`helpers.launch.fork_run`, as lesson 09 forks its launches)."""
    return fork_run(RunFolder(chain.run_dir, "cpu-smoke"), name, CHAIN[: CHAIN.index(TRAIN) + 1])
