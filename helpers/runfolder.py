"""The run folder: how notebooks hand results to each other.

papermill runs every notebook in a fresh kernel, so results travel as files in `runs/<name>/<step>/`, each step
with a `manifest.json` (which steps there are and what they hold: `helpers/steps.py`). A step is written to a
staging folder and swapped into place when complete (files and folders fsynced first), so a later notebook never
reads half a result and a failed rerun never destroys the last good one. A lock file per step (and one for a whole
chain run) stops two processes from writing the same step at once; a lock left by a killed process is taken over.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from helpers import ROOT
from helpers.steps import STEPS

_VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RUN_LOCK = "run"  # held by `python -m helpers.run` for a whole chain; its notebook kernels are its children


def runs_dir() -> Path:
    """Where run folders live: `runs/` in the project, or $LLM_SCHOOL_RUNS."""
    return Path(os.environ.get("LLM_SCHOOL_RUNS", ROOT / "runs"))


class MissingStepError(RuntimeError):
    """A notebook needs a step that has not been run (or was run with another profile)."""


class RunNameError(ValueError):
    """A RUN_NAME that is not a plain folder name."""


class RunInUseError(RuntimeError):
    """Another live process is writing the same step of the same run folder."""


def library_versions() -> dict[str, str]:
    """Versions of Python and the training libraries, for manifests."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk (a folder: every file in it, then the folder)."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                fsync_path(child)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary file, fsync it and rename it over `path`: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ancestors() -> set[int]:
    """This process and its parents (a notebook kernel started by the runner may use the runner's lock)."""
    pids, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


class RunFolder:
    """One run of the workbook: `runs/<name>/` with a folder per step."""

    def __init__(self, root: Path, profile_name: str, seed: int | None = None):
        self.root = Path(root)
        self.profile_name = profile_name
        self.seed = seed
        self.root.mkdir(parents=True, exist_ok=True)
        self._recover()

    @classmethod
    def open(cls, name: str, profile_name: str, seed: int | None = None) -> RunFolder:
        """Open (or create) `runs/<name>`; `name` must be a plain folder name (letters, digits, `.`, `_`, `-`)."""
        if not _PLAIN_NAME.fullmatch(name or "") or set(name) <= {"."}:
            raise RunNameError(
                f"RUN_NAME {name!r} is not a plain folder name: use letters, digits, '.', '_' and '-' (e.g. "
                f"'cpu-lab' or 'try2'); it becomes {runs_dir()}/<RUN_NAME>. To keep runs elsewhere, set the "
                "LLM_SCHOOL_RUNS environment variable to that folder."
            )
        return cls(runs_dir() / name, profile_name, seed)

    @property
    def checkpoints(self) -> Path:
        """The trainer's checkpoints of an unfinished run (removed once notebook 05 saves its step)."""
        return self.root / "checkpoints"

    def record(self, name: str) -> Path:
        """A run-level record that is not a step (exercise verdicts, executed notebooks); JSON: `write_json_atomic`."""
        return self.root / name

    def cache(self, name: str) -> Path:
        """A working folder that survives reruns (notebook 00's helper-LLM replies, say)."""
        return self.root / f"{name}-cache"

    def path(self, step: str) -> Path:
        """Folder of a completed step (it may not exist yet)."""
        if step not in STEPS:
            raise KeyError(f"Unknown step {step!r}; steps are {', '.join(STEPS)}")
        return self.root / step

    def require(self, step: str) -> dict[str, Any]:
        """Manifest of an earlier step; a clear error if it is missing or from another profile."""
        manifest_path = self.path(step) / "manifest.json"
        notebook = STEPS[step].notebook
        if not manifest_path.is_file():
            raise MissingStepError(
                f"Step {step} is missing in {self.root}: run notebooks/{notebook}.ipynb first "
                f"(with the same RUN_NAME and PROFILE)."
            )
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("profile") != self.profile_name:
            raise MissingStepError(
                f"Step {step} in {self.root} was made with profile {manifest.get('profile')!r}, not "
                f"{self.profile_name!r}: rerun notebooks/{notebook}.ipynb with this profile or use another RUN_NAME."
            )
        return manifest

    # locks

    def _lock_file(self, name: str) -> Path:
        return self.root / f".{name}.lock"

    def _holder(self, name: str) -> int | None:
        """The live process holding lock `name`, None when free or stale (its process is gone)."""
        try:
            pid = int(self._lock_file(name).read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        return pid if pid and _pid_alive(pid) else None

    def lock(self, name: str) -> None:
        """Take lock `name` for this process; a live other holder (not this process or a parent) is an error."""
        for held in (RUN_LOCK, name):
            pid = self._holder(held)
            if pid is not None and pid not in _ancestors():
                what = "a chain run" if held == RUN_LOCK else f"step {held}"
                raise RunInUseError(
                    f"Run folder {self.root} is in use by pid {pid} ({what}). Wait for it to finish, stop it, or "
                    "use another RUN_NAME."
                )
        if self._holder(name) is None:  # free, stale, or ours already
            tmp = self._lock_file(name).with_suffix(f".{os.getpid()}")
            tmp.write_text(str(os.getpid()))
            os.replace(tmp, self._lock_file(name))

    def unlock(self, name: str) -> None:
        """Release lock `name` if this process holds it."""
        if self._holder(name) == os.getpid():
            self._lock_file(name).unlink(missing_ok=True)

    # writing a step

    def _recover(self) -> None:
        """A commit killed between its two renames leaves the last good step as `.<step>.old`: put it back."""
        for step in STEPS:
            old, final = self.root / f".{step}.old", self.root / step
            if old.is_dir() and not final.exists():
                old.rename(final)

    def begin(self, step: str) -> Path:
        """Fresh staging folder to write a step into (locked to this process); `commit` moves it into place."""
        self.path(step)  # validates the name
        self.lock(step)
        staging = self.root / f".{step}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: str, manifest: dict[str, Any]) -> Path:
        """Write the step's manifest, flush everything to disk and swap the staged folder in for the old one."""
        staging = self.root / f".{step}.partial"
        if not staging.is_dir():
            raise RuntimeError(f"commit({step!r}) without begin({step!r})")
        full = {
            "step": step,
            "notebook": STEPS[step].notebook,
            "profile": self.profile_name,
            "seed": self.seed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
            **manifest,
        }
        (staging / "manifest.json").write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
        fsync_path(staging)
        final, old = self.path(step), self.root / f".{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)
        self.unlock(step)
        return final

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every completed step's manifest, in order."""
        found = {}
        for step in STEPS:
            path = self.path(step) / "manifest.json"
            if path.is_file():
                found[step] = json.loads(path.read_text(encoding="utf-8"))
        return found
