"""The steps of the workbook and every file they write: the contract between notebooks.

papermill runs every notebook in a fresh kernel, so results travel as files in the run folder. Each step is
declared once here (its folder and its notebook), and so is every file a step writes and every other place in a
run folder (checkpoints, caches, executed notebooks, exercise verdicts, tracking). Notebooks save and load through
the one-call helpers below, so no notebook, test or runner spells a step or a file name (tests/test_steps.py
checks it). Every save goes through `RunFolder.begin` and `RunFolder.commit`: a step appears complete or not at all.
It is one file (~360 lines) on purpose: the whole contract between the notebooks reads top to bottom, step by step.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from helpers.runfolder import RunFolder, Step, write_json_atomic

if TYPE_CHECKING:  # the heavy libraries load only when a helper needs them
    from datasets import DatasetDict
    from matplotlib.figure import Figure
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTTrainer

    from helpers.model import ModelCard
    from helpers.profiles import LoraSettings, Profile

PREPARED = Step("00_prepared", "00_prepare_data")
MODEL = Step("01_model", "01_load_model")
PEFT = Step("02_peft", "02_peft_setup")
DATASET = Step("03_dataset", "03_format_white_rabbit")
TRAINER = Step("04_trainer", "04_sft_trainer")
TRAIN = Step("05_train", "05_train")
INFER = Step("06_infer", "06_infer")
EVAL = Step("07_eval", "07_evaluate")
EXPORT = Step("08_export", "08_export_and_serve")
SCALE = Step("09_scale", "09_scale_out")
APPENDIX_A1 = Step("A1_trainer_vs_sft", "A1_trainer_vs_sfttrainer", in_chain=False)

STEPS: tuple[Step, ...] = (PREPARED, MODEL, PEFT, DATASET, TRAINER, TRAIN, INFER, EVAL, EXPORT, SCALE, APPENDIX_A1)
CHAIN: tuple[Step, ...] = tuple(step for step in STEPS if step.in_chain)

# The files steps write (each name is spelled here only).
PAIRS = "pairs.jsonl"  # 00
STATS = "stats.json"  # 00, 03
MODEL_INFO = "model.json"  # 01: what was loaded (the Hub's "model card" is HUB_README)
SPLITS = "splits"  # 03
SFT_CONFIG = "sft_config.json"  # 04
ADAPTER = "adapter"  # 05, 08
LOG_HISTORY = "log_history.json"  # 05
SAMPLES = "samples.json"  # 06
REPORT = "report.json"  # 07
REPORT_MD = "report.md"  # 07
MERGED = "merged"  # 08
MODELFILE = "Modelfile"  # 08
EXPORT_REPORT = "export.json"  # 08
HUB_README = "README.md"  # 08: the model card the Hub shows
MEMORY_TABLE = "memory_table.json"  # 09
LAUNCHES = "launches.json"  # 09

# Places in a run folder that are not steps.
CHECKPOINTS = "checkpoints"  # the trainer's checkpoints of an unfinished 05 (removed once 05 is saved)
TRACKING = "tracking"  # local trackers' files (trackio, tensorboard): a run's dashboard travels with it
EXECUTED = "executed"  # executed copies of the notebooks (the runner, a class run)
EXERCISES = "exercises.json"  # each exercise's last verdict


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def figure_name(name: str) -> str:
    return f"{name}.png"


def log_name(name: str) -> str:
    return f"{name}.log"


def checkpoints_dir(run: RunFolder) -> Path:
    return run.place(CHECKPOINTS)


def tracking_dir(run: RunFolder) -> Path:
    return run.place(TRACKING)


def executed_dir(run: RunFolder) -> Path:
    return run.place(EXECUTED)


def exercises_file(run: RunFolder) -> Path:
    return run.place(EXERCISES)


def cache_dir(run: RunFolder, step: Step) -> Path:
    """A working folder of `step` that survives reruns (00's helper-LLM replies, 08's files before they are saved)."""
    folder = run.place(f"{step.name}-cache")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")


def _figures(out: Path, figures: dict[str, Figure]) -> None:
    for name, figure in figures.items():
        figure.savefig(out / figure_name(name), dpi=120)


def read_json(run: RunFolder, step: Step, name: str) -> Any:
    """A JSON file a completed step wrote (`run.require` first: a clear error when the step is missing)."""
    run.require(step)
    return json.loads((run.path(step) / name).read_text(encoding="utf-8"))


# 00: prepared question/answer pairs


def save_prepared(run: RunFolder, rows: list[dict[str, Any]], stats: dict[str, Any]) -> Path:
    """The pairs notebook 00 kept (JSONL in the White Rabbit schema) and how they were made."""
    from helpers.prepare import write_rows

    out = run.begin(PREPARED)
    write_rows(rows, out / PAIRS)
    _json(out / STATS, stats)
    return run.commit(PREPARED, stats)


def prepared_pairs(run: RunFolder) -> Path | None:
    """The pairs file notebook 00 wrote in this run, None when 00 has not run."""
    path = run.path(PREPARED) / PAIRS
    return path if path.is_file() else None


def data_source(run: RunFolder, source: str) -> str:
    """A profile's `data.source`, with "prepared" turned into the pairs file notebook 00 wrote in this run."""
    if source != "prepared":
        return source
    run.require(PREPARED)
    return str(run.path(PREPARED) / PAIRS)


