"""Training throughput on this machine: the seeds' recipe vs the workbook's default vs each lever.

Every variant trains the same model (the profile's), the same LoRA settings, the same rows in one pass
(so the same real tokens), and the same optimiser settings. Each repetition runs in a fresh process so
that peak RSS belongs to that variant alone. Prints one table (median and spread over the repetitions):

    python benchmarks/train_throughput.py                      # all variants, 3 repetitions
    python benchmarks/train_throughput.py --variants seed-recipe default --repeats 1

Real tokens are prompt + answer tokens; padding is not counted. The matmul peak is measured here, and
"% of peak" counts 4 x parameters FLOPs per real token (forward 2N, backward to the activations 2N; the
LoRA weight gradients and attention scores are small next to that for a 135M model at ~200 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

# name -> what it changes from the workbook's default (helpers.trainer.build_trainer with the profile's SFTConfig).
# None: the seeds' recipe, built separately. "threads" sets torch's thread count; "trl-head" uses trl's SFTTrainer
# as it comes (its fused LM head); "profile" holds profile overrides; every other key is an SFTConfig field.
VARIANTS: dict[str, dict[str, Any] | None] = {
    "seed-recipe": None,  # text rows padded to max_length=512, LM collator, loss on every token
    "trl-sfttrainer": {"trl-head": True},  # trl as it comes: dynamic padding, its fused LM head on every position
    "default": {},  # what the workbook does (dynamic padding, LM head on answer positions only)
    "group-by-length": {"train_sampling_strategy": "group_by_length"},  # rows of similar length batched together
    "padding-free": {"padding_free": True},  # rows of a batch concatenated, position ids restart per row
    "gradient-checkpointing": {"profile": {"train": {"gradient_checkpointing": True}}},  # saves memory, costs time
    "1-thread": {"threads": 1},
    "torch-compile": {"torch_compile": True},
}


def cpu_has_bf16() -> bool:
    """bf16 pays on a CPU only with AVX-512 BF16 or AMX; without them (AVX2 machines) it is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


if cpu_has_bf16():
    VARIANTS["bf16"] = {"bf16": True}


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048, 4096), repeats: int = 5) -> float:
    """Best fp32 square-matmul GFLOP/s over a few sizes, with this process's threads."""
    import torch

    best = 0.0
    for size in sizes:
        a, b = torch.randn(size, size), torch.randn(size, size)
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


class CountingCollator:
    """Wraps a collator and records real and padded tokens of every batch it builds."""

    def __init__(self, collate):
        self.collate, self.batches = collate, []

    def __call__(self, features):
        batch = self.collate(features)
        padded = batch["input_ids"].numel()
        real = int(batch["attention_mask"].sum()) if "attention_mask" in batch else padded
        self.batches.append((real, padded))
        return batch


