"""Notebook 07 runs to the end on any valid evaluation file (issue 27): small adversarial `EVAL_DATA` files,
executed with papermill on a fork of the shared smoke chain's trained run."""

import json
from pathlib import Path

import nbformat
from smoke_chain import fork_through_training

from helpers.runfolder import RunFolder
from helpers.runner import NOTEBOOKS_DIR
from helpers.steps import EVAL, figure_name, load_report, load_splits

SYSTEM = "You are a cybersecurity expert."


def _row(instruction: str, response: str, subject: str = "Network defense") -> dict:
    return {"subject": subject, "system": SYSTEM, "instruction": instruction, "response": response}


def _files(run: RunFolder, folder: Path) -> dict[str, Path]:
    """One row with a one-word reference; three rows: a training row planted as is, a reference that loops, and
    unicode, tabs and live HTML in both question and answer (security data holds such payloads on purpose)."""
    trained = load_splits(run)["train"][0]
    planted = _row(trained["prompt"][-1]["content"], trained["completion"][0]["content"], trained["subject"])
    rows = {
        "one_row": [_row("Which TCP port does HTTPS use by default?", "443.")],
        "three_rows": [
            planted,
            _row("Repeat the rule.", "Block the port, " * 20, "Firewalls"),
            _row(
                "Qu'est-ce qu'un pare-feu?\tRéponds <b>brièvement</b> 🔥 <script>alert(1)</script>",
                "Un filtre\tde paquets: «deny». <img src=x onerror=alert(2)> is another way in.",
            ),
        ],
    }
    paths = {}
    for name, content in rows.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in content), encoding="utf-8")
    return paths


def _html(path: Path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    return "".join(o.get("data", {}).get("text/html", "") for c in cells if c.cell_type == "code"
                   for o in c.get("outputs", []))  # fmt: skip


def _outputs(path: Path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    return "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_07_runs_to_the_end_on_small_hostile_evaluation_files_and_escapes_them(smoke_chain, tmp_path, monkeypatch):
    import papermill as pm

    run = fork_through_training(smoke_chain, "adversarial")
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(run.root.parent))
    for name, path in _files(run, tmp_path).items():
        executed = tmp_path / f"07_{name}.ipynb"
        pm.execute_notebook(
            str(NOTEBOOKS_DIR / f"{EVAL.notebook}.ipynb"), str(executed),
            parameters={"PROFILE": "cpu-smoke", "RUN_NAME": run.root.name, "EVAL_DATA": str(path)},
            cwd=str(NOTEBOOKS_DIR), kernel_name="python3",
        )  # fmt: skip
        output = _outputs(executed)
        assert "07 self-check passed" in output, name
        report = load_report(RunFolder(run.root, "cpu-smoke"))
        rows = 1 if name == "one_row" else 3
        assert report["eval_rows"] == rows and report["generation"]["questions"] == rows
        for verdict in report["verdicts"]:
            assert verdict["low"] <= verdict["change"] <= verdict["high"], (name, verdict)
            assert rows > 1 or verdict["tuned better"] in ("can't tell", "n/a"), "one question draws no verdict"
        flagged = report["overlap"]["near_duplicates"]
        assert flagged == (0 if name == "one_row" else 1), report["overlap"]
        assert ("1 near-duplicate(s) flagged" in output) == (name == "three_rows")
        assert str(tmp_path) not in output, "the evaluation file is shown without this machine's path"
        assert (run.path(EVAL) / figure_name("intervals")).is_file(), "the intervals figure was drawn and saved"
        if name == "three_rows":  # 07's tables show model and data text as text, never as live HTML
            html = _html(executed)
            assert "&lt;script&gt;" in html, "the hostile rows should be shown, escaped"
            assert "<script" not in html and "<img" not in html, "model or data text became live HTML"
