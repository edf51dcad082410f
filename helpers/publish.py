"""Lesson 08: publish the tuned model to the Hugging Face Hub, privately, with a model card.

Off unless the profile's `publish.repo_id` is set. The token comes from HF_TOKEN (environment or `.env`), is
handed only to `huggingface_hub` (which sends it only to HF_ENDPOINT, the Hub by default) and is never printed.
Every check that can fail runs before the first byte is uploaded; after the upload the repo is read back and must
be private.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helpers.profiles import Profile, PublishSettings
from helpers.steps import ADAPTER, DATASET, EVAL, HUB_README, MERGED, MODELFILE, TRAIN


class PublishError(RuntimeError):
    """Publishing stopped; nothing was uploaded unless the message says so."""


class MissingTokenError(PublishError):
    """A repo id is set but there is no HF_TOKEN."""


class PublicRepoError(PublishError):
    """The repo exists and is public (or came back public), and the profile does not allow that."""


@dataclass
class Published:
    repo_id: str
    repo_type: str
    url: str
    private: bool
    files: list[str]


def _token() -> str:
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise MissingTokenError(
            "publish.repo_id is set but HF_TOKEN is not: put HF_TOKEN=hf_... (a token with write access) in the "
            "project's .env file or the environment. Nothing was uploaded."
        )
    return token


def _api(token: str) -> Any:
    from huggingface_hub import HfApi

    return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)


def _existing_privacy(api: Any, repo_id: str, repo_type: str) -> bool | None:
    """True/False for an existing repo's privacy, None when it does not exist yet."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return bool(api.repo_info(repo_id, repo_type=repo_type).private)
    except RepositoryNotFoundError:
        return None


def push_folder(
    folder: Path,
    repo_id: str,
    settings: PublishSettings,
    repo_type: str = "model",
    allow_patterns: list[str] | None = None,
    message: str = "Upload from LLM Goes to School",
) -> Published:
    """Create the repo private (or reuse a private one), upload `folder`, read the repo back and check it is private."""
    token = _token()
    api = _api(token)
    existing = _existing_privacy(api, repo_id, repo_type)
    if existing is False and not settings.allow_public:
        raise PublicRepoError(
            f"The {repo_type} repo {repo_id} exists and is public. Make it private on the Hub, choose another "
            "publish.repo_id, or set publish.allow_public: true. Nothing was uploaded."
        )
    if existing is None:
        api.create_repo(repo_id, repo_type=repo_type, private=True, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                      commit_message=message)  # fmt: skip
    info = api.repo_info(repo_id, repo_type=repo_type)
    if not info.private and not settings.allow_public:
        raise PublicRepoError(f"The {repo_type} repo {repo_id} came back public after the upload: make it private now.")
    files = sorted(api.list_repo_files(repo_id, repo_type=repo_type))
    prefix = "" if repo_type == "model" else f"{repo_type}s/"
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    return Published(repo_id, repo_type, f"{endpoint}/{prefix}{repo_id}", bool(info.private), files)


def publish_patterns(settings: PublishSettings, gguf_files: list[str]) -> list[str]:
    """What goes up: the adapter and the card always; the merged model and GGUF files when the profile says so."""
    patterns = [HUB_README, MODELFILE, f"{ADAPTER}/*"]
    if settings.merged:
        patterns.append(f"{MERGED}/*")
    if settings.gguf:
        patterns += gguf_files
    return patterns


def model_card(profile: Profile, base_model: str, manifests: dict[str, dict[str, Any]], export: dict[str, Any]) -> str:
    """The model card (README.md): what it is, how it was made and checked, and what it is not for."""
    train = manifests.get(TRAIN.name, {})
    report = manifests.get(EVAL.name, {})
    data = manifests.get(DATASET.name, {})
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: peft",
        "license: apache-2.0",
        "tags: [lora, sft, cybersecurity, llm-goes-to-school]",
        "---",
        f"# {profile.publish.repo_id or 'Tuned model'}",
        "",
        f"A LoRA adapter for **{base_model}**, tuned with supervised fine-tuning in the *LLM Goes to School* workbook "
        f"(profile `{profile.name}`: {profile.description})",
        "",
        "## Data",
        f"- Source: `{profile.data.source}` in the White Rabbit schema (subject, system, instruction, response); the "
        "project's own sample is written for the course and licensed Apache-2.0. Data from the Hub "
        "(WhiteRabbitNeo/WRN-Chapter-1) keeps its own licence and terms.",
        f"- Rows: {data.get('train_rows', '?')} train / {data.get('eval_rows', '?')} held out.",
        "",
        "## Training",
        f"- LoRA r={profile.lora.r}, alpha={profile.lora.alpha} on {', '.join(profile.lora.target_modules)}.",
        f"- {train.get('steps', '?')} steps, batch {profile.train.per_device_train_batch_size} x "
        f"{profile.train.gradient_accumulation_steps}, learning rate {profile.train.learning_rate}.",
        f"- Held-out loss before -> after: {_num(train.get('eval_loss_before'))} -> "
        f"{_num(train.get('eval_loss_after'))}.",
        "",
        "## Evaluation (notebook 07)",
    ]
    if report:
        lines += [f"- {k}: {_num(v)}" for k, v in report.items() if isinstance(v, (int, float)) and k not in ("seed",)]
    else:
        lines.append("- Not run for this model.")
    lines += [
        "",
        "## Export checks (notebook 08)",
        *[f"- GGUF {r['type']}: {r['identical']}/{r['questions']} greedy answers identical to the merged model, "
          f"token agreement {r['token_agreement']:.3f}" for r in export.get("round_trip", [])],
        "",
        "## Intended use and limits",
        "- For learning how fine-tuning works, and for defensive security questions in a classroom.",
        "- A small model tuned for minutes: answers can be wrong or shallow. Do not act on them without checking, "
        "and do not use it to attack systems you are not allowed to test.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value if value is not None else "?")


def publish(profile: Profile, folder: Path, gguf_files: list[str], pairs: Path | None) -> dict[str, Any]:
    """Notebook 08's publish cell: off without `publish.repo_id`; the model folder, then 00's pairs as a dataset."""
    settings = profile.publish
    if not settings.repo_id:
        return {"published": False, "reason": "publish.repo_id is not set (publishing is off)"}
    _token()  # the named error before anything else happens
    model = push_folder(folder, settings.repo_id, settings, allow_patterns=publish_patterns(settings, gguf_files))
    result: dict[str, Any] = {"published": True, "model": vars(model)}
    if settings.dataset_repo_id and pairs is not None and pairs.is_file():
        # from its own step folder, that file alone: nothing is written into a saved step
        data = push_folder(pairs.parent, settings.dataset_repo_id, settings, repo_type="dataset",
                           allow_patterns=[pairs.name])  # fmt: skip
        result["dataset"] = vars(data)
    return result
