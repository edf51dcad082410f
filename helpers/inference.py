"""Lesson 06: ask questions of the base and the tuned model."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from peft import PeftModel
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from helpers.backend import uses_unsloth
from helpers.chat import messages
from helpers.profiles import InferSettings, Profile


@dataclass(frozen=True)
class Decoding:
    """How the next token is chosen. The defaults are plain greedy decoding: the most likely token every time."""

    repetition_penalty: float = 1.0  # >1 lowers the score of tokens already in the text (1.1-1.3 is usual)
    no_repeat_ngram_size: int = 0  # >0 forbids any n-gram of that many tokens to appear twice (0: off)
    do_sample: bool = False  # True: draw the next token at random from the model's distribution
    temperature: float = 1.0  # with sampling: <1 sharpens the distribution, >1 flattens it
    top_p: float = 1.0  # with sampling: draw only from the smallest set of tokens holding this much probability

    @classmethod
    def from_settings(cls, settings: InferSettings) -> Decoding:
        """The decoding settings a profile's `infer` section holds."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate` (sampling knobs only when sampling, so greedy stays greedy)."""
        kwargs: dict[str, Any] = {"do_sample": self.do_sample, "repetition_penalty": self.repetition_penalty}
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p)
        return kwargs

    def describe(self) -> dict[str, Any]:
        return asdict(self)


GREEDY = Decoding()


def prepare_for_inference(model: PreTrainedModel, profile: Profile) -> PreTrainedModel:
    """Eval mode, and Unsloth's faster generation path on its GPU route."""
    if uses_unsloth(profile):
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model


def chat_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, system: str = ""):
    """The question (after an optional system message) in the chat template, ready for `model.generate`."""
    return tokenizer.apply_chat_template(
        messages(question, system), add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)


def _answer(tokenizer: PreTrainedTokenizerBase, new_tokens: torch.Tensor, seconds: float) -> dict[str, Any]:
    """One answer from its generated ids; in a batch, rows that ended early are padded after their end token."""
    ids = new_tokens.tolist()
    eos = tokenizer.eos_token_id
    stopped = eos in ids
    if stopped:
        ids = ids[: ids.index(eos) + 1]  # the end token counts, as generate() returns it for a single question
    return {
        "answer": tokenizer.decode(ids, skip_special_tokens=True).strip(),
        "tokens": len(ids),
        "stopped_by_itself": stopped,  # end-of-turn reached before max_new_tokens
        "seconds": round(seconds, 2),
    }


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    system: str = "",
    max_new_tokens: int = 128,
    stream: bool = False,
    decoding: Decoding = GREEDY,
) -> dict[str, Any]:
    """An answer to one question (greedy unless `decoding` says otherwise); `stream=True` prints tokens as they come."""
    inputs = chat_inputs(model, tokenizer, question, system)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
        **decoding.generate_kwargs(),
    )
    return _answer(tokenizer, output[0, inputs["input_ids"].shape[1] :], time.perf_counter() - start)


