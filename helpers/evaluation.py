"""Lesson 07: did fine-tuning teach the model? Base vs tuned on held-out data.

Two kinds of evidence: the loss on the reference answers (how likely the model finds the
expert's words), and answers generated greedily and scored against the references with
established metrics (ROUGE-L from rouge-score, BLEU and chrF from sacrebleu, token F1).

Every metric is a per-answer mean (BLEU and chrF: corpus scores recomputed on each resample of the questions), so
resampling the questions is resampling what the metric averages; every interval contains its own estimate.

~600 lines because the statistics (paired bootstrap intervals, Holm-adjusted verdicts, the length-controlled
twins of the overlap metrics) and the report built from them stay together: the report states exactly what the
statistics computed. Text measures live in text_measures.py, generation in inference.py, closeness of the
evaluation rows to the training rows in overlap.py.
"""

from __future__ import annotations

import math
import random
import statistics
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import sacrebleu
import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from transformers import PreTrainedTokenizerBase

from helpers.data import tokenize_example
from helpers.inference import GREEDY, Decoding, compare_base_and_tuned
from helpers.text_measures import distinct_n, repeated_loop, token_f1

METRICS = ("rougeL", "bleu", "chrf", "token_f1")


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-L F (mean), corpus BLEU and chrF (0-100, sacrebleu), token F1 (mean); all higher is better."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need as many predictions as references, got {len(predictions)} and {len(references)}")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return {
        "rougeL": statistics.fmean(rouge),
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
        "token_f1": statistics.fmean(token_f1(p, r) for p, r in zip(predictions, references, strict=True)),
    }


@torch.inference_mode()
def answer_losses(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], batch_size: int = 4
) -> list[dict[str, float]]:
    """Per example: summed cross-entropy over the answer tokens and their count (prompt masked, as in training)."""
    model.eval()
    results = []
    for start in range(0, len(examples), batch_size):
        batch = [tokenize_example(tokenizer, e) for e in examples[start : start + batch_size]]
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        logits = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.float()
        targets = labels[:, 1:].to(logits.device)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="none"
        )
        for row in range(len(batch)):
            counted = targets[row] != -100
            results.append({"loss_sum": losses[row][counted].sum().item(), "tokens": int(counted.sum())})
    return results


def perplexity(loss: float) -> float:
    """exp(loss): the 'how many tokens was it choosing between' reading of a mean cross-entropy loss."""
    return math.exp(loss) if loss < 50 else float("inf")


def summarise_losses(per_example: list[dict[str, float]]) -> dict[str, float]:
    """Token-weighted mean answer loss and its perplexity."""
    tokens = sum(r["tokens"] for r in per_example)
    loss = sum(r["loss_sum"] for r in per_example) / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens}


def compare_losses(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    batch_size: int = 4,
    bootstrap_samples: int = 1000,
) -> dict[str, Any]:
    """Answer loss of the base (adapter off) and tuned model, overall (with a paired bootstrap 95% interval of
    the relative change) and per subject."""
    with model.disable_adapter():
        base = answer_losses(model, tokenizer, examples, batch_size)
    tuned = answer_losses(model, tokenizer, examples, batch_size)
    by_subject: dict[str, dict[str, list]] = defaultdict(lambda: {"base": [], "tuned": []})
    for example, b, t in zip(examples, base, tuned, strict=True):
        by_subject[example.get("subject", "all")]["base"].append(b)
        by_subject[example.get("subject", "all")]["tuned"].append(t)
    overall: dict[str, Any] = {"base": summarise_losses(base), "tuned": summarise_losses(tuned)}
    overall["relative_change"] = overall["tuned"]["loss"] / overall["base"]["loss"] - 1
    overall["interval"] = loss_change_interval(base, tuned, bootstrap_samples)
    overall["per_subject"] = {
        subject: {
            "rows": len(v["base"]),
            "base": summarise_losses(v["base"])["loss"],
            "tuned": summarise_losses(v["tuned"])["loss"],
        }
        for subject, v in sorted(by_subject.items())
    }
    return overall


