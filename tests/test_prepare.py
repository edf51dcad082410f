"""Notebook 00's helpers: cleaning, chunking, parsing, filtering, and the API backend against a real HTTP server."""

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

from helpers import ROOT
from helpers.data import DataError
from helpers.prepare import (
    MAX_DOCUMENT_BYTES,
    MAX_REPLY_DEPTH,
    Chunk,
    OpenAIGenerator,
    api_endpoint,
    chunk_text,
    clean_text,
    generate_replies,
    parse_pairs,
    read_documents,
    select_pairs,
)

HTML = """<html><head><title>T</title><script>track()</script><meta name="author" content="x"></head><body>
<nav><a href="/">Home</a> | <a href="/a">About</a></nav><article><h1>Phishing review</h1>
<p>The attacker registered a look-alike domain and sent fake invoices to the finance team, who entered their
passwords on a copied login page. See <a href="https://example.com/report">the full report</a> for details.</p>
<p>Revoking every session of the account is what cut the attacker off, because session tokens outlive a reset of
the password. The team then removed the hidden inbox rule and blocked the domain at the gateway.</p>
</article><footer>Copyright. <a href="/privacy">Privacy</a></footer></body></html>"""


def test_clean_html_keeps_the_article_and_drops_navigation_scripts_and_links():
    text = clean_text(HTML, ".html")
    assert "look-alike domain" in text and "the full report" in text and "session tokens" in text
    for gone in ("track()", "Home | About", "https://", "Privacy", "<p>"):
        assert gone not in text


def test_clean_markdown_drops_front_matter_link_targets_images_and_metadata():
    raw = "---\ntitle: X\nowner: y\n---\n# Policy\n\nUse [FIDO2 keys](https://x.io/k) ![logo](l.png) now.\n\n"
    raw += "Source: https://wiki.example.com/page\n\nSecond   paragraph\nwrapped.\n"
    assert clean_text(raw, ".md") == "Policy\n\nUse FIDO2 keys now.\n\nSecond paragraph wrapped."


def test_chunks_keep_whole_paragraphs_under_the_limit():
    text = "\n\n".join(" ".join(f"w{p}_{i}" for i in range(40)) for p in range(5))
    chunks = chunk_text(text, 100)
    assert [len(c.split()) for c in chunks] == [80, 80, 40]
    assert chunk_text("x " * 250, 100) == ["x " * 99 + "x"] * 2 + ["x " * 49 + "x"]


def test_bad_documents_are_counted_not_fatal_and_an_empty_folder_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "good.md").write_text("Passphrases of four unrelated words resist guessing.\n")
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x00\x00binary")
    (tmp_path / "locked.txt").write_text("secret")
    (tmp_path / "sheet.xlsx").write_bytes(b"PK")
    real_read = Path.read_bytes

    def read_bytes(path):
        if path.name == "locked.txt":
            raise PermissionError(13, "Permission denied")
        return real_read(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    chunks, problems, documents = read_documents(tmp_path, 300)
    assert documents == 1 and len(chunks) == 1 and chunks[0].source == "good.md"
    assert sorted(p.reason for p in problems) == ["binary", "unreadable", "unsupported type"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="No usable documents"):
        read_documents(empty, 300)
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "nope", 300)


def test_parse_pairs_finds_json_in_chatter_and_refuses_the_rest():
    pair = {"question": "Why MFA?", "answer": "It stops most credential attacks."}
    fenced = 'Sure! Here you go:\n```json\n{"pairs": [' + json.dumps(pair) + "]}\n```\nAnything else?"
    assert parse_pairs(fenced) == [pair]
    assert parse_pairs(json.dumps([pair, "junk"])) == [pair]
    for bad in ("no json at all", '{"pairs": [{"question": "x"', '{"items": []}'):
        with pytest.raises(ValueError):
            parse_pairs(bad)


def test_select_pairs_drops_bad_duplicate_and_near_duplicate_pairs():
    chunk = Chunk("doc.md", 0, "Doc", "text")

    def reply(*pairs):
        return json.dumps({"pairs": [{"question": q, "answer": a} for q, a in pairs]})

    answer = "Use a slow salted hash such as Argon2id for every stored password."
    replies = {
        chunk.id: [
            reply(("How should passwords be stored?", answer), ("What is MFA?", "Too short.")),
            reply(("how should PASSWORDS be stored", answer), ("How should the passwords be stored?", answer)),
            reply(("", answer), ("What does a FIDO2 key check?", "It checks the origin before it signs anything.")),
            "not json",
        ]
    }
    selection = select_pairs(replies, [chunk], "You are a security expert.")
    assert [r["instruction"] for r in selection.rows] == [
        "How should passwords be stored?",
        "What does a FIDO2 key check?",
    ]
    assert selection.rows[0]["source"] == "doc.md" and selection.rows[0]["chunk"] == 0
    assert dict(selection.dropped) == {
        "answer under 5 words": 1,
        "duplicate": 1,
        "near-duplicate": 1,
        "missing or empty question": 1,
        "reply not JSON": 1,
    }


