"""Is held-out data really unseen? How close each evaluation row is to the training rows (lessons 03 and 07).

Two measures, per evaluation row, both read before any metric:
- **answer overlap**: the share of the answer's word 8-grams that also occur in some training answer (0: none of
  its 8-word stretches was trained on; 1: every one was). Eight words in a row rarely repeat by chance in prose.
- **question match**: the best fuzzy match (rapidfuzz `token_sort_ratio`, 0-100: case, punctuation and word order
  ignored) between the question and any training question, and which training question it was.

A row is flagged as a near-duplicate when either passes its threshold: a metric on it measures recall of a
training row, not what the model learned to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rapidfuzz import fuzz, process, utils

from helpers.text_measures import words

NGRAM = 8  # words per n-gram of the answer overlap
QUESTION_MATCH_FLAG = 90.0  # a best question match at or above this (0-100) flags the row
ANSWER_OVERLAP_FLAG = 0.5  # a share of the answer's 8-grams seen in training at or above this flags the row


def question_and_answer(example: dict[str, Any]) -> tuple[str, str]:
    """The user question and the answer of a prompt-completion example (or of a White Rabbit row)."""
    if "prompt" in example:
        return example["prompt"][-1]["content"], example["completion"][0]["content"]
    return example["instruction"], example["response"]


def _grams(text: str, n: int) -> list[tuple[str, ...]]:
    w = words(text)
    return [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]


class _TrainingAnswers:
    """Word n-grams of the training answers, built once per n (answers shorter than 8 words use their length)."""

    def __init__(self, answers: Iterable[str]) -> None:
        self.answers = list(answers)
        self._by_n: dict[int, set[tuple[str, ...]]] = {}

    def grams(self, n: int) -> set[tuple[str, ...]]:
        if n not in self._by_n:
            self._by_n[n] = {g for a in self.answers for g in _grams(a, n)}
        return self._by_n[n]


def answer_overlap(answer: str, training: _TrainingAnswers, n: int = NGRAM) -> float:
    """Share of the answer's word n-grams found in the training answers (an answer under n words: itself, whole)."""
    size = min(n, len(words(answer)))
    if size == 0:
        return 0.0
    grams = _grams(answer, size)
    seen = training.grams(size)
    return sum(g in seen for g in grams) / len(grams)


def closeness(
    held_out: Sequence[dict[str, Any]],
    training: Sequence[dict[str, Any]],
    n: int = NGRAM,
    question_flag: float = QUESTION_MATCH_FLAG,
    answer_flag: float = ANSWER_OVERLAP_FLAG,
) -> list[dict[str, Any]]:
    """One row per held-out example: its question, the closest training question and their match (0-100), the
    share of its answer's n-grams seen in training answers, and whether it is flagged as a near-duplicate."""
    if not training:
        raise ValueError("closeness needs training rows to compare with; got none")
    train_pairs = [question_and_answer(e) for e in training]
    train_questions = [q for q, _ in train_pairs]
    answers = _TrainingAnswers(a for _, a in train_pairs)
    rows = []
    for example in held_out:
        question, answer = question_and_answer(example)
        match = process.extractOne(
            question, train_questions, scorer=fuzz.token_sort_ratio, processor=utils.default_process
        )
        score, closest = (float(match[1]), match[0]) if match else (0.0, "")
        overlap = answer_overlap(answer, answers, n)
        rows.append(
            {
                "question": question,
                "closest training question": closest,
                "question match": round(score, 1),
                "answer 8-grams seen": round(overlap, 3),
                "near-duplicate": score >= question_flag or overlap >= answer_flag,
            }
        )
    return rows


def summarise(rows: Sequence[dict[str, Any]], training_rows: int) -> dict[str, Any]:
    """The figures a lesson prints: rows compared, share of held-out answer n-grams seen, best and median question
    match, and the near-duplicates flagged (their questions)."""
    matches = sorted(r["question match"] for r in rows)
    flagged = [r["question"] for r in rows if r["near-duplicate"]]
    return {
        "rows": len(rows),
        "training_rows": training_rows,
        "mean_answer_overlap": round(sum(r["answer 8-grams seen"] for r in rows) / len(rows), 4) if rows else 0.0,
        "max_answer_overlap": max((r["answer 8-grams seen"] for r in rows), default=0.0),
        "best_question_match": matches[-1] if matches else 0.0,
        "median_question_match": matches[len(matches) // 2] if matches else 0.0,
        "near_duplicates": len(flagged),
        "flagged_questions": flagged,
        "thresholds": {"question_match": QUESTION_MATCH_FLAG, "answer_overlap": ANSWER_OVERLAP_FLAG, "ngram": NGRAM},
    }


def summary_text(summary: dict[str, Any]) -> str:
    """One sentence from the figures, for the lesson to print."""
    text = (
        f"{summary['rows']} evaluation rows against {summary['training_rows']} training rows: on average "
        f"{summary['mean_answer_overlap']:.1%} of an answer's {NGRAM}-word stretches occur in a training answer "
        f"(at most {summary['max_answer_overlap']:.1%} for one row); best question match "
        f"{summary['best_question_match']:.0f}/100 (median {summary['median_question_match']:.0f}). "
    )
    if summary["near_duplicates"]:
        return text + (
            f"{summary['near_duplicates']} near-duplicate(s) flagged: metrics on them measure recall of training "
            "rows, so read the results with them in mind, or drop them."
        )
    return text + "No near-duplicates: the evaluation rows were not seen in training, as far as these measures tell."


def closeness_table(rows: Sequence[dict[str, Any]], limit: int = 5):
    """The `limit` evaluation rows closest to a training question (flagged ones first), as an HTML-escaped table:
    questions are data text."""
    from helpers.html_tables import safe_table

    ordered = sorted(rows, key=lambda r: (not r["near-duplicate"], -r["question match"]))[:limit]
    return safe_table([{**r, "near-duplicate": "yes" if r["near-duplicate"] else "no"} for r in ordered])
