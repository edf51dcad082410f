"""Lesson 07's RAG: find the training pairs closest to a question with BM25 (the `bm25s` library).

Each training pair (question and answer) is one document. Words are split, lower-cased and stemmed as ROUGE-L does
it in lesson 07 (rouge-score's tokenizer, Porter stemmer), so "passwords" finds "password"; bm25s's English stop
words are dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import bm25s
from bm25s.stopwords import STOPWORDS_EN
from rouge_score.tokenizers import DefaultTokenizer


class RetrievalError(ValueError):
    """An index with no documents, or more pairs asked for than it holds."""


logging.getLogger("bm25s").setLevel(logging.WARNING)  # its debug line ("Building index") is no lesson output
_TOKENIZER = DefaultTokenizer(use_stemmer=True)
_STOPWORDS = frozenset(STOPWORDS_EN)


def words(text: str) -> list[str]:
    """The words BM25 matches: lower-cased, stemmed, without stop words."""
    return [w for w in _TOKENIZER.tokenize(text) if w not in _STOPWORDS]


def question_of(example: dict[str, Any]) -> str:
    """The user's question of a prompt/completion row."""
    return example["prompt"][-1]["content"]


def answer_of(example: dict[str, Any]) -> str:
    """The reference answer of a prompt/completion row."""
    return example["completion"][0]["content"]


@dataclass
class PairIndex:
    """A BM25 index over question/answer pairs; `retrieve` gives each question's top k pairs with their scores."""

    pairs: list[dict[str, Any]]
    setting: str = "k"  # the profile setting that chooses k, named in errors
    seconds: float = 0.0  # time to build the index
    _bm25: Any = field(default=None, repr=False)

    @classmethod
    def build(cls, pairs: list[dict[str, Any]], setting: str = "k") -> PairIndex:
        if not pairs:
            raise RetrievalError(
                "The retrieval index has no documents: the training split is empty. Every row went to the held-out "
                "split: raise data.max_rows or lower data.eval_rows."
            )
        start = time.perf_counter()
        bm25 = bm25s.BM25()
        bm25.index([words(f"{question_of(p)}\n{answer_of(p)}") for p in pairs], show_progress=False)
        return cls(pairs, setting, time.perf_counter() - start, bm25)

    def retrieve(self, questions: list[str], k: int) -> list[list[dict[str, Any]]]:
        """For each question, its k best pairs, best first: {"row": index in `pairs`, "score": BM25 score}.

        A question sharing no word with any pair still gets k pairs, all with score 0 (the table shows it)."""
        if k > len(self.pairs):
            raise RetrievalError(
                f"{self.setting} is {k}, but the retrieval index holds only {len(self.pairs)} training pairs: "
                f"lower {self.setting} or use more training rows (data.max_rows)."
            )
        if not questions:
            return []
        rows, scores = self._bm25.retrieve([words(q) for q in questions], k=k, show_progress=False, n_threads=1)
        return [
            [{"row": int(r), "score": round(float(s), 3)} for r, s in zip(rs, ss, strict=True)]
            for rs, ss in zip(rows, scores, strict=True)
        ]
