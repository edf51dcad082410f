"""Lesson 03: White Rabbit rows -> validated, chat-formatted, tokenised train/eval splits.

A White Rabbit row has four text fields: subject, system, instruction, response. Each
becomes a conversational prompt-completion example: the prompt is the system and user
messages, the completion is the assistant's answer. trl's SFTTrainer then computes the
loss on the completion only, and the chat template closes it with the end-of-turn token.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from helpers import ROOT
from helpers.profiles import DataSettings

FIELDS = ("subject", "system", "instruction", "response")
SAMPLE = ROOT / "data" / "white_rabbit_sample.jsonl"
HUB_PREFIX = "hub:"


class DataError(ValueError):
    """Input data that cannot be used, with where and why."""


def _read_file(path: Path) -> list[Any]:
    if path.suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}, line {number}: not valid JSON ({err.msg}).") from None
        return rows
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}.")
        return rows
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path)).to_list()
    raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet.")


def _read_hub(dataset_id: str) -> list[Any]:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise DataError(
            f"{dataset_id} is a gated Hugging Face dataset: accept its terms on the Hub, then set HF_TOKEN in "
            "the environment (or a git-ignored .env) before starting Jupyter. The token is never a parameter."
        )
    from datasets import load_dataset

    return load_dataset(dataset_id, split="train", token=token).to_list()


def validate_rows(rows: list[Any], origin: str) -> list[dict[str, str]]:
    """Check every row has the four White Rabbit fields as non-empty text; name the row and field if not."""
    if not rows:
        raise DataError(f"{origin}: no rows.")
    clean = []
    for number, row in enumerate(rows, start=1):
        where = f"{origin}, row {number}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with {', '.join(FIELDS)}, got {type(row).__name__}.")
        missing = [f for f in FIELDS if f not in row]
        if missing:
            raise DataError(f"{where}: missing field(s) {', '.join(missing)}.")
        for field in FIELDS:
            value = row[field]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}.")
            if field in ("instruction", "response") and not value.strip():
                raise DataError(f"{where}: field {field!r} is empty.")
        clean.append({f: row[f].strip() for f in FIELDS})
    return clean


def load_rows(source: str = "sample") -> list[dict[str, str]]:
    """Rows from the shipped sample, a local .jsonl/.json/.parquet file, or `hub:<dataset id>`."""
    if source == "sample":
        path = SAMPLE
    elif source.startswith(HUB_PREFIX):
        dataset_id = source.removeprefix(HUB_PREFIX)
        return validate_rows(_read_hub(dataset_id), dataset_id)
    else:
        path = Path(source).expanduser()
        if not path.is_absolute():
            path = ROOT / path
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    return validate_rows(_read_file(path), str(path))


def to_prompt_completion(row: dict[str, str]) -> dict[str, Any]:
    """One White Rabbit row as a conversational prompt-completion example."""
    prompt = [{"role": "user", "content": row["instruction"]}]
    if row["system"]:
        prompt.insert(0, {"role": "system", "content": row["system"]})
    return {
        "prompt": prompt,
        "completion": [{"role": "assistant", "content": row["response"]}],
        "subject": row["subject"],
    }


def tokenize_example(tokenizer: PreTrainedTokenizerBase, example: dict[str, Any]) -> dict[str, list[int]]:
    """Token ids and labels as SFTTrainer builds them: prompt tokens get label -100 (no loss)."""
    prompt_ids = tokenizer.apply_chat_template(example["prompt"], add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(example["prompt"] + example["completion"], return_dict=False)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("The chat template renders the prompt differently alone and with its answer.")
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids) :]
    return {"input_ids": list(full_ids), "labels": labels}


def check_end_of_turn_trained(labels: list[int], eot_id: int, where: str) -> None:
    """Fail unless the end-of-turn token is a trained label: without it the model never learns to stop."""
    if eot_id not in [t for t in labels if t != -100]:
        raise DataError(
            f"{where}: the end-of-turn token is not among the trained labels (answer cut by max_length, or a "
            "template without an end marker). The model would never learn to stop."
        )
    first_trained = next(i for i, t in enumerate(labels) if t != -100)
    if first_trained == 0:
        raise DataError(f"{where}: the prompt is not masked; the loss would train on the question too.")


def show_label_mask(tokenizer: PreTrainedTokenizerBase, input_ids: list[int], labels: list[int]) -> str:
    """The text with the masked (untrained) part in [brackets] and the trained part plain."""
    start = next(i for i, t in enumerate(labels) if t != -100)
    masked = tokenizer.decode(input_ids[:start])
    trained = tokenizer.decode(input_ids[start:])
    return f"[{masked}]{trained}"


def build_splits(
    rows: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    settings: DataSettings,
    max_length: int,
) -> tuple[DatasetDict, dict[str, Any]]:
    """Shuffle, cap, drop rows that do not fit max_length (their end would be cut), split train/eval.

    Returns the splits as prompt-completion datasets and statistics for the manifest.
    """
    rows = list(rows)
    random.Random(settings.seed).shuffle(rows)
    if settings.max_rows:
        rows = rows[: settings.max_rows]
    kept, lengths, too_long, eot_id = [], [], [], tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for index, row in enumerate(rows):
        example = to_prompt_completion(row)
        tokens = tokenize_example(tokenizer, example)
        if len(tokens["input_ids"]) > max_length:
            too_long.append(index)
            continue
        check_end_of_turn_trained(tokens["labels"], eot_id, f"row {index} ({row['subject']})")
        kept.append(example)
        lengths.append(len(tokens["input_ids"]))
    if len(kept) <= settings.eval_rows:
        raise DataError(
            f"Only {len(kept)} usable rows (of {len(rows)}; {len(too_long)} longer than max_length={max_length}), "
            f"not enough for eval_rows={settings.eval_rows} plus training rows."
        )
    eval_part, train_part = kept[: settings.eval_rows], kept[settings.eval_rows :]
    splits = DatasetDict(train=Dataset.from_list(train_part), eval=Dataset.from_list(eval_part))
    stats = {
        "rows_read": len(rows),
        "rows_kept": len(kept),
        "rows_dropped_too_long": len(too_long),
        "train_rows": len(train_part),
        "eval_rows": len(eval_part),
        "tokens_total": sum(lengths),
        "tokens_max": max(lengths),
        "tokens_mean": round(sum(lengths) / len(lengths), 1),
        "max_length": max_length,
        "subjects": dict(Counter(e["subject"] for e in kept).most_common()),
        "lengths": lengths,
    }
    return splits, stats
