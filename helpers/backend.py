"""Which hardware and which stack: CUDA or CPU, Unsloth or plain transformers + peft, the compute dtype.

Every other module asks here, so the choice is made in one place.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from helpers.profiles import Profile, list_profiles


class HardwareError(RuntimeError):
    """A profile asks for hardware (or a package) this machine does not have."""


def cuda_available() -> bool:
    """True when PyTorch sees a CUDA GPU."""
    import torch

    return torch.cuda.is_available()


def bf16_available() -> bool:
    """True on a CUDA GPU that computes in bfloat16 (Ampere and newer)."""
    import torch

    return cuda_available() and torch.cuda.is_bf16_supported()


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


def gpu_memory() -> dict[str, Any] | None:
    """GPU name, total and peak reserved memory in GiB (None on CPU)."""
    if not cuda_available():
        return None
    import torch

    gib = 1024**3
    return {
        "gpu": torch.cuda.get_device_name(0),
        "total_gib": round(torch.cuda.get_device_properties(0).total_memory / gib, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / gib, 2),
    }
