"""Lesson 03: White Rabbit rows -> validated, chat-formatted, tokenised train/eval splits.

A White Rabbit row has four text fields: subject, system, instruction, response. Each
becomes a conversational prompt-completion example: the prompt is the system and user
messages, the completion is the assistant's answer. trl's SFTTrainer then computes the
loss on the completion only, and the chat template closes it with the end-of-turn token.

Longer than the other modules (~430 lines) because every way a data file can be wrong is caught here, at the one
place rows enter the workbook (bounded line reading, JSON without NaN, field types, control characters,
duplicates), each with a message naming the file and line; formatting and splitting follow in the same module so
that a row is validated and formatted by one reading of the rules.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from transformers import PreTrainedTokenizerBase

from helpers import ROOT
from helpers.chat import messages
from helpers.html_tables import CONTROL_CHARS, show_controls
from helpers.lesson import shown_path
from helpers.profiles import DataSettings
from helpers.text_measures import words

FIELDS = ("subject", "system", "instruction", "response")
PROVENANCE = ("source", "chunk")  # optional: where notebook 00 found the text of a generated pair
SAMPLE = ROOT / "data" / "white_rabbit_sample.jsonl"
GENERAL_QUESTIONS = ROOT / "data" / "general_questions.jsonl"  # non-security questions: the forgetting check
HUB_PREFIX = "hub:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")  # compared in lower case: `.JSONL` is a JSONL file too
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which Windows editors put at the start of a file
MAX_LINE_BYTES = 1_000_000  # one row of a .jsonl file; the longest sample row is 3 KB, and parsing costs ~20x its size


class DataError(ValueError):
    """Input data that cannot be used, with where and why."""


@dataclass
class Problem:
    """One unusable row: where it is, a short reason to count by, and the full explanation."""

    where: str
    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.detail}"


@dataclass
class LoadedRows:
    """Validated rows (each with `where` it came from: file and line) and the problems skipped on the way."""

    rows: list[dict[str, Any]]
    problems: list[Problem] = field(default_factory=list)

    def skipped(self) -> dict[str, int]:
        """How many rows were skipped, by reason."""
        return dict(Counter(p.reason for p in self.problems))


Item = tuple[str, Any]


class _Row(dict):
    """A JSON object as parsed, with the keys that appeared more than once (JSON would silently keep the last)."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> _Row:
    row = _Row(pairs)
    row.duplicates = [key for key, count in Counter(key for key, _ in pairs).items() if count > 1]
    return row


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json accepts NaN, Infinity and -Infinity; JSON does not


def _loads(text: str) -> Any:
    """json.loads that remembers duplicate keys (see `_Row`) and refuses NaN and Infinity; a value nested past the
    parser's recursion limit or an integer too long to convert is a ValueError like any other invalid JSON."""
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_no_constant)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _lines(path: Path) -> Iterator[tuple[int, bytes | int]]:
    """(line number, its bytes without the line break), or the line's size in bytes when that is over
    MAX_LINE_BYTES: such a line is read in pieces and dropped, never held whole in memory."""
    with open(path, "rb") as file:
        for number in itertools.count(1):
            line = file.readline(MAX_LINE_BYTES + 2)  # room for a row at the limit and its \r\n
            if not line:
                return
            if number == 1:
                line = line.removeprefix(BOM)
            if line.endswith(b"\n") or len(line) <= MAX_LINE_BYTES:  # the whole line, maybe the last one
                row = line.rstrip(b"\r\n")
                yield number, row if len(row) <= MAX_LINE_BYTES else len(row)
                continue
            size = len(line)
            while line and not line.endswith(b"\n"):  # the rest of a long line, a piece at a time
                line = file.readline(MAX_LINE_BYTES)
                size += len(line)
            yield number, size - line.endswith(b"\n")


