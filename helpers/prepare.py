"""Lesson 00: raw documents -> question/answer pairs in the White Rabbit schema, written by a helper LLM.

The seed's recipe: clean the raw text and cut it into chunks (`helpers.documents`), ask another LLM for
question/answer pairs as JSON (temperature 0.7, 16 replies per chunk), keep the valid and distinct pairs
(`helpers.replies`). This module runs the asking. `helper_llm` gives the generator the settings ask for, always
through the OpenAI client (`helpers.openai_client`: concurrency, `n` replies, temperature, rate limiter, retries):
- `backend: openai`: OpenAI or any compatible API at `base_url`;
- `backend: local` (the default): the embedded SmolLM2 GGUF served on this machine by llama.cpp's server
  (`helpers.serve`, one slot per chunk in flight, batched together), stopped when the `with` block ends,
  even when it fails. Only where that server cannot start does the model run in this process through transformers
  (`LocalGenerator`, several times slower), and the lesson says why, with the end of the server's log.
Replies are cached so an interrupted run resumes; the kept pairs are written out (and, when asked, pushed to the
Hub by `helpers.publish_pairs`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from helpers.api_keys import is_openai_url, origin
from helpers.documents import Chunk
from helpers.openai_client import OpenAIGenerator, QuestionThenAnswer
from helpers.profiles import PrepareSettings, Profile
from helpers.replies import (
    QUESTION_TOKENS,
    answer_prompt,
    first_question,
    pack_pair,
    question_prompt,
    refusal,
    whole_sentences,
)
from helpers.serve import LlamaServer, ServerError, default_threads


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
        # n questions about the chunk in one batch, then their n answers in another (the served path's prompts)
        asked = self._sample([question_prompt(chunk)] * n, temperature, min(QUESTION_TOKENS, self.max_new_tokens))
        questions = [first_question(a) for a in asked]
        answers = self._sample([answer_prompt(chunk, q) for q in questions], temperature, self.max_new_tokens)
        return [pack_pair(q, whole_sentences(a)) for q, a in zip(questions, answers, strict=True)]


SERVER_LOG = "helper-llm-server.log"  # in 00's cache folder: what llama.cpp's server printed


def server_threads() -> int:
    """Threads for llama.cpp's server: every core, fewer when OMP_NUM_THREADS says so (`helpers.serve.default_threads`:
    the tests give each worker one). Its threads wait for each other by spinning, so on cores another program keeps
    busy one thread too many is many times slower (measured on 2 shared cores: 12 tokens/s with 1 thread, under 2
    with 2); on an idle machine the notebook's kernel only waits for the replies."""
    return default_threads()


MAX_SLOTS = 16  # each slot holds server_context() tokens of cache (~23 KB a token for the embedded model)


def server_slots(settings: PrepareSettings) -> int:
    """Requests the server runs at once: one slot per chunk in flight (`workers`), whose requests follow one another
    in it and reuse the chunk it has read (measured on cpu-lab here: 32 s with 4 slots so, 42 s with 8 slots and
    every reply of a chunk at once)."""
    return min(MAX_SLOTS, settings.workers)


def server_context(settings: PrepareSettings) -> int:
    """Tokens per slot: the chunk (these documents take ~1.4 tokens a word: 2 leaves room), the prompt's own words
    and question, and the longest answer; a multiple of 256 (cpu-lab: 1024)."""
    needed = 2 * settings.chunk_words + 128 + settings.max_new_tokens
    return -(-needed // 256) * 256


@dataclass
class HelperLLM:
    """The generator lesson 00 asks, and what the manifest and the output say about it."""

    generator: Generator
    name: str  # the model's name (part of the replies cache's key)
    backend: str  # the profile's prepare.backend
    server: dict[str, Any] | None  # who answered the requests: software, address, slots; None in-process
    notes: list[str] = field(default_factory=list)  # why the in-process fallback was used, with the server's log

    def describe(self) -> str:
        if self.server is None:
            return f"{self.name}, in this process through transformers (no server)"
        where = ", ".join(f"{key} {value}" for key, value in self.server.items() if key != "software")
        return f"{self.name} via {self.server['software']} ({where})"

    def manifest(self) -> dict[str, Any]:
        return {"backend": self.backend, "generator": self.name, "server": self.server, "server_notes": self.notes}


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def start_helper_server(settings: PrepareSettings, log_folder: str | Path) -> LlamaServer:
    """llama.cpp's server on the embedded GGUF, on a free local port, with `server_slots` slots of `server_context`
    tokens. Raises ServerError (with the end of its log) when it cannot start."""
    from helpers.model import embedded_gguf_path  # imports torch: only when the server is wanted

    server = LlamaServer(
        embedded_gguf_path(),
        threads=server_threads(),
        parallel=server_slots(settings),
        context=server_context(settings),
        log_file=Path(log_folder) / SERVER_LOG,
    )
    return server.start()


def served_generator(base_url: str, settings: PrepareSettings) -> QuestionThenAnswer:
    """The OpenAI client on a local OpenAI-compatible server that serves a small model (no key: the server has none)."""
    return QuestionThenAnswer(
        "embedded",  # llama.cpp serves one model whatever the name
        base_url=base_url,
        requests_per_window=settings.requests_per_minute,
        tokens_per_window=settings.tokens_per_minute,
        max_tokens=settings.max_new_tokens,
        pairs_per_reply=1,
    )


@contextmanager
def helper_llm(profile: Profile, settings: PrepareSettings, log_folder: str | Path) -> Iterator[HelperLLM]:
    """The helper LLM the settings ask for, for the length of a `with` block: OpenAI (or a compatible API at
    base_url) for `backend: openai`; else llama.cpp's server on the embedded GGUF, stopped at the end of the block
    even when it fails; the profile's model in this process only where the server cannot start."""
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
        url = str(generator.client.base_url)
        software = "OpenAI's API" if is_openai_url(url) else "an OpenAI-compatible API"
        yield HelperLLM(generator, settings.api_model, settings.backend, {"software": software, "at": origin(url)})
        return
    note: str | None = None
    try:
        server = start_helper_server(settings, log_folder)
    except ServerError as err:
        note = f"llama.cpp's server could not start, so the model runs in this process instead (slower). {err}"
    if note is not None:  # outside the except block: an error in the caller's block is not chained to the server's
        from helpers.model import load_model

        model, tokenizer, card = load_model(profile)
        yield HelperLLM(LocalGenerator(model, tokenizer, settings.max_new_tokens), card.name, "local", None, [note])
        return
    with server:
        about = {
            "software": f"llama.cpp's server (xllamacpp {_package_version('xllamacpp')})",
            "model file": server.gguf.name,
            "at": server.url,
            "slots": server_slots(settings),
            "threads": server.threads,
        }
        yield HelperLLM(served_generator(server.base_url, settings), server.gguf.stem, settings.backend, about)


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
