"""The llama.cpp server of notebook 08 (`helpers.serve`): free port, named faults, and no process left behind,
whether the block ends, fails, the object is dropped, or the parent process is killed."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from helpers import ROOT
from helpers.model import embedded_gguf_path
from helpers.serve import LlamaServer, PortInUseError, ServerError, chat_body, free_port, served_speed


def _servers_on(gguf: Path) -> list[int]:
    """Live `helpers.serve` processes serving this test's file (only processes these tests started)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"helpers.serve" in cmd and str(gguf).encode() in cmd:
                stat = (proc / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie is already dead
                    pids.append(int(proc.name))
    return pids


def _wait_gone(gguf: Path, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _servers_on(gguf):
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # the embedded model's own GGUF (Q4_1, 98 MB) under a path unique to this test module, found in /proc by name
    link = tmp_path_factory.mktemp("serve") / "embedded.gguf"
    link.symlink_to(embedded_gguf_path())
    return link


def test_serves_openai_routes_and_stops(gguf: Path) -> None:
    with LlamaServer(gguf, threads=2, parallel=2) as server:
        assert server.port and server.base_url.endswith("/v1")
        reply = server.post("/v1/chat/completions", chat_body("What is a firewall?", "Be brief.", 8))
        assert reply["choices"][0]["message"]["content"]
        speed = served_speed(server, ["What is a firewall?"], "Be brief.", 8, concurrency=2)
        assert speed["tokens"] == 16 and speed["tokens_per_second"] > 0
        assert _servers_on(gguf) == [server.process.pid]
    assert _wait_gone(gguf)


def test_failing_cell_still_stops_the_server(gguf: Path) -> None:
    with pytest.raises(ZeroDivisionError), LlamaServer(gguf, threads=1) as server:
        assert server.running
        1 / 0  # noqa: B018  (a cell that fails)
    assert not server.running and _wait_gone(gguf)


def test_dropped_server_object_stops_its_process(gguf: Path) -> None:
    server = LlamaServer(gguf, threads=1).start()
    pid = server.process.pid
    del server
    gc.collect()
    assert _wait_gone(gguf), f"server {pid} still running after its object was dropped"


def test_killed_parent_leaves_no_orphan(gguf: Path, tmp_path: Path) -> None:
    """A kernel killed with SIGKILL runs no cleanup: the server child notices its parent is gone and exits."""
    script = (f"from helpers.serve import LlamaServer; s = LlamaServer({str(gguf)!r}, threads=1).start(); "
              "print(s.process.pid, flush=True); import time; time.sleep(600)")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    try:
        child = int(parent.stdout.readline())
        assert child in _servers_on(gguf)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_gone(gguf), f"server {child} outlived its killed parent"
    finally:
        parent.kill()
        for pid in _servers_on(gguf):  # only if the test failed: do not leave it running
            os.kill(pid, signal.SIGKILL)


def test_port_in_use_is_named(gguf: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortInUseError, match=f"Port {port}"):
            LlamaServer(gguf, port=port).start()
    assert not _servers_on(gguf)


def test_server_that_cannot_load_shows_its_log_and_is_gone(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # a header and nothing else
    with pytest.raises(ServerError, match="exited") as err:
        LlamaServer(broken, port=free_port(), threads=1, startup_seconds=60).start()
    assert "ends:" in str(err.value)
    assert _wait_gone(broken)


def test_missing_gguf_is_named(tmp_path: Path) -> None:
    with pytest.raises(ServerError, match="No GGUF file"):
        LlamaServer(tmp_path / "none.gguf")


# ---- without llama.cpp: a tiny HTTP server stands in for it ------------------------------------------------------

CANARY = "hf_canary_instructor_token_7731"


class _FakeLlama(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._reply({"status": "ok"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._reply({"tokens": [len(body["content"])]})

    def _reply(self, value: dict) -> None:
        data = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


class _FakeProcess:
    """Stands in for the server's child process: records its environment and keeps running."""

    env: dict[str, str] = {}

    def __init__(self, command: list[str], **kwargs: object) -> None:
        _FakeProcess.env = kwargs["env"]  # type: ignore[assignment]
        self.pid, self.returncode = 0, None

    def poll(self) -> None:
        return None

    def terminate(self) -> None:
        pass

    def wait(self, timeout: float | None = None) -> int:
        return 0


@pytest.fixture
def fake_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A LlamaServer whose child is `_FakeProcess` and whose HTTP side is `_FakeLlama`, behind a dead proxy."""
    import helpers.serve

    http = ThreadingHTTPServer(("127.0.0.1", 0), _FakeLlama)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    dead_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(helpers.serve, "free_port", lambda host: http.server_port)
    monkeypatch.setattr(helpers.serve.subprocess, "Popen", _FakeProcess)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    yield LlamaServer(gguf, threads=1, startup_seconds=5)
    http.shutdown()


def test_local_requests_bypass_proxies(fake_server: LlamaServer) -> None:
    """With http_proxy set to a dead port, the health check, a POST and tokenize still reach the local server."""
    with fake_server.start() as server:
        assert server.get("/health") == {"status": "ok"}
        assert server.tokenize("four") == [4]
        assert server.post("/v1/chat/completions", {"content": "ab"}) == {"tokens": [2]}


def test_the_server_process_gets_no_secrets_or_stored_logins(fake_server: LlamaServer, monkeypatch) -> None:
    for name in ("HF_TOKEN", "OPENAI_API_KEY", "PGPASSWORD", "CI_JOB_JWT", "SENTRY_DSN"):
        monkeypatch.setenv(name, CANARY)
    monkeypatch.setenv("DATABASE_URL", f"postgres://app:{CANARY}@db/app")
    with fake_server.start():
        env = _FakeProcess.env
    assert CANARY not in json.dumps(env) and env["HF_HUB_DISABLE_IMPLICIT_TOKEN"] == "1"
    assert env["HF_TOKEN_PATH"] == str(fake_server.log_file.parent / ".no-stored-login")
    assert not Path(env["HF_TOKEN_PATH"]).exists() and str(ROOT) in env["PYTHONPATH"]
