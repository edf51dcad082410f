"""Embedded model load time: cold (GGUF de-quantised and converted) vs cached (safetensors), each in a fresh process.

python benchmarks/model_load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOAD = (
    "import time; t = time.perf_counter(); from helpers.model import load_model; from helpers.profiles import "
    "load_profile; load_model(load_profile('cpu-lab')); print('SECONDS', time.perf_counter() - t)"
)


def timed_load(cache: Path) -> float:
    env = {**os.environ, "LLM_SCHOOL_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", LOAD], capture_output=True, text=True, env=env, check=True)
    return float(next(x for x in done.stdout.splitlines() if x.startswith("SECONDS")).split()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cold, cached = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(timed_load(Path(cache)))
            cached.append(timed_load(Path(cache)))
    print("| load (includes imports) | median s | min-max s |\n|---|---|---|")
    for name, times in (("cold: GGUF -> safetensors", cold), ("cached safetensors", cached)):
        print(f"| {name} | {statistics.median(times):.1f} | {min(times):.1f}-{max(times):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
