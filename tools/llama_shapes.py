"""Llama-shaped models with random weights, built locally: the GPU machines here cannot reach the Hub.

Random weights do the same work as trained ones (same shapes, same kernels), so they serve for speed and
memory. `llama31-8b` is Llama 3.1 8B's published configuration; `tiny` is a 4-layer model with the embedded
SmolLM2 tokenizer, small enough to build in seconds, for running the notebooks' GPU path (profile gpu-smoke).

    python -m tools.llama_shapes tiny .cache/gpu-smoke-llama --tokenizer .bundle/tokenizer --device cuda
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from helpers.memory import LLAMA31

SHAPES: dict[str, dict] = {
    "llama31-8b": LLAMA31["8B"],  # the published configuration, kept once in helpers.memory
    "tiny": {
        "vocab_size": 49152,  # SmolLM2's tokenizer
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    },
}


def parameter_count(shape: str) -> int:
    """Parameters of a shape, counted by building it on the meta device (no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    return sum(p.numel() for p in model.parameters())


def build(shape: str, target: Path, tokenizer_dir: Path, device: str = "cpu") -> Path:
    """Save a random-weight Llama of `shape` in bfloat16 with the tokenizer from `tokenizer_dir`; skip if done."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (target / "config.json").is_file():
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **SHAPES[shape],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="bfloat16",
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 8B parameters: 16 GB in bfloat16, built straight on the device
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size="5GB")
    tokenizer.save_pretrained(staging)
    staging.rename(target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("target", type=Path)
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json (see gpu_bundle.py)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    target = build(args.shape, args.target, args.tokenizer, args.device)
    print(f"{args.shape}: {parameter_count(args.shape) / 1e9:.2f} B parameters, saved in {target}")


if __name__ == "__main__":
    main()
