"""GGUF files as lesson 08 checks them: the header's description of the tokenizer, and the weights read back.

GGUF is llama.cpp's file: weights, architecture settings, tokenizer and chat template in one. The checks read the
header with the `gguf` package and hold it against the source tokenizer; the weights are de-quantized under the
model's own parameter names so a loss can be measured on exactly what the file holds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from helpers.model import adds_bos, end_of_turn_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Bytes per weight in each file type (q8_0: 32 int8 weights + one f16 scale per block of 32).
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


def byte_level_bpe(tokenizer_json: dict[str, Any]) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return tokenizer_json["model"].get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in parts)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The GGUF header fields the checks need, read with the `gguf` package."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def value(key: str) -> Any:
        field = reader.fields.get(key)
        return None if field is None else field.contents()

    return {
        "architecture": value("general.architecture"),
        "file_type": value("general.file_type"),
        "vocabulary": value("tokenizer.ggml.model"),
        "pre_tokenizer": value("tokenizer.ggml.pre"),
        "tokens": value("tokenizer.ggml.tokens"),
        "chat_template": value("tokenizer.chat_template"),
        "bos_token_id": value("tokenizer.ggml.bos_token_id"),
        "add_bos_token": value("tokenizer.ggml.add_bos_token"),
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "eot_token_id": value("tokenizer.ggml.eot_token_id"),
        "tensors": len(reader.tensors),
    }


def expected_vocabulary(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name for the tokenizer kind: `gpt2` for byte-level BPE, `llama` for SentencePiece."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    return "gpt2" if byte_level_bpe(data) else "llama"


# llama.cpp's converter names the pre-tokenizer (how text is split before BPE) by hashing the tokenizer's ids for a
# test text; a wrong or unknown name (`default`) splits numbers, spaces or accents differently at serving time. The
# families this course uses, recognised the same way: their ids for one text and their vocabulary size.
FAMILY_PROBE = "Hello world"
PRE_TOKENIZERS: list[dict[str, Any]] = [
    {"family": "Llama 3", "pre_tokenizer": "llama-bpe", "tokens": 128256, "probe_ids": [9906, 1917]},
    {"family": "SmolLM / SmolLM2", "pre_tokenizer": "smollm", "tokens": 49152, "probe_ids": [19556, 905]},
]


def expected_pre_tokenizer(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The pre-tokenizer name llama.cpp should write for this tokenizer's family; None for a family not listed."""
    ids = tokenizer(FAMILY_PROBE, add_special_tokens=False)["input_ids"]
    for family in PRE_TOKENIZERS:
        if len(tokenizer) == family["tokens"] and ids == family["probe_ids"]:
            return family["pre_tokenizer"]
    return None


