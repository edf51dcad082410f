"""The step contract: each step and each place in a run folder is declared once, in helpers/steps.py, and
every step is written through it (tests/test_structure.py checks that no other file spells their names)."""

from pathlib import Path

import pytest

from helpers import steps
from helpers.profiles import load_profile
from helpers.runfolder import MissingStepError, RunFolder

HELPERS = Path(steps.__file__).parent
NOTEBOOKS = HELPERS.parent / "notebooks"


def test_each_step_is_declared_once_with_its_notebook():
    assert isinstance(steps.STEPS, tuple)
    assert len({s.name for s in steps.STEPS}) == len({s.notebook for s in steps.STEPS}) == len(steps.STEPS)
    assert all((NOTEBOOKS / f"{s.notebook}.ipynb").is_file() for s in steps.STEPS)
    assert steps.CHAIN == tuple(s for s in steps.STEPS if s.in_chain) and steps.APPENDIX_A1 not in steps.CHAIN
    assert [s.name for s in steps.CHAIN] == sorted(s.name for s in steps.CHAIN), "the chain runs in folder order"


def test_run_level_places_are_in_the_run_folder_and_not_steps(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    places = [steps.checkpoints_dir(run), steps.tracking_dir(run), steps.executed_dir(run), steps.exercises_file(run)]
    assert [p.name for p in places] == [steps.CHECKPOINTS, steps.TRACKING, steps.EXECUTED, steps.EXERCISES]
    cache = steps.cache_dir(run, steps.EXPORT)
    assert cache.is_dir() and steps.export_workdir(run) == cache
    assert all(p.parent == run.root for p in [*places, cache])
    assert not {p.name for p in [*places, cache]} & {s.name for s in steps.STEPS}
    assert run.manifests() == {}, "a cache is no step"


def test_every_step_folder_is_written_only_through_begin_and_commit():
    for path in [*HELPERS.glob("*.py"), *NOTEBOOKS.glob("*.ipynb")]:
        text = path.read_text()
        assert "run.root /" not in text and "run.root/" not in text, f"{path.name} writes into the run root"
        if path.name != "steps.py":
            assert "run.begin(" not in text and "run.commit(" not in text, f"{path.name}: save through helpers.steps"
            assert ".place(" not in text, f"{path.name}: reach a run-level place through helpers.steps"


def test_lora_settings_saved_by_02_are_what_04_and_05_train_with(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    with pytest.raises(MissingStepError, match="run notebooks/02_peft_setup.ipynb first"):
        steps.load_lora(run)
    changed = load_profile("cpu-smoke").lora.model_copy(update={"r": 4, "alpha": 8})
    steps.save_lora(run, changed, trainable=10, total=1000)
    assert steps.load_lora(run) == changed
    assert (run.path(steps.PEFT) / "adapter_config.json").is_file(), "peft's own LoraConfig file is kept too"


def test_prepared_source_points_at_notebook_00s_pairs(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    assert steps.data_source(run, "sample") == "sample"
    with pytest.raises(MissingStepError, match="00_prepare_data"):
        steps.data_source(run, "prepared")
    row = {"subject": "s", "system": "y", "instruction": "q?", "response": "an answer"}
    steps.save_prepared(run, [row], {"pairs_kept": 1})
    assert Path(steps.data_source(run, "prepared")).read_text().count("\n") == 1
