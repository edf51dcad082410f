"""Lesson 00's optional last step: the pairs as a private Hugging Face dataset.

`datasets` makes a repo private only when it creates it; an existing repo keeps its visibility. So, as notebook 08
does for models (`helpers.publish`), the repo is read first: created private when missing, refused when public
unless that is allowed, and read back after the upload. The token comes from HF_TOKEN and is never printed.
"""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset

from helpers.data import DataError
from helpers.publish import PublicRepoError, Published, _api, _existing_privacy


def push_to_hub(rows: list[dict[str, Any]], dataset_id: str, allow_public: bool = False) -> Published:
    """Upload the pairs as a private Hugging Face dataset (only when asked, and only with HF_TOKEN set) and say
    what the Hub holds afterwards. An existing public repo is refused unless `allow_public` (the profile's
    publish.allow_public)."""
    token = os.environ.get("HF_TOKEN", "").strip()
    if not token:
        raise DataError("Pushing to the Hub needs HF_TOKEN in the environment (or a git-ignored .env file).")
    api = _api(token)
    existing = _existing_privacy(api, dataset_id, "dataset")
    if existing is False and not allow_public:
        raise PublicRepoError(
            f"The dataset repo {dataset_id} exists and is public: the pairs would be readable by anyone. Make it "
            "private on the Hub, push to another name, or set publish.allow_public: true. Nothing was uploaded."
        )
    if existing is None:
        api.create_repo(dataset_id, repo_type="dataset", private=True, exist_ok=True)
    Dataset.from_list(rows).push_to_hub(dataset_id, private=True, token=token)
    private = bool(api.repo_info(dataset_id, repo_type="dataset").private)
    if not private and not allow_public:
        raise PublicRepoError(f"The dataset repo {dataset_id} came back public after the upload: make it private now.")
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    files = sorted(api.list_repo_files(dataset_id, repo_type="dataset"))
    return Published(dataset_id, "dataset", f"{endpoint}/datasets/{dataset_id}", private, files)
