"""The steps of the workbook and the files each one hands on: the contract between notebooks.

papermill runs every notebook in a fresh kernel, so results travel as files in the run folder. Each step is
declared once here (its folder, its notebook, its files), and each notebook saves and loads through the one-call
helpers below, so no notebook, test or runner spells a file name. Every save goes through `RunFolder.begin` and
`RunFolder.commit`: a step appears complete or not at all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the heavy libraries load only when a helper needs them
    from datasets import DatasetDict
    from matplotlib.figure import Figure
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTTrainer

    from helpers.model import ModelCard
    from helpers.profiles import LoraSettings, Profile
    from helpers.runfolder import RunFolder


@dataclass(frozen=True)
class Step:
    name: str  # the step's folder in the run folder
    notebook: str  # the notebook that writes it (notebooks/<notebook>.ipynb)
    in_chain: bool = True  # run by `python -m helpers.run`; appendices are not


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

STEPS: dict[str, Step] = {
    s.name: s for s in (PREPARED, MODEL, PEFT, DATASET, TRAINER, TRAIN, INFER, EVAL, EXPORT, SCALE, APPENDIX_A1)
}

# The files steps hand on (each name is spelled here only).
PAIRS = "pairs.jsonl"
SPLITS = "splits"
ADAPTER = "adapter"
LOG_HISTORY = "log_history.json"
STATS = "stats.json"
SAMPLES = "samples.json"
REPORT = "report.json"


def _json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=str), encoding="utf-8")


def _figures(out: Path, figures: dict[str, Figure]) -> None:
    for name, figure in figures.items():
        figure.savefig(out / f"{name}.png", dpi=120)


# 00: prepared question/answer pairs


def save_prepared(run: RunFolder, rows: list[dict[str, Any]], stats: dict[str, Any]) -> Path:
    """The pairs notebook 00 kept (JSONL in the White Rabbit schema) and how they were made."""
    from helpers.prepare import write_rows

    out = run.begin(PREPARED.name)
    write_rows(rows, out / PAIRS)
    _json(out / STATS, stats)
    return run.commit(PREPARED.name, stats)


def data_source(run: RunFolder, source: str) -> str:
    """A profile's `data.source`, with "prepared" turned into the pairs file notebook 00 wrote in this run."""
    if source != "prepared":
        return source
    run.require(PREPARED.name)
    return str(run.path(PREPARED.name) / PAIRS)


# 01: the model card


def save_model_card(run: RunFolder, card: ModelCard, gpu: dict | None, baseline: dict[str, Any]) -> Path:
    from helpers.model import describe

    out = run.begin(MODEL.name)
    _json(out / "model_card.json", describe(card))
    return run.commit(MODEL.name, {"model": describe(card), "gpu": gpu, "baseline": baseline})


# 02: the LoRA settings (04 and 05 train with these, so a change made in 02 carries on)


def save_lora(run: RunFolder, settings: LoraSettings, trainable: int, total: int) -> Path:
    from helpers.lora import lora_config

    out = run.begin(PEFT.name)
    lora_config(settings).save_pretrained(out)
    return run.commit(
        PEFT.name,
        {"lora": settings.model_dump(), "trainable_parameters": trainable, "total_parameters": total,
         "trainable_share": trainable / total},
    )  # fmt: skip


def load_lora(run: RunFolder) -> LoraSettings:
    """The LoRA settings notebook 02 saved."""
    from helpers.profiles import LoraSettings

    return LoraSettings.model_validate(run.require(PEFT.name)["lora"])


# 03: the formatted train/eval splits


def save_dataset(run: RunFolder, splits: DatasetDict, stats: dict[str, Any], manifest: dict[str, Any],
                 histogram: Figure) -> Path:  # fmt: skip
    out = run.begin(DATASET.name)
    splits.save_to_disk(out / SPLITS)
    _json(out / STATS, stats)
    _figures(out, {"token_lengths": histogram})
    return run.commit(DATASET.name, {**manifest, **{k: v for k, v in stats.items() if k != "lengths"}})


def load_splits(run: RunFolder) -> DatasetDict:
    """The train/eval splits notebook 03 saved."""
    from datasets import load_from_disk

    run.require(DATASET.name)
    return load_from_disk(run.path(DATASET.name) / SPLITS)


# 04: the trainer's resolved configuration


def save_trainer_config(run: RunFolder, trainer: SFTTrainer, figures: dict[str, Any]) -> Path:
    from helpers.trainer import key_settings

    out = run.begin(TRAINER.name)
    (out / "sft_config.json").write_text(trainer.args.to_json_string(), encoding="utf-8")
    return run.commit(TRAINER.name, {"settings": key_settings(trainer.args), **figures})


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
    import shutil

    out = run.begin(TRAIN.name)
    trainer.save_model(out / ADAPTER)
    tokenizer.save_pretrained(out / ADAPTER)
    _json(out / LOG_HISTORY, trainer.state.log_history)
    _figures(out, plots)
    manifest = {"steps": trainer.state.global_step, "adapter_dir": str(adapter_dir(run)), **figures}
    final = run.commit(TRAIN.name, manifest)
    shutil.rmtree(trainer.args.output_dir, ignore_errors=True)  # checkpoints only serve an interrupted run
    return final