def check_metadata(meta: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """The GGUF's own description of its tokenizer against the source tokenizer, one row per check. `add_bos_token`
    must say what the tokenizer does: llama.cpp then adds BOS itself and strips the one a chat template writes
    (Llama 3's `{{ bos_token }}`), so the served prompt starts with exactly one (08's served-route check counts the
    prompt's tokens; the Modelfile template leaves BOS out for the same reason)."""
    eot = end_of_turn_ids(tokenizer)[0]
    stops = {meta["eos_token_id"], meta["eot_token_id"]} - {None}
    source_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    vocab, pre = expected_vocabulary(tokenizer), expected_pre_tokenizer(tokenizer)
    gguf_adds_bos = bool(meta.get("add_bos_token"))
    if pre is not None:
        pre_row = ("pre-tokenizer", meta["pre_tokenizer"], pre, meta["pre_tokenizer"] == pre)
    else:  # a family not listed: at least a named one ("default" is what the converter writes when it did not know)
        pre_row = ("pre-tokenizer", meta["pre_tokenizer"], "not 'default'" if vocab == "gpt2" else "any",
                   vocab != "gpt2" or meta["pre_tokenizer"] not in (None, "default"))  # fmt: skip
    rows = [
        ("vocabulary type", meta["vocabulary"], vocab, meta["vocabulary"] == vocab),
        pre_row,
        ("token count", len(meta["tokens"] or []), len(source_tokens), len(meta["tokens"] or []) == len(source_tokens)),
        ("token strings", "same" if meta["tokens"] == source_tokens else "differ", "same",
         meta["tokens"] == source_tokens),
        ("BOS id", meta.get("bos_token_id"), tokenizer.bos_token_id,
         tokenizer.bos_token_id is None or meta.get("bos_token_id") == tokenizer.bos_token_id),
        ("adds BOS", gguf_adds_bos, adds_bos(tokenizer), gguf_adds_bos == adds_bos(tokenizer)),
        ("chat template present", bool(meta["chat_template"]), True, bool(meta["chat_template"])),
        ("chat template", "same" if meta["chat_template"] == tokenizer.chat_template else "differs", "same",
         meta["chat_template"] == tokenizer.chat_template),
        ("end of turn stops", sorted(stops), eot, eot in stops),
    ]  # fmt: skip
    return [{"check": c, "gguf": _text(g), "source": _text(s), "ok": bool(ok)} for c, g, s, ok in rows]


def _text(value: Any) -> str:
    """One type per table column (a number, a list and a word side by side would print as raw Python)."""
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def size_breakdown(path: Path) -> dict[str, int]:
    """Where a GGUF's bytes go: tensor data by storage type, and the rest (the header: tokenizer vocabulary and
    merges, chat template, settings, tensor names, alignment padding)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    parts: dict[str, int] = {}
    for tensor in reader.tensors:
        key = f"{tensor.tensor_type.name.lower()} tensors"
        parts[key] = parts.get(key, 0) + int(tensor.n_bytes)
    parts["header and padding"] = Path(path).stat().st_size - sum(parts.values())
    return parts


def gguf_tensors(path: Path, model: PreTrainedModel) -> Iterator[tuple[str, torch.Tensor]]:
    """A GGUF's weights de-quantized to fp32, one at a time, under the model's parameter names (transformers' name
    map and q/k un-permute), without transformers' GGUF tokenizer rebuild: the tokenizer is checked by metadata and
    by llama.cpp instead. GGUF tensors the model has no name for are yielded under `?<gguf name>`."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    config = {"num_attention_heads": model.config.num_attention_heads,
              "num_key_value_heads": model.config.num_key_value_heads}  # fmt: skip
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        parsed = {"config": config, "tensors": {}}
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        name = names.get(result.name, f"?{tensor.name}")
        yield name, torch.from_numpy(result.weights.copy()).float()


# Tensors llama.cpp computes from the configuration, not weights: Llama 3.1's RoPE scaling factors (rope_type llama3),
# which transformers recomputes from `rope_parameters` instead of storing.
DERIVED_TENSORS = {"rope_freqs.weight"}


@torch.no_grad()
def load_gguf_weights(model: PreTrainedModel, path: Path) -> dict[str, list[str]]:
    """Overwrite the model's weights with the GGUF's, in place (no second copy of the model), strictly: a weight
    the file lacks (but a head tied to the embeddings) or a tensor the model has no place for is an error, since
    a name-mapping bug would otherwise keep the original weights and look lossless."""
    params = dict(model.named_parameters(remove_duplicate=False))  # a tied head is listed under both names
    loaded, unexpected, derived = set(), [], []
    for name, weights in gguf_tensors(path, model):
        if (bare := name.removeprefix("?")) in DERIVED_TENSORS:
            derived.append(bare)
            continue
        if name not in params:
            unexpected.append(name)
            continue
        params[name].copy_(weights.reshape(params[name].shape).to(params[name].dtype))
        loaded.add(name)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(params) - loaded - tied)
    if missing or unexpected:
        raise ValueError(
            f"{path.name} does not map onto the model: {len(missing)} weights missing ({missing[:3]}), "
            f"{len(unexpected)} tensors without a place ({unexpected[:3]})."
        )
    return {"loaded": sorted(loaded), "tied": sorted(tied), "derived": derived}


@torch.no_grad()
def restore_weights(model: PreTrainedModel, folder: Path) -> None:
    """Put the saved (merged) weights back, tensor by tensor from its safetensors files."""
    from safetensors import safe_open

    params = dict(model.named_parameters())
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open has no iterator)
                if name in params:
                    params[name].copy_(weights.get_tensor(name).to(params[name].dtype))
