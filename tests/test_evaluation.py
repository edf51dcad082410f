import math
import random
import statistics

import matplotlib.pyplot as plt
import pytest
import torch

from helpers.data import to_prompt_completion, tokenize_example
from helpers.evaluation import (
    METRICS,
    STATISTICS,
    _answer_records,
    _rounded,
    answer_losses,
    build_report,
    changes_table,
    cut_to_reference,
    distinct_n,
    forgetting_text,
    holm,
    length_controlled_table,
    loss_change_interval,
    metric_label,
    paired_bootstrap,
    repeated_loop,
    report_markdown,
    score_answers,
    summarise_losses,
    text_metrics,
    token_f1,
    verdicts_note,
)
from helpers.model import load_model
from helpers.plots import change_intervals, metric_bars


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
    records = _answer_records([{"answer": a, "tokens": 5, "stopped_by_itself": True} for a in answers], refs)
    assert STATISTICS["bleu"][0](records) == pytest.approx(sacrebleu.corpus_bleu(answers, [refs]).score)
    assert STATISTICS["chrf"][0](records) == pytest.approx(sacrebleu.corpus_chrf(answers, [refs]).score)
    cut = [cut_to_reference(a, r) for a, r in zip(answers, refs, strict=True)]
    assert STATISTICS["bleu_cut"][0](records) == pytest.approx(sacrebleu.corpus_bleu(cut, [refs]).score)


def test_loss_change_interval_is_relative_and_lower_is_better():
    base = [{"loss_sum": 4.0 * n, "tokens": n} for n in (10, 20, 30, 40)]
    tuned = [{"loss_sum": 3.0 * n, "tokens": n} for n in (10, 20, 30, 40)]
    interval = loss_change_interval(base, tuned, samples=200)
    assert interval["change"] == pytest.approx(-0.25) and interval["tuned_better"] == "yes"


def test_paired_bootstrap_p_value_agrees_with_the_interval_and_holm_adjusts():
    base = [0.1 * (i % 5) for i in range(40)]
    assert paired_bootstrap(base, [b + 0.2 for b in base], statistics.fmean, samples=200)["p_value"] == 0.0
    assert paired_bootstrap(base, base, statistics.fmean, samples=200)["p_value"] == 1.0
    for seed in range(20):  # "yes"/"no" exactly when p <= 0.05
        rng = random.Random(seed)
        tuned = [b + rng.gauss(0.03, 0.2) for b in base]
        result = paired_bootstrap(base, tuned, statistics.fmean, samples=200, seed=seed)
        assert (result["tuned_better"] != "can't tell") == (result["p_value"] <= 0.05), result
    one = paired_bootstrap([0.1], [0.9], statistics.fmean, samples=100)
    assert one["low"] == one["change"] == one["high"] and one["tuned_better"] == "can't tell" and one["p_value"] == 1
    assert holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert holm([]) == [] and holm([0.2]) == [0.2]


def test_a_statistic_whose_percentile_interval_misses_its_estimate_is_widened_and_says_so():
    # distinct-2 pooled over all answers (what 07 used before): a resample repeats answers, whose word pairs then
    # count as repeats, so the resampled statistic is biased and its middle 95% can miss the observed change (issue
    # 27: 15 of 40 trials). Whatever the statistic, the interval reaches its estimate and says when it had to.
    letters = "a b c d e f g h i j k l m n o p q r s t u v w x y z".split()
    widened = 0
    for seed in range(40):
        rng = random.Random(seed)
        base = [" ".join(rng.choice(letters) for _ in range(rng.randint(2, 30))) for _ in range(20)]
        tuned = [" ".join(rng.choice(letters[: rng.randint(3, 26)]) for _ in range(rng.randint(2, 30)))
                 for _ in range(20)]  # fmt: skip
        result = paired_bootstrap(base, tuned, lambda texts: distinct_n(texts, 2), samples=200, seed=seed)
        assert result["low"] <= result["change"] <= result["high"]
        widened += result["widened"]
    assert widened, "these draws include pooled estimates outside their percentile interval"
    rows = [{"metric": "m", "change": 0.5, "low": 0.50000001, "high": 0.6, "tuned better": "yes"}]
    plt.close(change_intervals(rows))  # a caller's rounding never reaches matplotlib as a negative error bar


