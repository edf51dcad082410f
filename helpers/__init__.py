"""Helpers for the LLM Goes to School workbook.

Notebooks import what they need from the submodules, one per lesson. This package
imports nothing heavy itself, so that `helpers.lesson.start_lesson` can load Unsloth
before transformers when a GPU profile asks for it.
"""

import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# bitsandbytes (imported by peft whenever it is installed) looks for an optional faster CPU 4-bit kernel on the
# Hugging Face Hub and logs a warning when it cannot: 4-bit works without it, and the course machines are offline.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
