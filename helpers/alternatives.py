"""Lesson 07, "should you fine-tune?": the tuned model against what you could do without training.

On the held-out questions of the base/tuned comparison (the first `evaluate.alternatives_questions` of them), three
more systems answer:

- `prompting`: the base model, each row's system prompt and k worked examples from the training split
  (`evaluate.prompt_examples`, chosen by `evaluate.example_choice`);
- `rag`: the base model with the k training pairs BM25 retrieves for each question (`evaluate.rag_top_k`);
- `tuned_rag`: the tuned model with the same retrieved pairs.

Both kinds of examples go into the system message in one format, so prompting and RAG differ only in *which*
pairs are shown. Each system gets the metrics of helpers.evaluation (its generation scoring and answer loss: the
teacher-forced loss of the reference after that system's prompt) with paired bootstrap intervals of the change
from the system to the tuned model ("tuned better": yes / no / can't tell, as in the base/tuned table), and its
cost: prompt tokens per question, generation seconds, and training seconds amortised over the questions. The tuned
model's answers are those of the base/tuned comparison, reused rather than generated again.

~420 lines because the comparison and the tables and sentences that report it stay together (as in evaluation.py):
the lesson's sentences state exactly what was computed. BM25 retrieval lives in retrieval.py.
"""

from __future__ import annotations

import random
import statistics
import time
from typing import TYPE_CHECKING, Any

from helpers.chat import messages, prompt_ids
from helpers.evaluation import answer_losses, changes_table, loss_change_interval, score_answers, summarise_losses
from helpers.inference import GREEDY, Decoding, generate_batch
from helpers.retrieval import PairIndex, RetrievalError, answer_of, question_of

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from helpers.profiles import EvalSettings

TUNED = "tuned"
ANSWER_LOSS = "answer_loss"
SYSTEMS = ("prompting", "rag", "tuned_rag")  # the alternatives, each compared with TUNED
ORDER = ("prompting", "rag", TUNED, "tuned_rag")  # rows of the tables: without training, then with
TRAINED, RETRIEVING = (TUNED, "tuned_rag"), ("rag", "tuned_rag")
LABELS = {"prompting": "prompting (base + examples)", "rag": "RAG (base + retrieved)", TUNED: "tuned",
          "tuned_rag": "tuned + RAG"}  # fmt: skip
SHORT = {"prompting": "prompting", "rag": "RAG", TUNED: "tuned", "tuned_rag": "tuned + RAG"}  # in sentences
KEY_METRICS = (ANSWER_LOSS, "rougeL", "chrf", "token_f1", "stopped_rate", "loop_rate")  # the lesson's grid


class AlternativesError(ValueError):
    """A setting of the comparison that cannot work: k too large, a prompt over the context, mismatched inputs."""


def choose_examples(train: list[dict[str, Any]], k: int, choice: str, seed: int) -> list[int]:
    """Rows of the training split shown as worked examples: `random` (seeded), `shortest` answers, or `first`."""
    if not train:
        raise AlternativesError(
            "evaluate.prompt_examples: the training split is empty, so there are no worked examples to show. "
            "Every row went to the held-out split: raise data.max_rows or lower data.eval_rows."
        )
    if k > len(train):
        raise AlternativesError(
            f"evaluate.prompt_examples is {k}, but the training split has only {len(train)} rows: lower it."
        )
    rows = list(range(len(train)))
    if choice == "random":
        return sorted(random.Random(seed).sample(rows, k))
    if choice == "shortest":
        return sorted(sorted(rows, key=lambda i: (len(answer_of(train[i])), i))[:k])
    if choice == "first":
        return rows[:k]
    raise AlternativesError(f"evaluate.example_choice must be random, shortest or first, got {choice!r}")


def with_examples(system: str, pairs: list[dict[str, Any]]) -> str:
    """The system message with worked examples after it (prompting and RAG alike)."""
    shown = "\n\n".join(f"Question: {question_of(p)}\nAnswer: {answer_of(p)}" for p in pairs)
    return f"{system}\n\nExamples of questions with expert answers:\n\n{shown}".lstrip()


