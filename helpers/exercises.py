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

from helpers.runfolder import RunFolder
from helpers.steps import exercises_file, write_exercises


@dataclass(frozen=True)
class Exercise:
    id: str  # the task and its difficulty are the notebook's own text; here, how to check an answer and what to hint
    hint: str
    expected: Callable[..., Any]  # the right answer, from the lesson's objects
    tolerance: float = 0.0  # relative, for numbers


def _read_documents(raw_dir, words: int):
    from helpers.documents import read_documents

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
            "00.1",
            "read_documents(raw_dir, 150) keeps whole paragraphs together; a chunk never crosses two documents.",
            lambda raw_dir: len(_read_documents(raw_dir, 150)[0]),
        ),
        Exercise(
            "01.1",
            "tokenizer(text, add_special_tokens=False)['input_ids'] lists them; words and tokens differ.",
            lambda tokenizer: _tokens(tokenizer, "What is a SYN flood?"),
        ),
        Exercise(
            "02.1",
            "Each targeted linear layer of shape out x in gets r * (in + out). The count is linear in r.",
            lambda model, targets: _lora_count(model, targets),
        ),
        Exercise(
            "03.1",
            "tokenize_example(tokenizer, to_prompt_completion(row)) gives the ids; compare their lengths.",
            lambda tokenizer, rows: _longest_row(tokenizer, rows),
        ),
        Exercise(
            "04.1",
            "The trainer's train_dataset has a labels column; the prompt's labels are -100.",
            lambda dataset: sum(label != -100 for label in dataset[0]["labels"]),
        ),
        Exercise(
            "05.1",
            "history['train'] is a list of (step, loss) pairs.",
            lambda history: min(history["train"], key=lambda point: point[1])[0],
        ),
        Exercise(
            "06.1",
            "Without an end-of-turn token to stop at, generation runs until the budget is spent.",
            lambda max_new_tokens: max_new_tokens,
        ),
        Exercise(
            "07.1",
            "Perplexity is exp(mean cross-entropy per token).",
            lambda loss: _perplexity(loss),
            tolerance=1e-3,
        ),
        Exercise(
            "08.1",
            "q8_0 stores blocks of 32 weights as 32 int8 values plus one 16-bit scale; the vocabulary adds a little.",
            lambda gguf_bytes, parameters: gguf_bytes / parameters,
            tolerance=1e-3,
        ),
        Exercise(
            "09.1",
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
    verdicts = {**results(run), exercise_id: verdict}  # an unreadable file is replaced, never a reason to fail
    write_exercises(run, verdicts)


MAX_RECORD_BYTES = 1_000_000  # ten verdicts take a few hundred bytes; anything near this was not written by check()


def results(run: RunFolder, strict: bool = False) -> dict[str, str]:
    """Each exercise's last verdict in this run folder: correct, wrong or not answered.

    The file is written by a learner's kernel, so it may hold anything. An unreadable one (torn, not an object of
    texts, nested past the parser's limit, too large) counts as no verdicts, or with `strict` is a ValueError that
    names the file and the fault: the classroom runner puts it in that learner's row instead of failing the class.
    """
    path = exercises_file(run)
    if not path.is_file():
        return {}
    try:
        if path.stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"larger than {MAX_RECORD_BYTES:,} bytes")
        verdicts = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(verdicts, dict):
            raise ValueError(f"it holds a {type(verdicts).__name__}, not an object of verdicts")
        wrong = next((k for k, v in verdicts.items() if not isinstance(v, str)), None)
        if wrong is not None:
            raise ValueError(f"the verdict of {wrong!r} is not text (got {type(verdicts[wrong]).__name__})")
    except (OSError, ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if strict:
            reason = "nested too deeply" if isinstance(err, RecursionError) else str(err).splitlines()[0][:200]
            raise ValueError(f"{path} is unreadable: {reason}") from None
        return {}
    return verdicts
