"""Lesson 08's checks without a server: the near-tie threshold derived from the number format (held to a real
model's bf16 and f16 rounding noise), the teacher-forced comparison, the GGUF metadata rows (pre-tokenizer of the
family, BOS added as the tokenizer does, chat template present), the held-out loss bars and the merge's memory
estimate for Llama 3.1 8B."""

from __future__ import annotations

import math

import pytest
import torch

from helpers.export import MERGE_LOSS_BOUND, QUANTIZED_LOSS_BOUND, loss_table, require_loss_bars
from helpers.export_errors import QualityBarError, RoundTripError
from helpers.gguf_file import check_metadata, expected_pre_tokenizer
from helpers.merge import merge_peak_memory
from helpers.round_trip import (
    RoundTrip,
    compare_scores,
    hf_scores,
    near_tie_threshold,
    require_served,
    require_sound,
    unit_roundoff,
)

FIXED = 0.05  # the old threshold, tuned on fp32 logits


@pytest.fixture(scope="module")
def smol() -> tuple:
    from helpers.model import load_model
    from helpers.profiles import load_profile

    model, tokenizer, _ = load_model(load_profile("cpu-smoke"))
    return model.eval(), tokenizer


def test_threshold_follows_the_number_format() -> None:
    assert unit_roundoff("f16") == unit_roundoff(torch.float16) == 2.0**-11
    assert unit_roundoff(torch.bfloat16) == 8 * unit_roundoff("f16")
    assert unit_roundoff("q8_0") == pytest.approx(unit_roundoff("bf16"), rel=0.01)  # 8 bits either way
    assert unit_roundoff(torch.float32) < 1e-7
    # the coarser format decides: an fp32 merged model against f16 is f16; a bf16 merged model against f16 is bf16
    assert near_tie_threshold(29, 30, torch.float32, "f16") == pytest.approx(2 * 2**-11 * math.sqrt(30) * 29)
    assert near_tie_threshold(29, 30, torch.bfloat16, "f16") == 8 * near_tie_threshold(29, 30, torch.float32, "f16")
    with pytest.raises(KeyError, match="q4_K"):
        unit_roundoff("q4_K")


@torch.no_grad()
def _gap_moves(model: torch.nn.Module, ids: list[int], prompt: int, dtype: torch.dtype) -> list[tuple[float, float]]:
    """At each position: how far rounding the weights to `dtype` moved the gap between the fp32 top-2 tokens, and
    the derived near-tie threshold there. The weights are rounded in place and put back."""
    fp32 = hf_scores(model, ids[:prompt], ids[prompt:])
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
        rounded = hf_scores(model, ids[:prompt], ids[prompt:])
    finally:
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    layers, moves = model.config.num_hidden_layers, []
    for a, b in zip(fp32, rounded, strict=True):
        first, second = list(a["top"])[:2]
        moved = abs((a["top"][first] - a["top"][second]) - float(b["row"][first] - b["row"][second]))
        moves.append((moved, near_tie_threshold(a["scale"], layers, torch.float32, dtype)))
    return moves


def test_bf16_noise_exceeds_the_fixed_threshold_and_stays_within_the_derived_one(smol: tuple) -> None:
    """A top-2 gap that rounding moved by more than 0.05 could flip under bf16 weights: the fixed 0.05 would call
    such a flip a failure, the threshold derived from bf16 covers it (and f16's covers f16 noise)."""
    from helpers.data import load_rows, to_prompt_completion, tokenize_example

    model, tokenizer = smol
    example = tokenize_example(tokenizer, to_prompt_completion(load_rows("sample").rows[0]))
    prompt = example["labels"].index(next(x for x in example["labels"] if x != -100))
    for dtype in (torch.bfloat16, torch.float16):
        moves = _gap_moves(model, example["input_ids"], prompt, dtype)
        assert all(moved < threshold for moved, threshold in moves), dtype
    bf16 = _gap_moves(model, example["input_ids"], prompt, torch.bfloat16)
    assert max(moved for moved, _ in bf16) > FIXED  # the fixed threshold fails under bf16-level noise


def _scores(top: dict[int, float], vocab: int = 8) -> dict:
    row = torch.full((vocab,), -20.0)
    for token, value in top.items():
        row[token] = value
    return {"token": max(top, key=top.__getitem__), "logprob": max(top.values()), "top": top, "row": row,
            "scale": 30.0}  # fmt: skip


