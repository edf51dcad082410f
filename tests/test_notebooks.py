"""The notebooks as source, and the whole chain executed with papermill."""

import math
from pathlib import Path

import nbformat
import pytest

from helpers.backend import cuda_available
from helpers.data import load_rows
from helpers.exercises import EXERCISES, results
from helpers.profiles import load_profile
from helpers.runfolder import RunFolder
from helpers.runner import NOTEBOOKS_DIR, main, notebooks
from helpers.secrets import SECRET_NAMES
from helpers.steps import (
    ADAPTER,
    APPENDIX_A1,
    CHAIN,
    DATASET,
    EVAL,
    EXPORT,
    INFER,
    MERGED,
    MODEL,
    MODELFILE,
    PAIRS,
    PEFT,
    PREPARED,
    REPORT_MD,
    SPLITS,
    STEPS,
    TRAIN,
    TRAINER,
    adapter_dir,
    executed_dir,
    figure_name,
    gguf_name,
    load_log_history,
    load_report,
)

NOTEBOOKS = sorted(Path(__file__).resolve().parent.parent.joinpath("notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_clean_with_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "strip outputs: make clean-notebooks"
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and "PROFILE" in tagged[0].source
    assert not any(name in tagged[0].source for name in SECRET_NAMES), "tokens come from the environment only"
    assert nb.cells[0].cell_type == "markdown" and "Learning objectives" in nb.cells[0].source


CHAIN_NOTEBOOKS = [step.notebook for step in CHAIN]


def test_every_step_has_its_notebook():
    assert [p.stem for p in notebooks()] == CHAIN_NOTEBOOKS
    assert all((NOTEBOOKS_DIR / f"{step.notebook}.ipynb").is_file() for step in STEPS)


def all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    return not isinstance(value, float) or math.isfinite(value)


def manifests(run_dir: Path, profile: str) -> dict:
    found = {step: RunFolder(run_dir, profile).require(step) for step in CHAIN}
    assert all(m["profile"] == profile for m in found.values())
    return found


def check_chain(run_dir: Path, m: dict) -> None:
    run = RunFolder(run_dir, m[MODEL]["profile"])
    pairs = load_rows(str(run.path(PREPARED) / PAIRS)).rows  # notebook 00's output validates
    assert pairs and len(pairs) == m[PREPARED]["pairs_kept"] and all(p["where"] for p in pairs)
    assert m[MODEL]["baseline"]["answer"].strip()
    assert m[PEFT]["trainable_share"] < 0.05
    assert (run.path(DATASET) / SPLITS / "train").is_dir()
    assert m[DATASET]["eval_rows"] > 0
    assert math.isfinite(m[TRAINER]["dry_step_loss"])
    train = m[TRAIN]
    assert "adapter_dir" not in train, "no absolute path of this machine in a manifest"
    assert (adapter_dir(run) / "adapter_model.safetensors").is_file()
    assert load_log_history(run)[-1]["step"] == train["steps"]
    for key in ("eval_loss_before", "eval_loss_after", "train_loss_first", "train_loss_last"):
        assert math.isfinite(train[key]), key
    assert m[INFER]["first_tuned_answer"].strip()
    report = load_report(run)
    assert {"loss", "generation", "forgetting", "headline", "dataset", "eval_rows"} <= set(report)
    for name in ("base", "tuned"):
        assert set(report["generation"]["scores"][name]) >= {"rougeL", "bleu", "chrf", "token_f1", "stopped_rate"}
    assert all_finite(report), "every number in the report must be finite"
    assert (run.path(EVAL) / REPORT_MD).read_text().startswith("# Evaluation")
    assert (run.path(EVAL) / figure_name("metrics")).is_file()
    export = m[EXPORT]  # notebook 08's self-check already stopped on a failed round trip
    assert set(export["round_trip"]) == {"f16", "q8_0"} and export["speed_tokens_per_second"]
    assert export["sizes_mb"]["q8_0"] < export["sizes_mb"]["f16"] < export["sizes_mb"]["merged"]
    assert all((run.path(EXPORT) / f).exists() for f in (gguf_name("q8_0"), MODELFILE, MERGED, ADAPTER))
    executed = sorted(executed_dir(run).glob("*.ipynb"))
    assert [p.stem for p in executed] == CHAIN_NOTEBOOKS
    verdicts = results(run)
    assert set(verdicts) == set(EXERCISES), "every notebook's exercise check ran"


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    """Run folders under tmp_path: RUN_NAME stays a plain name, LLM_SCHOOL_RUNS says where runs live."""
    monkeypatch.setenv("LLM_SCHOOL_RUNS", str(tmp_path))
    return tmp_path


def test_all_notebooks_run_in_order_under_cpu_smoke_and_never_show_a_token(smoke_chain):
    # The kernels saw made-up tokens (01 reports them as set) and must not have written them anywhere: executed
    # notebooks, run folders, saved configs, logs.
    assert smoke_chain.returncode == 0, smoke_chain.output[-5000:]
    run_dir = smoke_chain.run_dir
    check_chain(run_dir, manifests(run_dir, "cpu-smoke"))
    assert "eval loss before -> after" in smoke_chain.output and "total" in smoke_chain.output
    first = (executed_dir(RunFolder(run_dir, "cpu-smoke")) / f"{MODEL.notebook}.ipynb").read_text()
    assert "'HF_TOKEN': 'set (value hidden)'" in first
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert len(files) > 20
    for value in smoke_chain.canaries.values():
        assert value not in smoke_chain.output, "a token was printed to the log"
        leaked = [str(p) for p in files if value.encode() in p.read_bytes()]
        assert not leaked, f"a token was written to {leaked}"


def test_student_answers_say_not_answered_and_every_solution_checks_correct(smoke_chain):
    """Each exercise ran twice in the chain: the student's empty answer, then the worked solution."""
    executed = "".join(p.read_text() for p in executed_dir(RunFolder(smoke_chain.run_dir, "cpu-smoke")).glob("*.ipynb"))
    for exercise in EXERCISES:
        assert f"Exercise {exercise}: not answered yet." in executed, f"{exercise}: the student's path did not run"
    assert results(RunFolder(smoke_chain.run_dir, "cpu-smoke")) == {e: "correct" for e in EXERCISES}


def test_no_later_cell_reads_an_answer_so_student_copies_run_as_solved_ones_do():
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        for index, cell in enumerate(cells):
            if "exercise" in cell.metadata.get("tags", []):
                name = cell.source.split("=")[0].strip()
                readers = [c for c in cells[index + 2 :] if name in c.source]
                assert not readers, f"{path.name}: a cell after exercise {name}'s check reads it"


def test_appendix_compares_trainer_and_sfttrainer(runs):
    import papermill as pm

    run = RunFolder(runs / "appendix", "cpu-smoke")
    pm.execute_notebook(
        str(NOTEBOOKS_DIR / f"{APPENDIX_A1.notebook}.ipynb"),
        str(runs / "A1.ipynb"),
        parameters={"PROFILE": "cpu-smoke", "RUN_NAME": "appendix", "ROWS": 8, "STEPS": 2},
        cwd=str(NOTEBOOKS_DIR),
        kernel_name="python3",
    )
    result = run.require(APPENDIX_A1)
    assert result["plain_trainer_trained_tokens"] > result["sft_trained_tokens"] > 0
    assert result["packed_sequences"] < result["examples"]
    losses = result["answer_loss"]
    assert losses["trainer"] < losses["base"] and losses["sft_trainer"] < losses["base"]


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine: the GPU chain cannot run here")
def test_all_notebooks_run_under_a_gpu_profile(runs, request):
    profile = request.config.getoption("--profile")
    if not load_profile(profile).model.requires_gpu:
        pytest.skip(f"--profile {profile} is a CPU profile; run: pytest -m gpu --profile rtx4090")
    run_dir = runs / "gpu"
    assert main(["--profile", profile, "--run-name", run_dir.name, "--log-output"]) == 0
    check_chain(run_dir, manifests(run_dir, profile))
