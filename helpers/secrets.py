"""Tokens (Hugging Face, OpenAI-compatible APIs) come from the environment or a git-ignored `.env` file.

Never from a notebook cell or a papermill parameter: those end up in executed notebooks and run folders.
"""

from __future__ import annotations

import os

from helpers import ROOT

SECRET_NAMES = ("HF_TOKEN", "OPENAI_API_KEY")


def load_secrets() -> None:
    """Read `.env` at the project root into the environment; variables already set take precedence."""
    from dotenv import load_dotenv

    load_dotenv(ROOT / ".env", override=False)


def secrets_status() -> dict[str, str]:
    """Which tokens are available, without their values."""
    return {name: "set (value hidden)" if os.environ.get(name) else "not set" for name in SECRET_NAMES}
