"""Run the workbook headlessly: every notebook in order with papermill, then a summary.

    python -m helpers.runner --profile cpu-lab            # what `make demo` does
    python -m helpers.runner --profile cpu-smoke --run-name smoke --only 01 02

Executed copies go to runs/<name>/executed/, never back into notebooks/.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from helpers import ROOT
from helpers.exercises import results
from helpers.profiles import ProfileError, load_profile
from helpers.runfolder import RUN_LOCK, RunFolder, RunInUseError, RunNameError
from helpers.steps import CHAIN, DATASET, EVAL, MODEL, PREPARED, TRAIN, adapter_dir, executed_dir

NOTEBOOKS_DIR = ROOT / "notebooks"


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names it, the cell and where the executed copy is."""


def notebooks(only: list[str] | None = None, folder: Path = NOTEBOOKS_DIR) -> list[Path]:
    """The ordered notebooks that write a step (from `folder`: a learner's copies, say), optionally only those whose
    name starts with one of `only`."""
    names = [step.notebook for step in CHAIN]
    found = [folder / f"{name}.ipynb" for name in names if (folder / f"{name}.ipynb").is_file()]
    if only:
        found = [p for p in found if any(p.stem.startswith(prefix) for prefix in only)]
    return found


def papermill_run(notebook: Path, executed: Path, profile_arg: str, run_name: str, **options: Any) -> None:
    """The one papermill call of the chain runner and the class runner: the notebook with its profile and run
    name injected, executed in notebooks/ into `executed` (options: progress_bar, log_output, execution_timeout)."""
    import papermill as pm

    options.setdefault("progress_bar", False)
    pm.execute_notebook(
        str(notebook),
        str(executed),
        parameters={"PROFILE": profile_arg, "RUN_NAME": run_name},
        cwd=str(NOTEBOOKS_DIR),
        kernel_name="python3",
        **options,
    )


def execute(notebook: Path, run: RunFolder, profile_name: str, log_output: bool = False) -> float:
    """Execute one notebook with papermill into the run folder; return its wall time in seconds."""
    import papermill as pm

    os.environ["LLM_SCHOOL_HEADLESS"] = "1"  # the kernel inherits it: widgets stay quiet, nothing waits for a click
    os.environ["LLM_SCHOOL_RUNS"] = str(run.root.parent)  # so the kernel finds the run folder by its plain name
    executed = executed_dir(run) / notebook.name
    executed.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    quiet = None if log_output else _kernel_stderr_to(executed.with_suffix(".kernel.log"))
    try:
        # the plain run prints one line per notebook; --log-output streams the cells
        papermill_run(notebook, executed, profile_name, run.root.name, progress_bar=log_output, log_output=log_output)
    except pm.PapermillExecutionError as err:
        raise NotebookFailed(
            f"{notebook.stem} failed in cell {err.exec_count} (cell index {err.cell_index}): "
            f"{err.ename}: {err.evalue}\nExecuted copy with the traceback: {executed}"
        ) from None
    finally:
        if quiet is not None:
            os.dup2(quiet, 2)  # the terminal's stderr back
            os.close(quiet)
    return time.perf_counter() - start