@torch.inference_mode()
def generate_batch(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    systems: str | Sequence[str] = "",
    max_new_tokens: int = 128,
    decoding: Decoding = GREEDY,
    batch_size: int = 8,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Answers to many questions, `batch_size` at a time: one `generate` call per batch.

    Prompts are padded on the left, so every row's last prompt token sits at the same position and the new tokens
    follow it directly; the attention mask hides the padding, and greedy answers equal one-at-a-time answers
    (tests/test_inference.py). Questions are grouped by prompt length to keep padding small; the answers come back
    in the order of `questions`. A batched answer's `seconds` is its batch's time shared evenly.
    """
    if isinstance(systems, str):
        systems = [systems] * len(questions)
    if len(systems) != len(questions):
        raise ValueError(f"generate_batch: {len(questions)} questions but {len(systems)} system messages")
    texts = [
        tokenizer.apply_chat_template(messages(q, s), add_generation_prompt=True, tokenize=False)
        for q, s in zip(questions, systems, strict=True)
    ]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    answers: list[dict[str, Any] | None] = [None] * len(texts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=desc, disable=desc is None):
        inputs = tokenizer(
            [texts[i] for i in batch], add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        start = time.perf_counter()
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **decoding.generate_kwargs(),
        )
        seconds = (time.perf_counter() - start) / len(batch)
        width = inputs["input_ids"].shape[1]
        for row, index in enumerate(batch):
            answers[index] = _answer(tokenizer, output[row, width:], seconds)
    return answers  # type: ignore[return-value]


def compare_base_and_tuned(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    systems: str | Sequence[str],
    max_new_tokens: int,
    decoding: Decoding = GREEDY,
    batch_size: int = 8,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """For each question, the base model's answer (adapter off) and the tuned one (adapter on), batched."""
    with model.disable_adapter():
        base = generate_batch(
            model, tokenizer, questions, systems, max_new_tokens, decoding, batch_size, desc and f"{desc} (base)"
        )
    tuned = generate_batch(
        model, tokenizer, questions, systems, max_new_tokens, decoding, batch_size, desc and f"{desc} (tuned)"
    )
    return [{"question": q, "base": b, "tuned": t} for q, b, t in zip(questions, base, tuned, strict=True)]


def _yes_no(flags: Sequence[bool]) -> str:
    return " / ".join("yes" if flag else "no" for flag in flags)


def answers_table(samples: list[dict[str, Any]], limit: int | None = None):
    """Base and tuned answers side by side (with the reference where there is one), as an HTML-escaped table: for
    each model, the new tokens, whether it ended by itself (its end-of-turn token before max_new_tokens) and
    whether it loops.

    Model answers and data rows are untrusted text: a `<script>` in either must show as text, never run.
    """
    from helpers.html_tables import safe_table
    from helpers.text_measures import repeated_loop

    models = ("base", "tuned")
    rows = []
    for s in samples[:limit]:
        row = {"question": s["question"]}
        if "reference" in s:
            row["reference"] = s["reference"]
        row |= {"base": s["base"]["answer"], "tuned": s["tuned"]["answer"]}
        if all("tokens" in s[m] for m in models):
            row["tokens (base / tuned)"] = " / ".join(str(s[m]["tokens"]) for m in models)
        row["ended by itself (base / tuned)"] = _yes_no([s[m]["stopped_by_itself"] for m in models])
        row["loops (base / tuned)"] = _yes_no([repeated_loop(s[m]["answer"]) is not None for m in models])
        rows.append(row)
    return safe_table(rows)


# ---- 06: does an answer end by itself, and which decoding settings break a loop ----------------------------------


def answer_lengths(tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Tokens of each prompt-completion row's answer, its end-of-turn token included: what a tuned model learned
    to write before it stops."""
    return [len(tokenizer(row["completion"][-1]["content"], add_special_tokens=False)["input_ids"]) + 1 for row in rows]


def stopping_summary(samples: list[dict[str, Any]], lengths: Sequence[int], max_new_tokens: int) -> str:
    """Whether the 'does it end by itself' check can work with this budget, and what it found, in words: the
    training answers' lengths against `max_new_tokens`, then how many base and tuned answers ended by themselves."""
    ordered = sorted(lengths)
    median = ordered[len(ordered) // 2]
    ended = {m: sum(s[m]["stopped_by_itself"] for s in samples) for m in ("base", "tuned")}
    found = f"{ended['tuned']} of {len(samples)} tuned answers ended by themselves (base: {ended['base']})."
    training = (
        f"The training answers are {ordered[0]}-{ordered[-1]} tokens long (median {median}) and the budget, "
        f"infer.max_new_tokens, is {max_new_tokens}"
    )
    if max_new_tokens < ordered[0]:
        return (
            f"{training}: shorter than every training answer, so no answer can end by itself under this profile "
            f"and the check says nothing here. {found}"
        )
    covered = sum(length <= max_new_tokens for length in ordered)
    return f"{training}: room for {covered} of {len(ordered)} of them. {found}"


def looping_answers(answers: Sequence[dict[str, Any]]) -> list[int]:
    """Positions of the answers with a runaway loop (`text_measures.repeated_loop`), in order."""
    from helpers.text_measures import repeated_loop

    return [i for i, a in enumerate(answers) if repeated_loop(a["answer"]) is not None]


def least_distinct(answers: Sequence[dict[str, Any]], count: int) -> list[int]:
    """Positions of the `count` answers with the smallest share of distinct word pairs: the closest to a loop."""
    from helpers.text_measures import distinct_n

    return sorted(range(len(answers)), key=lambda i: distinct_n([answers[i]["answer"]], 2))[:count]


def decoding_table(decoded: dict[str, list[dict[str, Any]]]):
    """One row per decoding setting over the same questions: answers that loop, distinct word pairs, mean new
    tokens, answers that ended by themselves, and the answer to the first question (HTML-escaped)."""
    from helpers.html_tables import safe_table
    from helpers.text_measures import distinct_n, repeated_loop

    rows = []
    for answers in decoded.values():
        count = len(answers)
        loops = [repeated_loop(a["answer"]) for a in answers]
        rows.append(
            {
                "loops": f"{sum(loop is not None for loop in loops)} of {count}",
                "distinct word pairs": f"{distinct_n([a['answer'] for a in answers], 2):.0%}",
                "mean new tokens": f"{sum(a['tokens'] for a in answers) / count:.0f}",
                "ended by itself": f"{sum(a['stopped_by_itself'] for a in answers)} of {count}",
                "first answer": answers[0]["answer"],
                "its loop": loops[0] or "",
            }
        )
    import pandas as pd

    return safe_table(pd.DataFrame(rows, index=pd.Index(list(decoded), name="decoding")))
