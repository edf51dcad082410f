"""Lesson 08, step 3: does the GGUF answer like the merged model? Greedy answers in transformers and in llama.cpp
(the runtime we serve with), compared token for token, with both models' scores where they part.

transformers' own GGUF loader is no oracle for this (it rebuilds some tokenizers wrongly): a GGUF that loads but
tokenizes differently, lost its chat template or never stops only shows when the exported file runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from helpers.chat import prompt_ids
from helpers.export_errors import RoundTripError
from helpers.model import end_of_turn_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.inference_mode()
def hf_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int) -> dict:
    """Greedy tokens with the two best logits at each step (to show near ties), stopping at end of turn."""
    stops = end_of_turn_ids(tokenizer)
    start = time.perf_counter()
    out = model.generate(
        input_ids=torch.tensor([ids], device=model.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
        device=model.device), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = out.sequences[0, len(ids) :].tolist()
    top = [torch.topk(step[0].float(), 2) for step in out.logits]
    stopped = bool(tokens) and tokens[-1] in stops
    return {"tokens": tokens[:-1] if stopped else tokens, "stopped": stopped, "seconds": seconds,
            "top2": [[(int(i), float(v)) for i, v in zip(t.indices, t.values, strict=True)] for t in top]}  # fmt: skip


def _divergence(reference: dict, candidate: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    ref, got = reference["tokens"], candidate["tokens"]
    for pos in range(max(len(ref), len(got))):
        a = ref[pos] if pos < len(ref) else None
        b = got[pos] if pos < len(got) else None
        if a != b:
            top2 = reference["top2"][pos] if pos < len(reference["top2"]) else []
            logits = dict(top2)
            gap = top2[0][1] - top2[1][1] if len(top2) == 2 else None
            gguf_top = candidate.get("top_logprobs", [])
            return {"position": pos, "merged_token": None if a is None else tokenizer.decode([a]),
                    "gguf_token": None if b is None else tokenizer.decode([b]),
                    "merged_logits": {tokenizer.decode([i]): round(v, 4) for i, v in logits.items()},
                    "merged_top2_gap": None if gap is None else round(gap, 4),
                    "gguf_logprobs": gguf_top[pos] if pos < len(gguf_top) else None}  # fmt: skip
    return None


def compare_greedy(reference: dict, candidate: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Token-for-token comparison; the first divergence with both models' scores for the tokens involved."""
    ref, got = reference["tokens"], candidate["tokens"]
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    identical = ref == got and reference["stopped"] == candidate["stopped"]
    return {"identical": identical, "agreeing_tokens": prefix, "tokens": max(len(ref), len(got), 1),
            "agreement": prefix / max(len(ref), len(got), 1), "merged_answer": tokenizer.decode(ref),
            "gguf_answer": tokenizer.decode(got), "divergence": None if identical else _divergence(
                reference, candidate, tokenizer)}  # fmt: skip


@dataclass
class RoundTrip:
    gguf_type: str
    rows: list[dict[str, Any]]
    prompt_tokens_match: bool

    @property
    def identical(self) -> int:
        return sum(r["identical"] for r in self.rows)

    @property
    def agreement(self) -> float:
        return sum(r["agreeing_tokens"] for r in self.rows) / sum(r["tokens"] for r in self.rows)

    def verdict(self, near_tie: float) -> str:
        """f16: identical, or every difference starts at a shown near tie (top-2 logit gap below `near_tie`).
        Quantized files are lossy on purpose: their agreement is reported, not required."""
        if not self.prompt_tokens_match:
            return "fail: llama.cpp tokenizes the prompt differently"
        ties = [r["divergence"] for r in self.rows if not r["identical"]]
        if not ties:
            return "identical"
        if self.gguf_type not in ("f16", "bf16", "f32"):
            return (f"{self.identical}/{len(self.rows)} identical, token agreement {self.agreement:.2f} "
                    "(quantized: reported, not required)")  # fmt: skip
        gaps = [d["merged_top2_gap"] for d in ties]
        if all(g is not None and g < near_tie for g in gaps):
            return f"{len(ties)} near tie(s) flipped (top-2 logit gap {max(gaps):.3f} < {near_tie})"
        return "fail: answers differ beyond a near tie"

    def summary(self) -> dict[str, Any]:
        return {"type": self.gguf_type, "questions": len(self.rows), "identical": self.identical,
                "token_agreement": round(self.agreement, 4),
                "prompt_tokens_match": self.prompt_tokens_match}  # fmt: skip


def round_trip(server: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str],
               system: str, max_new_tokens: int, gguf_type: str,
               references: list[dict] | None = None) -> tuple[RoundTrip, list[dict]]:  # fmt: skip
    """Each question's greedy answer from the merged model and from the served GGUF, compared token for token.
    The prompt goes to llama.cpp as text, so its own tokenizer and the GGUF vocabulary are tested too."""
    references = references or [hf_greedy(model, tokenizer, prompt_ids(tokenizer, q, system), max_new_tokens)
                                for q in questions]  # fmt: skip
    rows, prompts_match = [], True
    for question, reference in zip(questions, references, strict=True):
        ids = prompt_ids(tokenizer, question, system)
        text = tokenizer.decode(ids)
        prompts_match &= server.tokenize(text) == ids
        candidate = server.greedy(text, max_new_tokens, stops=end_of_turn_ids(tokenizer))
        rows.append({"question": question, **compare_greedy(reference, candidate, tokenizer)})
    return RoundTrip(gguf_type, rows, prompts_match), references


def require_sound(trips: dict[str, RoundTrip], metadata: dict[str, list[dict[str, Any]]], near_tie: float) -> None:
    """Stop here (before anything is served as the result, saved or published) when a GGUF failed a check."""
    problems = [f"{t}: metadata {r['check']} is {r['gguf']!r}, expected {r['source']!r}"
                for t, rows in metadata.items() for r in rows if not r["ok"]]  # fmt: skip
    problems += [
        f"{t}: {trip.verdict(near_tie)}" for t, trip in trips.items() if trip.verdict(near_tie).startswith("fail")
    ]
    if problems:
        raise RoundTripError("The exported GGUF does not answer like the merged model, so it is neither saved as this "
                             "step's result nor published:\n  " + "\n  ".join(problems))  # fmt: skip