def _system_of(example: dict[str, Any]) -> str:
    return next((m["content"] for m in example["prompt"] if m["role"] == "system"), "")


def prompted_examples(examples: list[dict[str, Any]], shown: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each held-out row with its own system message extended by the pairs shown to it; the reference unchanged."""
    return [
        {"prompt": messages(question_of(e), with_examples(_system_of(e), pairs)), "completion": e["completion"]}
        for e, pairs in zip(examples, shown, strict=True)
    ]


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, examples: list[dict[str, Any]]) -> list[int]:
    """Tokens of each row's prompt in the chat template, up to where the model starts its answer."""
    return [len(prompt_ids(tokenizer, question_of(e), _system_of(e))) for e in examples]


def check_context(lengths: list[int], questions: list[str], max_new_tokens: int, max_seq_length: int,
                  system: str, setting: str, k: int) -> None:  # fmt: skip
    """Fail, naming the settings, unless every prompt leaves room for a full answer within model.max_seq_length."""
    longest = max(range(len(lengths)), key=lambda i: lengths[i])
    needed = lengths[longest] + max_new_tokens
    if needed > max_seq_length:
        over = sum(n + max_new_tokens > max_seq_length for n in lengths)
        raise AlternativesError(
            f"The {system} prompt no longer fits the context: for held-out question {longest} "
            f"({questions[longest][:60]!r}) it is {lengths[longest]} tokens with its {k} examples, and with "
            f"evaluate.max_new_tokens {max_new_tokens} it needs {needed}, over model.max_seq_length "
            f"{max_seq_length} ({over} of {len(lengths)} questions do not fit). Lower {setting} (now {k}) or "
            "evaluate.max_new_tokens, or raise model.max_seq_length."
        )


def _against_tuned(
    alternative: list[dict[str, Any]],
    tuned: list[dict[str, Any]],
    references: list[str],
    tokenizer: PreTrainedTokenizerBase,
    settings: EvalSettings,
    decoding: Decoding,
) -> dict[str, Any]:
    """Both systems' scores, and each metric's change from the alternative to the tuned model with its paired
    bootstrap 95% interval: helpers.evaluation's own scoring, the alternative in the place of the base model."""
    samples = [{"reference": r, "base": dict(a), "tuned": dict(t)} for a, t, r in zip(alternative, tuned, references,
               strict=True)]  # fmt: skip
    return score_answers(samples, tokenizer, settings.max_new_tokens, decoding, settings.bootstrap_samples)


def _losses(model: PeftModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict[str, Any]], batch_size: int
            ) -> list[dict[str, float]]:  # fmt: skip
    """helpers.evaluation's answer losses, rows of similar length batched together (less padding), in row order."""
    lengths = [sum(len(m["content"]) for m in r["prompt"] + r["completion"]) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    losses = answer_losses(model, tokenizer, [rows[i] for i in order], batch_size)
    return [loss for _, loss in sorted(zip(order, losses, strict=True), key=lambda pair: pair[0])]


def _cost(prompts: list[int], answers: list[dict[str, Any]], train_seconds: float, retrieval_seconds: float
          ) -> dict[str, float]:  # fmt: skip
    n = len(answers)
    generation = sum(a["seconds"] for a in answers)
    per_question = (generation + train_seconds + retrieval_seconds) / n
    return {
        "prompt_tokens": statistics.fmean(prompts),  # per question
        "generation_seconds": round(generation, 2),  # all questions
        "training_seconds": train_seconds,  # once, before the first question
        "training_seconds_per_question": round(train_seconds / n, 3),  # amortised over these questions
        "retrieval_seconds": round(retrieval_seconds, 3),  # building the index and searching it
        "seconds_per_question": round(per_question, 3),
    }


def compare_alternatives(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[dict[str, Any]],
    train: list[dict[str, Any]],
    tuned_samples: list[dict[str, Any]],
    settings: EvalSettings,
    max_seq_length: int,
    train_seconds: float,
    decoding: Decoding = GREEDY,
    seed: int = 42,
    desc: str | None = None,
    tuned_losses: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Prompting, RAG and tuned + RAG against the tuned model on `examples`, the rows the base/tuned comparison
    answered (`tuned_samples`: its `samples`, whose tuned answers are reused), the first
    `settings.alternatives_questions` of them (None: all), with `settings.max_new_tokens`, batches of
    `settings.generation_batch_size` and `settings.bootstrap_samples` resamples.

    `train` is the training split (the worked examples and the RAG index), `train_seconds` the training time of 05.
    `tuned_losses`: the tuned model's per-row answer losses on `examples` (helpers.evaluation.answer_losses), when
    the caller has them; computed here otherwise.
    """
    questions = [question_of(e) for e in examples]
    if [s["question"] for s in tuned_samples] != questions:
        raise AlternativesError(
            f"tuned_samples must answer the same {len(examples)} held-out questions in the same order (pass "
            f"compare_answers(...)['samples'] for examples[: evaluate.questions]); got {len(tuned_samples)} answers."
        )
    if not examples:
        raise AlternativesError("No held-out questions to compare on (evaluate.questions, data.eval_rows).")
    asked = len(examples)  # the first alternatives_questions of them answer (each costs three generations)
    examples, tuned_samples = (
        examples[: settings.alternatives_questions],
        tuned_samples[: settings.alternatives_questions],
    )
    questions = questions[: len(examples)]
    try:
        index = PairIndex.build(train, "evaluate.rag_top_k")
        start = time.perf_counter()
        retrieved = index.retrieve(questions, settings.rag_top_k)
    except RetrievalError as err:
        raise AlternativesError(str(err)) from None
    retrieval_seconds = index.seconds + time.perf_counter() - start
    shots = choose_examples(train, settings.prompt_examples, settings.example_choice, seed)

    prompts = {
        "prompting": prompted_examples(examples, [[train[i] for i in shots]] * len(examples)),
        "rag": prompted_examples(examples, [[train[r["row"]] for r in found] for found in retrieved]),
    }
    lengths = {name: prompt_lengths(tokenizer, rows) for name, rows in prompts.items()}
    for name, setting, k in (("prompting", "evaluate.prompt_examples", settings.prompt_examples),
                             ("rag", "evaluate.rag_top_k", settings.rag_top_k)):  # fmt: skip
        check_context(lengths[name], questions, settings.max_new_tokens, max_seq_length, name, setting, k)
    prompts["tuned_rag"], lengths["tuned_rag"] = prompts["rag"], lengths["rag"]

    def answer(rows: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
        return generate_batch(model, tokenizer, [question_of(e) for e in rows], [_system_of(e) for e in rows],
                              settings.max_new_tokens, decoding, settings.generation_batch_size,
                              desc and f"{desc} ({label})")  # fmt: skip

    answers, losses = {}, {}
    with model.disable_adapter():
        for name in ("prompting", "rag"):
            answers[name] = answer(prompts[name], name)
            losses[name] = _losses(model, tokenizer, prompts[name], settings.batch_size)
    answers["tuned_rag"] = answer(prompts["tuned_rag"], "tuned_rag")
    losses["tuned_rag"] = _losses(model, tokenizer, prompts["tuned_rag"], settings.batch_size)
    answers[TUNED] = [s[TUNED] for s in tuned_samples]
    losses[TUNED] = (
        tuned_losses[: len(examples)] if tuned_losses else _losses(model, tokenizer, examples, settings.batch_size)
    )
    if len(losses[TUNED]) != len(examples):
        raise AlternativesError(f"tuned_losses holds {len(losses[TUNED])} rows, not the {len(examples)} examples.")
    lengths[TUNED] = prompt_lengths(tokenizer, examples)

    references = [answer_of(e) for e in examples]
    systems: dict[str, Any] = {}
    reference_form: dict[str, float] = {}
    for name in ORDER:
        trained = train_seconds if name in TRAINED else 0.0
        cost = _cost(lengths[name], answers[name], trained, retrieval_seconds if name in RETRIEVING else 0.0)
        systems[name] = {"label": LABELS[name], "loss": summarise_losses(losses[name]), "cost": cost}
    for name in SYSTEMS:
        scored = _against_tuned(answers[name], answers[TUNED], references, tokenizer, settings, decoding)
        loss = loss_change_interval(losses[name], losses[TUNED], settings.bootstrap_samples)  # relative change
        systems[name] |= {"scores": scored["scores"]["base"], "changes": {ANSWER_LOSS: loss, **scored["changes"]}}
        systems[TUNED]["scores"], reference_form = scored["scores"]["tuned"], scored["scores"]["reference"]
    for s in systems.values():
        s["scores"] = {ANSWER_LOSS: s["loss"]["loss"], **s["scores"]}
    samples = [
        {
            "question": q,
            "reference": ref,
            "retrieved": [{**r, "question": question_of(train[r["row"]])} for r in found],
            **{name: answers[name][i] for name in ORDER},
        }
        for i, (q, ref, found) in enumerate(zip(questions, references, retrieved, strict=True))
    ]
    return {
        "questions": len(examples),
        "of_questions": asked,  # held-out questions of the base/tuned comparison
        "train_rows": len(train),
        "prompt_examples": [{"row": i, "question": question_of(train[i])} for i in shots],
        "settings": {k: getattr(settings, k) for k in ("prompt_examples", "example_choice", "rag_top_k")},
        "max_seq_length": max_seq_length,
        "reference": reference_form,  # the references' own length, stop rate, loops
        "systems": systems,
        "samples": samples,
    }


COST_COLUMNS = ("prompt_tokens", "generation_seconds", "training_seconds_per_question", "seconds_per_question")


def scores_table(result: dict[str, Any], metrics: tuple[str, ...] | None = KEY_METRICS) -> list[dict[str, Any]]:
    """One row per system (the tuned model's included): its scores (`metrics`, None: all) and costs."""
    return [
        {"system": s["label"], **{m: v for m, v in s["scores"].items() if metrics is None or m in metrics},
         **{k: s["cost"][k] for k in COST_COLUMNS}}
        for s in result["systems"].values()
    ]  # fmt: skip


def against_tuned_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per alternative and metric: its value, the tuned model's, the change to tuned with its 95% interval
    (the answer loss relative: -0.1 = tuned 10% lower) and whether the tuned model is better, as helpers.evaluation's
    table gives them (Holm's adjustment over each alternative's verdicts)."""
    rows = []
    for name in SYSTEMS:
        changes = dict(result["systems"][name]["changes"])
        loss = {"interval": changes.pop(ANSWER_LOSS)}
        for row in changes_table(loss, changes):
            rows.append({"system": LABELS[name], "metric": row.pop("metric"), "alternative": row.pop("base"), **row})
    return rows


def verdict_grid(result: dict[str, Any], metrics: tuple[str, ...] = KEY_METRICS) -> list[dict[str, str]]:
    """One row per metric, one column per alternative: the change from it to the tuned model, its 95% interval and
    whether the tuned model is better ("-4.1% [-6.0%, -2.2%] yes")."""
    rows = []
    for metric in metrics:
        row = {"metric": metric + (" (relative)" if metric == ANSWER_LOSS else "")}
        for name in SYSTEMS:
            c = result["systems"][name]["changes"][metric]
            f = "{:+.1%}" if metric == ANSWER_LOSS else "{:+.3f}"
            row[f"tuned vs {LABELS[name]}"] = (
                f"{f.format(c['change'])} [{f.format(c['low'])}, {f.format(c['high'])}] {c['tuned_better']}"
            )
        rows.append(row)
    return rows


def _loss_sentence(result: dict[str, Any], name: str) -> str:
    c = result["systems"][name]["changes"][ANSWER_LOSS]
    way = "lower" if c["change"] < 0 else "higher"
    return (
        f"{abs(c['change']):.1%} {way} than {SHORT[name]}'s ({c['tuned']:.3f} vs {c['base']:.3f}; "
        f"95% interval [{c['low']:+.1%}, {c['high']:+.1%}], tuned better: {c['tuned_better']})"
    )


def _of(result: dict[str, Any]) -> str:
    """ "12" or "the first 12 of 24": how many of the comparison's held-out questions the alternatives answered."""
    n, of = result["questions"], result.get("of_questions", result["questions"])
    return f"{n}" if n == of else f"the first {n} of {of}"


def _names(names: list[str]) -> str:
    return " and ".join(SHORT[n] for n in names)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def reading(result: dict[str, Any], questions_in_use: int = 1000) -> list[str]:
    """What the comparison says, sentence by sentence, from its numbers: the answer loss against each alternative,
    the form (stop rate), what RAG adds to the tuned model, the costs, what it means for the project, and what more
    data or a bigger model changes. `questions_in_use`: the question count of the cost sentence's projection."""
    s, n, k = result["systems"], result["questions"], result["settings"]
    t_cost, verdicts = s[TUNED]["cost"], {name: s[name]["changes"][ANSWER_LOSS]["tuned_better"] for name in SYSTEMS}
    stop = {name: s[name]["scores"]["stopped_rate"] for name in ORDER}
    gen = {name: s[name]["cost"]["generation_seconds"] / n for name in ORDER}
    rag_helps = {"no": "retrieval adds to the tuned model: use both", "yes": "retrieval makes the tuned model worse",
                 "can't tell": "no clear gain from adding retrieval"}[verdicts["tuned_rag"]]  # fmt: skip
    lines = [
        f"On {_of(result)} held-out questions the tuned model's answer loss is "
        f"{_loss_sentence(result, 'prompting')}, and {_loss_sentence(result, 'rag')}.",
        "Form: the share of answers that end by themselves is "
        + ", ".join(f"{stop[name]:.0%} for {SHORT[name]}" for name in ORDER)
        + f" ({result['reference'].get('stopped_rate', float('nan')):.0%} of the references are short enough).",
        f"Tuned + RAG against tuned alone: answer loss {s['tuned_rag']['scores'][ANSWER_LOSS]:.3f} vs "
        f"{s[TUNED]['scores'][ANSWER_LOSS]:.3f} (tuned alone better: {verdicts['tuned_rag']}): {rag_helps}.",
        f"Cost per question: {s['prompting']['cost']['prompt_tokens']:.0f} prompt tokens for prompting, "
        f"{s['rag']['cost']['prompt_tokens']:.0f} for RAG, {t_cost['prompt_tokens']:.0f} for the tuned model; "
        f"generation {gen['prompting']:.2f} s, {gen['rag']:.2f} s and {gen[TUNED]:.2f} s. "
        f"Training took {t_cost['training_seconds']:.0f} s once: "
        f"{t_cost['training_seconds_per_question']:.2f} s per question over these {n}, "
        f"{t_cost['training_seconds'] / questions_in_use:.3f} s over {questions_in_use:,}.",
    ]
    beaten = [name for name in ("prompting", "rag") if verdicts[name] == "yes"]
    better = [name for name in ("prompting", "rag") if verdicts[name] == "no"]
    level = [name for name in ("prompting", "rag") if verdicts[name] == "can't tell"]
    if len(beaten) == 2:
        meaning = ("fine-tuning beat both alternatives at what it was trained for: worth its training time when the "
                   "same kind of question comes many times.")  # fmt: skip
    elif better:
        meaning = (f"{_names(better)} did better than the tuned model without any training: start there, and "
                   "fine-tune only for what it cannot give (form, a shorter prompt, speed).")  # fmt: skip
    else:
        meaning = (f"the tuned model beat {_names(beaten) or 'neither alternative'}; against {_names(level)} the "
                   f"interval straddles zero, so on this many questions {_names(level)} "
                   f"{'comes' if len(level) == 1 else 'come'} as close without "
                   "training: the cheaper start, unless the form or the prompt length matters.")  # fmt: skip
    lines.append("What it means for this project: here " + meaning)
    scores = [r["score"] for sample in result["samples"] for r in sample["retrieved"]]
    lines.append(
        f"With more data: the index holds {result['train_rows']} training pairs (best BM25 score per question "
        f"{max(scores):.1f} at most, {statistics.fmean(scores):.1f} on average); more pairs give RAG closer matches "
        "and the tuned model more to learn, so measure both again. With a bigger model: model.max_seq_length "
        f"{result['max_seq_length']} leaves room for {_plural(k['prompt_examples'], 'example')} and "
        f"{_plural(k['rag_top_k'], 'retrieved pair')} here; a longer context shows more, and a larger model follows "
        "examples better, which usually narrows the gap to fine-tuning."
    )
    return lines


def retrieval_table(result: dict[str, Any], limit: int | None = 4):
    """What RAG retrieved for each question (BM25 scores) and what base and tuned answered with it; escaped."""
    from helpers.html_tables import safe_table

    rows = [
        {
            "question": s["question"],
            "retrieved (BM25 score)": "\n".join(f"{r['score']:.2f}: {r['question']}" for r in s["retrieved"]),
            "reference": s["reference"],
            "base + RAG": s["rag"]["answer"],
            "tuned": s[TUNED]["answer"],
            "tuned + RAG": s["tuned_rag"]["answer"],
        }
        for s in result["samples"][:limit]
    ]
    return safe_table(rows)


def headline(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For the step's manifest and the runner's summary: per system, answer loss, ROUGE-L, seconds per question and
    prompt tokens, and (alternatives) whether the tuned model's answer loss and ROUGE-L are better."""
    out = {}
    for name, s in result["systems"].items():
        out[name] = {
            ANSWER_LOSS: round(s["scores"][ANSWER_LOSS], 4),
            "rougeL": round(s["scores"]["rougeL"], 4),
            "seconds_per_question": s["cost"]["seconds_per_question"],
            "prompt_tokens": round(s["cost"]["prompt_tokens"], 1),
        }
        if "changes" in s:
            out[name] |= {f"tuned_better_{m}": s["changes"][m]["tuned_better"] for m in (ANSWER_LOSS, "rougeL")}
    return out


def alternatives_markdown(result: dict[str, Any]) -> str:
    """A section for report.md: scores and costs per system, then each change to the tuned model; text escaped."""
    from helpers.html_tables import markdown_text as md

    s = result["settings"]
    lines = [
        "## Should you fine-tune? Prompting and RAG against the tuned model",
        "",
        f"{_of(result)} held-out questions; prompting shows {s['prompt_examples']} worked example(s) "
        f"({md(s['example_choice'])}), RAG the top {s['rag_top_k']} of {result['train_rows']} training pairs by BM25.",
        "",
        "| system | answer loss | ROUGE-L | token F1 | stopped | prompt tokens | generation s | training s / Q |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in scores_table(result):
        lines.append(
            f"| {row['system']} | {row[ANSWER_LOSS]:.3f} | {row['rougeL']:.3f} | {row['token_f1']:.3f} "
            f"| {row['stopped_rate']:.2f} | {row['prompt_tokens']:.0f} | {row['generation_seconds']:.1f} "
            f"| {row['training_seconds_per_question']:.2f} |"
        )
    lines += ["", "| system | metric | alternative | tuned | change to tuned | 95% interval | tuned better |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in against_tuned_table(result):
        f = "{:+.1%}" if row["metric"].startswith(ANSWER_LOSS) else "{:+.3f}"
        lines.append(
            f"| {row['system']} | {row['metric']} | {row['alternative']:.3f} | {row['tuned']:.3f} "
            f"| {f.format(row['change'])} | [{f.format(row['low'])}, {f.format(row['high'])}] | {row['tuned better']} |"
        )
    return "\n".join(lines)
