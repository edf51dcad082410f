"""helpers.train with a record of every file each process opens for writing or renames (Python's audit hooks):
tests/test_scale_out.py reads the records to check that only rank 0 writes the run folder.

Records go to $AUDIT_WRITES_DIR/rank-<RANK>.txt, one `event<TAB>path` a line. Files written by native code
(safetensors) do not pass through Python's open and are not recorded; the step folder's JSON, plots and the
Trainer's checkpoints do.
"""

import os
import sys

_out = open(os.path.join(os.environ["AUDIT_WRITES_DIR"], f"rank-{os.environ.get('RANK', '0')}.txt"), "w")  # noqa: SIM115


def _hook(event, args):
    path = None
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1] or "", args[2] or 0
        if any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            path = args[0]
    elif event in ("os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.rmtree"):
        path = args[0] if event != "os.rename" and event != "os.replace" else args[1]
    if path is not None and not isinstance(path, int):
        _out.write(f"{event}\t{os.path.abspath(os.fsdecode(path))}\n")
        _out.flush()


sys.addaudithook(_hook)

from helpers.train import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
