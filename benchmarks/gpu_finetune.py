"""GPU fine-tuning benchmark: tokens/s and peak memory of QLoRA and 16-bit LoRA on a Llama 3.1 8B-shaped model,
with Unsloth and with plain transformers + peft + bitsandbytes, next to torchtune's RTX 4090 figures.

Same data and settings for every variant: batch 2 of 2,048 token ids (every position a real token, as in
torchtune's packed runs), LoRA r=16 alpha=16 on all seven projections, AdamW 8-bit, lr 2e-4, gradient
checkpointing on (Unsloth's own on its path). Tokens/s counts the timed steps after the warm-up ones. Each
variant runs in a fresh process, so the plain ones never see Unsloth's patches and the memory peaks are
each variant's own. The model has random weights built from Llama 3.1 8B's configuration (tools/llama_shapes.py);
no Hub access is needed.

    python benchmarks/gpu_finetune.py                       # all four variants, table at the end
    python benchmarks/gpu_finetune.py --variants plain-qlora --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VARIANTS = ["unsloth-qlora", "unsloth-lora", "plain-qlora", "plain-lora"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# torchtune's published table, Llama 3.1 8B on one RTX 4090: batch 2, sequences packed to 2048, torch.compile.
TORCHTUNE_RTX4090 = {
    "qlora": {"tokens_per_s": 2413, "peak_gib": 7.4},
    "lora": {"tokens_per_s": 3083, "peak_gib": 16.2},
}
GIB = 1024**3


def load(variant: str, model_dir: str, seq: int, r: int, device: str):
    """The model with fresh LoRA adapters, loaded the way each stack's documentation does it."""
    qlora = variant.endswith("qlora")
    if variant.startswith("unsloth"):
        from unsloth import FastLanguageModel  # first: it patches transformers and peft

        model, _ = FastLanguageModel.from_pretrained(
            model_name=model_dir, max_seq_length=seq, dtype=None, load_in_4bit=qlora, local_files_only=True
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=r,
            lora_alpha=r,
            lora_dropout=0,
            target_modules=TARGETS,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=0,
            max_seq_length=seq,
        )
        FastLanguageModel.for_training(model)
        return model

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if device == "cuda":
        kwargs["device_map"] = {"": 0}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def worker(args: argparse.Namespace) -> dict:
    """One variant in this process: load, warm up, time `steps` optimizer steps; one JSON line to stdout."""
    import torch

    cuda = args.device == "cuda"
    start = time.perf_counter()
    model = load(args.worker, args.model_dir, args.seq, args.r, args.device)
    load_s = time.perf_counter() - start
    loaded_gib = torch.cuda.max_memory_reserved() / GIB if cuda else None
    params = [p for p in model.parameters() if p.requires_grad]
    if cuda:
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, lr=2e-4)
    else:  # the CPU check of this script (tests); bitsandbytes' 8-bit Adam is a CUDA optimizer
        optimizer = torch.optim.AdamW(params, lr=2e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if cuda:
                torch.cuda.synchronize()
            timed_start = time.perf_counter()
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(args.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - timed_start
    return {
        "variant": args.worker,
        "tokens_per_s": round(args.steps * args.batch * args.seq / seconds, 1),
        "seconds_per_step": round(seconds / args.steps, 3),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2) if cuda else None,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else None,
        "after_load_gib": round(loaded_gib, 2) if cuda else None,
        "load_s": round(load_s, 1),
        "trainable": sum(p.numel() for p in params),
        "losses": losses,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "versions": versions(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ["torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "triton"]:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """The variant in a fresh process; an error (out of memory, a missing package) becomes a row, not a crash."""
    command = [sys.executable, __file__, "--worker", variant, "--model-dir", str(args.model_dir)]
    for name in ["batch", "seq", "warmup", "steps", "r", "device"]:
        command += [f"--{name}", str(getattr(args, name))]
    print(f"--- {variant}", flush=True)
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    sys.stderr.write(done.stderr[-4000:])
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    error = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": variant, "error": error[:200]}


def table(rows: list[dict], args: argparse.Namespace) -> str:
    tokens = args.batch * args.seq
    optimizer = "AdamW 8-bit" if args.device == "cuda" else "AdamW"
    lines = [
        f"{args.shape} shape, random weights; batch {args.batch} x {args.seq} tokens ({tokens} per step), "
        f"LoRA r={args.r} alpha={args.r} on 7 projections, {optimizer}, "
        f"{args.warmup} warm-up + {args.steps} timed steps.",
        "",
        "| variant | tokens/s | s/step | peak reserved GiB | peak allocated GiB | after load GiB | load s "
        "| vs torchtune 4090 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error']} | | | | | | |")
            continue
        ref = TORCHTUNE_RTX4090[row["variant"].split("-")[1]]
        lines.append(
            f"| {row['variant']} | {row['tokens_per_s']:.0f} | {row['seconds_per_step']} | "
            f"{row['peak_reserved_gib']} | "
            f"{row['peak_allocated_gib']} | {row['after_load_gib']} | {row['load_s']} | "
            f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x speed, {row['peak_reserved_gib'] or 0:.1f} vs "
            f"{ref['peak_gib']} GiB |"
        )
    for kind, ref in TORCHTUNE_RTX4090.items():
        lines.append(
            f"| torchtune {kind} (RTX 4090, published) | {ref['tokens_per_s']} | | {ref['peak_gib']} | | | | 1.00x |"
        )
    first = next((r for r in rows if "gpu" in r), None)
    if first:
        lines += ["", f"GPU: {first['gpu']}; versions: {first['versions']}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama31-8b-random"))
    parser.add_argument(
        "--shape", default="llama31-8b", help="tools/llama_shapes.py shape to build when --model-dir is empty"
    )
    parser.add_argument("--tokenizer", type=Path, default=HERE.parent / ".bundle" / "tokenizer")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)), flush=True)
        return
    start = time.perf_counter()  # built in its own process, so that this one holds no GPU memory
    build = [sys.executable, "-m", "tools.llama_shapes", args.shape, str(args.model_dir)]
    subprocess.run([*build, "--tokenizer", str(args.tokenizer), "--device", args.device], check=True)
    print(f"model ready in {args.model_dir} ({time.perf_counter() - start:.0f} s)", flush=True)
    rows = [run_variant(variant, args) for variant in args.variants]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("\n" + table(rows, args))


if __name__ == "__main__":
    main()
