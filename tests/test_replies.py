"""Notebook 00's helper-LLM replies: parsing untrusted text into pairs, and filtering them (helpers.replies)."""

import json

import pytest

from helpers.documents import Chunk
from helpers.html_tables import safe_table
from helpers.replies import (
    MAX_REPLY_DEPTH,
    ReplyRefused,
    first_question,
    pair_problem,
    parse_pairs,
    refusal,
    select_pairs,
    whole_sentences,
)

PAIR = {"question": "Why MFA?", "answer": "It stops most credential attacks."}


def test_parse_pairs_finds_json_in_chatter_and_refuses_the_rest():
    fenced = 'Sure! Here you go:\n```json\n{"pairs": [' + json.dumps(PAIR) + "]}\n```\nAnything else?"
    assert parse_pairs(fenced) == [PAIR]
    assert parse_pairs(json.dumps([PAIR, "junk"])) == [PAIR]
    for bad in ("no json at all", '{"pairs": [{"question": "x"', '{"items": []}'):
        with pytest.raises(ValueError):
            parse_pairs(bad)


def test_parse_pairs_skips_brackets_and_other_json_before_the_pairs():
    pairs = json.dumps({"pairs": [PAIR]})
    assert parse_pairs(f"Sure [see below]: {pairs}") == [PAIR]  # `[see below]` is not JSON: the next start is tried
    assert parse_pairs(f"Step [1] of 2, with {{}} and {{'x': 1}}: {pairs}") == [PAIR]
    assert parse_pairs('{"note": {"pairs": "inside"}} ' + pairs) == [PAIR]  # a value without pairs is skipped whole
    assert parse_pairs('{"pairs": []}') == [] and parse_pairs("[]") == []
    with pytest.raises(ValueError, match='the JSON has no "pairs" list'):
        parse_pairs('Sure (see below): {"items": [1]} {"n": 2}')


def test_select_pairs_drops_bad_duplicate_and_near_duplicate_pairs():
    chunk = Chunk("doc.md", 0, "Doc", "Passwords are stored with Argon2id. A FIDO2 key checks the origin.")

    def reply(*pairs):
        return json.dumps({"pairs": [{"question": q, "answer": a} for q, a in pairs]})

    answer = "Use a slow salted hash such as Argon2id for every stored password."
    replies = {
        chunk.id: [
            reply(("How should passwords be stored?", answer), ("What is MFA?", "Too short.")),
            reply(("how should PASSWORDS be stored", answer), ("How should the passwords be stored?", answer)),
            reply(("", answer), ("What does a FIDO2 key check?", "It checks the origin before it signs anything.")),
            "not json",
        ]
    }
    selection = select_pairs(replies, [chunk], "You are a security expert.")
    assert [r["instruction"] for r in selection.rows] == [
        "How should passwords be stored?",
        "What does a FIDO2 key check?",
    ]
    assert selection.rows[0]["source"] == "doc.md" and selection.rows[0]["chunk"] == 0
    assert dict(selection.dropped) == {
        "answer under 5 words": 1,
        "duplicate": 1,
        "near-duplicate": 1,
        "missing or empty question": 1,
        "reply not JSON": 1,
    }


def test_a_deep_huge_or_non_text_reply_is_refused_before_parsing():
    with pytest.raises(ReplyRefused, match=f"nests 1000 levels deep, over the limit of {MAX_REPLY_DEPTH}"):
        parse_pairs("[" * 1000 + "]" * 1000)
    with pytest.raises(ReplyRefused, match=f"nests 1000 levels deep, over the limit of {MAX_REPLY_DEPTH}"):
        parse_pairs("Sure [see below]: " + "[" * 1000 + "]" * 1000)  # deep JSON after a bracketed aside
    with pytest.raises(ReplyRefused, match="the reply has 200,000 characters, over the limit of 100,000"):
        parse_pairs("x" * 200_000)
    with pytest.raises(ReplyRefused, match="the reply is int, not text"):
        parse_pairs(1)
    assert [getattr(refusal(r), "reason", None) for r in ("[" * 30, "x" * 200_000, None, "not json", "[]")] == [
        "reply nested too deep",
        "reply too long",
        "reply not text",
        None,
        None,
    ]


CHUNK = Chunk(
    "policy.md",
    0,
    "Password and access policy",
    "Passwords are stored with Argon2id and a per-user salt. Finance staff use hardware security keys, and payment "
    "changes are confirmed by phone.",
)
GOOD_ANSWER = "Store them with a slow salted hash such as Argon2id, never in plain text or with a fast hash."

