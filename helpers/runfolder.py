"""The run folder: how notebooks hand results to each other.

papermill runs every notebook in a fresh kernel, so results travel as files in
`runs/<name>/<step>/`, each step with a `manifest.json`. A step is written to a
temporary folder and renamed into place when complete, so a later notebook never
reads half a result and a failed rerun never destroys the last good one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from helpers import ROOT

RUNS_DIR = Path(os.environ.get("LLM_SCHOOL_RUNS", ROOT / "runs"))

# step folder -> the notebook that writes it
STEPS: dict[str, str] = {
    "00_prepared": "00_prepare_data",
    "01_model": "01_load_model",
    "02_peft": "02_peft_setup",
    "03_dataset": "03_format_white_rabbit",
    "04_trainer": "04_sft_trainer",
    "05_train": "05_train",
    "06_infer": "06_infer",
    "07_eval": "07_evaluate",
}

_VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


class MissingStepError(RuntimeError):
    """A notebook needs a step that has not been run (or was run with another profile)."""


def library_versions() -> dict[str, str]:
    """Versions of Python and the training libraries, for manifests."""
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunFolder:
    """One run of the workbook: `runs/<name>/` with a folder per step."""

    def __init__(self, root: Path, profile_name: str, seed: int | None = None):
        self.root = Path(root)
        self.profile_name = profile_name
        self.seed = seed
        self.root.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, name: str, profile_name: str, runs_dir: Path | None = None, seed: int | None = None) -> RunFolder:
        """Open (or create) `runs_dir/<name>`; `name` may also be an absolute path."""
        path = Path(name)
        if not path.is_absolute():
            path = Path(runs_dir or RUNS_DIR) / name
        return cls(path, profile_name, seed)

    def path(self, step: str) -> Path:
        """Folder of a completed step (it may not exist yet)."""
        if step not in STEPS:
            raise KeyError(f"Unknown step {step!r}; steps are {', '.join(STEPS)}")
        return self.root / step

    def require(self, step: str) -> dict[str, Any]:
        """Manifest of an earlier step; a clear error if it is missing or from another profile."""
        manifest_path = self.path(step) / "manifest.json"
        if not manifest_path.is_file():
            raise MissingStepError(
                f"Step {step} is missing in {self.root}: run notebooks/{STEPS[step]}.ipynb first "
                f"(with the same RUN_NAME and PROFILE)."
            )
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("profile") != self.profile_name:
            raise MissingStepError(
                f"Step {step} in {self.root} was made with profile {manifest.get('profile')!r}, not "
                f"{self.profile_name!r}: rerun notebooks/{STEPS[step]}.ipynb with this profile or use another RUN_NAME."
            )
        return manifest

    def begin(self, step: str) -> Path:
        """Fresh temporary folder to write a step into; `commit` moves it into place."""
        staging = self.root / f".{step}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.path(step)  # validates the name
        return staging

    def commit(self, step: str, manifest: dict[str, Any]) -> Path:
        """Write the step's manifest and swap the staged folder in for the old one."""
        staging = self.root / f".{step}.partial"
        if not staging.is_dir():
            raise RuntimeError(f"commit({step!r}) without begin({step!r})")
        full = {
            "step": step,
            "notebook": STEPS[step],
            "profile": self.profile_name,
            "seed": self.seed,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
            **manifest,
        }
        (staging / "manifest.json").write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
        final = self.path(step)
        old = self.root / f".{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        return final

    def manifests(self) -> dict[str, dict[str, Any]]:
        """Every completed step's manifest, in order."""
        found = {}
        for step in STEPS:
            path = self.path(step) / "manifest.json"
            if path.is_file():
                found[step] = json.loads(path.read_text(encoding="utf-8"))
        return found