def _seed_trainer(model, tokenizer, rows, profile, output_dir):
    """The seeds' recipe: chat text padded to 512 tokens, plain Trainer, LM collator (loss on all tokens)."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    texts = [tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False) for r in rows]
    dataset = Dataset.from_dict({"text": texts}).map(
        lambda b: tokenizer(b["text"], padding="max_length", max_length=512, truncation=True),
        batched=True,
        remove_columns=["text"],
    )
    train = profile.train
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=len(rows) // train.per_device_train_batch_size,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler_type,
        warmup_steps=train.warmup_steps,
        optim=train.optim,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=train.seed,
        data_seed=train.seed,
        dataloader_pin_memory=False,
    )
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def run_variant(name: str, profile_name: str, rows: int, output_dir: Path) -> dict[str, Any]:
    """Train one variant once, in this process; return its figures."""
    import torch
    from datasets import DatasetDict
    from transformers import TrainerCallback, set_seed
    from trl import SFTTrainer

    from helpers.data import build_splits, load_rows
    from helpers.evaluation import answer_losses, summarise_losses
    from helpers.lora import add_lora
    from helpers.model import load_model
    from helpers.profiles import load_profile
    from helpers.trainer import build_trainer, sft_config

    changes = dict(VARIANTS[name] or {})
    torch.set_num_threads(changes.pop("threads", torch.get_num_threads()))
    profile = load_profile(profile_name, changes.pop("profile", None))
    set_seed(profile.train.seed)
    model, tokenizer, _ = load_model(profile)
    parameters = sum(p.numel() for p in model.parameters())  # the base model's, before LoRA
    splits, _ = build_splits(load_rows(profile.data.source).rows, tokenizer, profile.data, profile.model.max_seq_length)
    train_rows = splits["train"].select(range(rows))
    model = add_lora(model, profile)

    if VARIANTS[name] is None:
        trainer = _seed_trainer(model, tokenizer, list(train_rows), profile, output_dir)
    else:
        config = sft_config(profile, output_dir)
        config.max_steps = rows // profile.train.per_device_train_batch_size
        config.eval_strategy, config.save_strategy, config.logging_steps = "no", "no", 1
        for key, value in changes.items():
            if key != "trl-head":
                setattr(config, key, value)
        if config.padding_free:
            config.max_length = None  # build_splits already dropped rows over max_length
        if changes.get("trl-head"):
            trainer = SFTTrainer(model=model, args=config, train_dataset=train_rows, processing_class=tokenizer)
        else:
            data = DatasetDict(train=train_rows, eval=splits["eval"])
            trainer = build_trainer(model, tokenizer, data, profile, output_dir, config=config)

    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not stamps:
                stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    real = [r for r, _ in counter.batches]
    padded = [p for _, p in counter.batches]
    steady_seconds = stamps[-1] - stamps[1]  # after the first (warm-up) step
    held_out = summarise_losses(answer_losses(trainer.model, tokenizer, list(splits["eval"])))
    return {
        "variant": name,
        "steps": len(stamps) - 1,
        "real_tokens": sum(real),
        "padding_share": 1 - sum(real) / sum(padded),
        "tokens_per_s": sum(real[1:]) / steady_seconds,
        "wall_s": wall,
        "first_step_s": stamps[1] - stamps[0],
        "final_train_loss": statistics.mean(losses[-2:]),
        "held_out_answer_loss": held_out["loss"],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
        "parameters": parameters,
        "matmul_gflops": matmul_peak(),  # measured after training, in the same process and threads
    }


def _table(results: dict[str, list[dict[str, Any]]], peak: float) -> list[str]:
    """One markdown row per variant: medians over the repetitions, ± half the range of tokens/s."""
    seed = (
        statistics.median(r["tokens_per_s"] for r in results.get("seed-recipe", [])) if "seed-recipe" in results else 0
    )
    lines = [
        "| variant | real tokens/s | vs seeds' recipe | % of matmul peak | padding | peak RSS GiB | wall s "
        "| final train loss | held-out answer loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0] if isinstance(runs[0][key], float)}
        speeds = [r["tokens_per_s"] for r in runs]
        share = med["tokens_per_s"] * 4 * runs[0]["parameters"] / (peak * 1e9)
        ratio = f"{med['tokens_per_s'] / seed:.2f}x" if seed else "-"
        lines.append(
            f"| {name} | {med['tokens_per_s']:.1f} ± {(max(speeds) - min(speeds)) / 2:.1f} | {ratio} | {share:.0%} | "
            f"{med['padding_share']:.0%} | {med['peak_rss_gib']:.2f} | {med['wall_s']:.0f} | "
            f"{med['final_train_loss']:.3f} | {med['held_out_answer_loss']:.3f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu-lab")
    parser.add_argument("--rows", type=int, default=32, help="training rows, one pass (a multiple of the batch)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "benchmarks")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    if args.child:  # one repetition of one variant, in its own process
        result = run_variant(args.child, args.profile, args.rows, args.out / f"trainer-{args.child}")
        print("RESULT " + json.dumps(result))
        return 0

    if not cpu_has_bf16():
        print("bf16 variant left out: this CPU has neither AVX-512 BF16 nor AMX")
    results: dict[str, list[dict[str, Any]]] = {}
    for repeat in range(args.repeats):  # interleaved, so a slow minute on the machine hits every variant
        for name in args.variants:
            command = [sys.executable, __file__, "--child", name, "--profile", args.profile, "--rows", str(args.rows)]
            command += ["--out", str(args.out)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode or not lines:
                print(done.stdout[-3000:], done.stderr[-3000:], sep="\n", file=sys.stderr)
                raise SystemExit(f"variant {name} failed (exit {done.returncode})")
            result = json.loads(lines[-1].removeprefix("RESULT "))
            results.setdefault(name, []).append(result)
            print(f"[{repeat + 1}/{args.repeats}] {name}: {result['tokens_per_s']:.1f} real tokens/s", flush=True)
    (args.out / "train_throughput.json").write_text(json.dumps(results, indent=1))

    threads = max(r["threads"] for runs in results.values() for r in runs)
    peaks = [r["matmul_gflops"] for runs in results.values() for r in runs if r["threads"] == threads]
    peak = statistics.median(peaks)
    parameters = next(iter(results.values()))[0]["parameters"]
    print(
        f"\nfp32 matmul peak, {threads} threads (best square matmul of each run; median of {len(peaks)} runs): "
        f"{peak:.0f} GFLOP/s (runs ranged {min(peaks):.0f}-{max(peaks):.0f})"
    )
    print(
        f"{parameters / 1e6:.1f} M parameters x 4 FLOPs per real token -> {peak * 1e9 / (4 * parameters):.0f} "
        "tokens/s if every FLOP were useful"
    )
    print(f"{args.rows} training rows, one pass; {args.repeats} repetitions of each variant, interleaved\n")
    print("\n".join(_table(results, peak)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
