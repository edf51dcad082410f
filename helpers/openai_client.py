"""Lesson 00's API generators: any OpenAI-compatible chat API (OpenAI, vLLM, llama.cpp's server, Ollama) asked
like a careful client: within a request and a token budget, retrying 429s and 5xx, and sending a key only where
it belongs (see `api_endpoint`). `OpenAIGenerator` asks for pairs as JSON (an API model); `QuestionThenAnswer`
asks a small served model for questions, then their answers, through the same client, limiter and retries.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import openai
from pyrate_limiter import Limiter, Rate
from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from helpers.api_keys import OPENAI_HOST, is_local_host, key_host_problem, key_name_problem, origin
from helpers.data import DataError
from helpers.documents import Chunk
from helpers.replies import (
    QUESTION_TOKENS,
    answer_prompt,
    first_question,
    pack_pair,
    prompt_for,
    question_prompt,
    whole_sentences,
)

RETRYABLE = (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError)
_backoff = wait_exponential(multiplier=0.5, max=30)


def _retry_wait(state) -> float:
    """The server's Retry-After when it gives one (at most a minute), else exponential backoff."""
    response: Any = getattr(state.outcome.exception(), "response", None)
    try:
        return min(float(response.headers["retry-after"]), 60.0)
    except (AttributeError, KeyError, TypeError, ValueError):
        return _backoff(state)


def api_endpoint(base_url: str | None, api_key_env: str | None = None) -> tuple[str, str | None]:
    """Where requests go and the key they carry (None: no key).

    OPENAI_API_KEY goes only to OpenAI's own host over https. Any other server gets the key in the variable named
    by `api_key_env` (prepare.api_key_env), or none; a key is never sent in plain http to a host other than this
    machine. Without base_url, OPENAI_BASE_URL (which the openai client would read by itself) or OpenAI's URL.
    """
    url = base_url or os.environ.get("OPENAI_BASE_URL") or f"https://{OPENAI_HOST}/v1"
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise DataError(f"prepare.base_url {url!r} is not an http(s) URL such as http://localhost:8000/v1.")
    openai_host = parts.scheme == "https" and host == OPENAI_HOST
    if api_key_env and (problem := key_name_problem(api_key_env) or key_host_problem(api_key_env, url)):
        raise DataError(problem)
    name = api_key_env or ("OPENAI_API_KEY" if openai_host else None)
    if name is None:
        return url, None  # another server and no key named for it: the OpenAI key stays here
    key = os.environ.get(name)
    if not key:
        where = "OpenAI" if openai_host else f"the server at {origin(url)}"
        raise DataError(
            f"The OpenAI backend needs {name} in the environment (or a git-ignored .env file) for {where}. For a "
            "local OpenAI-compatible server, set prepare.base_url (and prepare.api_key_env if it wants a key)."
        )
    if parts.scheme == "http" and not is_local_host(host):
        raise DataError(
            f"Refusing to send the key in {name} over plain http to {host}: anyone on the way could read it. Use "
            "https, a server on this machine (localhost), or no key (leave prepare.api_key_env empty)."
        )
    return url, key


