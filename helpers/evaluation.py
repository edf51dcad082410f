"""Lesson 07: did fine-tuning teach the model? Base vs tuned on held-out data.

Two kinds of evidence: the loss on the reference answers (how likely the model finds the
expert's words), and answers generated greedily and scored against the references with
established metrics (ROUGE-L from rouge-score, BLEU and chrF from sacrebleu, token F1).

~390 lines because the statistics (paired bootstrap intervals and verdicts for every metric) and the report built
from them stay together: the report states exactly what the statistics computed. Text measures live in
text_measures.py, generation in inference.py.
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


def _answer_records(answers: list[dict[str, Any]], references: list[str]) -> list[dict[str, Any]]:
    """Per answer: its text, reference, sentence-level scores and loop, the inputs to every statistic."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [
        {
            "answer": a["answer"],
            "reference": ref,
            "rougeL": scorer.score(ref, a["answer"])["rougeL"].fmeasure,
            "token_f1": token_f1(a["answer"], ref),
            "loop": repeated_loop(a["answer"]) is not None,
            "tokens": a["tokens"],
            "stopped": a["stopped_by_itself"],
        }
        for a, ref in zip(answers, references, strict=True)
    ]


def _corpus(metric: sacrebleu.metrics.base.Metric) -> Callable[[list[dict[str, Any]]], float]:
    # Sentence statistics are computed once per answer and summed per resample: sacrebleu's own paired
    # bootstrap (sacrebleu.significance) does the same, so 1000 resamples of BLEU and chrF take a second.
    def score(records: list[dict[str, Any]]) -> float:
        stats = [r["_stats"][metric.__class__.__name__] for r in records]
        return metric._compute_score_from_stats([sum(column) for column in zip(*stats, strict=True)]).score

    return score


_BLEU, _CHRF = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()

# Each statistic: per-example records -> one number, and whether higher is better (None: neither).
STATISTICS: dict[str, tuple[Callable[[list[dict[str, Any]]], float], bool | None]] = {
    "rougeL": (lambda rs: statistics.fmean(r["rougeL"] for r in rs), True),
    "bleu": (_corpus(_BLEU), True),
    "chrf": (_corpus(_CHRF), True),
    "token_f1": (lambda rs: statistics.fmean(r["token_f1"] for r in rs), True),
    "loop_rate": (lambda rs: statistics.fmean(r["loop"] for r in rs), False),
    "distinct_2": (lambda rs: distinct_n([r["answer"] for r in rs], 2), True),
    "mean_tokens": (lambda rs: statistics.fmean(r["tokens"] for r in rs), None),
    "stopped_rate": (lambda rs: statistics.fmean(r["stopped"] for r in rs), True),
}


