"""Lesson 07's "should you fine-tune?": BM25 retrieval, the prompts with worked examples, the bad settings, and the
whole comparison on the cpu-smoke model (tuned model, prompting, RAG, tuned + RAG)."""

import math
import time

import pytest
import torch

from helpers.alternatives import (
    ANSWER_LOSS,
    LABELS,
    ORDER,
    SYSTEMS,
    TUNED,
    AlternativesError,
    against_tuned_table,
    alternatives_markdown,
    choose_examples,
    compare_alternatives,
    headline,
    prompt_lengths,
    prompted_examples,
    reading,
    retrieval_table,
    scores_table,
    verdict_grid,
    with_examples,
)
from helpers.chat import messages
from helpers.data import to_prompt_completion
from helpers.evaluation import STATISTICS, answer_losses, compare_answers, summarise_losses
from helpers.profiles import ProfileError, load_profile
from helpers.retrieval import PairIndex, RetrievalError, answer_of, question_of


def pair(question: str, answer: str, system: str = "You are a security expert.") -> dict:
    return {"prompt": messages(question, system), "completion": [{"role": "assistant", "content": answer}]}


CORPUS = [
    pair("How should a web application store user passwords?", "Hash each password with Argon2id and a salt."),
    pair("What does a SYN scan send?", "Only the first packet of the TCP handshake."),
    pair("How do I spot a phishing email?", "Check the sender's domain and never trust urgent links."),
    pair("Why rotate API keys?", "A leaked key stops working once it is rotated."),
]


def test_bm25_finds_the_pair_about_the_question_with_stemming():
    index = PairIndex.build(CORPUS, "evaluate.rag_top_k")
    found = index.retrieve(["Where is a stored password safe?", "phishing e-mails: how to recognise them"], k=2)
    assert [hits[0]["row"] for hits in found] == [0, 2]  # "password" finds "passwords", "phishing" its pair
    assert all(len(hits) == 2 and hits[0]["score"] >= hits[1]["score"] for hits in found)
    assert found[0][0]["score"] > 0
    nothing = index.retrieve(["zebra quokka"], k=1)[0]  # no shared word: still k pairs, score 0 says so
    assert len(nothing) == 1 and nothing[0]["score"] == 0


def test_an_empty_index_and_a_k_over_the_index_are_clear_errors():
    with pytest.raises(RetrievalError, match="no documents: the training split is empty.*data.max_rows"):
        PairIndex.build([], "evaluate.rag_top_k")
    with pytest.raises(RetrievalError, match="evaluate.rag_top_k is 5, but the retrieval index holds only 4"):
        PairIndex.build(CORPUS, "evaluate.rag_top_k").retrieve(["passwords"], k=5)


def test_worked_examples_are_chosen_as_the_profile_says():
    assert choose_examples(CORPUS, 2, "first", 0) == [0, 1]
    shortest = choose_examples(CORPUS, 2, "shortest", 0)
    assert sorted(len(answer_of(CORPUS[i])) for i in shortest) == sorted(len(answer_of(p)) for p in CORPUS)[:2]
    assert choose_examples(CORPUS, 3, "random", 42) == choose_examples(CORPUS, 3, "random", 42)  # seeded
    with pytest.raises(AlternativesError, match="evaluate.prompt_examples is 5, but the training split has only 4"):
        choose_examples(CORPUS, 5, "random", 42)
    with pytest.raises(AlternativesError, match="evaluate.prompt_examples: the training split is empty"):
        choose_examples([], 1, "random", 42)


def test_the_prompt_shows_the_examples_after_the_rows_own_system_message(tokenizer):
    held_out = [pair("How long should a password be?", "At least 12 characters.", "Be brief.")]
    [prompted] = prompted_examples(held_out, [[CORPUS[0], CORPUS[3]]])
    system = prompted["prompt"][0]["content"]
    assert system == with_examples("Be brief.", [CORPUS[0], CORPUS[3]])
    assert system.startswith("Be brief.\n\n") and "Question: Why rotate API keys?\nAnswer: A leaked key" in system
    assert question_of(prompted) == "How long should a password be?"  # the question and the reference unchanged
    assert prompted["completion"] == held_out[0]["completion"]
    assert prompt_lengths(tokenizer, [prompted])[0] > prompt_lengths(tokenizer, held_out)[0] + 30