class OpenAIGenerator:
    """Any OpenAI-compatible chat API, within a request and a token budget per window, retrying 429 and 5xx.

    The budgets are enforced here with pyrate-limiter (the client's own retries are off, so that retries pass
    through the limiter too); a 429's Retry-After is honoured. OPENAI_API_KEY goes only to api.openai.com; another
    server gets the key in `api_key_env` or none (see `api_endpoint`); a local server (vLLM, llama.cpp, Ollama)
    usually accepts any key. Requests to a server on this machine never go through a proxy.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        requests_per_window: int = 500,
        tokens_per_window: int = 200_000,
        window_seconds: float = 60.0,
        max_tokens: int = 1024,
        pairs_per_reply: int = 3,
        attempts: int = 6,
        api_key_env: str | None = None,
    ):
        url, key = api_endpoint(base_url, api_key_env)
        # http_proxy/https_proxy/all_proxy would carry requests for localhost, and the key with them, to the proxy:
        # a local server is reached directly (trust_env=False ignores those variables).
        local = is_local_host(urlsplit(url).hostname or "")
        # Everything explicit: the client would otherwise fill a missing key, admin key, organization and project
        # from OPENAI_* variables and send them to whatever server this is. "no-key" is a placeholder, no secret.
        self.client = openai.OpenAI(
            api_key=key or "no-key",
            admin_api_key="",
            organization="",
            project="",
            base_url=url,
            max_retries=0,
            default_headers={"Authorization": f"Bearer {key or 'no-key'}"},  # wins over OPENAI_CUSTOM_HEADERS'
            http_client=openai.DefaultHttpxClient(trust_env=False) if local else None,
        )
        self.model, self.max_tokens, self.pairs_per_reply, self.attempts = model, max_tokens, pairs_per_reply, attempts
        # A request reaches the server a little after the limiter lets it go (a first one also waits for its
        # connection), so the client's window is a quarter of a second longer than the server's.
        window = int((window_seconds + 0.25) * 1000)  # milliseconds
        self.request_limiter = Limiter(Rate(requests_per_window, window))
        self.token_limiter = Limiter(Rate(tokens_per_window, window))
        self.tokens_per_window = tokens_per_window

    def _tokens(self, prompt: str, n: int, max_tokens: int) -> int:
        """What a request may use, counted against the token budget before it is sent (~4 characters a token)."""
        return min(len(prompt) // 4 + n * max_tokens, self.tokens_per_window)

    def complete(
        self, prompt: str, n: int, temperature: float, max_tokens: int | None = None, stop: list[str] | None = None
    ) -> list[str]:
        """`n` replies to one user message (one request with `n`), each ending at `max_tokens` or a `stop` string;
        within the budgets; a 429, a 5xx or a lost connection is retried after the server's Retry-After or a
        backoff, each retry through the limiter again."""
        max_tokens = max_tokens or self.max_tokens
        extra: dict[str, Any] = {"stop": stop} if stop else {}
        for attempt in Retrying(
            retry=retry_if_exception_type(RETRYABLE),
            wait=_retry_wait,
            stop=stop_after_attempt(self.attempts),
            reraise=True,
        ):
            with attempt:
                self.request_limiter.try_acquire("requests")
                self.token_limiter.try_acquire("tokens", weight=self._tokens(prompt, n, max_tokens))
                response = self.client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    n=n,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    **extra,
                )
        return [choice.message.content or "" for choice in response.choices]

    def replies(self, chunk: Chunk, n: int, temperature: float) -> list[str]:
        return self.complete(prompt_for(chunk, self.pairs_per_reply), n, temperature)


class QuestionThenAnswer(OpenAIGenerator):
    """A small served model that cannot be trusted to write JSON (the embedded SmolLM2 on llama.cpp's server).

    Each pair takes two requests through the same limiter and retries as any API: a question about the chunk, then
    its answer. With `reuse_prompt` (llama.cpp's server) a chunk's requests go one after another: each finds the
    chunk already read in the server's prompt cache (the slot that just served it), where `n` replies or
    simultaneous requests would each read the whole chunk again; several chunks run at once (`workers`, one server
    slot each). Without it, one request asks for `n` questions and the answers are asked for all at once. An answer
    cut by `max_tokens` loses its unfinished sentence; each pair is packed as the JSON an API model writes, so the
    same parser and filters apply.
    """

    def __init__(self, model: str, *args: Any, reuse_prompt: bool = True, **kwargs: Any):
        super().__init__(model, *args, **kwargs)
        self.reuse_prompt = reuse_prompt

    def _question(self, chunk: Chunk, n: int, temperature: float) -> list[str]:
        # a question is one line: the reply stops at its first line break (what follows is the model answering itself)
        max_tokens = min(QUESTION_TOKENS, self.max_tokens)
        return [first_question(q) for q in self.complete(question_prompt(chunk), n, temperature, max_tokens, ["\n"])]

    def _answer(self, chunk: Chunk, question: str, temperature: float) -> str:
        if not question:
            return ""  # nothing to answer: the pair is dropped as "missing or empty question"
        return whole_sentences(self.complete(answer_prompt(chunk, question), 1, temperature)[0])

    def replies(self, chunk: Chunk, n: int, temperature: float) -> list[str]:
        if self.reuse_prompt:
            questions = [self._question(chunk, 1, temperature)[0] for _ in range(n)]
            answers = [self._answer(chunk, q, temperature) for q in questions]
        else:
            questions = self._question(chunk, n, temperature)
            with ThreadPoolExecutor(max_workers=max(1, len(questions))) as pool:
                answers = list(pool.map(lambda q: self._answer(chunk, q, temperature), questions))
        return [pack_pair(q, a) for q, a in zip(questions, answers, strict=True)]
