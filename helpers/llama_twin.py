"""A Llama-3.1-shaped twin that runs the GPU profiles' code path on a CPU, offline.

Meta's real Llama 3 tokenizer (the tiktoken file in Meta's `llama-models` package, with its 256 special tokens:
128,256 ids, licensed under the Llama 3.1 Community License), Llama 3.1 8B's configuration family at a tiny size
(grouped-query attention, `llama3` RoPE scaling, untied input and output embeddings) and random weights. It learns
little, but every token id, special token, chat turn and tensor layout is the one Llama 3.1 has: BOS, `<|eot_id|>`,
the pad token, 4-bit loading, merging and the GGUF's `llama-bpe` pre-tokenizer are proven on it without a GPU.
Built on first use into the model cache (about 5 s), like the embedded model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Any

LLAMA31_TWIN = "llama31-twin"
LICENSE_NOTE = "tokenizer: Meta's Llama 3 tokenizer from the llama-models package, Llama 3.1 Community License"

# Llama 3.1 8B's published configuration with the widths cut down; what makes it Llama 3.1 is kept.
TWIN_SHAPE: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, as 8B (32 query heads, 8 key/value heads)
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,  # 8B and 70B keep a separate LM head
    "rope_parameters": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
}


class MissingPackageError(ImportError):
    """A package the twin needs is not installed."""


def _require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"The Llama 3.1 twin needs the `{package}` package for Meta's tokenizer: pip install {package} "
            "(make setup installs it)."
        )


def meta_tokenizer():
    """Meta's own Llama 3 tokenizer object (`llama_models.llama3.tokenizer.Tokenizer`): the reference the twin's
    fast tokenizer is built from and tested against."""
    _require("tiktoken", "tiktoken")
    _require("llama_models", "llama-models")
    from llama_models.llama3.tokenizer import Tokenizer

    return Tokenizer.get_instance()


def build_tokenizer():
    """A transformers fast tokenizer equal to Meta's: same BPE ranks, split pattern and special-token ids, and BOS
    added in front of every encoding (as the published Llama 3.1 tokenizer does). No chat template: like the base
    model the GPU profile loads, it uses the profile's `llama3` fallback."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    meta = meta_tokenizer()
    specials = sorted(meta.special_tokens, key=meta.special_tokens.__getitem__)
    model_file = Path(importlib.util.find_spec("llama_models").origin).parent / "llama3" / "tokenizer.model"  # type: ignore[union-attr, arg-type]
    backend = TikTokenConverter(vocab_file=str(model_file), pattern=meta.pat_str, extra_special_tokens=specials)
    backend = backend.converted()
    bos = "<|begin_of_text|>"
    backend.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, meta.bos_id)]
            ),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=bos, eos_token="<|end_of_text|>", clean_up_tokenization_spaces=False
    )
    tokenizer.model_max_length = TWIN_SHAPE["max_position_embeddings"]
    if len(tokenizer) != TWIN_SHAPE["vocab_size"]:
        raise RuntimeError(f"Meta's tokenizer gave {len(tokenizer)} ids, Llama 3.1 has {TWIN_SHAPE['vocab_size']}.")
    return tokenizer


def build(target: Path) -> Path:
    """Save the twin (tokenizer, configuration, random weights in bfloat16, as Meta ships 8B) into `target`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **TWIN_SHAPE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    # The base model's own generation config, as published: it stops at <|end_of_text|> only. Chat turns end in
    # <|eot_id|>, which lesson 01 adds (helpers.model.prepare_tokenizer): this is what the twin proves.
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")  # two first uses at once each build their own
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "NOTICE").write_text(
        f"Random weights in Llama 3.1's shape, built by helpers/llama_twin.py.\n{LICENSE_NOTE}.\n"
    )
    try:
        staging.rename(target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(staging)  # another process finished first; its twin is the same
    return target
