"""Tokens/s of batched greedy generation (left padding, one generate call per batch) by batch size.

Answers the held-out questions of a profile (cpu-lab: its 24 held-out rows) with the embedded model, greedy, at
batch sizes 1, 4, 8 and 16 (one repetition each, interleaved order not needed: one process, same questions), and
checks that every batch size gives the same answers as batch 1. Prints a table and the estimated generation time
of notebooks 06 and 07 for the profile's question counts.

    python benchmarks/generation_batch.py                      # cpu-lab's held-out questions, 160 new tokens
    python benchmarks/generation_batch.py --questions 8 --max-new-tokens 64 --batch-sizes 1 8
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from helpers.data import build_splits, load_rows
from helpers.inference import generate_batch
from helpers.model import load_model
from helpers.profiles import load_profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu-lab")
    parser.add_argument("--questions", type=int, default=None, help="how many held-out questions (default: all)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the profile's evaluate setting")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args(argv)

    profile = load_profile(args.profile)
    model, tokenizer, card = load_model(profile)
    model.eval()
    splits, _ = build_splits(load_rows(profile.data.source).rows, tokenizer, profile.data, profile.model.max_seq_length)
    examples = splits["eval"].to_list()[: args.questions]
    questions = [e["prompt"][-1]["content"] for e in examples]
    systems = [next((m["content"] for m in e["prompt"] if m["role"] == "system"), "") for e in examples]
    max_new_tokens = args.max_new_tokens or profile.evaluate.max_new_tokens
    print(f"{card.name} on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"{len(questions)} questions, up to {max_new_tokens} new tokens, greedy")  # fmt: skip

    results, reference = [], None
    print(f"\n| batch | seconds | tokens | tokens/s | vs batch {args.batch_sizes[0]} | answers equal to it |")
    print("|---|---|---|---|---|---|", flush=True)
    for batch_size in args.batch_sizes:  # each row prints as soon as it is measured
        start = time.perf_counter()
        answers = generate_batch(model, tokenizer, questions, systems, max_new_tokens, batch_size=batch_size)
        seconds = time.perf_counter() - start
        tokens = sum(a["tokens"] for a in answers)
        texts = [a["answer"] for a in answers]
        reference = reference or texts
        same = sum(a == b for a, b in zip(texts, reference, strict=True))
        results.append({"batch": batch_size, "seconds": seconds, "tokens": tokens, "same": same})
        rate, base = tokens / seconds, results[0]["tokens"] / results[0]["seconds"]
        print(f"| {batch_size} | {seconds:.1f} | {tokens} | {rate:.1f} | {rate / base:.2f}x "
              f"| {same}/{len(questions)} |", flush=True)  # fmt: skip

    # Notebook 07 answers every held-out row and the general questions, 06 its questions plus one held-out, each
    # with base and tuned model (06 also with four decoding settings, tuned only); seconds per question scale.
    per_question = {r["batch"]: r["seconds"] / len(questions) for r in results}
    eval_questions = len(splits["eval"]) if profile.evaluate.questions is None else profile.evaluate.questions
    n07 = 2 * (eval_questions + profile.evaluate.forgetting_questions)
    n06 = 2 * (len(profile.infer.questions) + 1) + 4 * (len(profile.infer.questions) + 1)
    print(f"\nEstimated generation time at {max_new_tokens} new tokens ({n07} answers in 07, {n06} in 06):")
    for batch_size, seconds in per_question.items():
        print(f"  batch {batch_size:>2}: 07 ~{n07 * seconds:.0f} s, 06 ~{n06 * seconds:.0f} s")


if __name__ == "__main__":
    main()
