"""Measures of plain text that lessons 00, 06 and 07 share: words, token F1, runaway loops, distinct-n.

Pure Python (no torch), so a lesson that only compares texts imports nothing heavy.
"""

from __future__ import annotations

import re
from collections import Counter


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: how texts are compared (duplicates in notebook 00, token F1)."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (lower-cased, punctuation removed), as in SQuAD."""
    pred, ref = words(prediction), words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def repeated_loop(text: str, min_repeats: int = 3, min_words: int = 12, max_period: int = 30) -> str | None:
    """The first runaway loop in a text: a run of words repeated back to back, or None.

    A loop is a span of `period` words (1 to `max_period`) that occurs at least `min_repeats` times in a row and
    covers at least `min_words` words, e.g. "the current user's role, the current user's role, ...". Lists and
    normal prose do not repeat themselves word for word like that.
    """
    w = words(text)
    for period in range(1, min(max_period, len(w) // min_repeats) + 1):
        run = 0
        for i in range(len(w) - period):
            run = run + 1 if w[i] == w[i + period] else 0
            covered = run + period  # words inside the repeating stretch so far
            if covered >= max(min_repeats * period, min_words):
                start = i - run + 1
                return " ".join(w[start : start + period])
    return None


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams over all n-grams in all texts; loops push it down."""
    grams = [tuple(w[i : i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0