def _read_jsonl(path: Path) -> list[Item]:
    items: list[Item] = []
    for number, raw in _lines(path):
        where = f"{shown_path(path)}, line {number}"  # relative to the project: no machine path in a lesson
        if isinstance(raw, int):
            detail = f"{raw:,} bytes long, over the limit of {MAX_LINE_BYTES:,} bytes for one row"
            items.append((where, Problem(where, "line too long", detail)))
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            items.append((where, Problem(where, "invalid UTF-8", f"not valid UTF-8 text (byte {err.start})")))
            continue
        if not line.strip():
            continue
        try:
            items.append((where, _loads(line)))
        except json.JSONDecodeError as err:
            items.append((where, Problem(where, "invalid JSON", f"not valid JSON ({err.msg}, column {err.colno})")))
        except ValueError as err:
            items.append((where, Problem(where, "invalid JSON", f"not usable JSON ({err})")))
    return items


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable parquet file ({first_line}).") from None


def _read_file(path: Path) -> list[Item]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        try:
            rows = _loads(path.read_bytes().removeprefix(BOM).decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not valid UTF-8 text (byte {err.start}).") from None
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}).") from None
        except ValueError as err:
            raise DataError(f"{path}: not usable JSON ({err}).") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}.")
    elif suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .json or .parquet.")
    return [(f"{path}, row {number}", row) for number, row in enumerate(rows, start=1)]


def _read_hub(dataset_id: str) -> list[Item]:
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise DataError(
            f"{dataset_id} is a gated Hugging Face dataset: accept its terms on the Hub, then set HF_TOKEN in "
            "the environment (or a git-ignored .env) before starting Jupyter. The token is never a parameter."
        )
    from datasets import load_dataset

    try:
        rows = load_dataset(dataset_id, split="train", token=token).to_list()
    except Exception as err:  # network, authorisation, missing dataset or split, bad files: all mean "not loaded"
        reason = (str(err).splitlines() or [""])[0].replace(token, "<HF_TOKEN>")[:300] or type(err).__name__
        raise DataError(
            f"hub:{dataset_id}: could not load the dataset from the Hugging Face Hub ({type(err).__name__}: "
            f"{reason}). Check the id, your access to it, and the network (HF_HUB_OFFLINE=1 forbids downloads)."
        ) from None
    return [(f"{dataset_id}, row {number}", row) for number, row in enumerate(rows, start=1)]


def _check_row(where: str, row: Any) -> Problem | None:
    if not isinstance(row, dict):
        return Problem(where, "not an object", f"expected an object with {', '.join(FIELDS)}, got {type(row).__name__}")
    duplicates = getattr(row, "duplicates", None)  # set by the JSON reader's object_pairs_hook
    if duplicates:
        keys = ", ".join(map(repr, duplicates))
        return Problem(where, "duplicate key", f"key(s) {keys} appear more than once; JSON would keep only the last")
    missing = [f for f in FIELDS if f not in row]
    if missing:
        return Problem(where, "missing field", f"missing field(s) {', '.join(missing)}")
    extra = [f for f in row if f not in FIELDS + PROVENANCE]
    if extra:
        allowed = f"{', '.join(FIELDS)} (and optionally {', '.join(PROVENANCE)})"
        return Problem(where, "extra field", f"unexpected field(s) {', '.join(map(repr, extra))}; a row has {allowed}")
    for name in FIELDS:
        if not isinstance(row[name], str):
            return Problem(where, "wrong type", f"field {name!r} must be text, got {type(row[name]).__name__}")
        if name in ("instruction", "response") and not row[name].strip():
            return Problem(where, "empty text", f"field {name!r} is empty")
    return _check_values(where, row)


def _check_values(where: str, row: dict[str, Any]) -> Problem | None:
    """Values that parse but mislead: NaN or infinity (a parquet float), and invisible control characters in text,
    bidi overrides above all, which make a row read differently from what the model is trained on."""
    for name, value in row.items():
        if isinstance(value, float) and not math.isfinite(value):
            return Problem(where, "not a number", f"field {name!r} is {value}, not a finite number")
        found = CONTROL_CHARS.search(value) if isinstance(value, str) else None
        if found:
            char = show_controls(found.group())
            detail = f"field {name!r} holds the invisible control character {char} at position {found.start()}"
            return Problem(where, "control character", f"{detail}: it can make the text read differently; remove it")
    return None