def test_compare_scores_counts_every_position_and_shows_ties(smol: tuple) -> None:
    _, tokenizer = smol
    threshold = near_tie_threshold(30.0, 30, torch.float32, "f16")  # ~0.16
    hf = [_scores({1: -0.1, 2: -3.0}), _scores({3: -0.70, 4: -0.75}), _scores({5: -0.2, 6: -2.0}),
          _scores({1: -0.5, 2: -0.9})]  # fmt: skip
    gguf = [{"token": 1, "logprob": -0.11, "top": {1: -0.11, 2: -3.0}},
            {"token": 3, "logprob": -0.76, "top": {4: -0.70, 3: -0.76}},  # a near tie: gaps 0.05 / 0.06
            {"token": 5, "logprob": -1.9, "top": {6: -0.3, 5: -1.9}},  # beyond noise
            {"token": 1, "logprob": -0.52, "top": {1: -0.52, 2: -0.8}}]  # fmt: skip
    result = compare_scores(hf, gguf, tokenizer, 30, (torch.float32, "f16"))
    assert result["positions"] == 4 and result["same_pick"] == 2  # positions after a divergence still count
    (tie,), (failure,) = result["near_ties"], result["failures"]
    assert tie["position"] == 1 and tie["near-tie threshold"] == pytest.approx(threshold, abs=1e-4)
    assert "-0.7000" in tie["merged log-probs"] and "-0.7600" in tie["GGUF log-probs"]  # both runtimes' scores
    assert failure["position"] == 2
    assert result["max_logprob_diff"] == pytest.approx(1.7) and result["max_logprob_diff_position"] == 2
    trip = RoundTrip("f16", [{"identical": False, "agreeing_tokens": 1, "tokens": 4, "teacher_forced": result}], True)
    assert trip.verdict().startswith("fail") and trip.positions == 4
    assert "quantized: reported" in RoundTrip("q8_0", trip.rows, True).verdict()
    with pytest.raises(RoundTripError, match="f16: fail: 2/4 positions"):
        require_sound({"f16": trip}, {})
    probes = [{"text": "tab\there", "same": False}]
    assert "probe texts" in RoundTrip("q8_0", trip.rows, True, probes).verdict()  # a tokenizer mismatch always fails
    served = {"prompt_tokens": 28, "prompt_ids": 27, "prompt_tokens_match": False, "teacher_forced": result}
    with pytest.raises(RoundTripError, match="28 tokens"):  # e.g. a second BOS added by the server
        require_served(served, "q8_0")


def _meta(tokenizer) -> dict:
    return {"vocabulary": "gpt2", "pre_tokenizer": "smollm",
            "tokens": tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))),
            "chat_template": tokenizer.chat_template, "bos_token_id": tokenizer.bos_token_id, "add_bos_token": False,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"), "eot_token_id": None}  # fmt: skip


@pytest.mark.parametrize(("change", "failing"), [
    ({}, set()),
    ({"pre_tokenizer": "default"}, {"pre-tokenizer"}),
    ({"pre_tokenizer": "llama-bpe"}, {"pre-tokenizer"}),  # named, but not SmolLM2's
    ({"add_bos_token": True}, {"adds BOS"}),
    ({"bos_token_id": 0}, {"BOS id"}),
    ({"chat_template": None}, {"chat template present", "chat template"}),
    ({"tokens": ["x"]}, {"token count", "token strings"}),
])  # fmt: skip
def test_metadata_rows_name_what_differs(smol: tuple, change: dict, failing: set) -> None:
    _, tokenizer = smol
    assert expected_pre_tokenizer(tokenizer) == "smollm"
    rows = check_metadata({**_meta(tokenizer), **change}, tokenizer)
    assert {r["check"] for r in rows if not r["ok"]} == failing
    assert all(isinstance(r["gguf"], str) and isinstance(r["source"], str) for r in rows)  # one type per column
    if failing:
        with pytest.raises(RoundTripError, match="metadata"):
            require_sound({}, {"q8_0": rows})


def test_llama3_tokenizer_expects_llama_bpe_and_bos_added() -> None:
    from helpers.llama_twin import build_tokenizer
    from helpers.model import adds_bos

    tokenizer = build_tokenizer()
    assert len(tokenizer) == 128256 and expected_pre_tokenizer(tokenizer) == "llama-bpe"
    assert adds_bos(tokenizer)


def test_loss_bars_stop_the_lesson() -> None:
    def summary(loss: float, four_bit: bool | None = None) -> dict:
        extra = {} if four_bit is None else {"4-bit": four_bit}
        return {"loss": loss, "perplexity": math.exp(loss), "tokens": 100, **extra}

    ok = {"merged": summary(3.0), "trained": summary(3.0001, False), "merged_vs_trained": -0.0001 / 3.0001,
          "q8_0": summary(3.02), "q8_0_minus_merged": 0.02, "q8_0_vs_merged": 0.02 / 3.0}  # fmt: skip
    require_loss_bars(ok)
    assert [r["bar"] for r in loss_table(ok)] == [f"±{MERGE_LOSS_BOUND[False]:.2%}", "", f"±{QUANTIZED_LOSS_BOUND:.2%}"]
    with pytest.raises(QualityBarError, match=r"q8_0's loss differs from the merged model's by \+1\.333%"):
        require_loss_bars({**ok, "q8_0_vs_merged": 0.04 / 3.0})
    with pytest.raises(QualityBarError, match="merged model's loss differs from the trained"):
        require_loss_bars({**ok, "merged_vs_trained": 0.01})
    # a 4-bit (NF4) trained model against the 16-bit merge: the wider bar applies
    require_loss_bars({**ok, "trained": summary(3.03, True), "merged_vs_trained": -0.01})


def test_merge_peak_memory_for_llama31_8b_fits_24gb() -> None:
    memory = merge_peak_memory("8B", r=16)
    assert memory["16-bit weights"] == pytest.approx(8.03e9 * 2 / 2**30, rel=0.01)  # 8.03 B weights x 2 bytes
    assert memory["peak"] == pytest.approx(
        memory["16-bit weights"] + max(memory["LoRA weights (fp32)"] + memory["one layer's update B·A (fp32 + cast)"],
                                       memory["loss pass logits (1 row)"]), abs=0.02)  # fmt: skip
    assert memory["peak"] < 24e9 / 2**30  # one copy fits a 24 GB card; two copies (the old deepcopy) would not
    assert 2 * memory["16-bit weights"] > 24e9 / 2**30
