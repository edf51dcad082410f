"""The first line of every notebook: profile, run folder, hardware check, seed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT
from helpers.backend import check_hardware, uses_unsloth
from helpers.profiles import Profile, load_profile
from helpers.runfolder import RunFolder, runs_dir
from helpers.secrets import load_secrets


@dataclass
class Lesson:
    profile: Profile
    run: RunFolder


def start_lesson(profile_name: str, run_name: str) -> Lesson:
    """Validate the profile, check the hardware, read tokens from `.env`, import Unsloth first when it is used, seed.

    Under the classroom runner, LLM_SCHOOL_PROFILE and LLM_SCHOOL_RUN_NAME (set by it) win over the arguments: a
    learner's notebook that lost its `parameters` cell still writes into that learner's run folder."""
    for variable, given in (("LLM_SCHOOL_PROFILE", profile_name), ("LLM_SCHOOL_RUN_NAME", run_name)):
        forced = os.environ.get(variable)
        if forced and forced != given:
            print(f"{variable} is set (by the classroom runner): using {forced!r}, not {given!r}")
    profile_name = os.environ.get("LLM_SCHOOL_PROFILE") or profile_name
    run_name = os.environ.get("LLM_SCHOOL_RUN_NAME") or run_name
    profile = load_profile(profile_name)
    check_hardware(profile)
    load_secrets()
    if uses_unsloth(profile):
        import unsloth  # noqa: F401  (must come before transformers, trl and peft to patch them)
    from transformers import set_seed

    set_seed(profile.train.seed)
    return Lesson(profile=profile, run=RunFolder.open(run_name, profile.name, seed=profile.train.seed))


def shown_path(path: str | Path) -> str:
    """A path as a lesson prints it, never as this machine's absolute path: relative to the project folder
    (`runs/cpu-lab/04_trainer`), else to the runs folder that LLM_SCHOOL_RUNS names
    (`$LLM_SCHOOL_RUNS/cpu-lab/04_trainer`), else to the home folder (`~/...`); both forms work in a shell
    opened in the project folder."""
    path = Path(path).absolute()
    for base, shown in ((ROOT, None), (runs_dir(), "$LLM_SCHOOL_RUNS"), (Path.home(), "~")):
        for variant in (base.absolute(), base.resolve()):
            if path.is_relative_to(variant):
                inside = path.relative_to(variant)
                if shown is None:
                    return str(inside)
                return f"{shown}/{inside}" if inside.parts else shown
    return path.name