def validate_rows(items: list[Item], origin: str, on_error: str = "stop") -> LoadedRows:
    """Check every row: an object with the four White Rabbit fields as text (plus optional provenance), a non-empty
    instruction and response, not a duplicate of an earlier row. `on_error="stop"` raises at the first problem
    (naming file, row and field); `"skip"` leaves such rows out and counts them."""
    loaded, seen = LoadedRows([]), dict[tuple, str]()
    for where, row in items:
        problem = row if isinstance(row, Problem) else _check_row(where, row)
        if problem is None:
            key = tuple(tuple(words(row[f])) for f in ("system", "instruction", "response"))
            if key in seen:
                problem = Problem(where, "duplicate", f"duplicate of {seen[key]}")
            seen.setdefault(key, where)
        if problem is None:
            loaded.rows.append({**{f: row[f].strip() for f in FIELDS}, "where": where})
        elif on_error == "stop":
            raise DataError(f"{problem}. (To skip such rows and count them instead, set data.on_error: skip.)")
        else:
            loaded.problems.append(problem)
    if not loaded.rows:
        skipped = f" ({len(loaded.problems)} skipped: {loaded.skipped()})" if loaded.problems else ""
        raise DataError(f"{origin}: no usable rows{skipped}.")
    return loaded


def fingerprint(rows: list[dict[str, Any]]) -> str:
    """SHA-256 of the rows' four fields in order: the same data gives the same hash on any machine."""
    canonical = json.dumps([[row[f] for f in FIELDS] for row in rows], ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def load_rows(source: str = "sample", on_error: str = "stop") -> LoadedRows:
    """Validated rows from the shipped sample, a local .jsonl/.json/.parquet file, or `hub:<dataset id>`."""
    if source.startswith(HUB_PREFIX):
        dataset_id = source.removeprefix(HUB_PREFIX)
        return validate_rows(_read_hub(dataset_id), dataset_id, on_error)
    path = SAMPLE if source == "sample" else Path(source).expanduser()
    if not path.is_absolute():
        path = ROOT / path
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file: name a .jsonl, .json or .parquet file in it.")
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    return validate_rows(_read_file(path), str(path), on_error)


def to_prompt_completion(row: dict[str, str]) -> dict[str, Any]:
    """One White Rabbit row as a conversational prompt-completion example."""
    *prompt, answer = messages(row["instruction"], row["system"], answer=row["response"])
    return {"prompt": prompt, "completion": [answer], "subject": row["subject"]}


def load_general_questions(limit: int) -> list[dict[str, Any]]:
    """The first `limit` general, non-security questions shipped in data/, as prompt-completion examples."""
    return [to_prompt_completion(row) for row in load_rows(str(GENERAL_QUESTIONS)).rows[:limit]]


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


def _truncate_answer(tokenizer: PreTrainedTokenizerBase, row: dict[str, str], max_length: int) -> dict | None:
    """The row with its response cut to the most whole words that fit max_length with the end-of-turn token kept;
    None when even the prompt does not fit."""
    answer = row["response"].split()
    low, high = 0, len(answer)  # invariant: `low` words fit (or none do)
    while low < high:
        middle = (low + high + 1) // 2
        candidate = {**row, "response": " ".join(answer[:middle])}
        if len(tokenize_example(tokenizer, to_prompt_completion(candidate))["input_ids"]) <= max_length:
            low = middle
        else:
            high = middle - 1
    return {**row, "response": " ".join(answer[:low])} if low else None


def build_splits(
    rows: list[dict[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    settings: DataSettings,
    max_length: int,
) -> tuple[DatasetDict, dict[str, Any]]:
    """Shuffle, cap, handle rows over max_length (drop, or truncate the answer: `settings.too_long`), split.

    Every kept row is checked: prompt masked, end-of-turn token trained. Returns the splits as prompt-completion
    datasets and statistics for the manifest, including which rows were too long and by how many tokens.
    """
    rows = list(rows)
    random.Random(settings.seed).shuffle(rows)
    if settings.max_rows:
        rows = rows[: settings.max_rows]
    kept, lengths, too_long, eot_id = [], [], [], tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    for row in rows:
        where = row.get("where", "row")
        tokens = tokenize_example(tokenizer, to_prompt_completion(row))
        if len(tokens["input_ids"]) > max_length:
            shortened = _truncate_answer(tokenizer, row, max_length) if settings.too_long == "truncate" else None
            action = "truncated" if shortened else "dropped"
            length = len(tokens["input_ids"])
            too_long.append({"where": where, "tokens": length, "over": length - max_length, "action": action})
            if not shortened:
                continue
            row = shortened
            tokens = tokenize_example(tokenizer, to_prompt_completion(row))
        check_end_of_turn_trained(tokens["labels"], eot_id, f"{where} ({row['subject']})")
        kept.append(to_prompt_completion(row))
        lengths.append(len(tokens["input_ids"]))
    dropped = sum(r["action"] == "dropped" for r in too_long)
    if len(kept) <= settings.eval_rows:
        raise DataError(
            f"Only {len(kept)} usable rows (of {len(rows)}; {dropped} longer than max_length={max_length}), "
            f"not enough for eval_rows={settings.eval_rows} plus training rows."
        )
    eval_part, train_part = kept[: settings.eval_rows], kept[settings.eval_rows :]
    splits = DatasetDict(train=Dataset.from_list(train_part), eval=Dataset.from_list(eval_part))
    stats = {
        "rows_read": len(rows),
        "rows_kept": len(kept),
        "rows_dropped_too_long": dropped,
        "rows_truncated": len(too_long) - dropped,
        "too_long": too_long,  # which rows, their length, the tokens over max_length, what was done
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


@dataclass
class EvalExamples:
    """Notebook 07's `EVAL_DATA` as prompt-completion examples, loaded under the same rules as notebook 03's rows."""

    examples: list[dict[str, Any]]
    problems: list[Problem]  # rows skipped (data.on_error: skip), by reason
    too_long: list[dict[str, Any]]  # rows over max_seq_length: where, tokens, over, dropped or truncated

    def summary(self) -> str:
        skipped = dict(Counter(p.reason for p in self.problems))
        actions = dict(Counter(r["action"] for r in self.too_long))
        return f"{len(self.examples)} rows; skipped: {skipped or 'none'}; over max_length: {actions or 'none'}"


def load_eval_examples(source: str, profile: Any, tokenizer: PreTrainedTokenizerBase | None = None) -> EvalExamples:
    """Rows from `source` (a file or `hub:<id>`, as `load_rows`) honouring the profile's data.on_error and, for rows
    longer than model.max_seq_length, data.too_long (drop, or truncate the answer keeping the end-of-turn token).
    The tokenizer is loaded from the profile when not given (notebook 07 reads its data before its model)."""
    if tokenizer is None:
        from helpers.model import load_tokenizer

        tokenizer = load_tokenizer(profile)[0]
    loaded = load_rows(source, profile.data.on_error)
    max_length, examples, too_long = profile.model.max_seq_length, [], []
    for row in loaded.rows:
        length = len(tokenize_example(tokenizer, to_prompt_completion(row))["input_ids"])
        if length > max_length:
            shortened = _truncate_answer(tokenizer, row, max_length) if profile.data.too_long == "truncate" else None
            action = "truncated" if shortened else "dropped"
            too_long.append({"where": row["where"], "tokens": length, "over": length - max_length, "action": action})
            if shortened is None:
                continue
            row = shortened
        examples.append(to_prompt_completion(row))
    if not examples:
        raise DataError(
            f"{source}: no rows fit max_seq_length={max_length} ({len(too_long)} longer); raise model.max_seq_length "
            "or set data.too_long: truncate."
        )
    return EvalExamples(examples, loaded.problems, too_long)