def adapter_dir(run: RunFolder) -> Path:
    """Where notebook 05 keeps the trained adapter."""
    return run.path(TRAIN.name) / ADAPTER


def load_log_history(run: RunFolder) -> list[dict[str, Any]]:
    """The trainer's log of notebook 05 (`trainer.state.log_history`)."""
    run.require(TRAIN.name)
    return json.loads((run.path(TRAIN.name) / LOG_HISTORY).read_text(encoding="utf-8"))


def load_tuned(run: RunFolder, profile: Profile) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelCard]:
    """The base model with 05's adapter on top, ready to generate; `model.disable_adapter()` gives the base back."""
    from helpers.inference import prepare_for_inference
    from helpers.lora import load_adapter
    from helpers.model import load_model

    run.require(TRAIN.name)
    model, tokenizer, card = load_model(profile)
    return prepare_for_inference(load_adapter(model, adapter_dir(run)), profile), tokenizer, card


# 06 and 07: answers and the evaluation report


def save_samples(run: RunFolder, samples: list[dict[str, Any]]) -> Path:
    out = run.begin(INFER.name)
    _json(out / SAMPLES, samples)
    return run.commit(
        INFER.name,
        {"questions": len(samples),
         "tuned_stopped_by_itself": sum(s["tuned"]["stopped_by_itself"] for s in samples),
         "base_stopped_by_itself": sum(s["base"]["stopped_by_itself"] for s in samples),
         "first_tuned_answer": samples[0]["tuned"]["answer"]},
    )  # fmt: skip


def save_report(run: RunFolder, report: dict[str, Any], figures: dict[str, Figure]) -> Path:
    from helpers.evaluation import report_markdown

    out = run.begin(EVAL.name)
    _json(out / REPORT, report)
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    _figures(out, figures)
    return run.commit(EVAL.name, report["headline"])


def load_report(run: RunFolder) -> dict[str, Any]:
    """Notebook 07's evaluation report (report.json)."""
    run.require(EVAL.name)
    return json.loads((run.path(EVAL.name) / REPORT).read_text(encoding="utf-8"))


# A1: the appendix's comparison


def save_appendix(run: RunFolder, results: dict[str, Any]) -> Path:
    run.begin(APPENDIX_A1.name)
    return run.commit(APPENDIX_A1.name, results)


# 08: the exported model (merged, GGUF, Modelfile) and the checks that proved it

MERGED = "merged"
MODELFILE = "Modelfile"
EXPORT_REPORT = "export.json"
MODEL_CARD = "README.md"


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def export_workdir(run: RunFolder) -> Path:
    """Where notebook 08 builds its files (merged model, GGUF, logs) before `save_export` moves them into the step."""
    work = run.cache(EXPORT.name)
    work.mkdir(parents=True, exist_ok=True)
    return work


def save_export(run: RunFolder, report: dict[str, Any], figures: dict[str, Figure]) -> Path:
    """The adapter alone, the merged model, the GGUF files, Modelfile and model card from the work folder (moved,
    not copied), the full report, and the headline numbers in the manifest."""
    import shutil

    work = export_workdir(run)
    out = run.begin(EXPORT.name)
    shutil.copytree(adapter_dir(run), out / ADAPTER)
    names = [MERGED, MODELFILE, MODEL_CARD] + [gguf_name(t) for t in report["gguf"]]
    missing = [n for n in names if not (work / n).exists()]
    if missing:
        raise FileNotFoundError(f"Notebook 08 has not written {', '.join(missing)} in {work}: run its cells in order.")
    for name in names:
        shutil.move(str(work / name), out / name)
    _json(out / EXPORT_REPORT, report)
    _figures(out, figures)
    final = run.commit(EXPORT.name, report["headline"])
    shutil.rmtree(work, ignore_errors=True)  # logs and partial files only served this run
    return final


def exported_dir(run: RunFolder) -> Path:
    """Notebook 08's folder: adapter/, merged/, model-*.gguf, Modelfile, README.md (model card), export.json."""
    run.require(EXPORT.name)
    return run.path(EXPORT.name)


# 09: memory per GPU and the 1- vs 2-process run


def save_scale(run: RunFolder, memory_rows: list[dict[str, Any]], runs: dict[str, dict[str, Any]],
               logs: dict[str, str], figures: dict[str, Figure]) -> Path:  # fmt: skip
    """The memory table, each launch's figures (losses, tokens/s) and its launcher output, and the plots."""
    out = run.begin(SCALE.name)
    _json(out / "memory_table.json", memory_rows)
    _json(out / "runs.json", runs)
    for name, text in logs.items():
        (out / f"{name}.log").write_text(text, encoding="utf-8")
    _figures(out, figures)
    summary = {name: {k: r.get(k) for k in ("processes", "train_losses", "tokens_per_second", "wall_seconds")}
               for name, r in runs.items()}  # fmt: skip
    return run.commit(SCALE.name, {"runs": summary, "memory_rows": len(memory_rows)})
