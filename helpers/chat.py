"""The chat messages of one question: built here only, so training rows, the notebook's answers, the exported
model's checks, the served requests and the Modelfile test all put the same turns in the same order."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def messages(question: str, system: str = "", answer: str | None = None) -> list[dict[str, str]]:
    """[system], user, [assistant]: the system message only when there is one, the answer only when given."""
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": question})
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return turns


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, system: str = "") -> list[int]:
    """The question in the chat template, up to where the model starts its answer."""
    rendered = tokenizer.apply_chat_template(
        messages(question, system), add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(rendered["input_ids"])
