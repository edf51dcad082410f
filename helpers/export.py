"""Lesson 08 in a few calls: convert, prove, measure and report, over the modules that do each job.

merge.py folds the adapter into the base; gguf_converter.py runs llama.cpp's converter; gguf_file.py reads a GGUF's
header and weights back; round_trip.py compares greedy answers in transformers and llama.cpp; ollama.py writes the
Modelfile. The notebook shows each step; the loops, tables and the report are built here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

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


def round_trips(run: RunFolder, merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                profile: Profile) -> tuple[dict[str, RoundTrip], list[dict]]:  # fmt: skip
    """Every GGUF served by llama.cpp in turn and asked the profile's questions; the merged model answers once."""
    settings = profile.export
    trips: dict[str, RoundTrip] = {}
    references: list[dict] | None = None
    for gguf_type in settings.gguf_types:
        with LlamaServer(gguf_path(run, gguf_type), log_file=export_log(run, f"server-{gguf_type}")) as server:
            trips[gguf_type], references = round_trip(
                server, merged, tokenizer, profile.infer.questions, profile.infer.system_prompt,
                settings.max_new_tokens, gguf_type, references,
            )  # fmt: skip
        print(f"{gguf_type}: {trips[gguf_type].verdict(settings.near_tie)}; server stopped: {not server.running}")
    return trips, references or []


def round_trip_rows(trips: dict[str, RoundTrip]) -> list[dict[str, Any]]:
    """One row per file and question: both answers, the agreeing prefix and where they part."""
    return [
        {"file": t, "question": r["question"], "identical": r["identical"],
         "agreeing tokens": f"{r['agreeing_tokens']}/{r['tokens']}", "merged model": r["merged_answer"],
         "GGUF in llama.cpp": r["gguf_answer"], "first divergence": r["divergence"] or ""}
        for t, trip in trips.items() for r in trip.rows
    ]  # fmt: skip


def gguf_losses(run: RunFolder, merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                profile: Profile) -> dict[str, Any]:  # fmt: skip
    """Held-out answer loss of the merged model and of each quantized file's weights, loaded into the same model in
    place and then restored from the saved merged folder: one copy of the model in memory at any time."""
    from helpers.evaluation import answer_losses, summarise_losses

    rows = list(load_splits(run)["eval"])[: profile.export.loss_rows]
    batch = profile.evaluate.batch_size
    loss: dict[str, Any] = {"merged": summarise_losses(answer_losses(merged, tokenizer, rows, batch))}
    for gguf_type in [t for t in profile.export.gguf_types if t not in ("f16", "bf16", "f32")]:
        try:
            load_gguf_weights(merged, gguf_path(run, gguf_type))
            loss[gguf_type] = summarise_losses(answer_losses(merged, tokenizer, rows, batch))
        finally:
            restore_weights(merged, merged_dir(run))
        loss[f"{gguf_type}_minus_merged"] = loss[gguf_type]["loss"] - loss["merged"]["loss"]
    return loss


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
                 speed: dict[str, float]) -> dict[str, Any]:  # fmt: skip
    """export.json: everything 08 measured; its `headline` becomes the step's manifest."""
    near_tie = profile.export.near_tie
    one_stream = speed[f"llama.cpp {profile.export.serve}, 1 stream"]
    speedup = one_stream / speed["transformers generate (merged, 1 stream)"]
    return {
        "gguf": profile.export.gguf_types,
        "sizes_bytes": sizes,
        "conversions": conversions,
        "metadata_checks": metadata_checks,
        "round_trip": [
            {**trip.summary(), "verdict": trip.verdict(near_tie), "rows": trip.rows} for trip in trips.values()
        ],  # fmt: skip
        "loss": loss,
        "served": {"file": profile.export.serve, **served},
        "speed_tokens_per_second": speed,
        "headline": {
            "sizes_mb": {k: round(v / 1e6, 1) for k, v in sizes.items()},
            "round_trip": {
                t: f"{trip.identical}/{len(trip.rows)} identical, agreement {trip.agreement:.3f}"
                for t, trip in trips.items()
            },  # fmt: skip
            "q8_0_loss_delta": loss.get("q8_0_minus_merged"),
            "served_equals_merged": served["served_equals_merged"],
            "speed_tokens_per_second": speed,
            "served_speedup_one_stream": round(speedup, 2),
        },
    }