class FakeAPI(BaseHTTPRequestHandler):
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

    def _send(self, status, payload, headers=None):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    FakeAPI.log, FakeAPI.headers_seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
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
from helpers.prepare import OpenAIGenerator, generate_replies, read_documents
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


def test_where_each_key_may_go(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_CANARY)
    monkeypatch.setenv("LOCAL_LLM_KEY", LOCAL_CANARY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    assert api_endpoint(None) == ("https://api.openai.com/v1", OPENAI_CANARY)
    assert api_endpoint("https://api.openai.com/v1") == ("https://api.openai.com/v1", OPENAI_CANARY)
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


def test_a_key_pasted_into_api_key_env_is_refused_without_being_printed():
    from helpers.profiles import ProfileError, load_profile

    with pytest.raises(ProfileError, match="prepare.api_key_env") as err:
        load_profile("cpu-smoke", {"prepare": {"api_key_env": OPENAI_CANARY}})
    assert OPENAI_CANARY not in str(err.value)
    named = load_profile("cpu-smoke", {"prepare": {"api_key_env": "VLLM_KEY"}})  # pragma: allowlist secret
    assert named.prepare.api_key_env == "VLLM_KEY"  # pragma: allowlist secret


ADVERSARIAL = {
    "open brackets": "[" * 1_000_000,
    "unclosed links": "[a](" * 250_000,
    "unclosed images": "![" * 500_000,
    "links without targets": "[a]" * 333_333,
}


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_link_cleaning_is_linear_on_a_1mb_adversarial_document(name, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "evil.md").write_text(ADVERSARIAL[name] + "\n\nPassphrases beat short passwords.\n")
    start = time.perf_counter()
    chunks, problems, documents_read = read_documents(raw, 300)
    seconds = time.perf_counter() - start
    assert seconds < 1.0, f"{name}: {seconds:.2f} s"
    assert documents_read == 1 and not problems and "Passphrases beat short passwords." in chunks[-1].text
    # ordinary links still lose their targets; a link whose text holds brackets is left as written
    assert clean_text("See [the report](https://x.example/r) and ![logo](l.png), [a [b] c](u).", ".md") == (
        "See the report and , [a [b] c](u)."
    )


def test_a_document_over_the_size_limit_is_skipped_with_its_reason(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "book.txt").write_bytes(b"word " * (MAX_DOCUMENT_BYTES // 5 + 1))
    (raw / "note.md").write_text("Passphrases beat short passwords.\n")
    chunks, problems, documents_read = read_documents(raw, 300)
    assert documents_read == 1 and [c.source for c in chunks] == ["note.md"]
    assert [(p.where, p.reason) for p in problems] == [("book.txt", "too large")]
    size = MAX_DOCUMENT_BYTES + 5
    assert str(problems[0]) == f"book.txt: {size:,} bytes, over the limit of 2,000,000 bytes; split it"


class DeepReplies:
    """A generator whose replies are hostile JSON (a stand-in for a misbehaving helper LLM); counts its calls."""

    def __init__(self):
        self.calls = 0

    def replies(self, chunk, n, temperature):
        self.calls += 1
        deep = "[" * 1000 + "]" * 1000
        good = json.dumps({"pairs": [{"question": "What beats short passwords?", "answer": "Passphrases do, " * 3}]})
        braces = json.dumps({"pairs": [{"question": "Why [[[[ here?", "answer": "Brackets in strings do not nest."}]})
        return [deep, '{"pairs": ' * 5000, "x" * 200_000, good, braces]


def test_a_deeply_nested_or_huge_reply_is_dropped_before_parsing_and_a_rerun_does_not_crash(tmp_path):
    chunk = Chunk("doc.md", 0, "Doc", "Passphrases beat short passwords.")
    generator, cache = DeepReplies(), tmp_path / "cache.jsonl"
    for _ in range(2):  # the second run reads the cached hostile replies back
        replies = generate_replies([chunk], generator, cache, n=5, temperature=0.7)
        selection = select_pairs(replies, [chunk], "You are a security expert.")
        assert [r["instruction"] for r in selection.rows] == ["What beats short passwords?", "Why [[[[ here?"]
        assert dict(selection.dropped) == {"reply nested too deep": 2, "reply too long": 1}
    assert generator.calls == 1, "the cached replies were asked again"
    with pytest.raises(ValueError, match=f"nests 1000 levels deep, over the limit of {MAX_REPLY_DEPTH}"):
        parse_pairs("[" * 1000 + "]" * 1000)
    with pytest.raises(ValueError, match="the reply has 200,000 characters, over the limit of 100,000"):
        parse_pairs("x" * 200_000)


def test_push_to_hub_needs_a_token_and_is_never_implicit(monkeypatch):
    from helpers.prepare import push_to_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DataError, match="HF_TOKEN"):
        push_to_hub([{"subject": "s"}], "someone/pairs")
