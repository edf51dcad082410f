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
            "With eos_token_id=-1 (an id no token has) generation is never told where an answer ends: it stops "
            "only when max_new_tokens new tokens are written. chat_inputs(model, tokenizer, question) from "
            "helpers.inference gives the prompt; the new tokens are output.shape[1] - inputs['input_ids'].shape[1].",
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
            "q8_0 stores each block of 32 weights as 32 int8 values (1 byte each) plus one 16-bit scale (2 bytes): "
            "bytes per weight x `parameters`, in MB (/ 1e6). Predict from the format, not from the file.",
            lambda parameters: parameters * 34 / 32 / 1e6,
            tolerance=0.01,
        ),
        Exercise(
            "09.1",
            "Per GPU = what FSDP shares out / N + what every GPU keeps whole (activations, logits, two gathered "
            "layers, the LM head kept whole); the smallest N with that at most 0.9 x 24 GiB. Then check N and N - 1 "
            "with estimate('70B', 'qlora', 'fsdp_full', N).",
            lambda: _fewest_cards("70B", 24.0),
        ),
    ]
}  # fmt: skip


def _perplexity(loss: float) -> float:
    from helpers.evaluation import perplexity

    return perplexity(loss)


def _fewest_cards(model: str, card_gib: float) -> int | None:
    from helpers.memory import fewest_gpus

    return fewest_gpus(model, card_gib, method="qlora", strategy="fsdp_full")


def _lora_count(model, targets: list[str]) -> int:
    from helpers.lora import count_lora_parameters

    return count_lora_parameters(model, 8, targets)


@dataclass(frozen=True, repr=False)
class Verdict:
    """What `check` says about one answer. A notebook shows it as its sentence (never a bare True or False); it is
    true only when the answer is right, so a test can still `assert check(...)`."""

    exercise: str
    verdict: str  # correct, wrong or not answered
    sentence: str

    def __bool__(self) -> bool:
        return self.verdict == "correct"

    def __repr__(self) -> str:
        return self.sentence


def check(run: RunFolder | None, exercise_id: str, answer: Any, **context: Any) -> Verdict:
    """Say whether `answer` is right and record it in the run folder; an unanswered exercise fails nothing.

    The sentence is the returned Verdict's text: the last line of the check cell shows it."""
    e = EXERCISES[exercise_id]
    expected = e.expected(**context)
    name = f"answer_{e.id.replace('.', '_')}"
    if answer is None:
        verdict = "not answered"
        sentence = (
            f"Exercise {e.id}: not answered yet. Write your answer in `{name}` in the cell above, "
            "then run that cell and this one again."
        )
    elif _matches(answer, expected, e.tolerance):
        verdict, sentence = "correct", f"Exercise {e.id}: {answer!r} is correct."
    else:
        verdict = "wrong"
        sentence = f"Exercise {e.id}: {answer!r} is not the expected answer yet. Hint: {e.hint}"
    if run is not None:
        _record(run, exercise_id, verdict)
    return Verdict(e.id, verdict, sentence)


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