# 01: what was loaded


def save_model_card(run: RunFolder, card: ModelCard, gpu: dict | None, baseline: dict[str, Any]) -> Path:
    from helpers.model import describe

    out = run.begin(MODEL)
    _json(out / MODEL_INFO, describe(card))
    return run.commit(MODEL, {"model": describe(card), "gpu": gpu, "baseline": baseline})


# 02: the LoRA settings (04 and 05 train with these, so a change made in 02 carries on)


def save_lora(run: RunFolder, settings: LoraSettings, trainable: int, total: int) -> Path:
    from helpers.lora import lora_config

    out = run.begin(PEFT)
    lora_config(settings).save_pretrained(out)
    return run.commit(
        PEFT,
        {"lora": settings.model_dump(), "trainable_parameters": trainable, "total_parameters": total,
         "trainable_share": trainable / total},
    )  # fmt: skip


def load_lora(run: RunFolder) -> LoraSettings:
    """The LoRA settings notebook 02 saved."""
    from helpers.profiles import LoraSettings

    return LoraSettings.model_validate(run.require(PEFT)["lora"])


# 03: the formatted train/eval splits


def save_dataset(run: RunFolder, splits: DatasetDict, stats: dict[str, Any], manifest: dict[str, Any],
                 histogram: Figure) -> Path:  # fmt: skip
    out = run.begin(DATASET)
    splits.save_to_disk(out / SPLITS)
    _json(out / STATS, stats)
    _figures(out, {"token_lengths": histogram})
    return run.commit(DATASET, {**manifest, **{k: v for k, v in stats.items() if k != "lengths"}})


def load_splits(run: RunFolder) -> DatasetDict:
    """The train/eval splits notebook 03 saved."""
    from datasets import load_from_disk

    run.require(DATASET)
    return load_from_disk(run.path(DATASET) / SPLITS)


# 04: the trainer's resolved configuration


def save_trainer_config(run: RunFolder, trainer: SFTTrainer, figures: dict[str, Any]) -> Path:
    from helpers.trainer import key_settings

    out = run.begin(TRAINER)
    (out / SFT_CONFIG).write_text(trainer.args.to_json_string(), encoding="utf-8")
    return run.commit(TRAINER, {"settings": key_settings(trainer.args), **figures})


def load_trainable(run: RunFolder, profile: Profile) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelCard,
                                                                DatasetDict]:  # fmt: skip
    """What 04 and 05 train: the profile's model with 02's LoRA adapters, its tokenizer and card, 03's splits."""
    from helpers.lora import add_lora
    from helpers.model import load_model

    settings = load_lora(run)
    splits = load_splits(run)
    model, tokenizer, card = load_model(profile)
    return add_lora(model, profile, settings), tokenizer, card, splits


# 05: the trained adapter and its log


def save_training(run: RunFolder, trainer: SFTTrainer, tokenizer: PreTrainedTokenizerBase,
                  figures: dict[str, Any], plots: dict[str, Figure]) -> Path:  # fmt: skip
    """The adapter (with its tokenizer), the trainer's log and plots; the checkpoints go once the step is saved."""
    out = run.begin(TRAIN)
    trainer.save_model(out / ADAPTER)
    tokenizer.save_pretrained(out / ADAPTER)
    _json(out / LOG_HISTORY, trainer.state.log_history)
    _figures(out, plots)
    manifest = {"steps": trainer.state.global_step, **figures}
    final = run.commit(TRAIN, manifest)
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # checkpoints only serve an interrupted run
    return final


def adapter_dir(run: RunFolder) -> Path:
    """Where notebook 05 keeps the trained adapter."""
    return run.path(TRAIN) / ADAPTER


def load_log_history(run: RunFolder) -> list[dict[str, Any]]:
    """The trainer's log of notebook 05 (`trainer.state.log_history`)."""
    return read_json(run, TRAIN, LOG_HISTORY)


def load_tuned(run: RunFolder, profile: Profile) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelCard]:
    """The base model with 05's adapter on top, ready to generate; `model.disable_adapter()` gives the base back."""
    from helpers.inference import prepare_for_inference
    from helpers.lora import load_adapter
    from helpers.model import load_model

    run.require(TRAIN)
    model, tokenizer, card = load_model(profile)
    return prepare_for_inference(load_adapter(model, adapter_dir(run)), profile), tokenizer, card