def cut_to_reference(answer: str, reference: str) -> str:
    """The answer cut to as many words as its reference has: the length-controlled comparison.

    Overlap metrics reward length (ROUGE-L and token F1 through recall, BLEU's brevity penalty); a model that runs
    to the token limit can score better, or worse, for its length alone. Cutting every answer of both models with
    the same rule removes that advantage; an answer shorter than its reference stays as it is.
    """
    return " ".join(answer.split()[: len(reference.split())])


def _sentence_stats(answer: str, reference: str) -> dict[str, list[float]]:
    return {m.__class__.__name__: m._extract_corpus_statistics([answer], [[reference]])[0] for m in (_BLEU, _CHRF)}


def _answer_records(answers: list[dict[str, Any]], references: list[str]) -> list[dict[str, Any]]:
    """Per answer: its text, reference, per-answer scores (raw and cut to the reference's length), loop, length and
    stop; with the sentence statistics BLEU and chrF sum per resample. The inputs to every statistic."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    records = []
    for a, ref in zip(answers, references, strict=True):
        cut = cut_to_reference(a["answer"], ref)
        records.append(
            {
                "answer": a["answer"],
                "reference": ref,
                "rougeL": scorer.score(ref, a["answer"])["rougeL"].fmeasure,
                "token_f1": token_f1(a["answer"], ref),
                "rougeL_cut": scorer.score(ref, cut)["rougeL"].fmeasure,
                "token_f1_cut": token_f1(cut, ref),
                "loop": repeated_loop(a["answer"]) is not None,
                "distinct_2": distinct_n([a["answer"]], 2),
                "tokens": a["tokens"],
                "stopped": a["stopped_by_itself"],
                "_stats": _sentence_stats(a["answer"], ref),
                "_stats_cut": _sentence_stats(cut, ref),
            }
        )
    return records


def _corpus(metric: sacrebleu.metrics.base.Metric, key: str = "_stats") -> Callable[[list[dict[str, Any]]], float]:
    # Sentence statistics are computed once per answer and summed per resample: sacrebleu's own paired
    # bootstrap (sacrebleu.significance) does the same, so 1000 resamples of BLEU and chrF take a second.
    def score(records: list[dict[str, Any]]) -> float:
        stats = [r[key][metric.__class__.__name__] for r in records]
        return metric._compute_score_from_stats([sum(column) for column in zip(*stats, strict=True)]).score

    return score


def _mean(key: str) -> Callable[[list[dict[str, Any]]], float]:
    return lambda records: statistics.fmean(float(r[key]) for r in records)


_BLEU, _CHRF = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()

# Each statistic: per-answer records -> one number, and whether higher is better (None: neither). Every one but
# BLEU and chrF is a mean of per-answer values; BLEU and chrF are corpus scores (as sacrebleu reports them),
# recomputed on each resample of the questions. `*_cut`: the same metric on answers cut to the reference's length.
STATISTICS: dict[str, tuple[Callable[[list[dict[str, Any]]], float], bool | None]] = {
    "rougeL": (_mean("rougeL"), True),
    "bleu": (_corpus(_BLEU), True),
    "chrf": (_corpus(_CHRF), True),
    "token_f1": (_mean("token_f1"), True),
    "loop_rate": (_mean("loop"), False),
    "distinct_2": (_mean("distinct_2"), True),
    "mean_tokens": (_mean("tokens"), None),
    "stopped_rate": (_mean("stopped"), True),
    "rougeL_cut": (_mean("rougeL_cut"), True),
    "bleu_cut": (_corpus(_BLEU, "_stats_cut"), True),
    "chrf_cut": (_corpus(_CHRF, "_stats_cut"), True),
    "token_f1_cut": (_mean("token_f1_cut"), True),
}
LENGTH_CONTROLLED = {metric: f"{metric}_cut" for metric in METRICS}  # raw metric -> its length-controlled twin
SCALES = {"rougeL": "0-1", "bleu": "0-100", "chrf": "0-100", "token_f1": "0-1", "loop_rate": "share 0-1",
          "distinct_2": "0-1", "mean_tokens": "tokens", "stopped_rate": "share 0-1"}  # fmt: skip


def metric_label(metric: str) -> str:
    """A metric's name with its scale and direction, for chart titles: "bleu (0-100, higher is better)"."""
    raw = metric.removesuffix("_cut")
    better = STATISTICS[metric][1] if metric in STATISTICS else None
    direction = {True: "higher is better", False: "lower is better", None: "compare with the reference"}[better]
    cut = ", cut to reference length" if metric.endswith("_cut") else ""
    return f"{raw} ({SCALES.get(raw, '')}{cut}, {direction})"


