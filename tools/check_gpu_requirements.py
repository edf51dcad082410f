"""Prove that requirements-gpu.txt resolves with pip's own resolver for the GPU machines (Python 3.12, Linux x86_64).

    python tools/check_gpu_requirements.py                 # uses python3.12 from pyenv or PATH
    python tools/check_gpu_requirements.py --python /usr/bin/python3.12

pip resolves for the interpreter it runs in, and `--platform/--only-binary=:all:` cannot be used here because some
pins exist only as source (rouge-score, deepspeed). So this makes a throw-away Python 3.12 virtual environment and
runs `pip install --dry-run --ignore-installed --report` in it against the configured registry: nothing is
installed, and the report names every package and version pip would install. It prints the pinned packages'
resolved versions and exits 1 when pip cannot resolve the set. About a minute; not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("torch", "transformers", "accelerate", "peft", "trl", "unsloth", "unsloth-zoo", "bitsandbytes", "deepspeed",
           "datasets", "certifi")  # fmt: skip


def find_python(wanted: str | None) -> str:
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python"))
    candidates = [wanted] if wanted else [shutil.which("python3.12"), *pyenv]
    for candidate in candidates:
        if candidate and subprocess.run([str(candidate), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                        capture_output=True).returncode == 0:  # fmt: skip
            return str(candidate)
    sys.exit("error: no Python 3.12 found; pass --python /path/to/python3.12")


def resolve(python: str, requirements: Path, pip_version: str) -> tuple[int, dict | None, str]:
    with tempfile.TemporaryDirectory(prefix="gpu-resolve-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "-q", f"pip=={pip_version}"], check=True)
        report = Path(tmp) / "pip-report.json"
        done = subprocess.run([*pip, "install", "--dry-run", "--ignore-installed", "--report", str(report),
                               "-r", str(requirements)], capture_output=True, text=True, cwd=ROOT)  # fmt: skip
        data = json.loads(report.read_text()) if report.is_file() else None
        return done.returncode, data, done.stdout + done.stderr


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", help="a Python 3.12 interpreter (default: found on PATH or in pyenv)")
    parser.add_argument("--requirements", type=Path, default=ROOT / "requirements-gpu.txt")
    parser.add_argument("--pip", default="26.3", help="pip version for the resolver (default 26.3)")
    args = parser.parse_args()
    python = find_python(args.python)
    code, report, output = resolve(python, args.requirements, args.pip)
    if code != 0 or report is None:
        lines = [line for line in output.splitlines() if "is ignored" not in line]
        print("\n".join(lines[-25:]), file=sys.stderr)
        print(f"error: {args.requirements.name} does not resolve for Python 3.12 (pip exit {code})", file=sys.stderr)
        return 1
    versions = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in report["install"]}  # fmt: skip
    print(f"{args.requirements.name} resolves for Python 3.12 ({python}): {len(versions)} packages")
    for name in WATCHED:
        print(f"  {name:<14} {versions.get(name, 'not installed')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
