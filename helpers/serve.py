"""Lesson 08: a real OpenAI-compatible server (llama.cpp's, from the `xllamacpp` wheel) on an exported GGUF.

The server runs in a child process on a free port, so a notebook can stop it for sure: `with LlamaServer(...)`
stops it at the end of the block even when a cell fails, a `weakref.finalize` hook stops it when the object is
dropped or the interpreter exits, and the child itself exits when its parent process is gone (a killed kernel).

`python -m helpers.serve --gguf FILE --port N` is the child (also usable by hand).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from typing import Any

from helpers import ROOT
from helpers.chat import messages
from helpers.secrets import environment_without_secrets

# The server is on this machine: its requests never go through http_proxy/HTTPS_PROXY, which would not reach it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """The server did not start or did not answer; the message carries the tail of its log."""


class PortInUseError(ServerError):
    """The asked-for port is taken by another program."""


def default_threads() -> int:
    """Every core, unless OMP_NUM_THREADS says fewer (the tests give each worker one): llama.cpp's threads spin, so
    two of them sharing one busy core run several times slower than one."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port the system has just said is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def _stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 10 s; safe to call twice and at interpreter exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _log_tail(path: Path, lines: int = 20) -> str:
    if not path.is_file():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class LlamaServer:
    """llama.cpp's HTTP server on one GGUF file, in a child process; OpenAI routes under `base_url` (…/v1)."""

    def __init__(self, gguf: str | Path, port: int | None = None, threads: int | None = None, parallel: int = 1,
                 context: int = 2048, log_file: str | Path | None = None, startup_seconds: float = 120.0):  # fmt: skip
        self.gguf = Path(gguf)
        if not self.gguf.is_file():
            raise ServerError(f"No GGUF file at {self.gguf}: export it first (helpers.gguf_converter.convert_to_gguf).")
        self.host = "127.0.0.1"  # the lesson's server is local only; it has no API key
        self.port = port
        self.threads = threads or default_threads()
        self.parallel = parallel
        self.context = context
        self.log_file = Path(log_file) if log_file else self.gguf.with_suffix(".server.log")
        self.startup_seconds = startup_seconds
        self.process: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """For the `openai` client: `OpenAI(base_url=server.base_url, api_key=...)` (any key: this server has none)."""
        return f"{self.url}/v1"

    def start(self) -> LlamaServer:
        if self.process is not None and self.process.poll() is None:
            return self
        if self.port is None:
            self.port = free_port(self.host)
        elif port_in_use(self.port, self.host):
            raise PortInUseError(f"Port {self.port} on {self.host} is in use: stop what runs there or pass port=None.")
        command = [sys.executable, "-m", "helpers.serve", "--gguf", str(self.gguf), "--port", str(self.port),
                   "--threads", str(self.threads), "--parallel", str(self.parallel), "--context", str(self.context),
                   "--parent", str(os.getpid())]  # fmt: skip
        env = environment_without_secrets(self.log_file.parent)  # tokens and stored logins are not the server's
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "w", encoding="utf-8") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self._finalizer = weakref.finalize(self, _stop_process, self.process)  # also runs at interpreter exit
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise ServerError(
                    f"llama.cpp's server exited ({self.process.returncode}) while loading {self.gguf.name}. "
                    f"Log {self.log_file} ends:\n{_log_tail(self.log_file)}"
                )
            try:
                if self.get("/health").get("status") == "ok":
                    return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.2)
        self.stop()
        raise ServerError(f"llama.cpp's server did not answer within {self.startup_seconds:.0f} s. "
                          f"Log {self.log_file} ends:\n{_log_tail(self.log_file)}")  # fmt: skip

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # stops the process once; later calls do nothing

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # HTTP

    def get(self, path: str, timeout: float = 5.0) -> dict[str, Any]:
        with _DIRECT.open(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """A plain HTTP POST with a JSON body: what any language can do with this server."""
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode("utf-8"),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with _DIRECT.open(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise ServerError(f"POST {path} failed: {err.code} {err.read()[:300]!r}") from None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization of `text` (special tokens parsed, no BOS added)."""
        return self.post("/tokenize", {"content": text, "add_special": False, "parse_special": True})["tokens"]

    def greedy(self, prompt: str, max_new_tokens: int, stops: list[int]) -> dict[str, Any]:
        """Greedy continuation of a raw prompt with the two best log-probabilities at each step."""
        reply = self.post("/completion", {"prompt": prompt, "n_predict": max_new_tokens, "temperature": 0.0,
                                          "top_k": 1, "n_probs": 2, "return_tokens": True, "cache_prompt": False,
                                          "add_special": False, "parse_special": True})  # fmt: skip
        tokens = [t for t in reply["tokens"] if t not in stops]
        top = [{p["token"]: round(p["logprob"], 4) for p in step["top_logprobs"]}
               for step in reply.get("completion_probabilities", [])]  # fmt: skip
        return {"tokens": tokens, "stopped": reply.get("stop_type") == "eos", "top_logprobs": top,
                "tokens_per_second": reply["timings"]["predicted_per_second"]}  # fmt: skip


def chat_body(question: str, system: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    """An OpenAI chat-completions request body, greedy (temperature 0)."""
    return {"messages": messages(question, system), "max_tokens": max_tokens, "temperature": 0.0, **extra}


def served_speed(server: LlamaServer, questions: list[str], system: str, max_tokens: int,
                 concurrency: int = 1) -> dict[str, Any]:  # fmt: skip
    """Generated tokens per second over `concurrency` simultaneous chat requests (each forced to `max_tokens`
    with ignore_eos, so every run generates the same amount), wall clock from the first request to the last reply."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [chat_body(questions[i % len(questions)], system, max_tokens, ignore_eos=True)
              for i in range(concurrency)]  # fmt: skip
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(lambda b: server.post("/v1/chat/completions", b), bodies))
    seconds = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in replies)
    return {"concurrency": concurrency, "tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds, 1)}  # fmt: skip


def _watch_parent(parent: int) -> None:
    """Exit when the process that started us is gone (a kernel killed hard cannot run its cleanup)."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="llama.cpp's OpenAI-compatible server on one GGUF file.")
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=1, help="requests served at once (slots)")
    parser.add_argument("--context", type=int, default=2048, help="context per slot, in tokens")
    parser.add_argument("--parent", type=int, default=None, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if args.parent:
        _watch_parent(args.parent)

    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = args.gguf
    params.hostnames = [args.host]
    params.port = args.port
    params.n_parallel = args.parallel
    params.n_ctx = args.context * args.parallel  # llama.cpp shares the context among the slots
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.use_jinja = True  # the GGUF's own chat template, as Jinja
    server = xllamacpp.Server(params)
    print(f"serving {args.gguf} at {server.listening_address}", flush=True)
    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
    signal.signal(signal.SIGINT, lambda *_: stop.update(now=True))
    while not stop["now"]:
        time.sleep(0.2)
    del server
    return 0


if __name__ == "__main__":
    sys.exit(main())
