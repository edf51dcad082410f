"""The first line of every notebook: profile, run folder, hardware check, seed."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from helpers.profiles import Profile, list_profiles, load_profile
from helpers.runfolder import RunFolder
from helpers.secrets import load_secrets


class HardwareError(RuntimeError):
    """A profile asks for hardware this machine does not have."""


def cuda_available() -> bool:
    """True when PyTorch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def uses_unsloth(profile: Profile) -> bool:
    """Unsloth is used only with CUDA present and a profile that asks for it (never on CPU)."""
    backend = profile.model.backend
    wanted = backend == "unsloth" or (backend == "auto" and profile.model.requires_gpu)
    return wanted and cuda_available()


def check_hardware(profile: Profile) -> None:
    """Stop at once, with the way out, when a GPU profile meets a machine without CUDA."""
    if (profile.model.requires_gpu or profile.model.backend == "unsloth") and not cuda_available():
        cpu = [p for p in list_profiles() if p.startswith("cpu-")]
        raise HardwareError(
            f"Profile {profile.name!r} needs a CUDA GPU and none is visible to PyTorch on this machine. "
            f"Use a CPU profile instead ({', '.join(cpu)}), e.g. PROFILE='cpu-lab'."
        )
    if uses_unsloth(profile) and importlib.util.find_spec("unsloth") is None:
        raise HardwareError(
            f"Profile {profile.name!r} uses Unsloth, which is not installed: "
            "pip install -r requirements-gpu.txt (on a machine with a CUDA GPU)."
        )


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
