"""Notebook 00's helper-LLM replies: parsing untrusted text into pairs, and filtering them (helpers.replies)."""

import json

import pytest

from helpers.documents import Chunk
from helpers.replies import MAX_REPLY_DEPTH, ReplyRefused, parse_pairs, refusal, select_pairs

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
    chunk = Chunk("doc.md", 0, "Doc", "text")

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