def _with_sentence_stats(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in records:
        r["_stats"] = {
            m.__class__.__name__: m._extract_corpus_statistics([r["answer"]], [[r["reference"]]])[0]
            for m in (_BLEU, _CHRF)
        }
    return records


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
    """Change base -> tuned in a statistic, with a paired bootstrap 95% interval (Koehn, 2004).

    `relative=True` gives the change as a fraction of the base value.

    Both models answered the same questions, so each resample draws question indices with replacement and
    scores both models on the same draw: the interval reflects which questions happened to be asked, and the
    variation common to both models cancels out.
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
    low, high = changes[int(0.025 * samples)], changes[min(samples - 1, int(0.975 * samples))]
    b, t = statistic(base), statistic(tuned)
    return {
        "base": b,
        "tuned": t,
        "change": change(b, t),
        "low": low,
        "high": high,
        "tuned_better": verdict(low, high, higher_is_better),
    }


def loss_change_interval(base: list[dict[str, float]], tuned: list[dict[str, float]], samples: int = 1000,
                         seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Paired bootstrap interval of the relative change in token-weighted answer loss (lower is better)."""
    return paired_bootstrap(base, tuned, lambda rs: summarise_losses(rs)["loss"], False, samples, seed, relative=True)


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

    `scores` holds each model's metrics; `changes` each metric's change base -> tuned with a paired bootstrap 95%
    interval and the verdict "tuned better: yes / no / can't tell".
    """
    systems = [next((m["content"] for m in e["prompt"] if m["role"] == "system"), "") for e in examples]
    questions = [e["prompt"][-1]["content"] for e in examples]
    pairs = compare_base_and_tuned(model, tokenizer, questions, systems, max_new_tokens, decoding, batch_size, desc)
    samples = [
        {"subject": e.get("subject", ""), "reference": e["completion"][0]["content"], **pair}
        for e, pair in zip(examples, pairs, strict=True)
    ]
    references = [s["reference"] for s in samples]
    records = {name: _with_sentence_stats(_answer_records([s[name] for s in samples], references))
               for name in ("base", "tuned")}  # fmt: skip
    scores: dict[str, Any] = {
        name: {metric: fn(records[name]) for metric, (fn, _) in STATISTICS.items()} for name in ("base", "tuned")
    }
    scores["reference_mean_tokens"] = statistics.fmean(len(tokenizer(r)["input_ids"]) for r in references)
    changes = {
        metric: paired_bootstrap(records["base"], records["tuned"], fn, better, bootstrap_samples)
        for metric, (fn, better) in STATISTICS.items()
    }
    for sample, b, t in zip(samples, records["base"], records["tuned"], strict=True):
        sample["base"]["loop"], sample["tuned"]["loop"] = b["loop"], t["loop"]
    return {"scores": scores, "changes": changes, "decoding": decoding.describe(), "samples": samples}


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
) -> dict[str, Any]:
    """The evaluation report (report.json), with the headline numbers the runner's summary prints."""
    scores, general, changes = generation["scores"], forgetting["scores"], generation["changes"]
    interval = loss["interval"]
    return {
        "profile": profile,
        "model": model,
        "dataset": dataset,
        "eval_rows": eval_rows,
        "loss": loss,
        "generation": {"questions": len(generation["samples"]), **generation},
        "forgetting": {"questions": len(forgetting["samples"]), "loss": forgetting_loss, **forgetting},
        "headline": {
            "loss_base": loss["base"]["loss"],
            "loss_tuned": loss["tuned"]["loss"],
            "loss_change_pct": 100 * loss["relative_change"],
            "loss_change_pct_interval": [100 * interval["low"], 100 * interval["high"]],
            "questions": len(generation["samples"]),
            "rougeL_base": scores["base"]["rougeL"],
            "rougeL_tuned": scores["tuned"]["rougeL"],
            "token_f1_base": scores["base"]["token_f1"],
            "token_f1_tuned": scores["tuned"]["token_f1"],
            "loop_rate_base": scores["base"]["loop_rate"],
            "loop_rate_tuned": scores["tuned"]["loop_rate"],
            "stopped_rate_base": scores["base"]["stopped_rate"],
            "stopped_rate_tuned": scores["tuned"]["stopped_rate"],
            # metric -> "yes" / "no" / "can't tell": does the 95% interval of the change exclude zero?
            "tuned_better": {"answer_loss": interval["tuned_better"]}
            | {m: c["tuned_better"] for m, c in changes.items() if c["tuned_better"] != "n/a"},
            "forgetting_loss_base": forgetting_loss["base"]["loss"],
            "forgetting_loss_tuned": forgetting_loss["tuned"]["loss"],
            "forgetting_rougeL_base": general["base"]["rougeL"],
            "forgetting_rougeL_tuned": general["tuned"]["rougeL"],
        },
    }


def changes_table(loss: dict[str, Any], changes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per metric: base, tuned, change with its 95% interval (low, high), and the verdict.

    The answer loss comes first, its change relative to the base (-0.2: 20% lower).
    """
    i = loss["interval"]
    rows = [{"metric": "answer_loss (relative)", **{k: i[k] for k in ("base", "tuned", "change", "low", "high")},
             "tuned better": i["tuned_better"]}]  # fmt: skip
    for metric, c in changes.items():
        rows.append({"metric": metric, **{k: c[k] for k in ("base", "tuned", "change", "low", "high")},
                     "tuned better": c["tuned_better"]})  # fmt: skip
    return rows


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
        'bootstrap over the questions: "tuned better" is *yes* or *no* only when the interval excludes zero.',
        "",
        "| metric | base | tuned | change | 95% interval | tuned better |",
        "|---|---|---|---|---|---|",
    ]
    for row in changes_table(loss, report["generation"]["changes"]):
        f = "{:+.1%}" if row["metric"].startswith("answer_loss") else "{:+.3f}"
        lines.append(
            f"| {row['metric']} | {row['base']:.3f} | {row['tuned']:.3f} | {f.format(row['change'])} "
            f"| [{f.format(row['low'])}, {f.format(row['high'])}] | {row['tuned better']} |"
        )
    lines += [
        "",
        f"Reference answers average {gen['reference_mean_tokens']:.0f} tokens. `stopped_rate`: share of answers",
        "that ended with the end-of-turn token before the token limit. `loop_rate`: share of answers with a runaway",
        "loop (a run of words repeated three or more times back to back); `distinct_2`: unique word pairs over all",
        "word pairs (lower: more repetition).",
        "",
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
