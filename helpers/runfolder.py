"""The run folder: how notebooks hand results to each other.

papermill runs every notebook in a fresh kernel, so results travel as files in `runs/<name>/<step>/`, each step
with a `manifest.json`. This module knows what a step is (`Step`) but not which steps the workbook has: those,
and every file they write, are declared in `helpers/steps.py`. A step is written to a staging folder and swapped
into place when complete (files and folders fsynced first), so a later notebook never reads half a result and a
failed rerun never destroys the last good one. A lock per step (and one for a whole chain run) stops two processes
from writing the same step at once: an `flock` on a lock file, which the kernel releases when its process dies, so
a lock left by a killed process is free again.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import re
import shutil
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from helpers import ROOT

_VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")
_PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
MANIFEST = "manifest.json"
RUN_LOCK = "run"  # held by the chain runner for a whole run; its notebook kernels are its children
_HELD: dict[str, int] = {}  # lock file -> its open descriptor, for every lock this process holds


@dataclass(frozen=True)
class Step:
    """One step of the workbook: the folder it writes in the run folder and the notebook that writes it."""

    name: str
    notebook: str  # notebooks/<notebook>.ipynb
    in_chain: bool = True  # run by the chain runner; appendices are not


def runs_dir() -> Path:
    """Where run folders live: `runs/` in the project, or $LLM_SCHOOL_RUNS."""
    return Path(os.environ.get("LLM_SCHOOL_RUNS", ROOT / "runs"))


class MissingStepError(RuntimeError):
    """A notebook needs a step that has not been run (or was run with another profile)."""


class RunNameError(ValueError):
    """A RUN_NAME that is not a plain folder name, or a run folder that leads outside the runs folder."""


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_path(path: Path) -> None:
    """Flush a file, or a folder with everything in it (files, then each subfolder's entries, then its own)."""
    if path.is_dir():
        for child in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if not child.is_symlink() and (child.is_file() or child.is_dir()):
                _fsync(child)
    _fsync(path)


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to a temporary file, fsync it and rename it over `path`: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _ancestors() -> set[int]:
    """This process and its parents (a notebook kernel started by the runner works under the runner's lock)."""
    pids, pid = {os.getpid()}, os.getppid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def _try_flock(path: Path) -> int | None:
    """An exclusive lock on `path` (created if missing) with this process's pid written in it, or None when another
    process holds it. The file may have been unlinked by its last holder between our open and our lock: then the lock
    is on a dead inode, so check the path still names the file we locked, and retry."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


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
        """Open (or create) `runs/<name>`; `name` must be a plain folder name (letters, digits, `.`, `_`, `-`) and
        the folder must be a real folder inside the runs folder (a symlink could send the steps anywhere)."""
        if not _PLAIN_NAME.fullmatch(name or "") or set(name) <= {"."}:
            raise RunNameError(
                f"RUN_NAME {name!r} is not a plain folder name: use letters, digits, '.', '_' and '-' (e.g. "
                f"'cpu-lab' or 'try2'); it becomes {runs_dir()}/<RUN_NAME>. To keep runs elsewhere, set the "
                "LLM_SCHOOL_RUNS environment variable to that folder."
            )
        root = runs_dir() / name
        if root.is_symlink():
            raise RunNameError(
                f"Run folder {root} is a symbolic link (to {os.readlink(root)}): steps would be written outside "
                f"{runs_dir()}. Remove the link, or set LLM_SCHOOL_RUNS to the folder you want runs kept in."
            )
        return cls(root, profile_name, seed)

    def place(self, name: str) -> Path:
        """A run-level file or folder that is not a step (checkpoints, caches, executed notebooks, exercise
        verdicts); every such name is declared in helpers/steps.py. JSON files: `write_json_atomic`."""
        return self.root / name

    def path(self, step: Step) -> Path:
        """Folder of a completed step (it may not exist yet)."""
        return self.root / step.name

    def require(self, step: Step) -> dict[str, Any]:
        """Manifest of an earlier step; a clear error if it is missing or from another profile."""
        manifest_path = self.path(step) / MANIFEST
        if not manifest_path.is_file():
            raise MissingStepError(
                f"Step {step.name} is missing in run folder {self.root.name}: run notebooks/{step.notebook}.ipynb "
                "first (with the same RUN_NAME and PROFILE)."
            )
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("profile") != self.profile_name:
            raise MissingStepError(
                f"Step {step.name} in run folder {self.root.name} was made with profile {manifest.get('profile')!r}, "
                f"not {self.profile_name!r}: rerun notebooks/{step.notebook}.ipynb with this profile or use another "
                "RUN_NAME."
            )
        return manifest

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every completed step's manifest, by step folder, in folder order (the steps are numbered)."""
        found = {}
        for path in sorted(self.root.glob(f"*/{MANIFEST}")):
            if path.parent.name.startswith("."):
                continue  # a staged or replaced copy, not a step
            try:
                found[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not a step's manifest, or not readable: nothing to report from it
        return found

    # locks

    def _lock_file(self, name: str) -> Path:
        return self.root / f".{name}.lock"

    def _holder(self, name: str) -> int | None:
        """The pid written in lock `name`'s file (0 when unreadable), read once its lock is known to be held; the
        holder writes it just after locking, so an empty file is read again for a moment."""
        for _ in range(20):
            try:
                if pid := int(self._lock_file(name).read_text().strip() or 0):
                    return pid
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        return 0

    def _is_free(self, name: str) -> bool:
        """Whether no other process holds lock `name`, asked with a shared lock for a moment: several processes may
        ask at once (two kernels beginning different steps both look at the chain's lock) without refusing each
        other."""
        path = self._lock_file(name)
        if str(path) in _HELD:
            return True
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # closing releases the shared lock

    def _acquire(self, name: str) -> bool:
        """Take lock `name` for this process (True), or learn that another process holds it (False)."""
        path = self._lock_file(name)
        if str(path) in _HELD:
            return True
        fd = _try_flock(path)
        if fd is None:
            return False
        _HELD[str(path)] = fd
        return True

    def lock(self, name: str) -> None:
        """Take lock `name` (a step's name, or RUN_LOCK). A chain run's lock held by this process or a parent (the
        runner of this kernel) is no obstacle; any other live holder is an error."""
        checks = [(RUN_LOCK, self._is_free)] if name != RUN_LOCK else []
        for held, free in [*checks, (name, self._acquire)]:
            if free(held):
                continue
            pid = self._holder(held)
            if pid in _ancestors():
                continue
            what = "a chain run" if held == RUN_LOCK else f"step {held}"
            raise RunInUseError(
                f"Run folder {self.root.name} is in use by pid {pid or '?'} ({what}). Wait for it to finish, stop it, "
                "or use another RUN_NAME."
            )

    def unlock(self, name: str) -> None:
        """Release lock `name` if this process holds it (the file goes first, then the lock: see _try_flock)."""
        path = self._lock_file(name)
        fd = _HELD.pop(str(path), None)
        if fd is not None:
            path.unlink(missing_ok=True)
            os.close(fd)

    # writing a step

    def _recover(self) -> None:
        """A commit killed between its two renames leaves the last good step as `.<step>.old`: put it back, under
        the step's lock, so a live commit between its renames is left alone."""
        for old in self.root.glob(".*.old"):
            name = old.name[1:].removesuffix(".old")
            final = self.root / name
            if not old.is_dir() or final.exists() or not _PLAIN_NAME.fullmatch(name):
                continue
            ours = str(self._lock_file(name)) in _HELD
            if not self._acquire(name):
                continue  # its writer is alive and will finish the swap
            try:
                if old.is_dir() and not final.exists():
                    old.rename(final)
            finally:
                if not ours:
                    self.unlock(name)

    def begin(self, step: Step) -> Path:
        """Fresh staging folder to write a step into (locked to this process); `commit` moves it into place."""
        self.lock(step.name)
        staging = self.root / f".{step.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        return staging

    def commit(self, step: Step, manifest: dict[str, Any]) -> Path:
        """Write the step's manifest, flush everything to disk and swap the staged folder in for the old one."""
        staging = self.root / f".{step.name}.partial"
        if not staging.is_dir():
            raise RuntimeError(f"commit({step.name!r}) without begin({step.name!r})")
        full = {
            "step": step.name,
            "notebook": step.notebook,
            "profile": self.profile_name,
            "seed": self.seed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
            **manifest,
        }
        (staging / MANIFEST).write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
        fsync_path(staging)
        final, old = self.path(step), self.root / f".{step.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        _fsync(self.root)
        shutil.rmtree(old, ignore_errors=True)
        self.unlock(step.name)
        return final
