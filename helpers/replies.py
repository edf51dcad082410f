"""Lesson 00: what the helper LLM is asked for, and how its replies become White Rabbit rows.

An API model is asked for question/answer pairs as JSON (`prompt_for`); a small model, which cannot be trusted to
write JSON, is asked for a question (`question_prompt`), then for its answer (`answer_prompt`), and the pair is
packed as the same JSON (`pack_pair`). A reply is untrusted text, so it is size- and depth-checked before it is
parsed, searched for the JSON among any chatter, and its pairs are filtered: empty, short, filler, refusals,
echoed questions, instructions that ask nothing, pairs that name "the text" the learner will never see, generic or
off-topic questions, duplicates and near-duplicates are dropped, counted and kept with their reason for the lesson
to show (`Selection.dropped_pairs`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from rapidfuzz import fuzz, process

from helpers.documents import Chunk
from helpers.text_measures import words

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


# The two prompts of the small-model path (one question, then its answer): the same for llama.cpp's server and for
# the in-process fallback.
QUESTION_PROMPT = "{text}\n\nWrite one question that the text above answers."  # measured: more kept pairs than
# wordier prompts (which the 135M model echoes or answers itself)
ANSWER_PROMPT = "{text}\n\nUsing the text above, answer in two to four sentences: {question}"
QUESTION_TOKENS = 48  # a question is one line: a longer reply is cut to its first line anyway


def prompt_for(chunk: Chunk, pairs: int) -> str:
    return PROMPT.format(pairs=pairs, text=chunk.text)


def question_prompt(chunk: Chunk) -> str:
    return QUESTION_PROMPT.format(text=chunk.text)


def answer_prompt(chunk: Chunk, question: str) -> str:
    return ANSWER_PROMPT.format(text=chunk.text, question=question)


_QUESTION_LABEL = re.compile(r"^\s*(?:[-*#>\d.)\s]+)?(?:\*\*)?(?:question|q|a)\s*\d*\s*[:.)]\s*", re.IGNORECASE)


def first_question(reply: str) -> str:
    """The question in a small model's reply: its first non-empty line without a "Question:" label, list marker,
    bold or quotes, cut after its first question mark (what follows is usually the model answering itself)."""
    line = next((line for line in reply.splitlines() if line.strip(" \t*#-")), "")
    line = _QUESTION_LABEL.sub("", line).strip().strip("*\"'“”").strip()
    mark = line.find("?")
    return line[: mark + 1] if mark >= 0 else line


def whole_sentences(text: str) -> str:
    """`text` without the sentence a length limit cut off: up to its last `.`, `!` or `?` (the text unchanged when it
    ends with one, or has none)."""
    text = text.strip()
    if not text or text[-1] in ".!?\"'”)":
        return text
    ends = [m.end() for m in re.finditer(r"[.!?](?=[\"'”)]?(?:\s|$))", text)]
    return text[: ends[-1]].strip() if ends else text


def pack_pair(question: str, answer: str) -> str:
    """One question and its answer as the JSON reply an API model writes, so the same parser and filters apply."""
    return json.dumps({"pairs": [{"question": question, "answer": answer}]})


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


# What the filters look for (case-insensitive). The prompt asks for questions a practitioner would ask and answers
# that stand on their own; a small model often writes chat filler, refusals or "The article says..." instead.
FILLER = re.compile(
    r"\b(?:i'?m|i am) (?:ready|here|happy|glad) to (?:help|assist)|\bwhat'?s your (?:next )?question|"
    r"\bhow (?:can|may) i (?:help|assist)|\bfeel free to ask|\bi'?m glad you asked|"
    r"\bwhat an? (?:great|good|wonderful|interesting) question",
    re.IGNORECASE,
)
REFUSAL = re.compile(
    r"^(?:i'?m sorry|i apologi[sz]e|sorry,)|\bi (?:cannot|can'?t|am unable to|'m unable to|won'?t) "
    r"(?:help|assist|provide|answer|do that|comply)|\bas an ai\b|\bi don'?t have (?:access|enough information)",
    re.IGNORECASE,
)
# Questions, or requests that ask for something ("Explain how...", "List the..."): anything else asks nothing.
ASKING = re.compile(
    r"\?|^(?:what|why|how|when|where|which|who|whom|whose|is|are|was|were|do|does|did|can|could|should|would|will|"
    r"explain|describe|list|name|give|compare|outline|summari[sz]e|define|identify)\b",
    re.IGNORECASE,
)
SOURCE = r"(?:article|text|passage|excerpt|document above|paragraph)"
QUESTION_NAMES_SOURCE = re.compile(rf"\b(?:the|this|above|given|provided) {SOURCE}\b", re.IGNORECASE)
ANSWER_NAMES_SOURCE = re.compile(
    rf"^(?:the|this|in the|in this) {SOURCE}\b|\b(?:according to|as stated in|as mentioned in) (?:the|this) {SOURCE}\b|"
    rf"\bthe {SOURCE} (?:above|below)\b",
    re.IGNORECASE,
)
GENERIC = re.compile(
    r"^(?:can|could) you (?:help|tell|explain)(?: me)?(?: with)?(?: (?:that|this|it))?\s*\?|"
    r"^what do you (?:think|mean)\b|^tell me more\b|\bany (?:other |more )?questions\b|^what'?s the latest\b",
    re.IGNORECASE,
)
TOPIC_WORD_LETTERS = 5  # a question about its text shares at least one word this long with it


def _echoes(question: str, answer: str) -> bool:
    """The answer is the question again (nearly the same text, or the question plus a few words)."""
    q, a = words(question), words(answer)
    return fuzz.ratio(" ".join(q), " ".join(a)) >= 85 or (a[: len(q)] == q and len(a) - len(q) < 5)


ECHO_WORDS = 5  # a pair that holds this many consecutive words of a prompt's instruction repeats the prompt


def _ngrams(text: str, size: int = ECHO_WORDS) -> set[tuple[str, ...]]:
    found = words(text)
    return {tuple(found[i : i + size]) for i in range(len(found) - size + 1)}


# The prompts' own words (the chunk left out): a small model often hands them back as its question or answer.
PROMPT_NGRAMS = set().union(
    *(_ngrams(template.format(pairs="", text="", question="")) for template in (PROMPT, QUESTION_PROMPT, ANSWER_PROMPT))
)


def _repeats_prompt(text: str) -> bool:
    return bool(_ngrams(text) & PROMPT_NGRAMS)


def _stems(text: str) -> set[str]:
    """The text's words of TOPIC_WORD_LETTERS letters or more, cut to that many ("attacks" and "attack" match)."""
    return {w[:TOPIC_WORD_LETTERS] for w in words(text) if len(w) >= TOPIC_WORD_LETTERS}