def test_profile_settings_are_checked_and_fit_the_context_for_any_sample_pair(tokenizer, sample_rows):
    # The longest prompt a profile can build from the course's sample: k of its longest pairs around its longest
    # question, with the longest system message; it must leave max_new_tokens of room, or 07 stops with an error.
    rows = [to_prompt_completion(r) for r in sample_rows]
    longest = sorted(rows, key=lambda r: len(tokenizer(answer_of(r) + question_of(r))["input_ids"]))[-8:]
    question = max(rows, key=lambda r: len(tokenizer(question_of(r))["input_ids"]))
    for name in ("cpu-smoke", "cpu-lab"):
        profile = load_profile(name)
        s = profile.evaluate
        for k in (s.prompt_examples, s.rag_top_k):
            [worst] = prompted_examples([question], [longest[-k:]])
            needed = prompt_lengths(tokenizer, [worst])[0] + s.max_new_tokens
            assert needed <= profile.model.max_seq_length, f"{name}: k={k} needs {needed} tokens"
    with pytest.raises(ProfileError, match="evaluate.example_choice"):
        load_profile("cpu-smoke", {"evaluate": {"example_choice": "best"}})
    with pytest.raises(ProfileError, match="evaluate.rag_top_k"):
        load_profile("cpu-smoke", {"evaluate": {"rag_top_k": 0}})


def _samples_for(examples):  # what compare_answers returns, for the checks that stop before generating
    return [{"question": question_of(e), "tuned": {"answer": "", "tokens": 1, "stopped_by_itself": True,
             "seconds": 0.1}} for e in examples]  # fmt: skip


def test_a_prompt_over_the_context_and_mismatched_answers_are_clear_errors(smoke, tokenizer):
    held_out = [pair("How should passwords be stored?", "With a slow salted hash.")]
    settings = smoke.evaluate.model_copy(update={"rag_top_k": 2})
    with pytest.raises(AlternativesError) as err:
        compare_alternatives(None, tokenizer, held_out, CORPUS, _samples_for(held_out), settings, 80, 1.0)
    message = str(err.value)
    assert "prompt no longer fits the context" in message and "model.max_seq_length 80" in message
    assert f"evaluate.max_new_tokens {settings.max_new_tokens}" in message
    assert "evaluate.prompt_examples" in message  # the first system checked names its own k
    settings = settings.model_copy(update={"prompt_examples": 1})
    shown = choose_examples(CORPUS, 1, settings.example_choice, 42)
    one = prompt_lengths(tokenizer, prompted_examples(held_out, [[CORPUS[i] for i in shown]]))[0]
    context = max(one, *prompt_lengths(tokenizer, prompted_examples(held_out * 4, [[p] for p in CORPUS]))) + 24
    with pytest.raises(AlternativesError, match=r"Lower evaluate.rag_top_k \(now 2\)"):  # 1 example fits, 2 not
        compare_alternatives(None, tokenizer, held_out, CORPUS, _samples_for(held_out),
                             settings.model_copy(update={"max_new_tokens": 24}), context, 1.0)  # fmt: skip
    with pytest.raises(AlternativesError, match="same 1 held-out questions in the same order"):
        compare_alternatives(None, tokenizer, held_out, CORPUS, [], settings, 4096, 1.0)
    with pytest.raises(AlternativesError, match="no documents: the training split is empty"):
        compare_alternatives(None, tokenizer, held_out, [], _samples_for(held_out), settings, 4096, 1.0)


@pytest.fixture(scope="module")
def compared(smoke, sample_rows):
    """The comparison on the cpu-smoke model with an adapter nudged off zero (a stand-in for a trained one)."""
    from helpers.lora import add_lora
    from helpers.model import load_model

    model, tokenizer, _ = load_model(smoke)
    model = add_lora(model, smoke)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.02)
    model.eval()
    rows = [to_prompt_completion({**r, "response": " ".join(r["response"].split()[:30])}) for r in sample_rows[:40]]
    examples, train = rows[:4], rows[4:]
    train[0]["prompt"][-1]["content"] = "<script>alert(1)</script> " + question_of(examples[0])  # retrieved, escaped
    settings = smoke.evaluate.model_copy(update={"max_new_tokens": 8, "bootstrap_samples": 100,
                                                 "generation_batch_size": 4, "alternatives_questions": 3})  # fmt: skip
    generation = compare_answers(model, tokenizer, examples, 8, batch_size=4, bootstrap_samples=100)
    start, cpu = time.perf_counter(), time.process_time()
    result = compare_alternatives(model, tokenizer, examples, train, generation["samples"], settings,
                                  smoke.model.max_seq_length, train_seconds=12.0, seed=smoke.data.seed)  # fmt: skip
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"compare_alternatives on the cpu-smoke model: {seconds:.1f} s ({cpu:.1f} s CPU), 3 questions")
    return model, tokenizer, examples, train, generation, result


