"""Helpers for the LLM Goes to School workbook.

Notebooks import what they need from the submodules, one per lesson. This package
imports nothing heavy itself, so that `helpers.lesson.start_lesson` can load Unsloth
before transformers when a GPU profile asks for it.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