def _off_topic(question: str, chunk: Chunk) -> bool:
    """The question has long words but none of them appears in its text or title ("What do you think?"). A rough
    rule: a question on topic whose only long words are synonyms of the text's ("Does a salt slow down cracking?"
    about a text without "cracking") is dropped too; one without long words ("What is MFA?") is not judged."""
    asked = _stems(question)
    return bool(asked) and not asked & _stems(f"{chunk.subject} {chunk.text}")


def pair_problem(question: Any, answer: Any, chunk: Chunk) -> str | None:
    """Why a question/answer pair is not training data (the reason select_pairs counts), or None for a good pair.
    Duplicates are select_pairs' business: they depend on the pairs kept before."""
    if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
        return "missing or empty question"
    question, answer = question.strip(), answer.strip()
    if len(answer.split()) < 5:
        return "answer under 5 words"
    if FILLER.search(question) or FILLER.search(answer):
        return "chat filler"
    if REFUSAL.search(answer):
        return "refusal"
    if _repeats_prompt(question) or _repeats_prompt(answer):
        return "repeats the prompt"
    if _echoes(question, answer):
        return "answer repeats the question"
    if not ASKING.search(question):
        return "instruction asks nothing"
    if QUESTION_NAMES_SOURCE.search(question):
        return "question names the source text"
    if ANSWER_NAMES_SOURCE.search(answer):
        return "answer names the source text"
    if GENERIC.search(question):
        return "generic question"
    if _off_topic(question, chunk):
        return "question not about its text"
    return None


SHOWN_CHARS = 300  # a dropped reply or answer is shown up to this many characters


def _shown(text: Any) -> str:
    text = text if isinstance(text, str) else repr(text)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + " …"


@dataclass
class Selection:
    """Pairs kept as White Rabbit rows (with provenance) and what was dropped: counts by reason, and each dropped
    pair (or unparsed reply) with its reason, for the lesson's table."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    dropped_pairs: list[dict[str, Any]] = field(default_factory=list)

    def drop(self, reason: str, chunk: Chunk, instruction: Any, response: Any) -> None:
        self.dropped[reason] += 1
        self.dropped_pairs.append(
            {"reason": reason, "instruction": _shown(instruction), "response": _shown(response), "source": chunk.source}
        )

    def dropped_examples(self, per_reason: int = 2) -> list[dict[str, Any]]:
        """Up to `per_reason` dropped pairs for each reason, most frequent reason first: a table that shows every
        rule at work without repeating one."""
        shown: list[dict[str, Any]] = []
        for reason, _ in self.dropped.most_common():
            shown += [p for p in self.dropped_pairs if p["reason"] == reason][:per_reason]
        return shown


def select_pairs(
    replies: dict[str, list[str]], chunks: list[Chunk], system: str, similarity: float = 90.0
) -> Selection:
    """Parse every reply, drop malformed pairs, pairs `pair_problem` finds wanting, duplicate and near-duplicate
    pairs (questions whose rapidfuzz token-set similarity to a kept question is at least `similarity` out of 100).
    Kept pairs become rows with `system` (the profile's `infer.system_prompt`) as their system message."""
    selection, by_id, seen = Selection(), {c.id: c for c in chunks}, set()
    kept_questions: list[str] = []
    for chunk_id, texts in replies.items():
        chunk = by_id[chunk_id]
        for text in texts:
            try:
                pairs = parse_pairs(text)
            except ReplyRefused as err:
                selection.drop(err.reason, chunk, "", text)
                continue
            except ValueError:
                selection.drop("reply not JSON", chunk, "", text)
                continue
            for pair in pairs:
                question, answer = pair.get("question"), pair.get("answer")
                if (problem := pair_problem(question, answer, chunk)) is not None:
                    selection.drop(problem, chunk, question, answer)
                    continue
                q, a = str(question).strip(), str(answer).strip()  # both text: pair_problem checked
                if tuple(words(q)) in seen:
                    selection.drop("duplicate", chunk, q, a)
                elif process.extractOne(q, kept_questions, scorer=fuzz.token_set_ratio, score_cutoff=similarity):
                    selection.drop("near-duplicate", chunk, q, a)
                else:
                    kept_questions.append(q)
                    seen.add(tuple(words(q)))
                    row = {"subject": chunk.subject, "system": system, "instruction": q, "response": a}
                    selection.rows.append({**row, "source": chunk.source, "chunk": chunk.index})
    return selection
