"""Lesson 08 in a few calls: convert, prove, measure and report, over the modules that do each job.

merge.py folds the adapter into the base; gguf_converter.py runs llama.cpp's converter; gguf_file.py reads a GGUF's
header and weights back; round_trip.py compares greedy answers in transformers and llama.cpp; ollama.py writes the
Modelfile. The notebook shows each step; the loops, tables and the report are built here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from helpers.export_errors import QualityBarError
from helpers.gguf_converter import convert_to_gguf
from helpers.gguf_file import check_metadata, gguf_metadata, load_gguf_weights, restore_weights
from helpers.round_trip import RoundTrip, round_trip
from helpers.serve import LlamaServer, served_speed
from helpers.steps import export_log, gguf_path, load_splits, merged_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from helpers.profiles import Profile
    from helpers.runfolder import RunFolder

# Texts whose tokens must survive every save and conversion: newlines, tabs, runs of spaces, accents, a character
# outside the Basic Multilingual Plane, and markup.
PROBE_TEXTS = ["Line one\nline two:\t  spaces, émigré, 𝛑, <b>html</b>"]


def probe_texts(profile: Profile) -> list[str]:
    return [*profile.infer.questions, *PROBE_TEXTS]


def convert_all(run: RunFolder, tokenizer: PreTrainedTokenizerBase, gguf_types: list[str]) -> tuple[dict, dict]:
    """Each GGUF type from the merged model, with its header checked against the source tokenizer."""
    conversions, checks = {}, {}
    for gguf_type in tqdm(gguf_types, desc="GGUF"):
        out, log = gguf_path(run, gguf_type), export_log(run, f"convert-{gguf_type}")
        conversions[gguf_type] = convert_to_gguf(merged_dir(run), out, gguf_type, log)
        checks[gguf_type] = check_metadata(gguf_metadata(out), tokenizer)
    return conversions, checks


# The bars a GGUF and the merged model must meet, relative to the held-out answer loss (what 07 measured):
# q8_0 keeps ~8 bits per weight, so its loss may move by at most 1%; the merged model is the trained one folded
# together, so it may differ only by float rounding, or, when 05 trained on a 4-bit (NF4) base, by what the 16-bit
# base differs from the 4-bit one under the same adapter (QLoRA's own comparison: within a few %).
QUANTIZED_LOSS_BOUND = 0.01
MERGE_LOSS_BOUND = {False: 1e-4, True: 0.05}
LOSS_BATCH = 1  # the loss passes of 08 run one row at a time (the merge's peak memory estimate counts on it)


def round_trips(run: RunFolder, merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                profile: Profile) -> tuple[dict[str, RoundTrip], list[dict]]:  # fmt: skip
    """Every GGUF served by llama.cpp in turn: the merged model's greedy answers scored in both at every
    position, the GGUF's own answers, and the probe texts through llama.cpp's tokenizer."""
    settings = profile.export
    trips: dict[str, RoundTrip] = {}
    references: list[dict] | None = None
    for gguf_type in settings.gguf_types:
        with LlamaServer(gguf_path(run, gguf_type), log_file=export_log(run, f"server-{gguf_type}")) as server:
            trips[gguf_type], references = round_trip(
                server, merged, tokenizer, profile.infer.questions, profile.infer.system_prompt,
                settings.max_new_tokens, gguf_type, references, probe_texts(profile),
            )  # fmt: skip
        print(f"{gguf_type}: {trips[gguf_type].verdict()}; server stopped: {not server.running}")
    return trips, references or []


def round_trip_table(trips: dict[str, RoundTrip]) -> list[dict[str, Any]]:
    """One row per file: positions compared (all of them), the same pick, near ties, the largest log-prob gap."""
    return [
        {"file": t, "questions": len(trip.rows), "positions compared": trip.positions,
         "same pick": trip.same_pick, "near ties": len(trip.near_ties), "beyond noise": len(trip.failures),
         "largest log-prob difference": _fmt(trip.max_logprob_diff), "prompt ids equal": trip.prompt_tokens_match,
         "probe texts equal": trip.probes_match, "greedy answers identical": f"{trip.identical}/{len(trip.rows)}"}
        for t, trip in trips.items()
    ]  # fmt: skip


def round_trip_rows(trips: dict[str, RoundTrip]) -> list[dict[str, Any]]:
    """One row per file and question: both greedy answers and the teacher-forced result (every position)."""
    return [
        {"file": t, "question": r["question"], "merged model": r["merged_answer"],
         "GGUF in llama.cpp": r["gguf_answer"], "greedy identical": r["identical"],
         "positions (same pick)": f"{r['teacher_forced']['positions']} ({r['teacher_forced']['same_pick']})",
         "largest log-prob difference": _fmt(r["teacher_forced"]["max_logprob_diff"])}
        for t, trip in trips.items() for r in trip.rows
    ]  # fmt: skip


def tie_rows(trips: dict[str, RoundTrip]) -> list[dict[str, Any]]:
    """Every position where the two runtimes pick different tokens, with both runtimes' scores for both."""
    kinds = lambda trip: (("near tie", trip.near_ties), ("beyond noise", trip.failures))  # noqa: E731
    return [{"file": t, "kind": kind, **row} for t, trip in trips.items() for kind, rows in kinds(trip) for row in rows]


