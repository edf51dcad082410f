"""Lesson 08, step 1: fold the LoRA adapter into the base and save a plain model that any runtime can load.

The merge loads the base unquantized (16-bit on a GPU, 32-bit on a CPU, as `backend.merge_dtype` decides): merging
into a 4-bit base would round the learned update into 4-bit steps and ship a different model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from helpers.export_errors import DiskSpaceError, ExportError
from helpers.gguf_file import BYTES_PER_WEIGHT, byte_level_bpe
from helpers.memory import GIB, LLAMA31, linear_shapes, lora_parameters, parameter_counts
from helpers.model import end_of_turn_ids

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from helpers.profiles import Profile


def folder_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_bytes_needed(parameters: int, merged_dtype: torch.dtype, gguf_types: list[str]) -> int:
    """Disk the export writes: the merged safetensors and each GGUF file, plus 10% for tokenizer and headers."""
    merged = parameters * torch.finfo(merged_dtype).bits // 8
    return int(1.1 * (merged + sum(parameters * BYTES_PER_WEIGHT[t] for t in gguf_types)))


def check_disk(folder: Path, needed: int) -> dict[str, int]:
    """Fail before writing anything when the export would not fit."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskSpaceError(
            f"The export needs about {needed / 1e9:.2f} GB in {folder}, but only {free / 1e9:.2f} GB is free. "
            "Free some space (old runs in runs/, the Hugging Face cache) or set LLM_SCHOOL_RUNS to a larger disk."
        )
    return {"needed_bytes": needed, "free_bytes": free}


def merge_profile(profile: Profile) -> Profile:
    """The profile's model loaded unquantized with transformers: merging into a 4-bit base would round the
    learned update into 4-bit steps and ship a different model (and peft warns it is not exact)."""
    from helpers.backend import merge_dtype

    name = unquantized_name(profile.model.name)
    update = {"name": name, "load_in_4bit": False, "backend": "transformers", "dtype": merge_dtype()}
    return profile.model_copy(update={"model": profile.model.model_copy(update=update)})


def unquantized_name(name: str) -> str:
    """Unsloth publishes 4-bit copies as `<base>-bnb-4bit` (the seed's `unsloth/Meta-Llama-3.1-8B-bnb-4bit`); their
    weights are already 4-bit, so the merge loads the 16-bit `<base>` (same shapes, so the adapter fits)."""
    return name.removesuffix("-bnb-4bit").removesuffix("-unsloth")


def load_for_merge(adapter: Path, profile: Profile) -> tuple[PeftModel, PreTrainedTokenizerBase]:
    """The base in 16/32-bit with 05's adapter on top (a fresh load: the 4-bit training base is never merged into)."""
    from helpers.lora import load_adapter
    from helpers.model import load_model

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ExportError(f"No trained adapter in {adapter}: run notebook 05_train first.")
    model, tokenizer, _ = load_model(merge_profile(profile))
    return load_adapter(model, adapter).eval(), tokenizer


def merge_peak_memory(model: str | dict[str, Any] = "8B", r: int = 16, weight_bytes: int = 2,
                      loss_tokens: int = 2048) -> dict[str, float]:  # fmt: skip
    """GiB on the GPU while notebook 08 merges and measures, for a Llama 3.1 shape (helpers.memory.LLAMA31).

    One copy of the model at any time: the 16-bit base, the LoRA weights on top (fp32, as peft loads them), and
    while merging one layer's update B·A (fp32, then cast to the weight dtype before it is added in place);
    `merge_and_unload` then drops the LoRA weights. The held-out loss passes run one row at a time on the merged
    model: logits of up to `loss_tokens` x vocabulary in 16-bit, an fp32 copy and the fp32 log-softmax (10 bytes
    each). The trained model (NF4 + adapter on the GPU profiles) is measured and freed before the merge loads.
    """
    shape = LLAMA31[model] if isinstance(model, str) else model
    largest = max(a * b for a, b in linear_shapes(shape).values())
    parts = {
        "16-bit weights": parameter_counts(shape)["total"] * weight_bytes,
        "LoRA weights (fp32)": lora_parameters(shape, r) * 4,
        "one layer's update B·A (fp32 + cast)": largest * (4 + weight_bytes),
        "loss pass logits (1 row)": loss_tokens * shape["vocab_size"] * (weight_bytes + 4 + 4),
    }
    merging = parts["LoRA weights (fp32)"] + parts["one layer's update B·A (fp32 + cast)"]
    peak = parts["16-bit weights"] + max(merging, parts["loss pass logits (1 row)"])
    return {**{k: round(v / GIB, 2) for k, v in parts.items()}, "peak": round(peak / GIB, 2)}


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """W + (alpha/r)·B·A folded into each target layer; the result is a plain model with no peft inside."""
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise ExportError("Refusing to merge into a quantized base: reload the base in 16-bit (merge_profile).")
    return model.merge_and_unload()


def fix_byte_level_tokenizer(folder: Path) -> bool:
    """Make a byte-level BPE tokenizer.json say so, so llama.cpp's converter writes vocabulary type `gpt2`.

    transformers' GGUF loader (how the embedded SmolLM2 was made) writes byte-level BPE with SentencePiece's
    `byte_fallback` and a SentencePiece decoder. llama.cpp's converter reads those two fields as "a Llama
    SentencePiece BPE", writes vocabulary `llama` with pre-tokenizer `default`, and llama.cpp then fails on every
    request ("SPM vocabulary, but newline token not found"). A byte-level BPE never falls back to bytes (each byte
    has its own token) and its ByteLevel decoder is the one that applies, so the token ids do not change; the
    export checks that with `same_tokenization`. Returns whether the file was changed.
    """
    path = Path(folder) / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    has_byte_tokens = "<0x00>" in data["model"].get("vocab", {})
    if not byte_level_bpe(data) or has_byte_tokens or not data["model"].get("byte_fallback"):
        return False
    data["model"]["byte_fallback"] = False
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return True


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, texts: list[str]) -> None:
    for text in texts:
        ids_a, ids_b = a(text, add_special_tokens=False)["input_ids"], b(text, add_special_tokens=False)["input_ids"]
        if ids_a != ids_b or a.decode(ids_a) != b.decode(ids_b):
            raise ExportError(f"The saved tokenizer splits {text[:60]!r} differently from the source tokenizer.")


def save_merged(merged: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, probe_texts: list[str]) -> dict:
    """The merged model with its tokenizer, chat template, and a generation config that stops at end of turn."""
    from transformers import AutoTokenizer

    stops = end_of_turn_ids(tokenizer)
    merged.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    merged.generation_config.do_sample = False  # what the round trip and the served answers compare
    for key in ("temperature", "top_p", "top_k"):
        setattr(merged.generation_config, key, None)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    fixed = fix_byte_level_tokenizer(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    same_tokenization(tokenizer, reloaded, probe_texts)
    if reloaded.chat_template != tokenizer.chat_template:
        raise ExportError(f"The chat template saved in {out} differs from the tokenizer's.")
    return {"tokenizer_fixed": fixed, "eos_token_ids": stops, "bytes": folder_bytes(out)}
