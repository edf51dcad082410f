"""Notebook 00 on a real OpenAI-compatible server: llama.cpp's (xllamacpp) on the embedded GGUF, asked through the
OpenAI client with a 429 and a 503 injected by a small local proxy; the server stopped even when the block fails;
the in-process fallback (with the server's log) only where the server cannot start."""

import json
import threading
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import pytest
from json_handler import JsonHandler

from helpers import ROOT
from helpers.documents import read_documents
from helpers.openai_client import OpenAIGenerator, QuestionThenAnswer
from helpers.prepare import LocalGenerator, generate_replies, helper_llm, served_generator, start_helper_server
from helpers.profiles import load_profile
from helpers.replies import parse_pairs, select_pairs

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class FlakyProxy(JsonHandler):
    """Forwards to the real server, but answers its first request 429 (Retry-After: 0) and its second 503."""

    target = ""
    statuses: list = []
    lock = threading.Lock()

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            status = {0: 429, 1: 503}.get(len(self.statuses), 200)
            self.statuses.append(status)
        if status != 200:
            error = json.dumps({"error": {"message": "injected", "type": "server"}}).encode()
            return self._send(status, error, {"Retry-After": "0"} if status == 429 else {})
        request = urllib.request.Request(
            self.target + self.path, data=body, headers={"Content-Type": "application/json"}
        )
        with _DIRECT.open(request, timeout=300) as response:
            self._send(response.status, response.read())


@pytest.fixture(scope="module")
def smoke():
    profile = load_profile("cpu-smoke")
    settings = profile.prepare.model_copy(update={"responses_per_chunk": 2, "max_new_tokens": 24})
    chunks = read_documents(ROOT / settings.raw_dir, settings.chunk_words)[0][:2]
    return profile, settings, chunks


def test_preparation_on_the_real_server_retries_an_injected_429_and_503(smoke, tmp_path):
    profile, settings, chunks = smoke
    FlakyProxy.statuses = []
    with start_helper_server(settings, tmp_path) as server:
        FlakyProxy.target = server.url
        proxy = ThreadingHTTPServer(("127.0.0.1", 0), FlakyProxy)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        try:
            generator = served_generator(f"http://127.0.0.1:{proxy.server_address[1]}/v1", settings)
            failed = {}
            replies = generate_replies(
                chunks,
                generator,
                tmp_path / "cache.jsonl",
                n=settings.responses_per_chunk,
                temperature=settings.temperature,
                workers=settings.workers,
                on_error=lambda chunk, err: failed.update({chunk.id: repr(err)}),
            )
        finally:
            proxy.shutdown()
    assert not server.running, "the server outlived its with block"
    assert failed == {}, f"a chunk failed although 429 and 5xx are retried: {failed}"
    assert set(replies) == {c.id for c in chunks}
    assert all(len(r) == settings.responses_per_chunk for r in replies.values())
    pairs = [pair for texts in replies.values() for text in texts for pair in parse_pairs(text)]
    assert len(pairs) == len(chunks) * settings.responses_per_chunk and all(p["question"] for p in pairs)
    # per pair: one request for its question, one for its answer; plus the two injected failures, each retried
    answered = sum(1 for p in pairs if p["question"])
    assert FlakyProxy.statuses[:2] == [429, 503] and FlakyProxy.statuses.count(200) == len(pairs) + answered
    selection = select_pairs(replies, chunks, profile.infer.system_prompt)
    assert len(selection.rows) + sum(selection.dropped.values()) == len(pairs)


def test_helper_llm_serves_the_embedded_gguf_and_stops_it_when_the_block_fails(smoke, tmp_path):
    profile, settings, _ = smoke
    with pytest.raises(RuntimeError, match="a cell failed"):
        with helper_llm(profile, settings, tmp_path) as helper:
            assert isinstance(helper.generator, QuestionThenAnswer) and helper.notes == []
            about = helper.manifest()
            with _DIRECT.open(about["server"]["at"] + "/health", timeout=5) as response:
                assert json.loads(response.read())["status"] == "ok"
            raise RuntimeError("a cell failed")
    assert about["backend"] == "local" and about["server"]["model file"].endswith(".gguf")
    assert about["server"]["software"].startswith("llama.cpp's server (xllamacpp ")
    assert about["server"]["slots"] == settings.workers
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        _DIRECT.open(about["server"]["at"] + "/health", timeout=5)
    assert (tmp_path / "helper-llm-server.log").is_file()


def test_a_server_that_cannot_start_falls_back_in_process_and_says_why(smoke, tmp_path, monkeypatch):
    import helpers.model

    profile, settings, _ = smoke
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file at all")
    monkeypatch.setattr(helpers.model, "embedded_gguf_path", lambda: broken)
    card = SimpleNamespace(name="stand-in model")
    monkeypatch.setattr(helpers.model, "load_model", lambda profile: ("model", "tokenizer", card))
    with helper_llm(profile, settings, tmp_path) as helper:
        assert isinstance(helper.generator, LocalGenerator) and helper.server is None
    assert helper.name == "stand-in model" and "in this process" in helper.describe()
    (note,) = helper.notes
    assert note.startswith("llama.cpp's server could not start, so the model runs in this process instead")
    assert "broken.gguf" in note and "ends:\n" in note, "the note carries the end of the server's log"


def test_the_openai_backend_is_the_json_client_unchanged(smoke, tmp_path, monkeypatch):
    profile, settings, _ = smoke
    monkeypatch.setenv("OPENAI_API_KEY", "placeholder-for-a-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    openai_settings = settings.model_copy(update={"backend": "openai", "base_url": None})
    with helper_llm(profile, openai_settings, tmp_path) as helper:
        assert type(helper.generator) is OpenAIGenerator
    assert helper.manifest()["server"] == {"software": "OpenAI's API", "at": "https://api.openai.com"}
    assert not list(tmp_path.iterdir()), "no server was started for the OpenAI backend"
