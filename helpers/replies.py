"""Lesson 00: what the helper LLM is asked for, and how its replies become White Rabbit rows.

The prompt asks for question/answer pairs as JSON; a reply is untrusted text, so it is size- and depth-checked
before it is parsed, searched for the JSON among any chatter, and its pairs are filtered (empty, short, duplicate
and near-duplicate questions are dropped and counted).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rapidfuzz import fuzz, process

from helpers.data import words
from helpers.documents import Chunk

PROMPT = (
    "Read the text below and write {pairs} question-and-answer pairs that a security practitioner could answer "
    "from it alone. Each answer is 2 to 5 self-contained sentences and never mentions 'the text'. Reply with JSON "
    'only, in this form: {{"pairs": [{{"question": "...", "answer": "..."}}]}}\n\nTEXT:\n{text}'
)
MAX_REPLY_CHARS = 100_000  # a helper-LLM reply longer than this is dropped unparsed (1024 tokens are ~4,000 chars)
MAX_REPLY_DEPTH = 20  # JSON nesting a reply may have ({"pairs": [{...}]} is 3): deeper is dropped before parsing
# Where JSON may start; each start tried costs a scan of the reply, so only the first few are tried (a model's
# JSON follows a sentence or two of chatter, which holds few brackets).
JSON_START = re.compile(r"[\[{]")
MAX_JSON_STARTS = 20


def prompt_for(chunk: Chunk, pairs: int) -> str:
    return PROMPT.format(pairs=pairs, text=chunk.text)


class ReplyRefused(ValueError):
    """A reply dropped before parsing (not text, too long, nested too deep); `reason` is what select_pairs counts
    it as."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def json_depth(text: str, start: int = 0) -> int:
    """How deeply the JSON value starting at `start` nests objects and lists (brackets inside strings do not
    count); a linear scan that stops where the value ends, so it is safe on any input."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text[start:]:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
            if depth <= 0:
                break
    return deepest


def parse_pairs(reply: str) -> list[dict[str, str]]:
    """The question/answer pairs in a generator's reply: the first JSON value in it that holds pairs (a
    `{"pairs": [...]}` object, or a list of objects). Code fences, chatter and bracketed text around it are
    skipped: each `{` or `[` is tried in order. Raises ValueError when no JSON holds pairs, and ReplyRefused
    (before parsing) for a reply that is not text, is over MAX_REPLY_CHARS, or nests deeper than MAX_REPLY_DEPTH
    where its JSON starts (the parser would recurse until it fails)."""
    if not isinstance(reply, str):
        raise ReplyRefused("reply not text", f"the reply is {type(reply).__name__}, not text")
    if len(reply) > MAX_REPLY_CHARS:
        raise ReplyRefused(
            "reply too long", f"the reply has {len(reply):,} characters, over the limit of {MAX_REPLY_CHARS:,}"
        )
    problem, empty_list, position = "no JSON in the reply", False, 0
    for _ in range(MAX_JSON_STARTS):
        if (found := JSON_START.search(reply, position)) is None:
            break
        start = found.start()
        depth = json_depth(reply, start)
        if depth > MAX_REPLY_DEPTH:
            raise ReplyRefused(
                "reply nested too deep",
                f"the reply's JSON nests {depth} levels deep, over the limit of {MAX_REPLY_DEPTH}",
            )
        try:
            value, end = json.JSONDecoder().raw_decode(reply, start)
        except json.JSONDecodeError as err:
            problem, position = f"the reply is not valid JSON ({err.msg})", start + 1
            continue
        pairs = value.get("pairs") if isinstance(value, dict) else value
        objects = [p for p in pairs if isinstance(p, dict)] if isinstance(pairs, list) else []
        if objects or (isinstance(pairs, list) and isinstance(value, dict)):
            return objects
        empty_list = empty_list or isinstance(value, list)  # `[]`, or `[1]` in "step [1]": no pairs, kept looking
        problem, position = 'the JSON has no "pairs" list', end  # what is inside this value was tried with it
    if empty_list:
        return []
    raise ValueError(problem)


def refusal(reply: Any) -> ReplyRefused | None:
    """Why parse_pairs refuses `reply` unparsed (not text, too long, too deep), or None when it does not."""
    try:
        parse_pairs(reply)
    except ReplyRefused as err:
        return err
    except ValueError:
        pass
    return None


@dataclass
class Selection:
    """Pairs kept as White Rabbit rows (with provenance) and what was dropped, by reason."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)


def select_pairs(
    replies: dict[str, list[str]], chunks: list[Chunk], system: str, similarity: float = 90.0
) -> Selection:
    """Parse every reply, drop malformed, empty, too short, duplicate and near-duplicate pairs (questions whose
    rapidfuzz token-set similarity to a kept question is at least `similarity` out of 100). Kept pairs become rows
    with `system` (the profile's `infer.system_prompt`) as their system message."""
    selection, by_id, seen = Selection(), {c.id: c for c in chunks}, set()
    kept_questions: list[str] = []
    for chunk_id, texts in replies.items():
        chunk = by_id[chunk_id]
        for text in texts:
            try:
                pairs = parse_pairs(text)
            except ReplyRefused as err:
                selection.dropped[err.reason] += 1
                continue
            except ValueError:
                selection.dropped["reply not JSON"] += 1
                continue
            for pair in pairs:
                question, answer = pair.get("question"), pair.get("answer")
                if not isinstance(question, str) or not isinstance(answer, str) or not (q := question.strip()):
                    selection.dropped["missing or empty question"] += 1
                elif len(answer.split()) < 5:
                    selection.dropped["answer under 5 words"] += 1
                elif tuple(words(q)) in seen:
                    selection.dropped["duplicate"] += 1
                elif process.extractOne(q, kept_questions, scorer=fuzz.token_set_ratio, score_cutoff=similarity):
                    selection.dropped["near-duplicate"] += 1
                else:
                    kept_questions.append(q)
                    seen.add(tuple(words(q)))
                    row = {"subject": chunk.subject, "system": system, "instruction": q, "response": answer.strip()}
                    selection.rows.append({**row, "source": chunk.source, "chunk": chunk.index})
    return selection
