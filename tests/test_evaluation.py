import math

import pytest
import torch

from helpers.data import to_prompt_completion, tokenize_example
from helpers.evaluation import answer_losses, summarise_losses, text_metrics, token_f1
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
