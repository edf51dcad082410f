"""Generation speed of the exported model: transformers `generate` in a notebook vs llama.cpp's server (xllamacpp)
on the GGUF files, f16 and q8_0, with 1 and 4 concurrent requests.

python benchmarks/serve_throughput.py [--run RUN_NAME] [--tokens 96] [--repeats 3]

With --run, the merged model and GGUF files of runs/<RUN_NAME>/08_export/ are measured; without it, the embedded
base model is exported into a temporary folder first (same sizes and speed: merging changes values, not shapes).
Every request generates exactly --tokens tokens (the server with ignore_eos, transformers with min_new_tokens), so
the rows compare the same work.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = [
    "What is the difference between a TCP SYN scan and a TCP connect scan?",
    "How should an organisation store user passwords?",
    "What are the first steps when a laptop is suspected to be infected with ransomware?",
    "What is cross-site scripting and how is it prevented?",
]
SYSTEM = "You are a cybersecurity expert."


def export_embedded(folder: Path) -> Path:
    from helpers.gguf_converter import convert_to_gguf
    from helpers.merge import save_merged
    from helpers.model import load_model
    from helpers.profiles import load_profile
    from helpers.steps import MERGED, gguf_name

    model, tokenizer, _ = load_model(load_profile("cpu-lab"))
    save_merged(model, tokenizer, folder / MERGED, QUESTIONS)
    for kind in ("f16", "q8_0"):
        convert_to_gguf(folder / MERGED, folder / gguf_name(kind), kind, folder / f"convert-{kind}.log")
    return folder


def transformers_speed(merged: Path, tokens: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers.chat import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    done, seconds = 0, 0.0
    for question in QUESTIONS:
        ids = torch.tensor([prompt_ids(tokenizer, question, SYSTEM)])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        seconds += time.perf_counter() - start
        done += out.shape[1] - ids.shape[1]
    return done / seconds


def main() -> int:
    from helpers.steps import EXPORT, MERGED, gguf_name

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help=f"a run name whose {EXPORT.name}/ holds the files")
    parser.add_argument("--tokens", type=int, default=96, help="generated tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="server threads (default: all cores)")
    args = parser.parse_args()

    from helpers.serve import LlamaServer, served_speed

    with tempfile.TemporaryDirectory() as tmp:
        if args.run:
            from helpers.runfolder import runs_dir

            folder = runs_dir() / args.run / EXPORT.name
        else:
            folder = export_embedded(Path(tmp))
        rows: dict[str, list[float]] = {"transformers generate, merged fp32": []}
        for _ in range(args.repeats):
            rows["transformers generate, merged fp32"].append(transformers_speed(folder / MERGED, args.tokens))
        for kind in ("f16", "q8_0"):
            with LlamaServer(folder / gguf_name(kind), threads=args.threads, parallel=4,
                             log_file=Path(tmp) / f"server-{kind}.log") as server:  # fmt: skip
                served_speed(server, QUESTIONS, SYSTEM, 8, 1)  # warm-up
                for streams in (1, 4):
                    name = f"llama.cpp server, {kind}, {streams} stream{'s' if streams > 1 else ''}"
                    rows[name] = [served_speed(server, QUESTIONS, SYSTEM, args.tokens, streams)["tokens_per_second"]
                                  for _ in range(args.repeats)]  # fmt: skip
    base = statistics.median(rows["transformers generate, merged fp32"])
    print(f"\n{args.tokens} generated tokens per request, {args.repeats} repeats; median (min-max)\n")
    print("| generation | tokens/s | vs transformers |\n|---|---|---|")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.1f} ({min(values):.1f}-{max(values):.1f}) | {median / base:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
