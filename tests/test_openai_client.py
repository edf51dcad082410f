"""Notebook 00's API generator against a real HTTP server: rate limit, retries, resuming, and where keys go."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from json_handler import JsonHandler

from helpers import ROOT
from helpers.data import DataError
from helpers.documents import read_documents
from helpers.openai_client import OpenAIGenerator, api_endpoint
from helpers.prepare import generate_replies
from helpers.profiles import ProfileError, load_profile
from helpers.replies import select_pairs


class FakeAPI(JsonHandler):
    """An OpenAI-compatible chat completions endpoint with a request log, some 429s and one 500."""

    log: list = []
    headers_seen: list = []  # every request's headers, to check which key reached this host
    lock = threading.Lock()
    rate_limited = {1, 4}  # documents whose first request gets 429 + Retry-After
    server_error = 2  # the document whose first request gets a 500

    def do_POST(self):
        with self.lock:
            self.headers_seen.append({key.lower(): value for key, value in self.headers.items()})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        doc = int(re.search(r"Document number (\d+)", body["messages"][0]["content"]).group(1))
        with self.lock:
            first = all(entry[1] != doc for entry in self.log)
            status = 429 if first and doc in self.rate_limited else 500 if first and doc == self.server_error else 200
            self.log.append((time.monotonic(), doc, status))
        time.sleep(0.15)
        if status != 200:
            payload = {"error": {"message": "slow down" if status == 429 else "boom", "type": "server"}}
            return self._send(status, payload, {"Retry-After": "1"} if status == 429 else {})
        content = json.dumps({"pairs": [{"question": f"What does document {doc} say?", "answer": "It says " * 5}]})
        choices = [
            {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            for i in range(body.get("n", 1))
        ]
        self._send(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": choices,
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            },
        )


class RecordingProxy(BaseHTTPRequestHandler):
    """An HTTP proxy that forwards nothing: it records each request line and its headers, and answers 502."""

    seen: list = []

    def _record(self):
        self.seen.append((self.requestline, {key.lower(): value for key, value in self.headers.items()}))
        self.send_response(502)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = do_CONNECT = _record

    def log_message(self, *args):
        pass


def serve(handler) -> tuple[ThreadingHTTPServer, str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def api():
    FakeAPI.log, FakeAPI.headers_seen = [], []
    server, url = serve(FakeAPI)
    yield url + "/v1"
    server.shutdown()


@pytest.fixture
def proxy():
    RecordingProxy.seen = []
    server, url = serve(RecordingProxy)
    yield url
    server.shutdown()


def documents(folder: Path, count: int) -> Path:
    folder.mkdir()
    for doc in range(count):
        (folder / f"doc{doc:02d}.txt").write_text(f"Document number {doc}. Passphrases beat short passwords.\n")
    return folder


RATE, WINDOW = 4, 1.0
# The same generation, as a separate process the test can kill.
CLIENT = f"""
import sys
from helpers.documents import read_documents
from helpers.openai_client import OpenAIGenerator
from helpers.prepare import generate_replies
chunks, _, _ = read_documents(sys.argv[1], 300)
generator = OpenAIGenerator("test-model", base_url=sys.argv[2], requests_per_window={RATE}, window_seconds={WINDOW})
generate_replies(chunks, generator, sys.argv[3], n=2, temperature=0.7, workers=3)
"""


def max_in_window(times: list[float], window: float) -> int:
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


def test_api_backend_retries_stays_under_the_rate_limit_and_does_every_chunk_once(api, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a local server needs no key
    chunks, _, _ = read_documents(documents(tmp_path / "raw", 8), 300)
    generator = OpenAIGenerator("test-model", base_url=api, requests_per_window=RATE, window_seconds=WINDOW)
    replies = generate_replies(chunks, generator, tmp_path / "cache.jsonl", n=2, temperature=0.7, workers=4)
    assert set(replies) == {c.id for c in chunks} and all(len(r) == 2 for r in replies.values())
    log = FakeAPI.log
    assert sorted(doc for _, doc, status in log if status == 200) == list(range(8)), "each chunk done exactly once"
    assert sorted(doc for _, doc, status in log if status != 200) == [1, 2, 4], "429s and the 500 were retried"
    assert max_in_window([t for t, _, _ in log], WINDOW) <= RATE, "the rate limit was exceeded"
    selection = select_pairs(
        replies, chunks, "You are a security expert."
    )  # the canned questions differ by one number: near-duplicates
    assert len(selection.rows) + sum(selection.dropped.values()) == 16


def test_an_interrupted_api_run_resumes_without_asking_again(api, tmp_path):
    raw, cache = documents(tmp_path / "raw", 12), tmp_path / "cache.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    process = subprocess.Popen([sys.executable, "-c", CLIENT, str(raw), api, str(cache)], env=env)
    deadline = time.monotonic() + 120
    while not cache.is_file() or len(cache.read_text().splitlines()) < 3:
        assert process.poll() is None and time.monotonic() < deadline, "the client ended before the interruption"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {json.loads(line)["id"] for line in cache.read_text().splitlines() if line.endswith("}")}
    assert 3 <= len(finished) < 12
    requests_before = len(FakeAPI.log)

    chunks, _, _ = read_documents(raw, 300)
    generator = OpenAIGenerator("test-model", base_url=api, requests_per_window=RATE, window_seconds=WINDOW)
    replies = generate_replies(chunks, generator, cache, n=2, temperature=0.7, workers=3)
    assert set(replies) == {c.id for c in chunks}
    finished_docs = {c.source for c in chunks if c.id in finished}
    asked_again = {f"doc{doc:02d}.txt" for _, doc, _ in FakeAPI.log[requests_before:]}
    assert not finished_docs & asked_again, "a finished chunk was requested again"
    assert len(asked_again) == 12 - len(finished)


def test_api_backend_without_a_key_says_where_the_key_goes(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(DataError, match="OPENAI_API_KEY in the environment"):
        OpenAIGenerator("gpt-4o-mini")


OPENAI_CANARY, LOCAL_CANARY = "sk-canary-openai-0451", "canary-local-server-7781"
HF_CANARY = "hf_" + "CanaryTokenNotRealAbCdEf0123456789"  # a Hugging Face token's shape  # pragma: allowlist secret


def secrets_in(headers_seen: list[dict]) -> str:
    return json.dumps(headers_seen)


def test_the_openai_key_never_reaches_another_host(api, tmp_path, monkeypatch):
    """A local server asked without prepare.api_key_env receives no key at all, whatever OPENAI_* variables hold."""
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)
    monkeypatch.setenv("OPENAI_ADMIN_KEY", OPENAI_CANARY + "-admin")
    monkeypatch.setenv("OPENAI_CUSTOM_HEADERS", f"Authorization: Bearer {OPENAI_CANARY}-custom")
    chunks, _, _ = read_documents(documents(tmp_path / "raw", 2), 300)
    generator = OpenAIGenerator("test-model", base_url=api)
    replies = generate_replies(chunks, generator, tmp_path / "cache.jsonl", n=1, temperature=0.7)
    assert len(replies) == 2 and len(FakeAPI.headers_seen) >= 2
    assert OPENAI_CANARY not in secrets_in(FakeAPI.headers_seen)
    assert {h.get("authorization") for h in FakeAPI.headers_seen} == {"Bearer no-key"}

    # OPENAI_BASE_URL (which the openai client reads by itself) is another host too: still no key
    monkeypatch.setenv("OPENAI_BASE_URL", api)
    FakeAPI.headers_seen.clear()
    generate_replies(chunks, OpenAIGenerator("test-model"), tmp_path / "cache2.jsonl", n=1, temperature=0.7)
    assert FakeAPI.headers_seen and OPENAI_CANARY not in secrets_in(FakeAPI.headers_seen)


def test_a_local_server_gets_only_the_key_named_in_api_key_env(api, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)
    monkeypatch.setenv("LOCAL_LLM_KEY", LOCAL_CANARY)
    chunks, _, _ = read_documents(documents(tmp_path / "raw", 2), 300)
    generator = OpenAIGenerator("test-model", base_url=api, api_key_env="LOCAL_LLM_KEY")
    generate_replies(chunks, generator, tmp_path / "cache.jsonl", n=1, temperature=0.7)
    assert {h.get("authorization") for h in FakeAPI.headers_seen} == {f"Bearer {LOCAL_CANARY}"}
    assert OPENAI_CANARY not in secrets_in(FakeAPI.headers_seen)
    monkeypatch.delenv("LOCAL_LLM_KEY")
    with pytest.raises(DataError, match="needs LOCAL_LLM_KEY in the environment"):
        OpenAIGenerator("test-model", base_url=api, api_key_env="LOCAL_LLM_KEY")  # pragma: allowlist secret


def test_a_local_server_is_reached_directly_never_through_a_proxy(api, proxy, tmp_path, monkeypatch):
    """With http_proxy set, a request for this machine (and the key it carries) must not go to the proxy."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_LLM_KEY", LOCAL_CANARY)
    chunks, _, _ = read_documents(documents(tmp_path / "raw", 1), 300)
    generator = OpenAIGenerator("test-model", base_url=api, api_key_env="LOCAL_LLM_KEY", attempts=1)
    replies = generate_replies(chunks, generator, tmp_path / "cache.jsonl", n=1, temperature=0.7)
    assert RecordingProxy.seen == [], "a request for the local server went to the proxy"
    assert len(replies) == 1 and {h.get("authorization") for h in FakeAPI.headers_seen} == {f"Bearer {LOCAL_CANARY}"}