# 06 and 07: answers and the evaluation report


def save_samples(run: RunFolder, samples: list[dict[str, Any]]) -> Path:
    out = run.begin(INFER)
    _json(out / SAMPLES, samples)
    return run.commit(
        INFER,
        {"questions": len(samples),
         "tuned_stopped_by_itself": sum(s["tuned"]["stopped_by_itself"] for s in samples),
         "base_stopped_by_itself": sum(s["base"]["stopped_by_itself"] for s in samples),
         "first_tuned_answer": samples[0]["tuned"]["answer"]},
    )  # fmt: skip


def save_report(run: RunFolder, report: dict[str, Any], figures: dict[str, Figure]) -> Path:
    from helpers.evaluation import report_markdown

    out = run.begin(EVAL)
    _json(out / REPORT, report)
    text = report_markdown(report)
    if "alternatives" in report:  # 07's prompting / RAG comparison (alternatives imports evaluation: added here)
        from helpers.alternatives import alternatives_markdown

        text += "\n\n" + alternatives_markdown(report["alternatives"])
    (out / REPORT_MD).write_text(text, encoding="utf-8")
    _figures(out, figures)
    return run.commit(EVAL, report["headline"])


def load_report(run: RunFolder) -> dict[str, Any]:
    """Notebook 07's evaluation report."""
    return read_json(run, EVAL, REPORT)


# A1: the appendix's comparison


def save_appendix(run: RunFolder, results: dict[str, Any]) -> Path:
    run.begin(APPENDIX_A1)
    return run.commit(APPENDIX_A1, results)


# 08: the exported model (merged, GGUF, Modelfile, Hub model card) and the checks that proved it


def export_workdir(run: RunFolder) -> Path:
    """Where notebook 08 builds its files (merged model, GGUF, logs) before `save_export` moves them into the step."""
    return cache_dir(run, EXPORT)


def save_export(run: RunFolder, report: dict[str, Any], figures: dict[str, Figure], modelfile: str,
                hub_readme: str) -> Path:  # fmt: skip
    """The adapter alone, the merged model and the GGUF files from the work folder (moved, not copied), the
    Modelfile and the Hub model card, the full report, and the headline numbers in the manifest."""
    work = export_workdir(run)
    built = [MERGED] + [gguf_name(t) for t in report["gguf"]]
    missing = [n for n in built if not (work / n).exists()]
    if missing:
        raise FileNotFoundError(f"Notebook 08 has not written {', '.join(missing)} yet: run its cells in order.")
    out = run.begin(EXPORT)
    shutil.copytree(adapter_dir(run), out / ADAPTER)
    for name in built:
        shutil.move(str(work / name), out / name)
    (out / MODELFILE).write_text(modelfile, encoding="utf-8")
    (out / HUB_README).write_text(hub_readme, encoding="utf-8")
    _json(out / EXPORT_REPORT, report)
    _figures(out, figures)
    final = run.commit(EXPORT, report["headline"])
    shutil.rmtree(work, ignore_errors=True)  # logs and partial files only served this run
    return final


def merged_dir(run: RunFolder) -> Path:
    """The merged model as notebook 08 builds it (in its work folder until the step is saved)."""
    return export_workdir(run) / MERGED


def gguf_path(run: RunFolder, gguf_type: str) -> Path:
    """A GGUF file as notebook 08 builds it (in its work folder until the step is saved)."""
    return export_workdir(run) / gguf_name(gguf_type)


def export_log(run: RunFolder, name: str) -> Path:
    """A log of notebook 08's converter or server, in its work folder."""
    return export_workdir(run) / log_name(name)


# 09: memory per GPU and the 1- vs 2-process run


def save_scale(run: RunFolder, memory_rows: list[dict[str, Any]], launches: dict[str, dict[str, Any]],
               logs: dict[str, str], figures: dict[str, Figure]) -> Path:  # fmt: skip
    """The memory table, each launch's figures (losses, tokens/s) and its launcher output, and the plots."""
    out = run.begin(SCALE)
    _json(out / MEMORY_TABLE, memory_rows)
    _json(out / LAUNCHES, launches)
    for name, text in logs.items():
        (out / log_name(name)).write_text(text, encoding="utf-8")
    _figures(out, figures)
    summary = {name: {k: r.get(k) for k in ("processes", "train_losses", "tokens_per_second", "wall_seconds")}
               for name, r in launches.items()}  # fmt: skip
    return run.commit(SCALE, {"runs": summary, "memory_rows": len(memory_rows)})


# Exercise verdicts (a run-level record, not a step)


def write_exercises(run: RunFolder, verdicts: dict[str, str]) -> None:
    write_json_atomic(exercises_file(run), dict(sorted(verdicts.items())))  # a torn file would break checks
