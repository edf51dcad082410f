"""Lesson 00: raw documents -> question/answer pairs in the White Rabbit schema, written by a helper LLM.

The seed's recipe: clean the raw text and cut it into chunks (`helpers.documents`), ask another LLM for
question/answer pairs as JSON (temperature 0.7, 16 replies per chunk), keep the valid and distinct pairs
(`helpers.replies`). This module runs the asking: two generators share one interface (`Generator.replies`), any
OpenAI-compatible API (`helpers.openai_client`) and a local model through transformers (the embedded SmolLM2 by
default: offline, and much weaker pairs); replies are cached so an interrupted run resumes; the kept pairs are
written out (and, when asked, pushed to the Hub by `helpers.publish_pairs`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from helpers.documents import Chunk
from helpers.model import load_model
from helpers.openai_client import OpenAIGenerator
from helpers.profiles import PrepareSettings, Profile
from helpers.replies import refusal


class Generator(Protocol):
    """Anything that turns a chunk into `n` replies holding question/answer pairs as JSON."""

    def replies(self, chunk: Chunk, n: int, temperature: float) -> list[str]: ...


def _cached(line: str) -> tuple[str, list[str]] | None:
    """A cache line's chunk id and replies, or None for a line that is not `{"id": str, "replies": [str, ...]}`
    (cut off by an interruption, or edited) or that holds a refused reply (written before those were left out)."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    chunk_id, replies = record.get("id"), record.get("replies")
    if not isinstance(chunk_id, str) or not isinstance(replies, list) or not all(isinstance(r, str) for r in replies):
        return None
    if any(refusal(r) for r in replies):
        return None
    return chunk_id, replies


def generate_replies(
    chunks: list[Chunk],
    generator: Generator,
    cache: str | Path,
    n: int,
    temperature: float,
    workers: int = 1,
    on_error: Callable[[Chunk, Exception], None] | None = None,
) -> dict[str, list[str]]:
    """Replies for every chunk, `workers` requests at a time. Each finished chunk is appended to `cache` (JSONL)
    at once, so an interrupted run resumes without asking again for finished chunks. A chunk whose request fails
    for good is reported to `on_error` and left for the next run; a chunk with a refused reply (not text, too
    long, nested too deep) is returned but not cached, so the next run asks again."""
    cache = Path(cache)
    done: dict[str, list[str]] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            if (record := _cached(line)) is not None:  # a skipped line's chunk is simply asked again
                done[record[0]] = record[1]
    wanted = {c.id for c in chunks}
    todo = [c for c in chunks if c.id not in done]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers) as pool, cache.open("a", encoding="utf-8") as out:
        futures = {pool.submit(generator.replies, c, n, temperature): c for c in todo}
        for future in tqdm(as_completed(futures), total=len(futures), desc="chunks", unit="chunk"):
            chunk = futures[future]
            try:
                replies = future.result()
            except Exception as err:  # one failed chunk must not lose the others
                if on_error is None:
                    raise
                on_error(chunk, err)
                continue
            done[chunk.id] = replies
            if not any(refusal(r) for r in replies):
                out.write(json.dumps({"id": chunk.id, "replies": replies}) + "\n")
                out.flush()
    return {key: value for key, value in done.items() if key in wanted}


class LocalGenerator:
    """A local chat model through transformers (the embedded SmolLM2 on CPU).

    A 135M model cannot be trusted to write JSON, so it is asked for a question, then for its answer, and the
    pair is packed as JSON here; the same parser and filters then apply as for an API.
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 160):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    def _sample(self, contents: list[str], temperature: float, max_new_tokens: int) -> list[str]:
        """One sampled reply per message, all in one left-padded `generate` call (about 4x the tokens/s on CPU)."""
        from helpers.inference import Decoding, generate_batch

        decoding = Decoding(do_sample=True, temperature=temperature, top_p=0.95)
        replies = generate_batch(
            self.model, self.tokenizer, contents, "", max_new_tokens, decoding, batch_size=len(contents)
        )
        return [r["answer"] for r in replies]

    def replies(self, chunk: Chunk, n: int, temperature: float) -> list[str]:
        # n questions about the chunk in one batch, then their n answers in another
        instruction = f"{chunk.text}\n\nWrite one question that the text above answers."
        asked = self._sample([instruction] * n, temperature, min(48, self.max_new_tokens))
        questions = [a.splitlines()[0].strip() if a else "" for a in asked]
        answers = self._sample(
            [f"{chunk.text}\n\nUsing the text above, answer in two to four sentences: {q}" for q in questions],
            temperature,
            self.max_new_tokens,
        )
        return [json.dumps({"pairs": [{"question": q, "answer": a}]}) for q, a in zip(questions, answers, strict=True)]


def make_generator(profile: Profile, settings: PrepareSettings) -> tuple[Generator, str]:
    """The generator the settings ask for, and its model's name."""
    if settings.backend == "openai":
        generator = OpenAIGenerator(
            settings.api_model,
            base_url=settings.base_url,
            requests_per_window=settings.requests_per_minute,
            tokens_per_window=settings.tokens_per_minute,
            max_tokens=settings.max_new_tokens,
            pairs_per_reply=settings.pairs_per_reply,
            api_key_env=settings.api_key_env,
        )
        return generator, settings.api_model
    model, tokenizer, card = load_model(profile)
    return LocalGenerator(model, tokenizer, max_new_tokens=settings.max_new_tokens), card.name


def cache_path(folder: str | Path, generator_name: str, settings: PrepareSettings) -> Path:
    """A replies cache per generator and settings: another backend, model or sampling never reuses old replies."""
    sampling = settings.model_dump(
        include={"backend", "responses_per_chunk", "temperature", "pairs_per_reply", "max_new_tokens"}
    )
    key = json.dumps([generator_name, sampling], sort_keys=True)
    return Path(folder) / f"replies-{hashlib.sha256(key.encode()).hexdigest()[:12]}.jsonl"


def write_rows(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows as JSONL (into the step's staging folder: the run folder renames it into place when complete)."""
    path = Path(path)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