def probe_rows(trips: dict[str, RoundTrip]) -> list[dict[str, Any]]:
    return [{"file": t, **p} for t, trip in trips.items() for p in trip.probes]


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def loss_rows(run: RunFolder, profile: Profile) -> list[dict]:
    return list(load_splits(run)["eval"])[: profile.export.loss_rows]


def trained_loss(run: RunFolder, profile: Profile) -> dict[str, Any]:
    """Held-out answer loss of the model 05-07 trained and evaluated: the base loaded as the profile loads it (NF4
    on the GPU profiles) with 05's adapter on top. Measured and freed before the merge loads its own copy."""
    import gc

    from helpers.evaluation import answer_losses, summarise_losses
    from helpers.steps import load_tuned

    model, tokenizer, _ = load_tuned(run, profile)
    result = summarise_losses(answer_losses(model, tokenizer, loss_rows(run, profile), LOSS_BATCH))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {**result, "4-bit": bool(profile.model.load_in_4bit)}


def gguf_losses(run: RunFolder, merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, profile: Profile,
                trained: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Held-out answer loss of the trained model (when given), the merged model and each quantized file's weights,
    loaded strictly into the same model in place and then restored from the saved merged folder: one copy of the
    model in memory at any time. Each difference is relative to the merged model's loss."""
    from helpers.evaluation import answer_losses, summarise_losses

    rows = loss_rows(run, profile)
    loss: dict[str, Any] = {"merged": summarise_losses(answer_losses(merged, tokenizer, rows, LOSS_BATCH))}
    if trained is not None:
        loss["trained"] = trained
        loss["merged_vs_trained"] = (loss["merged"]["loss"] - trained["loss"]) / trained["loss"]
    for gguf_type in [t for t in profile.export.gguf_types if t not in ("f16", "bf16", "f32")]:
        try:
            load_gguf_weights(merged, gguf_path(run, gguf_type))
            loss[gguf_type] = summarise_losses(answer_losses(merged, tokenizer, rows, LOSS_BATCH))
        finally:
            restore_weights(merged, merged_dir(run))
        loss[f"{gguf_type}_minus_merged"] = loss[gguf_type]["loss"] - loss["merged"]["loss"]
        loss[f"{gguf_type}_vs_merged"] = loss[f"{gguf_type}_minus_merged"] / loss["merged"]["loss"]
    return loss


def loss_table(loss: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out answer losses side by side, each with its change against the merged model and its bar."""
    names = {"trained": "trained (as 05-07 measured: base + adapter)", "merged": "merged (what 08 ships)"}
    rows = []
    order = [k for k in ("trained", "merged") if k in loss] + [k for k in loss if k not in ("trained", "merged")]
    for key in order:
        value = loss[key]
        if not isinstance(value, dict):
            continue
        change = loss.get(f"{key}_vs_merged")
        if key == "trained":
            change = -loss["merged_vs_trained"] / (1 + loss["merged_vs_trained"])
        bar = {"trained": MERGE_LOSS_BOUND[bool(value.get("4-bit"))], "merged": None}.get(key, QUANTIZED_LOSS_BOUND)
        rows.append({"model": names.get(key, f"{key} GGUF weights"), "loss": f"{value['loss']:.4f}",
                     "perplexity": f"{value['perplexity']:.2f}", "answer tokens": value["tokens"],
                     "change vs merged": "" if change is None else f"{change:+.4%}",
                     "bar": "" if bar is None else f"±{bar:.2%}"})  # fmt: skip
    return rows


def require_loss_bars(loss: dict[str, Any]) -> None:
    """Stop before anything is served, saved or published when the merged model or a quantized file misses its
    held-out loss bar."""
    problems = []
    if "merged_vs_trained" in loss:
        bound = MERGE_LOSS_BOUND[bool(loss["trained"].get("4-bit"))]
        if abs(loss["merged_vs_trained"]) > bound:
            problems.append(f"the merged model's loss differs from the trained model's by "
                            f"{loss['merged_vs_trained']:+.3%} (bar ±{bound:.2%})")  # fmt: skip
    for key in [k for k in loss if k.endswith("_vs_merged")]:
        if abs(loss[key]) > QUANTIZED_LOSS_BOUND:
            problems.append(f"{key.removesuffix('_vs_merged')}'s loss differs from the merged model's by "
                            f"{loss[key]:+.3%} (bar ±{QUANTIZED_LOSS_BOUND:.0%})")  # fmt: skip
    if problems:
        raise QualityBarError("Held-out answer loss outside its bar, so nothing is served, saved or published:\n  "
                              + "\n  ".join(problems))  # fmt: skip


def speeds(server: LlamaServer, references: list[dict], profile: Profile) -> dict[str, float]:
    """Generated tokens per second: transformers' greedy answers of the round trip, then the server with one
    stream and with `export.concurrency` streams."""
    settings, questions, system = profile.export, profile.infer.questions, profile.infer.system_prompt
    tokens = sum(len(r["tokens"]) + r["stopped"] for r in references)
    speed = {"transformers generate (merged, 1 stream)": round(tokens / sum(r["seconds"] for r in references), 1)}
    for streams in dict.fromkeys((1, settings.concurrency)):
        label = f"llama.cpp {settings.serve}, {streams} stream{'s' if streams > 1 else ''}"
        speed[label] = served_speed(server, questions, system, settings.max_new_tokens, streams)["tokens_per_second"]
    return speed


def build_report(profile: Profile, sizes: dict[str, int], conversions: dict, metadata_checks: dict,
                 trips: dict[str, RoundTrip], loss: dict[str, Any], served: dict[str, Any],
                 speed: dict[str, float], merge_memory: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """export.json: everything 08 measured; its `headline` becomes the step's manifest."""
    one_stream = speed[f"llama.cpp {profile.export.serve}, 1 stream"]
    speedup = one_stream / speed["transformers generate (merged, 1 stream)"]
    forced = served.get("teacher_forced") or {}
    return {
        "gguf": profile.export.gguf_types,
        "sizes_bytes": sizes,
        "conversions": conversions,
        "metadata_checks": metadata_checks,
        "round_trip": [{**trip.summary(), "verdict": trip.verdict(), "rows": trip.rows, "probes": trip.probes}
                       for trip in trips.values()],  # fmt: skip
        "loss": loss,
        "served": {"file": profile.export.serve, **served},
        "speed_tokens_per_second": speed,
        "merge_peak_memory_gib_llama31_8b": merge_memory,
        "headline": {
            "sizes_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
            "round_trip": {
                t: f"{trip.identical}/{len(trip.rows)} identical, agreement {trip.agreement:.3f}"
                for t, trip in trips.items()
            },  # fmt: skip
            "teacher_forced": {t: {k: trip.summary()[k] for k in ("positions_compared", "positions_same_pick",
                                   "near_ties", "beyond_noise", "max_logprob_diff")} for t, trip in trips.items()},
            "q8_0_loss_delta": _round(loss.get("q8_0_minus_merged")),
            "q8_0_loss_change": _round(loss.get("q8_0_vs_merged")),
            "q8_0_loss_bar": QUANTIZED_LOSS_BOUND,
            "merged_vs_trained_loss_change": _round(loss.get("merged_vs_trained")),
            "served_equals_merged": served.get("served_equals_merged"),
            "served_prompt_tokens_match": served.get("prompt_tokens_match"),
            "served_positions_compared": forced.get("positions"),
            "served_max_logprob_diff": _round(forced.get("max_logprob_diff")),
            "speed_tokens_per_second": speed,
            "served_speedup_one_stream": round(speedup, 2),
            "merge_peak_gib_llama31_8b_24gb": None if merge_memory is None else merge_memory["peak"],
        },
    }  # fmt: skip


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)
