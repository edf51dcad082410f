"""Which hardware and which stack: CUDA or CPU, Unsloth or plain transformers + peft, the compute dtype.

Every other module asks here, so the choice is made in one place.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from helpers.profiles import Profile, list_profiles, load_profile


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


def mixed_precision() -> dict[str, bool]:
    """The trainer's `bf16`/`fp16`: bf16 where the GPU has it, fp16 on older GPUs, neither on a CPU (trl defaults
    bf16 to True, which on a CPU would silently change the numbers)."""
    bf16 = bf16_available()
    return {"bf16": bf16, "fp16": cuda_available() and not bf16}


def merge_dtype() -> str:
    """The dtype a merge loads the base in: 16-bit on a GPU (bf16 where it exists), 32-bit on a CPU."""
    if not cuda_available():
        return "float32"
    return "bfloat16" if bf16_available() else "float16"


def sharding_engine() -> bool:
    """True under `accelerate launch` with FSDP or DeepSpeed, which place (and shard) the weights themselves."""
    return any(os.environ.get(f"ACCELERATE_USE_{name}", "").lower() == "true" for name in ("FSDP", "DEEPSPEED"))


def device_map() -> dict[str, Any] | str | None:
    """Where transformers puts the weights: None on a CPU or under FSDP/ZeRO (they place the shards); one process
    spreads over the GPUs, several (DDP) take one GPU each."""
    if not cuda_available() or sharding_engine():
        return None
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return "auto" if processes == 1 else {"": int(os.environ.get("LOCAL_RANK", "0"))}


def wants_unsloth(profile: Profile) -> bool:
    """The profile asks for Unsloth: by name, or with "auto" on a GPU profile (whatever this machine has)."""
    backend = profile.model.backend
    return backend == "unsloth" or (backend == "auto" and profile.model.requires_gpu)


def uses_unsloth(profile: Profile) -> bool:
    """Unsloth is used only with CUDA present and a profile that asks for it (never on CPU)."""
    return wants_unsloth(profile) and cuda_available()


def check_hardware(profile: Profile) -> None:
    """Stop at once, with the way out, when a GPU profile meets a machine without CUDA."""
    if (profile.model.requires_gpu or wants_unsloth(profile)) and not cuda_available():
        # the CPU profiles a learner can use (cpu-llama31 loads 4-bit on the CPU to prove the GPU path: tests only)
        cpu = [p for p in list_profiles() if p.startswith("cpu-") and not load_profile(p).model.cpu_4bit]
        raise HardwareError(
            f"Profile {profile.name!r} needs a CUDA GPU and none is visible to PyTorch on this machine. "
            f"Use a CPU profile instead ({', '.join(cpu)}), e.g. PROFILE='cpu-lab'."
        )
    if profile.model.load_in_4bit and not cuda_available() and not profile.model.cpu_4bit:
        raise HardwareError(
            f"Profile {profile.name!r} loads the model in 4-bit, which without a GPU is slow and only for profiles "
            "that opt in (model.cpu_4bit: true, as cpu-llama31 does). Use a GPU, or set model.load_in_4bit: false."
        )
    if profile.model.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise HardwareError(f"Profile {profile.name!r} loads the model in 4-bit: pip install bitsandbytes.")
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
