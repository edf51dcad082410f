"""Exercises with self-checks.

Every notebook has exercises: an objective, a task, a difficulty (★ to ★★★) and a cell where the learner writes an
answer (`None` until they do). `check(...)` works out the expected answer from the lesson's own objects, says
whether the learner got it, and records the result in the run folder (`exercises.json`), so an instructor's class
run shows who solved what. Solutions live apart from the student notebooks, in `solutions/answers.yaml`;
`python -m helpers.solutions` writes solution copies of the notebooks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from helpers.runfolder import RunFolder, write_json_atomic

EXERCISES_FILE = "exercises.json"  # each exercise's last verdict, per run folder


@dataclass(frozen=True)
class Exercise:
    id: str
    level: str
    task: str
    hint: str
    expected: Callable[..., Any]  # the right answer, from the lesson's objects
    tolerance: float = 0.0  # relative, for numbers


def _read_documents(raw_dir, words: int):
    from helpers.prepare import read_documents

    return read_documents(raw_dir, words)


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _longest_row(tokenizer, rows) -> int:
    from helpers.data import to_prompt_completion, tokenize_example

    lengths = [len(tokenize_example(tokenizer, to_prompt_completion(row))["input_ids"]) for row in rows]
    return lengths.index(max(lengths))


EXERCISES = {
    e.id: e
    for e in [
        Exercise(
            "00.1", "★", "How many chunks do the raw documents become with chunk_words=150 instead of the profile's?",
            "read_documents(raw_dir, 150) keeps whole paragraphs together; a chunk never crosses two documents.",
            lambda raw_dir: len(_read_documents(raw_dir, 150)[0]),
        ),
        Exercise(
            "01.1", "★", "How many tokens is the text 'What is a SYN flood?' (no special tokens)?",
            "tokenizer(text, add_special_tokens=False)['input_ids'] lists them; words and tokens differ.",
            lambda tokenizer: _tokens(tokenizer, "What is a SYN flood?"),
        ),
        Exercise(
            "02.1", "★★", "Change r to 8 (same targets): how many trainable parameters will LoRA add?",
            "Each targeted linear layer of shape out x in gets r * (in + out). The count is linear in r.",
            lambda model, targets: _lora_count(model, targets),
        ),
        Exercise(
            "03.1", "★★", "Find the row (its index in `rows`) that max_length would cut off first: the longest one.",
            "tokenize_example(tokenizer, to_prompt_completion(row)) gives the ids; compare their lengths.",
            lambda tokenizer, rows: _longest_row(tokenizer, rows),
        ),
        Exercise(
            "04.1", "★", "How many tokens of the first training example carry a loss (label other than -100)?",
            "The trainer's train_dataset has a labels column; the prompt's labels are -100.",
            lambda dataset: sum(label != -100 for label in dataset[0]["labels"]),
        ),
        Exercise(
            "05.1", "★", "At which step was the logged training loss lowest?",
            "history['train'] is a list of (step, loss) pairs.",
            lambda history: min(history["train"], key=lambda point: point[1])[0],
        ),
        Exercise(
            "06.1", "★★", "Generate with eos_token_id=None, so the model is never told where its answer ends: how "
            "many new tokens come back?",
            "Without an end-of-turn token to stop at, generation runs until the budget is spent.",
            lambda max_new_tokens: max_new_tokens,
        ),
        Exercise(
            "07.1", "★", "What is the tuned model's perplexity on the held-out answers, from its mean answer loss?",
            "Perplexity is exp(mean cross-entropy per token).",
            lambda loss: _perplexity(loss),
            tolerance=1e-3,
        ),
        Exercise(
            "08.1", "★★", "How many bytes does the q8_0 GGUF file spend per model weight (file size / parameters)?",
            "q8_0 stores blocks of 32 weights as 32 int8 values plus one 16-bit scale; the vocabulary adds a little.",
            lambda gguf_bytes, parameters: gguf_bytes / parameters,
            tolerance=1e-3,
        ),
        Exercise(
            "09.1", "★", "How many GiB per GPU does Llama 3.1 70B need with QLoRA under ZeRO-3 on 4 GPUs?",
            "estimate('70B', 'qlora', 'zero3', 4) from helpers.memory; its total_gib is per GPU.",
            lambda: _memory_estimate("70B", "qlora", "zero3", 4),
            tolerance=0.02,
        ),
    ]
}  # fmt: skip


def _perplexity(loss: float) -> float:
    from helpers.evaluation import perplexity

    return perplexity(loss)


def _memory_estimate(model: str, method: str, strategy: str, gpus: int) -> float:
    from helpers.memory import estimate

    return estimate(model, method, strategy, gpus).total_gib  # type: ignore[arg-type]


def _lora_count(model, targets: list[str]) -> int:
    from helpers.lora import count_lora_parameters

    return count_lora_parameters(model, 8, targets)


def task(exercise_id: str) -> None:
    """Print an exercise's difficulty and task (the notebooks show it above the answer cell)."""
    e = EXERCISES[exercise_id]
    print(f"Exercise {e.id} {e.level}: {e.task}")


def check(run: RunFolder | None, exercise_id: str, answer: Any, **context: Any) -> bool:
    """Say whether `answer` is right and record it in the run folder; an unanswered exercise fails nothing."""
    e = EXERCISES[exercise_id]
    expected = e.expected(**context)
    if answer is None:
        verdict, ok = "not answered", False
        print(f"Exercise {e.id}: not answered yet. Write your answer in the cell above and run both cells again.")
    else:
        ok = _matches(answer, expected, e.tolerance)
        verdict = "correct" if ok else "wrong"
        print(f"Exercise {e.id}: correct." if ok else f"Exercise {e.id}: not yet ({answer!r}). Hint: {e.hint}")
    if run is not None:
        _record(run, exercise_id, verdict)
    return ok


def _matches(answer: Any, expected: Any, tolerance: float) -> bool:
    if isinstance(expected, float) or tolerance:
        try:
            return math.isclose(float(answer), float(expected), rel_tol=tolerance or 1e-9)
        except (TypeError, ValueError):
            return False
    return answer == expected


def _record(run: RunFolder, exercise_id: str, verdict: str) -> None:
    verdicts = {**results(run), exercise_id: verdict}
    write_json_atomic(run.record(EXERCISES_FILE), dict(sorted(verdicts.items())))  # a torn file would break checks


def results(run: RunFolder) -> dict[str, str]:
    """Each exercise's last verdict in this run folder: correct, wrong or not answered."""
    path = run.record(EXERCISES_FILE)
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # written atomically since; an older torn file must not break every later check
        return {}
