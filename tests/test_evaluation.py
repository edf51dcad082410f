import math
import statistics

import pytest
import torch

from helpers.data import to_prompt_completion, tokenize_example
from helpers.evaluation import (
    STATISTICS,
    _with_sentence_stats,
    answer_losses,
    distinct_n,
    loss_change_interval,
    paired_bootstrap,
    repeated_loop,
    summarise_losses,
    text_metrics,
    token_f1,
)
from helpers.model import load_model


def test_token_f1_known_cases():
    assert token_f1("The cat sat.", "the cat sat") == 1.0
    assert token_f1("a b", "c d") == 0.0
    assert token_f1("", "anything") == 0.0
    assert token_f1("cat sat mat", "cat") == pytest.approx(0.5)  # precision 1/3, recall 1


def test_text_metrics_identical_and_disjoint():
    same = text_metrics(["the firewall drops the packet"], ["the firewall drops the packet"])
    assert same == pytest.approx({"rougeL": 1.0, "bleu": 100.0, "chrf": 100.0, "token_f1": 1.0})
    disjoint = text_metrics(["zebra quokka"], ["firewall rules"])
    assert disjoint["rougeL"] == 0.0 and disjoint["token_f1"] == 0.0 and disjoint["bleu"] == 0.0


def test_rouge_l_is_longest_common_subsequence_f_measure():
    # LCS("the cat sat", "the cat sat on the mat") = 3 words: precision 3/3, recall 3/6, F = 2/3
    assert text_metrics(["the cat sat"], ["the cat sat on the mat"])["rougeL"] == pytest.approx(2 / 3)


def test_text_metrics_needs_pairs():
    with pytest.raises(ValueError, match="as many predictions as references"):
        text_metrics(["a"], ["a", "b"])


def test_answer_loss_matches_the_models_own_masked_loss(smoke, sample_rows):
    model, tokenizer, _ = load_model(smoke)
    examples = [to_prompt_completion(r) for r in sample_rows[:3]]
    per_example = answer_losses(model, tokenizer, examples, batch_size=2)  # padding in the second batch too
    for example, result in zip(examples, per_example, strict=True):
        tokens = tokenize_example(tokenizer, example)
        with torch.no_grad():
            expected = model(
                input_ids=torch.tensor([tokens["input_ids"]]), labels=torch.tensor([tokens["labels"]])
            ).loss.item()
        assert result["loss_sum"] / result["tokens"] == pytest.approx(expected, rel=1e-4)
    summary = summarise_losses(per_example)
    assert summary["perplexity"] == pytest.approx(math.exp(summary["loss"]))


def test_repeated_loop_finds_runaway_repetition_and_spares_prose():
    looping = "Check the role. " + "the current user's role, " * 25
    assert sorted(repeated_loop(looping).split()) == sorted("the current user s role".split())  # any phase
    assert repeated_loop("no no no no no no no no no no no no no") == "no"
    prose = (
        "Store passwords with a slow, salted hash such as Argon2 or bcrypt. Never store them in plain text, and "
        "never use a fast hash like MD5. 1. Hash. 2. Salt. 3. Tune the cost so one hash takes about 100 ms."
    )
    assert repeated_loop(prose) is None
    assert repeated_loop("the key, the key, the key") is None  # three repeats but under min_words: not a runaway


def test_distinct_n_drops_with_repetition():
    assert distinct_n(["a b c d"], 2) == 1.0
    assert distinct_n(["a b a b a b"], 2) == pytest.approx(2 / 5)
    assert distinct_n([""], 2) == 0.0


def test_paired_bootstrap_interval_and_verdicts():
    base = [0.1 * (i % 5) for i in range(40)]
    clearly_better = [b + 0.2 for b in base]
    result = paired_bootstrap(base, clearly_better, statistics.fmean, higher_is_better=True, samples=500)
    assert result["change"] == pytest.approx(0.2)
    assert result["low"] == pytest.approx(0.2) and result["high"] == pytest.approx(0.2)  # paired: the noise cancels
    assert result["tuned_better"] == "yes"
    assert paired_bootstrap(base, clearly_better, statistics.fmean, higher_is_better=False)["tuned_better"] == "no"
    noisy = [b + (0.3 if i % 2 else -0.3) for i, b in enumerate(base)]  # no systematic change
    mixed = paired_bootstrap(base, noisy, statistics.fmean, samples=500)
    assert mixed["low"] < 0 < mixed["high"] and mixed["tuned_better"] == "can't tell"
    assert paired_bootstrap(base, base, statistics.fmean, higher_is_better=None)["tuned_better"] == "n/a"
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 2.0], statistics.fmean)


def test_bootstrap_corpus_scores_equal_sacrebleu_on_the_whole_set():
    import sacrebleu

    answers = ["the firewall drops the packet", "use a salted hash", "isolate the laptop from the network"]
    refs = ["the firewall drops packets", "store a salted slow hash", "disconnect the laptop from the network"]
    records = _with_sentence_stats([{"answer": a, "reference": r} for a, r in zip(answers, refs, strict=True)])
    assert STATISTICS["bleu"][0](records) == pytest.approx(sacrebleu.corpus_bleu(answers, [refs]).score)
    assert STATISTICS["chrf"][0](records) == pytest.approx(sacrebleu.corpus_chrf(answers, [refs]).score)


def test_loss_change_interval_is_relative_and_lower_is_better():
    base = [{"loss_sum": 4.0 * n, "tokens": n} for n in (10, 20, 30, 40)]
    tuned = [{"loss_sum": 3.0 * n, "tokens": n} for n in (10, 20, 30, 40)]
    interval = loss_change_interval(base, tuned, samples=200)
    assert interval["change"] == pytest.approx(-0.25) and interval["tuned_better"] == "yes"
