"""Notebooks 02 and 03's step folders for a run, written with their own helpers (no notebook run): what the
training entry point `helpers.train` needs. Used by tests/test_scale_out.py and runnable by hand:

    python tests/scale_out_setup.py <runs folder> <run name> [profile]
"""

from __future__ import annotations

import sys
from pathlib import Path


def prepare_run(runs: Path, name: str, profile_name: str = "cpu-smoke") -> Path:
    from helpers.data import build_splits, fingerprint, load_rows
    from helpers.lora import add_lora, count_parameters
    from helpers.model import load_model
    from helpers.plots import token_length_histogram
    from helpers.profiles import load_profile
    from helpers.runfolder import RunFolder
    from helpers.steps import save_dataset, save_lora

    profile = load_profile(profile_name)
    run = RunFolder(Path(runs) / name, profile.name, seed=profile.train.seed)
    model, tokenizer, _ = load_model(profile)
    save_lora(run, profile.lora, *count_parameters(add_lora(model, profile)))
    rows = load_rows(profile.data.source, profile.data.on_error).rows
    splits, stats = build_splits(rows, tokenizer, profile.data, profile.model.max_seq_length)
    histogram = token_length_histogram(stats["lengths"], profile.model.max_seq_length)
    save_dataset(run, splits, stats, {"source": profile.data.source, "data_sha256": fingerprint(rows)}, histogram)
    return run.root


if __name__ == "__main__":
    print(prepare_run(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:]))
