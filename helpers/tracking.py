"""Tracked runs: where the trainer reports its losses (`train.report_to` in a profile).

trackio (the local default where it is installed) keeps every run of a project in a small SQLite database that
`trackio show` opens as a dashboard; tensorboard writes event files; wandb needs an account (or offline mode).
The local trackers write into the folder they are given (`steps.tracking_dir(run)` for a lesson's run), so a run's
dashboard travels with its results.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

# name -> the modules it can run with (transformers writes tensorboard events with either)
TRACKERS = {"trackio": ("trackio",), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


class TrackingError(RuntimeError):
    """A tracker a profile asks for that cannot run here."""


def report_to(targets: Sequence[str], folder: str | Path) -> list[str]:
    """The trainer's `report_to`, with each local tracker pointed at `folder` (a run folder's tracking place).

    trackio reads TRACKIO_DIR once, when it is first imported, so the first trainer of a process fixes it.
    """
    wanted = [t for t in targets if t != "none"]
    for name in wanted:
        if not any(importlib.util.find_spec(module) for module in TRACKERS[name]):
            raise TrackingError(
                f"train.report_to asks for {name!r}, but its package is not installed. Install it "
                f"(pip install {name}) or set train.report_to: [none] in the profile."
            )
    folder = Path(folder)
    if "trackio" in wanted:
        os.environ.setdefault("TRACKIO_DIR", str(folder / "trackio"))
    if "tensorboard" in wanted:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(folder / "tensorboard"))
    if "wandb" in wanted:
        os.environ.setdefault("WANDB_DIR", str(folder))
    return wanted or ["none"]
