"""Lesson 08, step 3: does the GGUF answer like the merged model? Scored in llama.cpp (the runtime we serve with)
and in transformers, token by token, at every position.

Comparing greedy answers stops at the first near tie: after one flipped token the two answers go separate ways and
nothing after it is compared. Teacher forcing does not stop: the merged model's greedy tokens are fed to both
runtimes, and at every position each says which token it would pick and with what log-probability. Every position
must pick the same token, or be a near tie (both runtimes' scores for both tokens shown). The largest difference of
the log-probability of the scored token is reported too.

A near tie is a top-2 gap smaller than the rounding noise of the number formats involved (`near_tie_threshold`), so
the tolerance follows from the dtype rather than from a number tuned on one model: fp32 logits barely move, bf16
and q8_0 move them ~8x more than f16.

transformers' own GGUF loader is no oracle for this (it rebuilds some tokenizers wrongly): a GGUF that loads but
tokenizes differently, lost its chat template or never stops only shows when the exported file runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from helpers.chat import messages, prompt_ids
from helpers.export_errors import RoundTripError
from helpers.model import end_of_turn_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# How many of the best tokens llama.cpp reports at each position (its full softmax, before sampling).
TOP = 10

# Unit roundoff: the largest relative error of storing a number in each format. f32 keeps 24 significant bits, f16
# 11, bf16 8; q8_0 rounds each weight to one of 255 steps of its block's largest magnitude / 127, so half a step is
# 1/254 of the block's largest weight: about bf16's precision. llama.cpp also rounds the activations to the weight
# format's partner type in its CPU matrix products (f16 with f16 weights, q8_0 with q8_0).
UNIT_ROUNDOFF = {"f32": 2.0**-24, "f16": 2.0**-11, "bf16": 2.0**-8, "q8_0": 1 / 254}
_TORCH_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def unit_roundoff(kind: str | torch.dtype) -> float:
    """The unit roundoff of a GGUF type (`f16`, `q8_0`, ...) or a torch dtype."""
    name = _TORCH_NAMES.get(kind, kind) if isinstance(kind, torch.dtype) else kind
    if name not in UNIT_ROUNDOFF:
        raise KeyError(f"No unit roundoff for {kind!r}: known are {', '.join(UNIT_ROUNDOFF)} and torch float dtypes.")
    return UNIT_ROUNDOFF[name]


def logit_noise(max_abs_logit: float, layers: int, *kinds: str | torch.dtype) -> float:
    """How far rounding can move one logit: each weight off by up to u (the coarsest format's unit roundoff), the
    errors adding up like a random walk over the layers (sqrt(layers)), relative to the logit's scale.
    Measured on SmolLM2-135M (30 layers, |logit| <= 46): f16 weights move log-probabilities by <= 0.05 (bound 0.08
    at |logit| 29), bf16 weights by <= 0.44 (bound 0.62); tests/test_round_trip.py holds the bound to a model."""
    u = max(unit_roundoff(k) for k in kinds)
    return u * math.sqrt(layers) * max_abs_logit


def near_tie_threshold(max_abs_logit: float, layers: int, *kinds: str | torch.dtype) -> float:
    """A flipped token is a near tie when the two candidates' gap is below twice the noise: each may move by it."""
    return 2 * logit_noise(max_abs_logit, layers, *kinds)


@torch.inference_mode()
def hf_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int) -> dict:
    """Greedy tokens (without the stop token), stopping at end of turn; `stopped` says whether it stopped."""
    stops = end_of_turn_ids(tokenizer)
    start = time.perf_counter()
    out = model.generate(
        input_ids=torch.tensor([ids], device=model.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
        device=model.device), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = out[0, len(ids) :].tolist()
    stopped = bool(tokens) and tokens[-1] in stops
    return {"tokens": tokens[:-1] if stopped else tokens, "stopped": stopped, "seconds": seconds,
            "stop_token": tokens[-1] if stopped else None}  # fmt: skip


def scored_tokens(reference: dict) -> list[int]:
    """The tokens a round trip scores: the answer, and its stop token when it stopped (both runtimes must stop)."""
    return [*reference["tokens"], *([reference["stop_token"]] if reference.get("stop_token") is not None else [])]


@torch.inference_mode()
def hf_scores(model: PreTrainedModel, prompt: list[int], tokens: list[int], top: int = TOP) -> list[dict[str, Any]]:
    """Teacher-forced in transformers: at each answer position, the scored token's log-probability, the `top` best
    tokens with theirs, and the largest |logit| there (the scale of the rounding noise). One forward pass."""
    if not tokens:
        return []
    ids = torch.tensor([prompt + tokens], device=model.device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    best = torch.topk(logprobs, min(top, logprobs.shape[-1]), dim=-1)
    return [
        {"token": token, "logprob": float(logprobs[i, token]), "scale": float(logits[i].abs().max()),
         "top": dict(zip(best.indices[i].tolist(), best.values[i].tolist(), strict=True)),
         "row": logprobs[i]}  # the full row: the other runtime's pick is looked up in it
        for i, token in enumerate(tokens)
    ]  # fmt: skip


def llama_scores(server: Any, prompt: list[int], tokens: list[int], top: int = TOP) -> list[dict[str, Any]]:
    """Teacher-forced in llama.cpp: the prompt ids are sent and llama.cpp generates greedily with its `top` best
    log-probabilities per position (the full softmax, before sampling). While it picks the expected tokens one
    request scores them all; where it picks another, the next request resumes after the expected token (the
    server's prompt cache keeps the prefix), so every position is scored on the expected prefix."""
    scores: list[dict[str, Any]] = []
    while len(scores) < len(tokens):
        start = len(scores)
        reply = server.post("/completion", {
            "prompt": prompt + tokens[:start], "n_predict": len(tokens) - start, "n_probs": top,
            "temperature": 0.0, "cache_prompt": True, "post_sampling_probs": False,
        })  # fmt: skip
        generated = reply["completion_probabilities"]
        if not generated:
            raise RuntimeError(f"llama.cpp returned no token at position {start} of the teacher-forced answer")
        for step in generated:
            token = tokens[len(scores)]
            best = {p["id"]: p["logprob"] for p in step["top_logprobs"]}
            scores.append({"token": token, "logprob": best.get(token), "top": best})
            if step["id"] != token or len(scores) == len(tokens):
                break  # llama.cpp went its own way: ask again from the expected prefix
    return scores


def chat_scores(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """llama.cpp's scores of its own served answer, from a chat reply asked with `logprobs` and `top_logprobs`."""
    content = (reply["choices"][0].get("logprobs") or {}).get("content") or []
    return [{"token": c["id"], "logprob": c["logprob"], "top": {p["id"]: p["logprob"] for p in c["top_logprobs"]}}
            for c in content]  # fmt: skip


def _pick(top: dict[int, float]) -> int:
    return max(top, key=lambda t: top[t])


def compare_scores(hf: list[dict], gguf: list[dict], tokenizer: PreTrainedTokenizerBase, layers: int,
                   kinds: tuple[str | torch.dtype, ...]) -> dict[str, Any]:  # fmt: skip
    """Every position: the same pick in both runtimes, or a near tie (the gap between the two picks below
    `near_tie_threshold` in both runtimes), with both runtimes' scores for both tokens. Anything else fails."""

    def text(token: int) -> str:
        return tokenizer.decode([token])

    near_ties: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    diffs: list[float] = []
    for pos, (a, b) in enumerate(zip(hf, gguf, strict=True)):
        got = b["logprob"]
        diffs.append(math.inf if got is None else abs(a["logprob"] - got))
        pick_hf, pick_gguf = _pick(a["top"]), _pick(b["top"])
        if pick_hf == pick_gguf:
            continue
        threshold = near_tie_threshold(a["scale"], layers, *kinds)
        gap_hf = a["top"][pick_hf] - float(a["row"][pick_gguf]) if "row" in a else math.inf
        gap_gguf = b["top"][pick_gguf] - b["top"].get(pick_hf, -math.inf)
        shown = {"position": pos, "merged picks": text(pick_hf), "GGUF picks": text(pick_gguf),
                 "merged log-probs": f"{text(pick_hf)!r} {a['top'][pick_hf]:.4f}, {text(pick_gguf)!r} "
                                     f"{float(a['row'][pick_gguf]) if 'row' in a else float('nan'):.4f}",
                 "GGUF log-probs": f"{text(pick_gguf)!r} {b['top'][pick_gguf]:.4f}, {text(pick_hf)!r} "
                                   f"{b['top'].get(pick_hf, float('-inf')):.4f}",
                 "gaps": f"{gap_hf:.4f} / {gap_gguf:.4f}", "near-tie threshold": round(threshold, 4)}  # fmt: skip
        (near_ties if max(gap_hf, gap_gguf) < threshold else failures).append(shown)
    worst = max(range(len(diffs)), key=diffs.__getitem__) if diffs else None
    return {"positions": len(hf), "same_pick": len(hf) - len(near_ties) - len(failures), "near_ties": near_ties,
            "failures": failures, "max_logprob_diff": None if worst is None else diffs[worst],
            "max_logprob_diff_position": worst}  # fmt: skip


@dataclass
class RoundTrip:
    gguf_type: str
    rows: list[dict[str, Any]]
    prompt_tokens_match: bool
    probes: list[dict[str, Any]] = field(default_factory=list)  # texts tokenized by llama.cpp and by transformers

    @property
    def identical(self) -> int:
        return sum(r["identical"] for r in self.rows)

    @property
    def agreement(self) -> float:
        """Greedy answers: tokens up to the first difference, over all tokens (stops at the first near tie)."""
        return sum(r["agreeing_tokens"] for r in self.rows) / max(sum(r["tokens"] for r in self.rows), 1)

    def _scored(self) -> list[dict[str, Any]]:
        return [r["teacher_forced"] for r in self.rows if r.get("teacher_forced")]

    @property
    def positions(self) -> int:
        return sum(t["positions"] for t in self._scored())

    @property
    def same_pick(self) -> int:
        return sum(t["same_pick"] for t in self._scored())

    @property
    def near_ties(self) -> list[dict[str, Any]]:
        return [tie for t in self._scored() for tie in t["near_ties"]]

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [f for t in self._scored() for f in t["failures"]]

    @property
    def max_logprob_diff(self) -> float | None:
        diffs = [t["max_logprob_diff"] for t in self._scored() if t["max_logprob_diff"] is not None]
        return max(diffs) if diffs else None

    @property
    def probes_match(self) -> bool:
        return all(p["same"] for p in self.probes)

    @property
    def quantized(self) -> bool:
        return self.gguf_type not in ("f16", "bf16", "f32")

    def verdict(self) -> str:
        """f16: every position the same pick or a near tie within the dtype's rounding noise. Quantized files are
        lossy on purpose: their positions are reported here, and their bar is the held-out answer loss."""
        if not self.prompt_tokens_match:
            return "fail: llama.cpp tokenizes the prompt differently"
        if not self.probes_match:
            bad = [p["text"][:30] for p in self.probes if not p["same"]]
            return f"fail: llama.cpp tokenizes probe texts differently ({bad})"
        where = (f"{self.same_pick}/{self.positions} positions pick the same token, {len(self.near_ties)} near "
                 f"tie(s)")  # fmt: skip
        if not self.failures:
            return f"ok: {where}"
        if self.quantized:
            return f"{where}, {len(self.failures)} beyond rounding noise (quantized: reported; its bar is the loss)"
        return f"fail: {where}, {len(self.failures)} beyond rounding noise"

    def summary(self) -> dict[str, Any]:
        diff = self.max_logprob_diff
        return {"type": self.gguf_type, "questions": len(self.rows), "identical": self.identical,
                "token_agreement": round(self.agreement, 4), "prompt_tokens_match": self.prompt_tokens_match,
                "positions_compared": self.positions, "positions_same_pick": self.same_pick,
                "near_ties": len(self.near_ties), "beyond_noise": len(self.failures),
                "max_logprob_diff": None if diff is None else round(diff, 4),
                "probe_texts_match": self.probes_match}  # fmt: skip


def compare_greedy(reference: dict, candidate: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Greedy answers side by side: identical or not, and the agreeing prefix (shown; the proof is teacher-forced)."""
    ref, got = reference["tokens"], candidate["tokens"]
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    identical = ref == got and reference["stopped"] == candidate["stopped"]
    return {"identical": identical, "agreeing_tokens": prefix, "tokens": max(len(ref), len(got), 1),
            "agreement": prefix / max(len(ref), len(got), 1), "merged_answer": tokenizer.decode(ref),
            "gguf_answer": tokenizer.decode(got)}  # fmt: skip


def tokenize_in_llama(server: Any, text: str, add_special: bool) -> list[int]:
    """llama.cpp's tokenizer (the GGUF's vocabulary and pre-tokenizer), special tokens parsed."""
    body = {"content": text, "add_special": add_special, "parse_special": True}
    return server.post("/tokenize", body)["tokens"]


def probe_tokenization(server: Any, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[dict[str, Any]]:
    """Each text tokenized by llama.cpp and by transformers, without and with special tokens (BOS when the
    tokenizer adds one): the same ids, or the check fails."""
    rows = []
    for text in texts:
        plain = tokenize_in_llama(server, text, False) == tokenizer(text, add_special_tokens=False)["input_ids"]
        special_ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        special = tokenize_in_llama(server, text, True) == special_ids
        rows.append({"text": text, "tokens": len(special_ids), "same": plain and special,
                     "same without specials": plain, "same with specials": special})  # fmt: skip
    return rows


def round_trip(server: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str],
               system: str, max_new_tokens: int, gguf_type: str, references: list[dict] | None = None,
               probe_texts: list[str] | None = None) -> tuple[RoundTrip, list[dict]]:  # fmt: skip
    """Each question's greedy answer from the merged model, scored teacher-forced in both runtimes at every
    position; the GGUF's own greedy answer beside it. The prompt also goes to llama.cpp as text, so its own
    tokenizer and the GGUF vocabulary are tested; `probe_texts` (tabs, unicode) are tokenized by both."""
    references = references or [hf_greedy(model, tokenizer, prompt_ids(tokenizer, q, system), max_new_tokens)
                                for q in questions]  # fmt: skip
    layers, kinds = model.config.num_hidden_layers, (model.dtype, gguf_type)
    stops = end_of_turn_ids(tokenizer)
    rows, prompts_match = [], True
    for question, reference in zip(questions, references, strict=True):
        ids = prompt_ids(tokenizer, question, system)
        prompts_match &= tokenize_in_llama(server, tokenizer.decode(ids), False) == ids
        tokens = scored_tokens(reference)
        forced = compare_scores(hf_scores(model, ids, tokens), llama_scores(server, ids, tokens), tokenizer,
                                layers, kinds)  # fmt: skip
        candidate = server.greedy(tokenizer.decode(ids), max_new_tokens, stops=stops)
        rows.append({"question": question, **compare_greedy(reference, candidate, tokenizer),
                     "teacher_forced": forced})  # fmt: skip
    probes = probe_tokenization(server, tokenizer, probe_texts or [])
    return RoundTrip(gguf_type, rows, prompts_match, probes), references


def served_check(server: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, question: str,
                 system: str, max_tokens: int, gguf_type: str, reference: dict) -> dict[str, Any]:  # fmt: skip
    """The chat route as a client uses it: the server applies the GGUF's chat template itself. Its prompt must be
    the prompt's ids (usage.prompt_tokens), and its answer's tokens, with llama.cpp's own scores from the reply,
    are scored teacher-forced by the merged model at every position."""
    ids = prompt_ids(tokenizer, question, system)
    body = {"messages": messages(question, system), "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": True, "top_logprobs": TOP}  # fmt: skip
    reply = server.post("/v1/chat/completions", body)
    gguf = chat_scores(reply)
    tokens = [s["token"] for s in gguf]
    forced = compare_scores(hf_scores(model, ids, tokens), gguf, tokenizer, model.config.num_hidden_layers,
                            (model.dtype, gguf_type))  # fmt: skip
    answer = reply["choices"][0]["message"]["content"]
    return {"served_answer": answer, "merged_answer": tokenizer.decode(reference["tokens"]),
            "prompt_tokens": reply["usage"]["prompt_tokens"], "prompt_ids": len(ids),
            "prompt_tokens_match": reply["usage"]["prompt_tokens"] == len(ids),
            "served_equals_merged": tokens == reference["tokens"], "teacher_forced": forced}  # fmt: skip


def served_verdict(served: dict[str, Any], gguf_type: str) -> str:
    forced = served["teacher_forced"]
    where = (f"{forced['same_pick']}/{forced['positions']} positions pick the same token, "
             f"{len(forced['near_ties'])} near tie(s)")  # fmt: skip
    if not served["prompt_tokens_match"]:
        return f"fail: the server's prompt has {served['prompt_tokens']} tokens, the chat template gives " \
               f"{served['prompt_ids']}"  # fmt: skip
    if not forced["failures"]:
        return f"ok: {where}"
    if gguf_type not in ("f16", "bf16", "f32"):
        return f"{where}, {len(forced['failures'])} beyond rounding noise (quantized: reported; its bar is the loss)"
    return f"fail: {where}, {len(forced['failures'])} beyond rounding noise"


def require_sound(trips: dict[str, RoundTrip], metadata: dict[str, list[dict[str, Any]]]) -> None:
    """Stop here (before anything is served as the result, saved or published) when a GGUF failed a check."""
    problems = [f"{t}: metadata {r['check']} is {r['gguf']!r}, expected {r['source']!r}"
                for t, rows in metadata.items() for r in rows if not r["ok"]]  # fmt: skip
    problems += [f"{t}: {trip.verdict()}" for t, trip in trips.items() if trip.verdict().startswith("fail")]
    if problems:
        raise RoundTripError("The exported GGUF does not answer like the merged model, so it is neither served, "
                             "saved as this step's result nor published:\n  " + "\n  ".join(problems))  # fmt: skip


def require_served(served: dict[str, Any], gguf_type: str) -> None:
    """Stop before saving and publishing when the served route's prompt or answer fails its check."""
    verdict = served_verdict(served, gguf_type)
    if verdict.startswith("fail"):
        raise RoundTripError(f"The served {gguf_type} route {verdict[6:]}: nothing is saved or published.")
