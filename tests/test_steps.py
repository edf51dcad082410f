"""The step contract: each step and each file it hands on is declared once, in helpers/steps.py."""

import re
from pathlib import Path

import pytest

from helpers import steps
from helpers.profiles import load_profile
from helpers.runfolder import MissingStepError, RunFolder

HELPERS = Path(steps.__file__).parent
NOTEBOOKS = HELPERS.parent / "notebooks"


def test_each_artifact_name_is_spelled_once_in_helpers_and_never_in_notebooks():
    names = [steps.PAIRS, steps.SPLITS, steps.ADAPTER, steps.LOG_HISTORY, steps.STATS, steps.SAMPLES, steps.REPORT]
    code = {p: p.read_text() for p in HELPERS.glob("*.py")}
    cells = "".join(p.read_text() for p in NOTEBOOKS.glob("*.ipynb"))
    for name in names:
        spelled = [p.name for p, text in code.items() for _ in re.finditer(re.escape(f'"{name}"'), text)]
        assert spelled == ["steps.py"], f"{name!r} spelled in {spelled}"
        assert f'\\"{name}\\"' not in cells, f"a notebook spells {name!r}; use the helpers in helpers/steps.py"


def test_every_step_folder_is_written_only_through_begin_and_commit():
    for path in [*HELPERS.glob("*.py"), *NOTEBOOKS.glob("*.ipynb")]:
        text = path.read_text()
        assert "run.root /" not in text and "run.root/" not in text, f"{path.name} writes into the run root"
        if path.name != "steps.py":
            assert "run.begin(" not in text and "run.commit(" not in text, f"{path.name}: save through helpers.steps"


def test_lora_settings_saved_by_02_are_what_04_and_05_train_with(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    with pytest.raises(MissingStepError, match="run notebooks/02_peft_setup.ipynb first"):
        steps.load_lora(run)
    changed = load_profile("cpu-smoke").lora.model_copy(update={"r": 4, "alpha": 8})
    steps.save_lora(run, changed, trainable=10, total=1000)
    assert steps.load_lora(run) == changed
    assert (run.path(steps.PEFT.name) / "adapter_config.json").is_file(), "peft's own LoraConfig file is kept too"


def test_prepared_source_points_at_notebook_00s_pairs(tmp_path):
    run = RunFolder(tmp_path / "r", "cpu-smoke")
    assert steps.data_source(run, "sample") == "sample"
    with pytest.raises(MissingStepError, match="00_prepare_data"):
        steps.data_source(run, "prepared")
    row = {"subject": "s", "system": "y", "instruction": "q?", "response": "an answer"}
    steps.save_prepared(run, [row], {"pairs_kept": 1})
    assert Path(steps.data_source(run, "prepared")).read_text().count("\n") == 1