def _kernel_stderr_to(log: Path) -> int:
    """Send this process's stderr, which the kernel inherits, to `log` (its start-up warnings would bury the one
    line per notebook); returns the saved terminal stderr for `execute` to restore."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log, "ab") as target:
        os.dup2(target.fileno(), 2)
    return saved


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _relative(path: Path) -> str:
    """A path as the project sees it (runs/<name>/...), not this machine's absolute path."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def summary(run: RunFolder, seconds: dict[str, float]) -> str:
    """A plain-text table of what the run produced, from the step manifests."""
    m = run.manifests()
    lines = [f"Run folder: {_relative(run.root)}   profile: {run.profile_name}", ""]
    model = m.get(MODEL.name, {}).get("model", {})
    data = m.get(DATASET.name, {})
    train = m.get(TRAIN.name, {})
    evaluation = m.get(EVAL.name, {})
    prepared = m.get(PREPARED.name, {})
    facts = {
        "00 pairs written": f"{prepared.get('pairs_kept', '?')} from {prepared.get('documents', '?')} documents "
        f"({prepared.get('backend', '?')} generator)",
        "model": f"{model.get('name', '?')} ({model.get('parameters', 0) / 1e6:.1f} M parameters, "
        f"{model.get('backend', '?')})",
        "rows": f"{data.get('train_rows', '?')} train / {data.get('eval_rows', '?')} eval "
        f"(source {data.get('source', '?')})",
        "steps": _fmt(train.get("steps", "?")),
        "train loss first -> last": f"{_fmt(train.get('train_loss_first'))} -> {_fmt(train.get('train_loss_last'))}",
        "eval loss before -> after": f"{_fmt(train.get('eval_loss_before'))} -> {_fmt(train.get('eval_loss_after'))}",
        "train tokens/s": _fmt(train.get("tokens_per_second", "?"), 1),
        "07 answer loss base -> tuned": f"{_fmt(evaluation.get('loss_base'))} -> {_fmt(evaluation.get('loss_tuned'))}"
        f" ({_fmt(evaluation.get('loss_change_pct', '?'), 1)}%)",
        "07 ROUGE-L base -> tuned": f"{_fmt(evaluation.get('rougeL_base'))} -> {_fmt(evaluation.get('rougeL_tuned'))}",
        "07 tuned better? (95% CI)": ", ".join(f"{k} {v}" for k, v in evaluation.get("tuned_better", {}).items()),
        "07 loop rate base -> tuned": f"{_fmt(evaluation.get('loop_rate_base'))} -> "
        f"{_fmt(evaluation.get('loop_rate_tuned'))}",
        "07 general Qs ROUGE-L": f"{_fmt(evaluation.get('forgetting_rougeL_base'))} -> "
        f"{_fmt(evaluation.get('forgetting_rougeL_tuned'))}",
        "07 answer loss (s/question)": ", ".join(
            f"{name} {_fmt(v.get('answer_loss'))} ({_fmt(v.get('seconds_per_question'), 2)})"
            for name, v in evaluation.get("alternatives", {}).items()
        )
        or "not measured",
        "exercises": ", ".join(f"{n} {v}" for v, n in Counter(results(run).values()).items()) or "none checked",
        "adapter folder": _relative(adapter_dir(run)) if train else "not trained",
    }
    width = max(map(len, facts))
    lines += [f"  {key:<{width}}  {value}" for key, value in facts.items()]
    lines += ["", "  notebook                   seconds"]
    lines += [f"  {name:<26} {secs:7.1f}" for name, secs in seconds.items()]
    lines.append(f"  {'total':<26} {sum(seconds.values()):7.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-lab", help="profile name or YAML path (default: cpu-lab)")
    parser.add_argument("--run-name", default=None, help="run folder name under runs/ (default: the profile name)")
    parser.add_argument("--only", nargs="*", help="notebook prefixes to run, e.g. 01 02")
    parser.add_argument("--notebooks", type=Path, default=NOTEBOOKS_DIR, help="folder of notebooks (e.g. solutions)")
    parser.add_argument("--log-output", action="store_true", help="stream cell outputs to the terminal")
    args = parser.parse_args(argv)
    # A profile given as a path is resolved here: the kernels run in notebooks/, not in the caller's folder.
    profile_arg = str(Path(args.profile).resolve()) if Path(args.profile).suffix in {".yaml", ".yml"} else args.profile
    try:
        profile = load_profile(profile_arg)
        run = RunFolder.open(args.run_name or profile.name, profile.name)
        run.lock(RUN_LOCK)
    except (ProfileError, RunNameError, RunInUseError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds: dict[str, float] = {}
    chain = notebooks(args.only, args.notebooks)
    print(f"{len(chain)} notebooks, profile {profile.name}, run folder {run.root} (executed copies in executed/)")
    try:
        for notebook in chain:
            print(f"{notebook.stem:<28} running ...", end="\n" if args.log_output else "", flush=True)
            try:
                seconds[notebook.stem] = execute(notebook, run, profile_arg, args.log_output)
                print(f"\r{notebook.stem:<28} done in {seconds[notebook.stem]:6.1f} s", flush=True)
            except NotebookFailed as err:
                print(f"\r{notebook.stem:<28} FAILED", flush=True)
                print(f"\nerror: {err}", file=sys.stderr)
                print(summary(run, seconds))
                return 1
    finally:
        run.unlock(RUN_LOCK)
    print("\n" + summary(run, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
