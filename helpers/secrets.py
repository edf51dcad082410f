"""Tokens (Hugging Face, OpenAI-compatible APIs) come from the environment or a git-ignored `.env` file.

Never from a notebook cell or a papermill parameter: those end up in executed notebooks and run folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from helpers import ROOT

SECRET_NAMES = ("HF_TOKEN", "OPENAI_API_KEY")


def load_secrets(path: Path = ROOT / ".env") -> None:
    """Read `.env` at the project root into the environment; variables already set take precedence. Not in a
    learner's kernel started by the classroom runner (LLM_SCHOOL_NO_SECRETS): the instructor's tokens stay out."""
    if os.environ.get("LLM_SCHOOL_NO_SECRETS"):
        return
    from dotenv import load_dotenv

    load_dotenv(path, override=False)


def secrets_status() -> dict[str, str]:
    """Which tokens are available, without their values."""
    return {name: "set (value hidden)" if os.environ.get(name) else "not set" for name in SECRET_NAMES}
