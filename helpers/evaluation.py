"""Lesson 07: did fine-tuning teach the model? Base vs tuned on held-out data.

Two kinds of evidence: the loss on the reference answers (how likely the model finds the
expert's words), and answers generated greedily and scored against the references with
established metrics (ROUGE-L from rouge-score, BLEU and chrF from sacrebleu, token F1).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from typing import Any

import sacrebleu
import torch
from peft import PeftModel
from rouge_score import rouge_scorer
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from helpers.data import tokenize_example, words
from helpers.inference import compare_base_and_tuned

METRICS = ("rougeL", "bleu", "chrf", "token_f1")


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 between two texts (lower-cased, punctuation removed), as in SQuAD."""
    pred, ref = words(prediction), words(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


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
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]], batch_size: int = 4
) -> dict[str, Any]:
    """Answer loss of the base (adapter off) and tuned model, overall and per subject."""
    with model.disable_adapter():
        base = answer_losses(model, tokenizer, examples, batch_size)
    tuned = answer_losses(model, tokenizer, examples, batch_size)
    by_subject: dict[str, dict[str, list]] = defaultdict(lambda: {"base": [], "tuned": []})
    for example, b, t in zip(examples, base, tuned, strict=True):
        by_subject[example.get("subject", "all")]["base"].append(b)
        by_subject[example.get("subject", "all")]["tuned"].append(t)
    overall: dict[str, Any] = {"base": summarise_losses(base), "tuned": summarise_losses(tuned)}
    overall["relative_change"] = overall["tuned"]["loss"] / overall["base"]["loss"] - 1
    overall["per_subject"] = {
        subject: {
            "rows": len(v["base"]),
            "base": summarise_losses(v["base"])["loss"],
            "tuned": summarise_losses(v["tuned"])["loss"],
        }
        for subject, v in sorted(by_subject.items())
    }
    return overall


def compare_answers(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    max_new_tokens: int,
    desc: str = "generating",
) -> dict[str, Any]:
    """Greedy answers of base and tuned model to each example's question, scored against its reference."""
    samples = []
    for example in tqdm(examples, desc=desc):
        system = next((m["content"] for m in example["prompt"] if m["role"] == "system"), "")
        question = example["prompt"][-1]["content"]
        pair = compare_base_and_tuned(model, tokenizer, [question], system, max_new_tokens)[0]
        samples.append(
            {"subject": example.get("subject", ""), "reference": example["completion"][0]["content"], **pair}
        )
    references = [s["reference"] for s in samples]
    scores: dict[str, Any] = {}
    for name in ("base", "tuned"):
        answers = [s[name] for s in samples]
        scores[name] = {
            **text_metrics([a["answer"] for a in answers], references),
            "mean_tokens": statistics.fmean(a["tokens"] for a in answers),
            "stopped_rate": statistics.fmean(a["stopped_by_itself"] for a in answers),
        }
    scores["reference_mean_tokens"] = statistics.fmean(len(tokenizer(r)["input_ids"]) for r in references)
    return {"scores": scores, "samples": samples}


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
    scores, general = generation["scores"], forgetting["scores"]
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
            "rougeL_base": scores["base"]["rougeL"],
            "rougeL_tuned": scores["tuned"]["rougeL"],
            "stopped_rate_base": scores["base"]["stopped_rate"],
            "stopped_rate_tuned": scores["tuned"]["stopped_rate"],
            "forgetting_loss_base": forgetting_loss["base"]["loss"],
            "forgetting_loss_tuned": forgetting_loss["tuned"]["loss"],
            "forgetting_rougeL_base": general["base"]["rougeL"],
            "forgetting_rougeL_tuned": general["tuned"]["rougeL"],
        },
    }


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a readable Markdown page."""
    loss, gen, forget = report["loss"], report["generation"]["scores"], report["forgetting"]
    lines = [
        f"# Evaluation: base vs tuned ({report['model']}, profile {report['profile']})",
        "",
        f"Held-out data: {report['dataset']} ({report['eval_rows']} rows, never trained on).",
        "",
        "## Answer loss on the reference answers (lower is better)",
        "",
        "| | base | tuned | change |",
        "|---|---|---|---|",
        f"| loss | {loss['base']['loss']:.3f} | {loss['tuned']['loss']:.3f} | {loss['relative_change']:+.1%} |",
        f"| perplexity | {loss['base']['perplexity']:.1f} | {loss['tuned']['perplexity']:.1f} | |",
        "",
        f"## Generated answers ({report['generation']['questions']} held-out questions, greedy)",
        "",
        "| metric | base | tuned |",
        "|---|---|---|",
    ]
    for key in (*METRICS, "mean_tokens", "stopped_rate"):
        lines.append(f"| {key} | {gen['base'][key]:.3f} | {gen['tuned'][key]:.3f} |")
    lines += [
        "",
        f"Reference answers average {gen['reference_mean_tokens']:.0f} tokens. `stopped_rate`: share of answers",
        "that ended with the end-of-turn token before the token limit.",
        "",
        "## Per subject (answer loss)",
        "",
        "| subject | rows | base | tuned |",
        "|---|---|---|---|",
    ]
    for subject, v in loss["per_subject"].items():
        lines.append(f"| {subject} | {v['rows']} | {v['base']:.3f} | {v['tuned']:.3f} |")
    lines += [
        "",
        "## Forgetting check: general, non-security questions",
        "",
        "| | base | tuned |",
        "|---|---|---|",
        f"| answer loss | {forget['loss']['base']['loss']:.3f} | {forget['loss']['tuned']['loss']:.3f} |",
    ]
    for key in METRICS:
        lines.append(f"| {key} | {forget['scores']['base'][key]:.3f} | {forget['scores']['tuned'][key]:.3f} |")
    lines += ["", "## Side by side", ""]
    for s in report["generation"]["samples"][:4]:
        lines += [
            f"**Q ({s['subject']}):** {s['question']}",
            "",
            f"- *reference:* {s['reference']}",
            f"- *base:* {s['base']['answer']}",
            f"- *tuned:* {s['tuned']['answer']}",
            "",
        ]
    return "\n".join(lines)
