"""Publishing to the Hub, against a local stand-in for the Hugging Face Hub HTTP API (HF_ENDPOINT points at it).

`HubStandIn` stands in for huggingface.co: it implements the routes `huggingface_hub.HfApi` calls for create_repo,
repo_info, upload_folder (preupload + commit, every file "regular", so no LFS/Xet) and list_repo_files, keeps the
repos in memory, and records every request with its Authorization header. No network is used.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from helpers.profiles import PublishSettings, load_profile
from helpers.publish import MissingTokenError, PublicRepoError, model_card, publish_patterns, push_folder

TOKEN = "hf_standin_test_token_0123456789"  # pragma: allowlist secret


class HubStandIn(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[tuple[str, str], dict] = {}  # (type, id) -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str, str | None]] = []
        self.make_public_on_commit = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: HubStandIn

    def log_message(self, *args: object) -> None:  # quiet test output
        pass

    def _send(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status >= 400:
            self.send_header("X-Error-Message", str(body))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _repo(self, parts: list[str]) -> tuple[tuple[str, str], list[str]]:
        # /api/{models|datasets}/{owner}/{name}/...
        kind = parts[1].removesuffix("s")
        return (kind, f"{parts[2]}/{parts[3]}"), parts[4:]

    def _record(self, method: str) -> list[str]:
        self.server.requests.append((method, self.path, self.headers.get("Authorization")))
        return [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]

    def do_GET(self) -> None:
        parts = self._record("GET")
        key, rest = self._repo(parts)
        repo = self.server.repos.get(key)
        if repo is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        if not rest or rest[0] == "revision":
            siblings = [{"rfilename": p} for p in repo["files"]]
            self._send(200, {"id": key[1], "private": repo["private"], "sha": "0" * 40, "siblings": siblings})
        elif rest[0] == "tree":
            self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                             for p, b in repo["files"].items()])  # fmt: skip
        else:
            self._send(404, {"error": f"stand-in has no GET route {self.path}"})

    def do_POST(self) -> None:
        parts = self._record("POST")
        body = self._body()
        if parts[:3] == ["api", "repos", "create"]:
            request = json.loads(body)
            key = (request.get("type") or "model", f"{request.get('organization') or 'me'}/{request['name']}")
            if key in self.server.repos:
                self._send(409, {"error": "You already created this repo"})
                return
            # huggingface_hub 1.x sends "visibility"; older clients sent "private"
            private = request.get("visibility", "private" if request.get("private") else "public") == "private"
            self.server.repos[key] = {"private": private, "files": {}}
            self._send(200, {"url": f"{self.server.url}/{key[1]}"})
            return
        if parts[:2] == ["api", "validate-yaml"]:  # the Hub checks a model card's metadata before a commit
            self._send(200, {"errors": [], "warnings": []})
            return
        key, rest = self._repo(parts)
        repo = self.server.repos.get(key)
        if repo is None:
            self._send(404, {"error": "Repository not found"})
        elif rest[0] == "preupload":
            files = json.loads(body)["files"]
            self._send(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                       for f in files]})  # fmt: skip
        elif rest[0] == "commit":
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            if self.server.make_public_on_commit:
                repo["private"] = False
            self._send(200, {"commitUrl": f"{self.server.url}/{key[1]}/commit/1", "commitOid": "1" * 40})
        else:
            self._send(404, {"error": f"stand-in has no POST route {self.path}"})


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    server = HubStandIn()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"r": 8}')
    (tmp_path / "README.md").write_text("# card")
    (tmp_path / "Modelfile").write_text("FROM ./model-q8_0.gguf")
    (tmp_path / "model-q8_0.gguf").write_bytes(b"GGUF")
    return tmp_path


def test_pushes_private_repo_and_reads_it_back(hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = PublishSettings(repo_id="me/tuned")
    done = push_folder(folder, "me/tuned", settings, allow_patterns=publish_patterns(settings, ["model-q8_0.gguf"]))
    assert done.private and hub.repos[("model", "me/tuned")]["private"]
    assert done.files == ["Modelfile", "README.md", "adapter/adapter_config.json"]  # no GGUF unless asked
    assert hub.repos[("model", "me/tuned")]["files"]["README.md"] == b"# card"
    # the token went only to the endpoint, as a bearer header, and was never printed
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_gguf_and_dataset_when_asked(hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = PublishSettings(repo_id="me/tuned", gguf=True, dataset_repo_id="me/pairs")
    push_folder(folder, "me/tuned", settings, allow_patterns=publish_patterns(settings, ["model-q8_0.gguf"]))
    assert "model-q8_0.gguf" in hub.repos[("model", "me/tuned")]["files"]
    data = folder / "data"
    data.mkdir()
    (data / "pairs.jsonl").write_text('{"instruction": "q", "response": "a"}\n')
    done = push_folder(data, "me/pairs", settings, repo_type="dataset")
    assert done.private and hub.repos[("dataset", "me/pairs")]["files"] == {
        "pairs.jsonl": (data / "pairs.jsonl").read_bytes()
    }


def test_no_token_is_a_named_error_before_any_request(hub: HubStandIn, folder: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(MissingTokenError, match="HF_TOKEN"):
        push_folder(folder, "me/tuned", PublishSettings(repo_id="me/tuned"))
    assert hub.requests == []


def test_existing_public_repo_is_refused_unless_allowed(hub: HubStandIn, folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.repos[("model", "me/open")] = {"private": False, "files": {}}
    with pytest.raises(PublicRepoError, match="public"):
        push_folder(folder, "me/open", PublishSettings(repo_id="me/open"))
    assert hub.repos[("model", "me/open")]["files"] == {}  # nothing uploaded
    done = push_folder(folder, "me/open", PublishSettings(repo_id="me/open", allow_public=True))
    assert not done.private and "README.md" in hub.repos[("model", "me/open")]["files"]


def test_repo_that_comes_back_public_is_an_error(
    hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.make_public_on_commit = True
    with pytest.raises(PublicRepoError, match="came back public"):
        push_folder(folder, "me/flip", PublishSettings(repo_id="me/flip"))


def test_model_card_names_base_data_limits() -> None:
    profile = load_profile("cpu-smoke", {"publish": {"repo_id": "me/tuned"}})
    manifests = {"05_train": {"steps": 4, "eval_loss_before": 4.2, "eval_loss_after": 4.0},
                 "07_eval": {"answer_loss_base": 4.1, "answer_loss_tuned": 3.9}}  # fmt: skip
    export = {"round_trip": [{"type": "q8_0", "identical": 2, "questions": 2, "token_agreement": 1.0}]}
    card = model_card(profile, "HuggingFaceTB/SmolLM2-135M-Instruct", manifests, export)
    assert card.startswith("---\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct")
    for text in ("cpu-smoke", "Apache-2.0", "4.2 -> 4", "answer_loss_tuned: 3.9", "2/2 greedy", "Intended use"):
        assert text in card


def test_publish_is_off_without_repo_id_and_pushes_model_and_pairs_with_one(
    hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from helpers.publish import publish

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert publish(load_profile("cpu-smoke"), folder, [], None) == {
        "published": False, "reason": "publish.repo_id is not set (publishing is off)"}  # fmt: skip
    assert hub.requests == []
    pairs = folder.parent / "pairs.jsonl"
    pairs.write_text('{"instruction": "q"}\n')
    profile = load_profile("cpu-smoke", {"publish": {"repo_id": "me/m", "dataset_repo_id": "me/d"}})
    result = publish(profile, folder, ["model-q8_0.gguf"], pairs)
    assert result["model"]["private"] and result["dataset"]["private"]
    assert hub.repos[("dataset", "me/d")]["files"]["pairs.jsonl"] == pairs.read_bytes()