def test_cut_to_reference_keeps_as_many_words_as_the_reference():
    assert cut_to_reference("one two three four five", "a b c") == "one two three"
    assert cut_to_reference("short", "a much longer reference") == "short"
    assert cut_to_reference("", "a b") == ""


def test_metric_labels_say_scale_and_direction():
    assert metric_label("loop_rate") == "loop_rate (share 0-1, lower is better)"
    assert metric_label("bleu") == "bleu (0-100, higher is better)"
    assert metric_label("rougeL_cut") == "rougeL (0-1, cut to reference length, higher is better)"
    assert "compare with the reference" in metric_label("mean_tokens")


WORDS = "the a firewall packet hash salt key user role network scan port attack log server password token".split()


def _answers(rng: random.Random, n: int, kind: str) -> list[dict]:
    if kind == "loops":
        text = lambda: "Check the role. " + "the current user's role, " * 8  # noqa: E731
    elif kind == "empty":
        text = lambda: ""  # noqa: E731
    else:
        text = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 40)))  # noqa: E731
    return [{"answer": text(), "tokens": rng.randint(1, 24), "stopped_by_itself": rng.random() < 0.5} for _ in range(n)]


CASES = [(n, kind, seed) for n in (1, 3) for kind in ("random", "identical", "loops", "empty") for seed in (0, 1)]
CASES += [(n, "random", seed) for n in (2, 5, 20) for seed in range(4)]


@pytest.mark.parametrize(("n", "kind", "seed"), CASES)
def test_every_change_lies_inside_its_interval_and_the_figures_draw(tokenizer, n, kind, seed):
    rng = random.Random(seed)
    refs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    base = _answers(rng, n, kind)
    tuned = [dict(b) for b in base] if kind == "identical" else _answers(rng, n, kind)
    samples = [{"subject": f"s{i % 2}", "question": f"q{i}?", "reference": r, "base": b, "tuned": t}
               for i, (r, b, t) in enumerate(zip(refs, base, tuned, strict=True))]  # fmt: skip
    generation = score_answers(samples, tokenizer, 24, bootstrap_samples=100)
    losses = [[{"loss_sum": rng.uniform(0.5, 5) * k, "tokens": k} for k in [rng.randint(1, 30) for _ in range(n)]]
              for _ in range(2)]  # fmt: skip
    loss = {"base": summarise_losses(losses[0]), "tuned": summarise_losses(losses[1]),
            "interval": loss_change_interval(*losses, samples=100), "per_subject": {}}  # fmt: skip
    loss["relative_change"] = loss["interval"]["change"]
    rows = changes_table(loss, generation["changes"])
    assert len(rows) == 1 + len(STATISTICS)
    for row in rows:
        assert row["low"] <= row["change"] <= row["high"], row
        assert all(math.isfinite(row[k]) for k in ("base", "tuned", "change", "low", "high")), row
    if kind == "identical":
        assert all(r["change"] == r["low"] == r["high"] == 0 for r in rows[1:]), rows
        assert all(r["tuned better"] in ("can't tell", "n/a") for r in rows[1:])
    report = build_report(profile="p", model="m", dataset="d", eval_rows=n, loss=loss, generation=generation,
                          forgetting_loss=loss, forgetting=generation)  # fmt: skip
    assert report_markdown(report).startswith("# Evaluation")
    assert forgetting_text(loss, generation).startswith(f"On {n} general questions the answer loss")
    assert verdicts_note(rows).startswith(f"{sum(r['tuned better'] != 'n/a' for r in rows)} verdicts drawn at 95%")
    assert len(length_controlled_table(generation["changes"])) == len(METRICS)
    scores = generation["scores"]
    if seed:  # drawing takes a second or two: once per size and kind is enough
        return
    for figure in (
        change_intervals(rows),
        metric_bars(
            scores["base"],
            scores["tuned"],
            (*METRICS, "mean_tokens", "loop_rate"),
            labels={m: metric_label(m) for m in STATISTICS},
            reference=scores["reference"],
        ),  # fmt: skip
    ):
        figure.canvas.draw()
        plt.close(figure)