def verdict(low: float, high: float, higher_is_better: bool | None) -> str:
    """Tuned better? "yes" when the whole 95% interval of the change lies on the better side of zero, "no" when
    it lies on the worse side, "can't tell" when it straddles zero."""
    if higher_is_better is None:
        return "n/a"
    if low > 0 or high < 0:
        return "yes" if (low > 0) == higher_is_better else "no"
    return "can't tell"


def paired_bootstrap(
    base: list[Any],
    tuned: list[Any],
    statistic: Callable[[list[Any]], float],
    higher_is_better: bool | None = True,
    samples: int = 1000,
    seed: int = 0,
    relative: bool = False,
) -> dict[str, Any]:
    """Change base -> tuned in a statistic, with a paired bootstrap 95% interval (Koehn, 2004) and a p-value.

    `relative=True` gives the change as a fraction of the base value.

    Both models answered the same questions, so each resample draws question indices with replacement and
    scores both models on the same draw: the interval reflects which questions happened to be asked, and the
    variation common to both models cancels out. The interval is the middle 95% of the resampled changes
    (percentile interval, symmetric in rank). A percentile interval can miss its own estimate when the statistic
    is not a plain mean (corpus BLEU, a ratio of sums) or the data are very skewed; the interval is then widened
    to reach the estimate and `widened` says so. The two-sided p-value, 2 x the share of resampled changes on the
    far side of zero, is at most 0.05 exactly when the (unwidened) interval excludes zero. One question draws no
    verdict: its interval has no width.
    """
    if len(base) != len(tuned) or not base:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists, got {len(base)} and {len(tuned)}")
    rng = random.Random(seed)
    n = len(base)

    def change(b: float, t: float) -> float:
        return t / b - 1 if relative else t - b

    changes = []
    for _ in range(samples):
        pick = [rng.randrange(n) for _ in range(n)]
        changes.append(change(statistic([base[i] for i in pick]), statistic([tuned[i] for i in pick])))
    changes.sort()
    k = int(0.025 * samples)  # ranks k and samples-1-k: at most 2.5% of the resamples outside on each side
    b, t = statistic(base), statistic(tuned)
    observed = change(b, t)
    low, high = changes[k], changes[samples - 1 - k]
    widened = not low <= observed <= high
    low, high = min(low, observed), max(high, observed)
    far_side = min(sum(c <= 0 for c in changes), sum(c >= 0 for c in changes))
    p_value = min(1.0, 2 * far_side / samples) if n > 1 else 1.0
    return {
        "base": b,
        "tuned": t,
        "change": observed,
        "low": low,
        "high": high,
        # one question: every resample is that question, the interval has no width and tells nothing of noise
        "tuned_better": verdict(low, high, higher_is_better) if n > 1 or higher_is_better is None else "can't tell",
        "p_value": p_value,
        "widened": widened,
    }


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment (1979) of p-values, in their order: with m verdicts drawn at once, the chance
    that any "yes" or "no" is a fluke stays at most 5% when each adjusted p-value is compared with 0.05."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [1.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def loss_change_interval(base: list[dict[str, float]], tuned: list[dict[str, float]], samples: int = 1000,
                         seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Paired bootstrap interval of the relative change in token-weighted answer loss (lower is better)."""
    return paired_bootstrap(base, tuned, lambda rs: summarise_losses(rs)["loss"], False, samples, seed, relative=True)


def reference_scores(
    references: list[str], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> dict[str, float]:
    """The references' own form, the row to compare the models with: mean tokens, the share short enough to end
    before `max_new_tokens` (the stop rate a model answering like them could reach), loop rate and distinct-2."""
    tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references]
    return {
        "mean_tokens": statistics.fmean(tokens),
        "stopped_rate": statistics.fmean(t < max_new_tokens for t in tokens),
        "loop_rate": statistics.fmean(repeated_loop(r) is not None for r in references),
        "distinct_2": statistics.fmean(distinct_n([r], 2) for r in references),
    }


def compare_answers(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    max_new_tokens: int,
    desc: str = "generating",
    decoding: Decoding = GREEDY,
    batch_size: int = 8,
    bootstrap_samples: int = 1000,
) -> dict[str, Any]:
    """Answers of base and tuned model to each example's question (batched), scored against its reference.

    `scores` holds each model's metrics and the references' own form (`reference`); `changes` each metric's change
    base -> tuned with a paired bootstrap 95% interval and the verdict "tuned better: yes / no / can't tell".
    """
    systems = [next((m["content"] for m in e["prompt"] if m["role"] == "system"), "") for e in examples]
    questions = [e["prompt"][-1]["content"] for e in examples]
    pairs = compare_base_and_tuned(model, tokenizer, questions, systems, max_new_tokens, decoding, batch_size, desc)
    samples = [
        {"subject": e.get("subject", ""), "reference": e["completion"][0]["content"], **pair}
        for e, pair in zip(examples, pairs, strict=True)
    ]
    return score_answers(samples, tokenizer, max_new_tokens, decoding, bootstrap_samples)


def score_answers(
    samples: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    decoding: Decoding = GREEDY,
    bootstrap_samples: int = 1000,
) -> dict[str, Any]:
    """`compare_answers` after generation: samples (question, reference, base and tuned answers) -> scores,
    changes with intervals, the references' own form."""
    references = [s["reference"] for s in samples]
    records = {name: _answer_records([s[name] for s in samples], references) for name in ("base", "tuned")}
    scores: dict[str, Any] = {
        name: {metric: fn(records[name]) for metric, (fn, _) in STATISTICS.items()} for name in ("base", "tuned")
    }
    scores["reference"] = reference_scores(references, tokenizer, max_new_tokens)
    scores["reference_mean_tokens"] = scores["reference"]["mean_tokens"]
    changes = {
        metric: paired_bootstrap(records["base"], records["tuned"], fn, better, bootstrap_samples)
        for metric, (fn, better) in STATISTICS.items()
    }
    for sample, b, t in zip(samples, records["base"], records["tuned"], strict=True):
        sample["base"]["loop"], sample["tuned"]["loop"] = b["loop"], t["loop"]
    return {"scores": scores, "changes": changes, "decoding": decoding.describe(), "samples": samples}