# One pair per rule, as the embedded 135M model writes them (several seen in notebook 00's runs).
BAD_PAIRS = [
    ("", GOOD_ANSWER, "missing or empty question"),
    ("How are passwords stored?", "With Argon2id.", "answer under 5 words"),
    ("I'm ready to help. What's your next question?", "I'm ready to help. What's your next question?", "chat filler"),
    ("How should passwords be stored?", "I'm ready to help you with any security question you have.", "chat filler"),
    ("How should passwords be stored?", "I'm sorry, but I can't help with that request today.", "refusal"),
    ("How should passwords be stored?", "As an AI language model, I do not store any passwords at all.", "refusal"),
    ("What is the question that the text above answers?", GOOD_ANSWER, "repeats the prompt"),
    ("How are passwords stored?", "Using the text above, answer in two to four sentences: how.", "repeats the prompt"),
    (
        "How should finance staff confirm payment changes?",
        "How should finance staff confirm payment changes? By phone.",
        "answer repeats the question",
    ),
    ("Passwords are stored with Argon2id and a salt.", GOOD_ANSWER, "instruction asks nothing"),
    ("1. Install only the packages the service needs", GOOD_ANSWER, "instruction asks nothing"),
    ("What are the key lessons from the article about passwords?", GOOD_ANSWER, "question names the source text"),
    ("What is the text about?", GOOD_ANSWER, "question names the source text"),
    ("How are passwords stored?", "The article says that passwords use Argon2id.", "answer names the source text"),
    ("How are passwords stored?", "The text explains that they use Argon2id.", "answer names the source text"),
    ("How are passwords stored?", "According to the passage, with Argon2id, salted.", "answer names the source text"),
    ("Can you help me with that?", GOOD_ANSWER, "generic question"),
    ("What do you think?", GOOD_ANSWER, "generic question"),
    ("What's the weather like in Lisbon today?", GOOD_ANSWER, "question not about its text"),
]


@pytest.mark.parametrize(("question", "answer", "reason"), BAD_PAIRS, ids=[f"{r}: {q[:30]}" for q, _, r in BAD_PAIRS])
def test_each_filter_drops_its_pair_with_its_reason(question, answer, reason):
    assert pair_problem(question, answer, CHUNK) == reason


@pytest.mark.parametrize(
    "question",
    [
        "How should passwords be stored?",
        "Explain how hardware security keys stop phishing.",
        "Which staff use hardware security keys?",
        "Why are payment changes confirmed by phone?",
        "Does a per-user salt make stored passwords safer?",
        "What is MFA?",  # no long word: the topic rule cannot judge it, so it keeps it
    ],
)
def test_good_pairs_pass_every_filter(question):
    assert pair_problem(question, GOOD_ANSWER, CHUNK) is None
    # "the text" inside an answer (not as its source) is no reason to drop it
    plain = "Never keep passwords in plain text: hash them with Argon2id and a salt."
    assert pair_problem(question, plain, CHUNK) is None


def test_dropped_pairs_are_kept_with_their_reason_and_shown_escaped():
    xss = "<img src=x onerror=alert(1)>"
    replies = {
        CHUNK.id: [
            json.dumps({"pairs": [{"question": q, "answer": a} for q, a, _ in BAD_PAIRS]}),
            json.dumps({"pairs": [{"question": "How should passwords be stored?", "answer": GOOD_ANSWER}]}),
            json.dumps({"pairs": [{"question": f"What is {xss}?", "answer": f"The article says {xss} is bad."}]}),
            "not json " + xss,
        ]
    }
    selection = select_pairs(replies, [CHUNK], "system")
    assert [r["instruction"] for r in selection.rows] == ["How should passwords be stored?"]
    reasons = [p["reason"] for p in selection.dropped_pairs]
    assert reasons == [r for _, _, r in BAD_PAIRS] + ["answer names the source text", "reply not JSON"]
    assert sum(selection.dropped.values()) == len(selection.dropped_pairs)
    examples = selection.dropped_examples(per_reason=1)
    assert len(examples) == len(selection.dropped) and examples[0]["reason"] == selection.dropped.most_common(1)[0][0]
    html = safe_table(examples, columns=["reason", "instruction", "response", "source"]).to_html()
    assert xss not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_a_long_dropped_reply_is_shown_shortened():
    selection = select_pairs({CHUNK.id: ["x" * 5000]}, [CHUNK], "system")
    assert dict(selection.dropped) == {"reply not JSON": 1}
    assert len(selection.dropped_pairs[0]["response"]) < 400


def test_first_question_and_whole_sentences_clean_a_small_models_reply():
    assert first_question("\nQuestion: How are passwords stored? They use Argon2id.") == "How are passwords stored?"
    assert first_question('A: "Why use a salt?"\nBecause...') == "Why use a salt?"
    assert first_question("**Q1:** What is MFA?") == "What is MFA?"
    assert first_question("") == ""
    assert whole_sentences("Argon2id is slow. It also uses a salt so that two equal") == "Argon2id is slow."
    assert whole_sentences("Ends well.") == "Ends well." and whole_sentences("no end at all") == "no end at all"
