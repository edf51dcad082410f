"""A child process that really holds a lock of a run folder, as another notebook or launch would: it takes the lock
through RunFolder (a step's name: `begin`; any other name, such as RUN_LOCK: `lock`) and sleeps until killed.
Used by tests/test_runfolder.py and tests/test_runner.py."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from helpers import ROOT

HOLD = """
import sys, time
from helpers.runfolder import RunFolder
from helpers.steps import STEPS

root, name = sys.argv[1], sys.argv[2]
run = RunFolder(root, "cpu-smoke")
step = next((s for s in STEPS if s.name == name), None)
if step is None:
    run.lock(name)
else:
    run.begin(step)
print("held", flush=True)
time.sleep(300)
"""


@contextlib.contextmanager
def holding(root: Path, name: str) -> Iterator[subprocess.Popen]:
    """A live process holding lock `name` (a step's name or RUN_LOCK) of the run folder `root`; killed on exit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), name], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.strip() == "held", f"the holder of {name} exited with {process.wait()} before taking its lock"
        yield process
    finally:
        process.kill()
        process.wait()
