"""Lesson 06: ask questions of the base and the tuned model."""

from __future__ import annotations

import time
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, TextStreamer

from helpers.backend import uses_unsloth
from helpers.profiles import Profile


def prepare_for_inference(model: PreTrainedModel, profile: Profile) -> PreTrainedModel:
    """Eval mode, and Unsloth's faster generation path on its GPU route."""
    if uses_unsloth(profile):
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    model.eval()
    return model


def chat_inputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str, system: str = ""):
    """The question (after an optional system message) in the chat template, ready for `model.generate`."""
    messages = [{"role": "user", "content": question}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    ).to(model.device)


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    system: str = "",
    max_new_tokens: int = 128,
    stream: bool = False,
) -> dict[str, Any]:
    """Greedy answer to one question; `stream=True` prints tokens as they come."""
    inputs = chat_inputs(model, tokenizer, question, system)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None,
    )
    seconds = time.perf_counter() - start
    new_tokens = output[0, inputs["input_ids"].shape[1] :]
    stopped = bool(len(new_tokens)) and int(new_tokens[-1]) == tokenizer.eos_token_id
    return {
        "answer": tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
        "tokens": len(new_tokens),
        "stopped_by_itself": stopped,  # end-of-turn reached before max_new_tokens
        "seconds": round(seconds, 2),
    }


def compare_base_and_tuned(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: list[str],
    system: str,
    max_new_tokens: int,
) -> list[dict[str, Any]]:
    """For each question, the base model's answer (adapter off) and the tuned one (adapter on)."""
    rows = []
    for question in questions:
        with model.disable_adapter():
            base = generate(model, tokenizer, question, system, max_new_tokens)
        tuned = generate(model, tokenizer, question, system, max_new_tokens)
        rows.append({"question": question, "base": base, "tuned": tuned})
    return rows
