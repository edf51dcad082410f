"""Held-out means unseen: helpers.overlap measures how close each evaluation row is to the training rows."""

import pytest

from helpers.overlap import (
    ANSWER_OVERLAP_FLAG,
    closeness,
    closeness_table,
    question_and_answer,
    summarise,
    summary_text,
)

SYSTEM = "You are a security expert."
TRAINING = [
    ("What is a TCP SYN scan?",
     "A SYN scan sends a SYN packet to each port and reads the reply: a SYN-ACK means the port is open, a reset "
     "means it is closed, and no answer usually means a firewall dropped the packet."),
    ("How should passwords be stored?",
     "Store passwords with a slow, salted hash such as Argon2 or bcrypt, never in plain text and never with a fast "
     "hash like MD5, and tune the cost so one hash takes about a tenth of a second."),
    ("What does a web application firewall do?",
     "It inspects HTTP requests before they reach the application and blocks those that match attack patterns, "
     "such as SQL injection or cross-site scripting payloads, while letting normal traffic through."),
]  # fmt: skip


def example(question: str, answer: str) -> dict:
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": answer}], "subject": "Test"}  # fmt: skip


TRAIN = [example(q, a) for q, a in TRAINING]
UNSEEN = example(
    "Why should backups be kept offline?",
    "Ransomware encrypts every drive it can reach, including attached backup disks and network shares; a copy "
    "that is disconnected or immutable survives the attack and lets the organisation restore its data.",
)


def test_a_planted_duplicate_is_flagged_and_an_unseen_row_is_not():
    planted = example(*TRAINING[1])  # a training row copied into the held-out set
    rows = closeness([UNSEEN, planted], TRAIN)
    assert [r["near-duplicate"] for r in rows] == [False, True]
    assert rows[1]["question match"] == 100.0 and rows[1]["answer 8-grams seen"] == 1.0
    assert rows[1]["closest training question"] == TRAINING[1][0]
    assert rows[0]["answer 8-grams seen"] == 0.0 and rows[0]["question match"] < 70


def test_a_reworded_question_with_a_trained_answer_is_flagged_by_the_answer():
    reworded = example("Explain the safe way to keep user passwords in a database.", TRAINING[1][1])
    row = closeness([reworded], TRAIN)[0]
    assert row["question match"] < 90 and row["answer 8-grams seen"] >= ANSWER_OVERLAP_FLAG and row["near-duplicate"]


def test_a_question_asked_again_in_other_words_order_and_case_is_flagged_by_the_question():
    same_question = example("a TCP SYN scan is what?", UNSEEN["completion"][0]["content"])
    row = closeness([same_question], TRAIN)[0]
    assert row["question match"] >= 90 and row["answer 8-grams seen"] == 0.0 and row["near-duplicate"]


def test_short_and_empty_answers_and_white_rabbit_rows():
    short = example("Port scanning?", "a SYN-ACK means the port")  # 5 words: compared as one 5-gram
    empty = example("Nothing?", "")
    rows = closeness([short, empty], TRAIN)
    assert rows[0]["answer 8-grams seen"] == 1.0 and rows[1]["answer 8-grams seen"] == 0.0
    raw = {"subject": "s", "system": SYSTEM, "instruction": "q?", "response": "a."}
    assert question_and_answer(raw) == ("q?", "a.")
    with pytest.raises(ValueError, match="training rows"):
        closeness([UNSEEN], [])


def test_summary_counts_the_flagged_rows_and_says_so():
    rows = closeness([UNSEEN, example(*TRAINING[0])], TRAIN)
    summary = summarise(rows, len(TRAIN))
    assert summary["near_duplicates"] == 1 and summary["flagged_questions"] == [TRAINING[0][0]]
    assert summary["best_question_match"] == 100.0 and summary["rows"] == 2 and summary["training_rows"] == 3
    assert "1 near-duplicate(s) flagged" in summary_text(summary)
    clean = summary_text(summarise(closeness([UNSEEN], TRAIN), len(TRAIN)))
    assert "No near-duplicates" in clean and "1 evaluation rows against 3 training rows" in clean


def test_closeness_table_shows_flagged_rows_first_and_escapes_questions():
    hostile = example("<script>alert(1)</script> What is a TCP SYN scan?", UNSEEN["completion"][0]["content"])
    page = closeness_table(closeness([UNSEEN, hostile, example(*TRAINING[2])], TRAIN), limit=2).to_html()
    assert "<script" not in page and "&lt;script&gt;" in page
    assert page.index(TRAINING[2][0]) < page.index("alert(1)") and "Why should backups" not in page  # flagged first
