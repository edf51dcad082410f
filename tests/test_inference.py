"""Batched generation: the same greedy answers as one question at a time, and the profile's decoding settings."""

import re

import pytest

from helpers.inference import (
    GREEDY,
    Decoding,
    decoding_table,
    generate,
    generate_batch,
    least_distinct,
    looping_answers,
    stopping_summary,
)
from helpers.model import load_model

QUESTIONS = [
    "What is XSS?",
    "What is the difference between a TCP SYN scan and a TCP connect scan?",
    "How should an organisation store user passwords? Answer for a small company without a security team.",
    "Name one port scanner.",
    "Explain the principle of least privilege with an example from a web application.",
]
SYSTEM = "You are a cybersecurity expert."


@pytest.fixture(scope="module")
def embedded(smoke):
    model, tokenizer, _ = load_model(smoke)
    return model.eval(), tokenizer


def test_batched_greedy_answers_equal_one_at_a_time(embedded):
    model, tokenizer = embedded
    one_by_one = [generate(model, tokenizer, q, SYSTEM, max_new_tokens=24) for q in QUESTIONS]
    batched = generate_batch(model, tokenizer, QUESTIONS, SYSTEM, max_new_tokens=24, batch_size=3)  # 3 + 2, padded
    for q, single, many in zip(QUESTIONS, one_by_one, batched, strict=True):
        assert many["answer"] == single["answer"], q
        assert (many["tokens"], many["stopped_by_itself"]) == (single["tokens"], single["stopped_by_itself"]), q


def test_batched_answers_keep_the_question_order_and_per_question_systems(embedded):
    model, tokenizer = embedded
    questions = QUESTIONS[:2]
    systems = ["Answer in French.", SYSTEM]
    batched = generate_batch(model, tokenizer, questions[::-1], systems[::-1], max_new_tokens=12, batch_size=2)
    alone = [
        generate(model, tokenizer, q, s, max_new_tokens=12) for q, s in zip(questions[::-1], systems[::-1], strict=True)
    ]
    assert [b["answer"] for b in batched] == [a["answer"] for a in alone]
    with pytest.raises(ValueError, match="system messages"):
        generate_batch(model, tokenizer, questions, ["one"], max_new_tokens=4)


def test_no_repeat_ngram_size_reaches_generate(embedded):
    model, tokenizer = embedded
    decoding = Decoding(no_repeat_ngram_size=2)
    answer = generate_batch(model, tokenizer, QUESTIONS[:1], SYSTEM, max_new_tokens=40, decoding=decoding)[0]
    ids = tokenizer(answer["answer"], add_special_tokens=False)["input_ids"]
    pairs = list(zip(ids, ids[1:], strict=False))
    assert len(pairs) == len(set(pairs)) or answer["tokens"] < 3  # no token pair twice (re-tokenising may merge)


def test_decoding_comes_from_the_profile(smoke):
    settings = smoke.infer.model_copy(update={"repetition_penalty": 1.2, "no_repeat_ngram_size": 3})
    decoding = Decoding.from_settings(settings)
    assert (decoding.repetition_penalty, decoding.no_repeat_ngram_size) == (1.2, 3)
    assert decoding.generate_kwargs()["no_repeat_ngram_size"] == 3
    kwargs = Decoding(do_sample=True, temperature=0.7, top_p=0.9).generate_kwargs()
    assert kwargs["do_sample"] and kwargs["temperature"] == 0.7 and kwargs["top_p"] == 0.9
    assert "temperature" not in GREEDY.generate_kwargs()  # greedy decoding gets no sampling knobs


def test_answers_table_escapes_model_and_data_text():
    from helpers.inference import answers_table

    answer = {"answer": "<script>alert(1)</script> the key, " * 2, "stopped_by_itself": True}
    sample = {"question": "<b>bold?</b>", "reference": "<img src=x onerror=alert(2)>", "base": answer,
              "tuned": {"answer": "the key, " * 20, "stopped_by_itself": False}}  # fmt: skip
    html = answers_table([sample]).to_html()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>" not in html
    assert "&lt;img src=x" in html and "<img" not in html and "&lt;b&gt;bold?" in html
    assert "no / yes" in html  # the tuned answer loops, the base answer does not


def test_local_generator_batches_its_questions_and_answers(embedded):
    import json

    from helpers.documents import Chunk
    from helpers.prepare import LocalGenerator

    model, tokenizer = embedded
    calls = []
    original = model.generate

    def counting_generate(*args, **kwargs):  # a spy: the real generate runs, each call is counted
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counting_generate
    try:
        chunk = Chunk(source="notes.md", index=0, subject="Passwords", text="Store passwords with Argon2 and a salt.")
        replies = LocalGenerator(model, tokenizer, max_new_tokens=12).replies(chunk, 3, temperature=0.7)
    finally:
        del model.generate
    assert calls == [3, 3], "three questions in one generate call, then their three answers in another"
    pairs = [json.loads(r)["pairs"][0] for r in replies]
    assert len(pairs) == 3 and all(isinstance(p["question"], str) and isinstance(p["answer"], str) for p in pairs)


def answer(text: str, tokens: int = 10, stopped: bool = True) -> dict:
    return {"answer": text, "tokens": tokens, "stopped_by_itself": stopped, "seconds": 0.1}


def test_the_stop_check_says_when_the_budget_cannot_show_it():
    samples = [{"base": answer("a", 24, False), "tuned": answer("b", 24, False)}] * 2
    short = stopping_summary(samples, [101, 137, 158], 24)
    assert short == (
        "The training answers are 101-158 tokens long (median 137) and the budget, infer.max_new_tokens, is 24: "
        "shorter than every training answer, so no answer can end by itself under this profile and the check says "
        "nothing here. 0 of 2 tuned answers ended by themselves (base: 0)."
    )
    samples = [
        {"base": answer("a", 224, False), "tuned": answer("b", 140)},
        {"base": answer("c"), "tuned": answer("d")},
    ]
    roomy = stopping_summary(samples, [101, 137, 203, 250], 224)
    assert roomy.endswith("is 224: room for 3 of 4 of them. 2 of 2 tuned answers ended by themselves (base: 1).")


def test_loops_are_found_and_else_the_least_varied_answers_stand_in():
    loop = "the current user's role, " * 6
    answers = [answer("a plain answer with words that differ"), answer(loop), answer("x y x y z"), answer(loop)]
    assert looping_answers(answers) == [1, 3]
    assert least_distinct([answers[0], answers[2]], 1) == [1]  # "x y" twice: the fewest distinct word pairs


def test_the_decoding_table_formats_its_numbers_and_escapes_answers():
    loop = "<b>the current user's role</b>, " * 6
    decoded = {
        "greedy": [answer(loop, 120, False), answer("fine", 31)],
        "sampling": [answer("ok", 40), answer("ok", 9)],
    }
    html = decoding_table(decoded).to_html()
    for shown in ("1 of 2", "0 of 2", "1 of 2", "76", "2 of 2", "&lt;b&gt;the current"):
        assert shown in html, shown
    assert "<b>" not in html and not re.search(r"\d\.\d{5,}", html)


def test_the_classroom_budget_leaves_room_for_every_training_answer(tokenizer, sample_rows):
    """06's stop check works under cpu-lab: its budget holds the longest answer of the sample (same tokenizer)."""
    from helpers.data import to_prompt_completion
    from helpers.inference import answer_lengths
    from helpers.profiles import load_profile

    lengths = answer_lengths(tokenizer, [to_prompt_completion(row) for row in sample_rows])
    assert max(lengths) <= load_profile("cpu-lab").infer.max_new_tokens, max(lengths)