def test_where_each_key_may_go(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)
    monkeypatch.setenv("LOCAL_LLM_KEY", LOCAL_CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert api_endpoint(None) == ("https://api.openai.com/v1", OPENAI_CANARY)
    assert api_endpoint("https://api.openai.com/v1") == ("https://api.openai.com/v1", OPENAI_CANARY)
    assert api_endpoint("https://api.openai.com/v1", "OPENAI_API_KEY") == ("https://api.openai.com/v1", OPENAI_CANARY)
    for elsewhere in ("http://api.openai.com/v1", "https://api.openai.com.evil.example/v1", "https://llm.example/v1"):
        assert api_endpoint(elsewhere) == (elsewhere, None), elsewhere
    assert api_endpoint("https://llm.example/v1", "LOCAL_LLM_KEY")[1] == LOCAL_CANARY
    for local in ("http://localhost:8000/v1", "http://127.0.0.1:8000/v1", "http://[::1]:8000/v1"):
        assert api_endpoint(local, "LOCAL_LLM_KEY")[1] == LOCAL_CANARY
    for plain in ("http://llm.example/v1", "http://10.0.0.5:8000/v1", "http://api.openai.com/v1"):
        with pytest.raises(DataError, match="Refusing to send the key in LOCAL_LLM_KEY over plain http") as err:
            api_endpoint(plain, "LOCAL_LLM_KEY")
        assert LOCAL_CANARY not in str(err.value)
    with pytest.raises(DataError, match="is not an http"):
        api_endpoint("ftp://llm.example/v1")


OPENAI_KEY_NAMED = {"api_key_env": "OPENAI_API_KEY"}  # pragma: allowlist secret


def test_the_openai_key_named_for_another_server_is_refused(monkeypatch):
    """api_key_env: OPENAI_API_KEY with a base_url that is not OpenAI would send OpenAI's key to that server."""
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)
    refused = (
        re.escape("names OPENAI_API_KEY, but the server is ")
        + r"\S+"
        + re.escape(", not OpenAI (https://api.openai.com): a key goes only to the host it belongs to.")
    )
    for url in ("http://localhost:8000/v1", "https://llm.example/v1", "http://api.openai.com/v1"):
        with pytest.raises(DataError, match="prepare.api_key_env " + refused) as err:
            api_endpoint(url, "OPENAI_API_KEY")
        assert OPENAI_CANARY not in str(err.value)
        with pytest.raises(ProfileError, match="api_key_env " + refused):
            load_profile("cpu-smoke", {"prepare": {"base_url": url, **OPENAI_KEY_NAMED}})
    with pytest.raises(DataError, match=re.escape("the server is https://llm.example, not OpenAI")) as err:
        api_endpoint("https://user:s3cretpw@llm.example/v1", "OPENAI_API_KEY")  # pragma: allowlist secret
    assert "s3cretpw" not in str(err.value), "the password written into the URL was repeated"
    openai = load_profile("cpu-smoke", {"prepare": {"base_url": "https://api.openai.com/v1", **OPENAI_KEY_NAMED}})
    assert openai.prepare.api_key_env == OPENAI_KEY_NAMED["api_key_env"]