def changes_table(loss: dict[str, Any], changes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: base, tuned, change with its 95% interval (low, high), the verdict, its p-value and the
    verdict after Holm's adjustment over every verdict in the table (metrics without a direction have none).

    The answer loss comes first, its change relative to the base (-0.2: 20% lower).
    """
    keys = ("base", "tuned", "change", "low", "high")
    rows = [{"metric": "answer_loss (relative)", **{k: loss["interval"][k] for k in keys}, "_c": loss["interval"]}]
    rows += [{"metric": metric, **{k: c[k] for k in keys}, "_c": c} for metric, c in changes.items()]
    family = [r for r in rows if r["_c"]["tuned_better"] != "n/a" and "p_value" in r["_c"]]
    adjusted = holm([r["_c"]["p_value"] for r in family])
    for row in rows:
        c = row.pop("_c")
        row["tuned better"] = c["tuned_better"]
        row["p"] = c.get("p_value") if c["tuned_better"] != "n/a" else None
        row["Holm p"], row["tuned better (Holm)"] = None, c["tuned_better"]
        row["widened"] = c.get("widened", False)
    for row, p in zip(family, adjusted, strict=True):
        row["Holm p"] = p
        row["tuned better (Holm)"] = row["tuned better"] if p <= 0.05 else "can't tell"
    return rows


def verdicts_frame(rows: list[dict[str, Any]], only: list[str] | None = None) -> Any:
    """`changes_table` rows as the table a learner reads: figures to 3 decimals, a blank where a metric draws no
    verdict (no p-value), the `widened` flag left to the note; `only`: these metrics, in this order."""
    import pandas as pd

    by_metric = {r["metric"]: r for r in rows}
    chosen = [by_metric[m] for m in only] if only else rows
    shown = [{k: "" if v is None else round(v, 3) if isinstance(v, float) else v for k, v in r.items()
              if k != "widened"} for r in chosen]  # fmt: skip
    return pd.DataFrame(shown).set_index("metric")


def verdicts_note(rows: list[dict[str, Any]]) -> str:
    """How many verdicts the table draws at 95%, how many a run with no real change would show by chance, and how
    many survive Holm's adjustment; and which intervals were widened to reach their estimate."""
    drawn = [r for r in rows if r["tuned better"] != "n/a"]
    decided = [r["metric"] for r in drawn if r["tuned better"] in ("yes", "no")]
    holm_decided = [r["metric"] for r in drawn if r["tuned better (Holm)"] in ("yes", "no")]
    widened = [r["metric"] for r in rows if r["widened"]]
    return (
        f"{len(drawn)} verdicts drawn at 95%: with no real change, about {0.05 * len(drawn):.1f} of them would read "
        f'"yes" or "no" by chance alone. {len(decided)} read yes/no ({", ".join(decided) or "none"}); after Holm\'s '
        f"adjustment, which keeps the chance of any fluke among them at 5%, {len(holm_decided)} do "
        f"({', '.join(holm_decided) or 'none'}). Intervals widened to reach their estimate: "
        f"{', '.join(widened) or 'none'}."
    )


def length_controlled_table(changes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each overlap metric raw and on answers cut to the reference's length, side by side: change [95% interval]
    and verdict. A "yes" that turns into "can't tell" once cut was partly about length."""
    rows = []
    for metric, twin in LENGTH_CONTROLLED.items():
        raw, cut = changes[metric], changes[twin]
        rows.append(
            {
                "metric": f"{metric} ({SCALES[metric]})",
                "raw: base -> tuned": f"{raw['base']:.3f} -> {raw['tuned']:.3f}",
                "raw: change [95%]": f"{raw['change']:+.3f} [{raw['low']:+.3f}, {raw['high']:+.3f}]",
                "raw: tuned better": raw["tuned_better"],
                "cut: base -> tuned": f"{cut['base']:.3f} -> {cut['tuned']:.3f}",
                "cut: change [95%]": f"{cut['change']:+.3f} [{cut['low']:+.3f}, {cut['high']:+.3f}]",
                "cut: tuned better": cut["tuned_better"],
            }
        )
    return rows


def forgetting_text(loss: dict[str, Any], answers: dict[str, Any]) -> str:
    """What the forgetting check found, worded from its numbers: the answer loss on the general questions with its
    interval and verdict, and ROUGE-L's change with its interval."""
    i, rouge = loss["interval"], answers["changes"]["rougeL"]
    moved = "fell" if i["change"] < 0 else "rose" if i["change"] > 0 else "did not move"
    reading = {
        "yes": "the tuned model finds the general answers more likely than the base did: no sign of forgetting on "
        "this measure (a shared style, such as the answer length and tone both sets use, can carry over)",
        "no": "the tuned model finds the general answers less likely: that is forgetting, the cost of specialising; "
        "weigh it against the gain on the security rows",
        "can't tell": "the interval straddles zero: no clear forgetting and no clear gain with this many questions",
    }[i["tuned_better"]]
    return (
        f"On {len(answers['samples'])} general questions the answer loss {moved}, {i['base']:.3f} -> "
        f"{i['tuned']:.3f} ({i['change']:+.1%}, 95% interval [{i['low']:+.1%}, {i['high']:+.1%}]): {reading}. "
        f"ROUGE-L {rouge['base']:.3f} -> {rouge['tuned']:.3f} ({rouge['change']:+.3f}, 95% interval "
        f"[{rouge['low']:+.3f}, {rouge['high']:+.3f}], tuned better: {rouge['tuned_better']})."
    )


def _rounded(value: Any, digits: int = 4) -> Any:
    """Floats rounded for a headline a person reads (the full values stay in the report's sections)."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v, digits) for v in value]
    return value


def build_report(
    *,
    profile: str,
    model: str,
    dataset: str,
    eval_rows: int,
    loss: dict[str, Any],
    generation: dict[str, Any],
    forgetting_loss: dict[str, Any],
    forgetting: dict[str, Any],
    overlap: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The evaluation report (report.json), with the headline numbers (rounded) the runner's summary prints."""
    scores, general, changes = generation["scores"], forgetting["scores"], generation["changes"]
    interval, f_interval = loss["interval"], forgetting_loss["interval"]
    rows = changes_table(loss, changes)
    return {
        "profile": profile,
        "model": model,
        "dataset": dataset,
        "eval_rows": eval_rows,
        "overlap": overlap or {},
        "loss": loss,
        "generation": {"questions": len(generation["samples"]), **generation},
        "verdicts": [{k: v for k, v in r.items() if v is not None} for r in rows],
        "forgetting": {"questions": len(forgetting["samples"]), "loss": forgetting_loss, **forgetting},
        "headline": _rounded(
            {
                "near_duplicates": (overlap or {}).get("near_duplicates", 0),
                "loss_base": loss["base"]["loss"],
                "loss_tuned": loss["tuned"]["loss"],
                "loss_change_pct": 100 * loss["relative_change"],
                "loss_change_pct_interval": [100 * interval["low"], 100 * interval["high"]],
                "questions": len(generation["samples"]),
                "rougeL_base": scores["base"]["rougeL"],
                "rougeL_tuned": scores["tuned"]["rougeL"],
                "rougeL_cut_base": scores["base"]["rougeL_cut"],
                "rougeL_cut_tuned": scores["tuned"]["rougeL_cut"],
                "token_f1_base": scores["base"]["token_f1"],
                "token_f1_tuned": scores["tuned"]["token_f1"],
                "loop_rate_base": scores["base"]["loop_rate"],
                "loop_rate_tuned": scores["tuned"]["loop_rate"],
                "stopped_rate_base": scores["base"]["stopped_rate"],
                "stopped_rate_tuned": scores["tuned"]["stopped_rate"],
                "mean_tokens_reference": scores["reference"]["mean_tokens"],
                # metric -> "yes" / "no" / "can't tell": does the 95% interval of the change exclude zero?
                "tuned_better": {"answer_loss": interval["tuned_better"]}
                | {m: c["tuned_better"] for m, c in changes.items() if c["tuned_better"] != "n/a"},
                "verdicts_at_95": sum(r["tuned better"] != "n/a" for r in rows),
                "yes_or_no_after_holm": sum(r["tuned better (Holm)"] in ("yes", "no") for r in rows),
                "forgetting_questions": len(forgetting["samples"]),
                "forgetting_loss_base": forgetting_loss["base"]["loss"],
                "forgetting_loss_tuned": forgetting_loss["tuned"]["loss"],
                "forgetting_loss_change_pct": 100 * f_interval["change"],
                "forgetting_loss_change_pct_interval": [100 * f_interval["low"], 100 * f_interval["high"]],
                "forgetting_rougeL_base": general["base"]["rougeL"],
                "forgetting_rougeL_tuned": general["tuned"]["rougeL"],
            }
        ),
    }


def _decoding_text(decoding: dict[str, Any]) -> str:
    if not decoding or decoding == GREEDY.describe():
        return "greedy"
    return ", ".join(f"{k}={v}" for k, v in decoding.items())


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a readable Markdown page. Model and data text (answers, questions, subjects, names) is
    escaped: Markdown viewers render HTML, and a `|` or line break would break a table."""
    from helpers.html_tables import markdown_text as md

    loss, gen, forget = report["loss"], report["generation"]["scores"], report["forgetting"]
    lines = [
        f"# Evaluation: base vs tuned ({md(report['model'])}, profile {md(report['profile'])})",
        "",
        f"Held-out data: {md(report['dataset'])} ({report['eval_rows']} rows, never trained on).",
    ]
    if report.get("overlap"):
        from helpers.overlap import summary_text

        lines += ["", f"Closeness to the training rows: {md(summary_text(report['overlap']))}"]
    lines += [
        "",
        "## Answer loss on the reference answers (lower is better)",
        "",
        "| | base | tuned | change |",
        "|---|---|---|---|",
        f"| loss | {loss['base']['loss']:.3f} | {loss['tuned']['loss']:.3f} | {loss['relative_change']:+.1%} |",
        f"| perplexity | {loss['base']['perplexity']:.1f} | {loss['tuned']['perplexity']:.1f} | |",
        "",
        f"## Generated answers ({report['generation']['questions']} held-out questions)",
        "",
        f"Decoding: {_decoding_text(report['generation'].get('decoding', {}))}. The 95% intervals come from a paired",
        'bootstrap over the questions: "tuned better" is *yes* or *no* only when the interval excludes zero; the',
        "Holm column adjusts for drawing many verdicts at once. BLEU and chrF are on a 0-100 scale, the others 0-1;",
        "`*_cut`: the metric on answers cut to the reference's length in words (same rule for both models).",
        "",
        "| metric | base | tuned | change | 95% interval | tuned better | Holm |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = changes_table(loss, report["generation"]["changes"])
    for row in rows:
        f = "{:+.1%}" if row["metric"].startswith("answer_loss") else "{:+.3f}"
        lines.append(
            f"| {row['metric']} | {row['base']:.3f} | {row['tuned']:.3f} | {f.format(row['change'])} "
            f"| [{f.format(row['low'])}, {f.format(row['high'])}] | {row['tuned better']} "
            f"| {row['tuned better (Holm)']} |"
        )
    reference = gen.get("reference", {"mean_tokens": gen.get("reference_mean_tokens", 0.0)})
    lines += [
        "",
        verdicts_note(rows),
        "",
        f"Reference answers average {reference['mean_tokens']:.0f} tokens. `stopped_rate`: share of answers",
        "that ended with the end-of-turn token before the token limit. `loop_rate`: share of answers with a runaway",
        "loop (a run of words repeated three or more times back to back); `distinct_2`: unique word pairs over all",
        "word pairs of an answer, averaged (lower: more repetition).",
        "",
    ]
    if "reference" in gen:
        form = ("mean_tokens", "stopped_rate", "loop_rate", "distinct_2")
        lines += ["| | " + " | ".join(form) + " |", "|---" * (len(form) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{gen[name][k]:.3f}" for k in form) + " |"
                  for name in ("base", "tuned", "reference")]  # fmt: skip
        lines += ["", "(reference `stopped_rate`: share of references short enough to end before the limit)", ""]
    lines += [
        "## Per subject (answer loss)",
        "",
        "| subject | rows | base | tuned |",
        "|---|---|---|---|",
    ]
    for subject, v in loss["per_subject"].items():
        lines.append(f"| {md(subject)} | {v['rows']} | {v['base']:.3f} | {v['tuned']:.3f} |")
    lines += [
        "",
        "## Forgetting check: general, non-security questions",
        "",
    ]
    if "interval" in forget["loss"] and "changes" in forget:
        lines += [forgetting_text(forget["loss"], forget), ""]
    lines += [
        "| | base | tuned |",
        "|---|---|---|",
        f"| answer loss | {forget['loss']['base']['loss']:.3f} | {forget['loss']['tuned']['loss']:.3f} |",
    ]
    for key in (*METRICS, "loop_rate"):
        lines.append(f"| {key} | {forget['scores']['base'][key]:.3f} | {forget['scores']['tuned'][key]:.3f} |")
    lines += ["", "## Side by side", ""]
    for s in report["generation"]["samples"][:4]:
        lines += [
            f"**Q ({md(s['subject'])}):** {md(s['question'])}",
            "",
            f"- *reference:* {md(s['reference'])}",
            f"- *base:* {md(s['base']['answer'])}",
            f"- *tuned:* {md(s['tuned']['answer'])}",
            "",
        ]
    return "\n".join(lines)