def test_every_system_has_every_metric_with_intervals_against_the_tuned_model(compared):
    _, _, examples, _, generation, result = compared
    systems = result["systems"]
    assert list(systems) == list(ORDER)
    assert (result["questions"], result["of_questions"]) == (3, len(examples))  # evaluate.alternatives_questions
    for name, system in systems.items():
        assert set(system["scores"]) == {ANSWER_LOSS, *STATISTICS}
        assert all(math.isfinite(v) for v in system["scores"].values()), name
        if name == TUNED:
            continue
        assert set(system["changes"]) == {ANSWER_LOSS, *STATISTICS}
        for metric, c in system["changes"].items():
            assert c["low"] <= c["change"] <= c["high"], (name, metric)
            assert c["tuned_better"] in ("yes", "no", "can't tell", "n/a")
    # the tuned model's answers are the base/tuned comparison's, not generated again
    assert [s[TUNED]["answer"] for s in result["samples"]] == [s["tuned"]["answer"] for s in generation["samples"][:3]]


def test_answer_loss_is_the_reference_after_each_systems_own_prompt(compared):
    model, tokenizer, examples, train, _, result = compared
    retrieved = [[train[r["row"]] for r in s["retrieved"]] for s in result["samples"]]
    examples = examples[: result["questions"]]
    rag_prompts = prompted_examples(examples, retrieved)
    with model.disable_adapter():
        rag = summarise_losses(answer_losses(model, tokenizer, rag_prompts))["loss"]
    tuned_rag = summarise_losses(answer_losses(model, tokenizer, rag_prompts))["loss"]
    tuned = summarise_losses(answer_losses(model, tokenizer, examples))["loss"]
    systems = result["systems"]
    assert systems["rag"]["scores"][ANSWER_LOSS] == pytest.approx(rag, rel=1e-4)
    assert systems["tuned_rag"]["scores"][ANSWER_LOSS] == pytest.approx(tuned_rag, rel=1e-4)
    assert systems[TUNED]["scores"][ANSWER_LOSS] == pytest.approx(tuned, rel=1e-4)
    assert rag != pytest.approx(tuned_rag)  # the adapter was off for RAG, on for tuned + RAG


def test_costs_count_prompt_tokens_generation_and_amortised_training(compared):
    result = compared[-1]
    cost = {name: s["cost"] for name, s in result["systems"].items()}
    assert cost[TUNED]["training_seconds_per_question"] == pytest.approx(12.0 / 3)
    assert cost["tuned_rag"]["training_seconds"] == 12.0
    assert cost["prompting"]["training_seconds"] == cost["rag"]["training_seconds"] == 0
    assert cost["rag"]["retrieval_seconds"] > 0 and cost["prompting"]["retrieval_seconds"] == 0
    assert min(cost[n]["prompt_tokens"] for n in SYSTEMS) > cost[TUNED]["prompt_tokens"]
    assert cost["rag"]["prompt_tokens"] == cost["tuned_rag"]["prompt_tokens"]
    assert all(c["generation_seconds"] > 0 and c["seconds_per_question"] > 0 for c in cost.values())


def test_tables_report_and_reading_come_from_the_result(compared):
    _, _, examples, _, _, result = compared
    assert [r["system"] for r in scores_table(result)] == [LABELS[n] for n in ORDER]
    assert len(against_tuned_table(result)) == len(SYSTEMS) * (1 + len(STATISTICS))
    grid = verdict_grid(result)
    assert grid[0]["metric"] == "answer_loss (relative)" and len(grid[0]) == 1 + len(SYSTEMS)
    page = alternatives_markdown(result)
    assert all(LABELS[n] in page for n in ORDER) and "<script>" not in page
    html = retrieval_table(result).to_html()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # retrieved, escaped
    assert result["samples"][0]["retrieved"][0]["row"] == 0  # the planted pair matches its own question best
    top = headline(result)
    assert set(top) == set(ORDER) and "tuned_better_answer_loss" in top["rag"]
    sentences = reading(result)
    assert f"On the first 3 of {len(examples)} held-out questions" in sentences[0]
    loss = result["systems"]["prompting"]["changes"][ANSWER_LOSS]
    assert f"{abs(loss['change']):.1%}" in sentences[0] and "What it means for this project" in sentences[-2]