KEY_IN_NAME = re.escape(
    "api_key_env does not look like a variable name; it looks like a key itself, which must never be written in "
    "a profile"
)


@pytest.mark.parametrize("pasted", [OPENAI_CANARY, HF_CANARY])
def test_a_key_pasted_into_api_key_env_is_refused_without_being_printed(pasted, monkeypatch):
    with pytest.raises(ProfileError, match="prepare.api_key_env: .*" + KEY_IN_NAME) as err:
        load_profile("cpu-smoke", {"prepare": {"api_key_env": pasted}})
    assert pasted not in str(err.value)
    monkeypatch.setenv("LOCAL_LLM_KEY", LOCAL_CANARY)
    with pytest.raises(DataError, match=KEY_IN_NAME) as err:
        OpenAIGenerator("test-model", base_url="http://localhost:8000/v1", api_key_env=pasted)
    assert pasted not in str(err.value)


def test_api_key_env_takes_variable_names_only():
    for name in ("VLLM_KEY", "LOCAL_LLM_KEY", "HF_TOKEN", "hf_token", "_X1"):  # pragma: allowlist secret
        assert load_profile("cpu-smoke", {"prepare": {"api_key_env": name}}).prepare.api_key_env == name
    for bad in ("MY KEY", "1KEY", "key-name"):
        with pytest.raises(ProfileError, match="api_key_env must be the name of an environment variable") as err:
            load_profile("cpu-smoke", {"prepare": {"api_key_env": bad}})
        assert bad not in str(err.value)
