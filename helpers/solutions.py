"""Write solution copies of the notebooks: each exercise's answer cell replaced by its worked solution.

    python -m helpers.solutions                  # -> solutions/notebooks/ (git-ignored), what `make solutions` does
    python -m helpers.solutions --out DIR

Student notebooks keep `answer_xx = None`; the solutions live in `solutions/answers.yaml`, apart from them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nbformat
import yaml

from helpers import ROOT

ANSWERS = ROOT / "solutions" / "answers.yaml"
NOTEBOOKS = ROOT / "notebooks"


def load_answers(path: Path = ANSWERS) -> dict[str, str]:
    """Exercise id -> solution code."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _answer_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if "exercise" in c.metadata.get("tags", [])]


def exercise_ids(notebook: Path) -> list[str]:
    """The exercises whose answer cells a notebook has (cells tagged `exercise`)."""
    return [c.metadata["exercise"] for c in _answer_cells(nbformat.read(notebook, as_version=4))]


def write_solutions(out: Path, answers: dict[str, str] | None = None) -> list[Path]:
    """Solution copies of every notebook with exercises; an exercise without a solution is an error."""
    answers = answers or load_answers()
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for notebook in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(notebook, as_version=4)
        cells = _answer_cells(nb)
        if not cells:
            continue
        for cell in cells:
            exercise = cell.metadata["exercise"]
            if exercise not in answers:
                raise KeyError(f"{notebook.name}: exercise {exercise} has no solution in {ANSWERS}")
            cell.source = f"# Solution to exercise {exercise}\n{answers[exercise].rstrip()}"
        target = out / notebook.name
        nbformat.write(nb, target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "solutions" / "notebooks")
    args = parser.parse_args(argv)
    for path in write_solutions(args.out):
        print("wrote", path)


if __name__ == "__main__":
    main()
