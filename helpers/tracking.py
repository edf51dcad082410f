"""Tracked runs: where the trainer reports its losses (`train.report_to` in a profile).

trackio (the local default where it is installed) keeps every run of a project in a small SQLite database that
`trackio show` opens as a dashboard; tensorboard writes event files; wandb needs an account (or offline mode).
The local trackers write into the folder they are given (`steps.tracking_dir(run)` for a lesson's run), so a run's
dashboard travels with its results.

transformers' own trackio callback embeds a live dashboard in the notebook (a local web server, and a URL that
carries a write token), prints start-up lines and may sync to a Hugging Face Space. `LocalTrackioCallback` replaces
it: the same metrics go to the local database, quietly, and nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers.integrations import TrackioCallback

# name -> the modules it can run with (transformers writes tensorboard events with either)
TRACKERS = {"trackio": ("trackio",), "tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}
# trackio settings that send a run's metrics off this machine (a Space, a server, a Hub bucket or dataset)
TRACKIO_REMOTE = ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID")


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
        remote = [variable for variable in TRACKIO_REMOTE if os.environ.get(variable)]
        if remote:
            raise TrackingError(
                f"{', '.join(remote)} is set in the environment: trackio would send this run's metrics off the "
                "machine. The workbook keeps them in the run folder; unset it, or set train.report_to: [none]."
            )
        os.environ.setdefault("TRACKIO_DIR", str(folder / "trackio"))
    if "tensorboard" in wanted:
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(folder / "tensorboard"))
    if "wandb" in wanted:
        os.environ.setdefault("WANDB_DIR", str(folder))
    return wanted or ["none"]


def tracking_names(run_name: str | None, profile_name: str) -> dict[str, str]:
    """The trackio project and run a training run is logged as: the project is the run folder's name (the
    profile's when there is none), the run says which profile trained when, so each retraining is its own line."""
    return {"project": run_name or profile_name, "run_name": f"{profile_name} {time.strftime('%Y-%m-%d %H:%M:%S')}"}


def dashboard_command(folder: str | Path, project: str) -> str:
    """The terminal command, run from the project folder, that opens a run's local trackio dashboard (`folder`: the
    run's tracking place), with this environment's trackio and paths shown as the lessons show them."""
    from helpers.lesson import shown_path

    trackio = shown_path(Path(sys.executable).parent / "trackio")
    return f"TRACKIO_DIR={shown_path(Path(folder) / 'trackio')} {trackio} show --project {project}"


class _QuietLocalTrackio:
    """The trackio module as TrackioCallback calls it, except that `init` never embeds a dashboard or reaches a
    Space, bucket or server, and neither `init` nor `finish` prints."""

    def __init__(self, module: Any) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def init(self, **kwargs: Any) -> Any:
        kwargs.update(space_id=None, bucket_id=None, embed=False)
        with contextlib.redirect_stdout(io.StringIO()):
            return self._module.init(**kwargs)

    def finish(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self._module.finish()


class LocalTrackioCallback(TrackioCallback):
    """transformers' trackio callback, writing the same metrics into the local database only, without output."""

    def __init__(self) -> None:
        super().__init__()
        import trackio  # imported by the callback already; after report_to has set TRACKIO_DIR

        self._trackio = _QuietLocalTrackio(trackio)

    def on_push_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        return  # the callback would sync the dashboard to a Hub Space here: the workbook keeps it local
