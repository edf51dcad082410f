"""The first line of every notebook: profile, run folder, hardware check, seed."""

from __future__ import annotations

from dataclasses import dataclass

from helpers.backend import check_hardware, uses_unsloth
from helpers.profiles import Profile, load_profile
from helpers.runfolder import RunFolder
from helpers.secrets import load_secrets


@dataclass
class Lesson:
    profile: Profile
    run: RunFolder


def start_lesson(profile_name: str, run_name: str) -> Lesson:
    """Validate the profile, check the hardware, read tokens from `.env`, import Unsloth first when it is used, seed."""
    profile = load_profile(profile_name)
    check_hardware(profile)
    load_secrets()
    if uses_unsloth(profile):
        import unsloth  # noqa: F401  (must come before transformers, trl and peft to patch them)
    from transformers import set_seed

    set_seed(profile.train.seed)
    return Lesson(profile=profile, run=RunFolder.open(run_name, profile.name, seed=profile.train.seed))