def _change(base, tuned, low, high, verdict="yes", p=0.01):
    return {"base": base, "tuned": tuned, "change": tuned - base, "low": low, "high": high, "tuned_better": verdict,
            "p_value": p, "widened": False}  # fmt: skip


def test_changes_table_holm_column_and_the_note_count_the_verdicts():
    loss = {"interval": _change(4.0, 3.0, -0.3, -0.2, "yes", 0.0)}
    changes = {"rougeL": _change(0.1, 0.2, 0.05, 0.15, "yes", 0.04), "bleu": _change(1, 2, 0.5, 1.5, "yes", 0.03),
               "mean_tokens": _change(10, 20, 5, 15, "n/a", 0.0)}  # fmt: skip
    rows = {r["metric"]: r for r in changes_table(loss, changes)}
    assert rows["answer_loss (relative)"]["tuned better (Holm)"] == "yes"  # 3 x 0.0
    assert rows["bleu"]["Holm p"] == pytest.approx(0.06) and rows["bleu"]["tuned better (Holm)"] == "can't tell"
    assert rows["rougeL"]["Holm p"] == pytest.approx(0.06) and rows["mean_tokens"]["Holm p"] is None
    note = verdicts_note(list(rows.values()))
    assert note.startswith("3 verdicts drawn at 95%: with no real change, about 0.2 of them")
    assert "3 read yes/no" in note and "1 do (answer_loss (relative))" in note and "widened" in note


def test_forgetting_text_follows_the_numbers():
    fell = {"interval": _change(2.318, 1.981, -0.18, -0.11, "yes") | {"change": 1.981 / 2.318 - 1}}
    answers = {"samples": [{}] * 24, "changes": {"rougeL": _change(0.10, 0.12, -0.01, 0.05, "can't tell")}}
    text = forgetting_text(fell, answers)
    assert text.startswith("On 24 general questions the answer loss fell, 2.318 -> 1.981 (-14.5%")
    assert "no sign of forgetting" in text and "rises" not in text
    rose = {"interval": _change(2.0, 2.2, 0.05, 0.15, "no") | {"change": 0.1}}
    assert "rose" in forgetting_text(rose, answers) and "forgetting, the cost" in forgetting_text(rose, answers)


def test_headline_figures_are_rounded():
    assert _rounded({"a": -15.96889365776054, "b": [0.123456789], "c": "yes", "d": 3}) == {
        "a": -15.9689, "b": [0.1235], "c": "yes", "d": 3}  # fmt: skip


def test_the_forgetting_check_asks_at_least_twenty_course_written_general_questions():
    from helpers.data import GENERAL_QUESTIONS, load_general_questions, load_rows
    from helpers.profiles import load_profile

    shipped = load_rows(str(GENERAL_QUESTIONS)).rows
    assert len(shipped) >= 20 and len({r["instruction"] for r in shipped}) == len(shipped)
    security = ("security", "attack", "password", "malware", "phishing", "firewall", "hack", "encrypt", "vulnerab")
    texts = {r["instruction"]: (r["instruction"] + r["response"]).lower() for r in shipped}
    assert not [q for q, text in texts.items() if any(word in text for word in security)], "general means general"
    for name in ("cpu-lab", "rtx4090"):  # the classroom profile and the default every GPU profile inherits
        assert len(load_general_questions(load_profile(name).evaluate.forgetting_questions)) >= 20, name
