"""Publishing to the Hub, against a local stand-in for the Hugging Face Hub HTTP API (HF_ENDPOINT points at it).

`HubStandIn` stands in for huggingface.co: it implements the routes `huggingface_hub.HfApi` calls for create_repo,
repo_info, upload_folder (preupload + commit, every file "regular", so no LFS/Xet) and list_repo_files, keeps the
repos in memory, and records every request with its Authorization header. No network is used.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from helpers.profiles import PublishSettings, load_profile
from helpers.publish import MissingTokenError, PublicRepoError, model_card, publish_patterns, push_folder
from helpers.steps import ADAPTER, EVAL, HUB_README, MODELFILE, PAIRS, TRAIN, gguf_name

Q8 = gguf_name("q8_0")
ADAPTER_CONFIG = f"{ADAPTER}/adapter_config.json"

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
    (tmp_path / ADAPTER).mkdir()
    (tmp_path / ADAPTER_CONFIG).write_text('{"r": 8}')
    (tmp_path / HUB_README).write_text("# card")
    (tmp_path / MODELFILE).write_text(f"FROM ./{Q8}")
    (tmp_path / Q8).write_bytes(b"GGUF")
    return tmp_path


def test_pushes_private_repo_and_reads_it_back(hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = PublishSettings(repo_id="me/tuned")
    done = push_folder(folder, "me/tuned", settings, allow_patterns=publish_patterns(settings, [Q8]))
    assert done.private and hub.repos[("model", "me/tuned")]["private"]
    assert done.files == sorted([MODELFILE, HUB_README, ADAPTER_CONFIG])  # no GGUF unless asked
    assert hub.repos[("model", "me/tuned")]["files"][HUB_README] == b"# card"
    # the token went only to the endpoint, as a bearer header, and was never printed
    assert all(auth == f"Bearer {TOKEN}" for _, _, auth in hub.requests)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err


def test_gguf_and_dataset_when_asked(hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    settings = PublishSettings(repo_id="me/tuned", gguf=True, dataset_repo_id="me/pairs")
    push_folder(folder, "me/tuned", settings, allow_patterns=publish_patterns(settings, [Q8]))
    assert Q8 in hub.repos[("model", "me/tuned")]["files"]
    data = folder / "data"
    data.mkdir()
    (data / PAIRS).write_text('{"instruction": "q", "response": "a"}\n')
    done = push_folder(data, "me/pairs", settings, repo_type="dataset")
    assert done.private and hub.repos[("dataset", "me/pairs")]["files"] == {PAIRS: (data / PAIRS).read_bytes()}


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
    assert not done.private and HUB_README in hub.repos[("model", "me/open")]["files"]


def test_repo_that_comes_back_public_is_an_error(
    hub: HubStandIn, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.make_public_on_commit = True
    with pytest.raises(PublicRepoError, match="came back public"):
        push_folder(folder, "me/flip", PublishSettings(repo_id="me/flip"))


def test_model_card_names_base_data_limits() -> None:
    profile = load_profile("cpu-smoke", {"publish": {"repo_id": "me/tuned"}})
    manifests = {TRAIN.name: {"steps": 4, "eval_loss_before": 4.2, "eval_loss_after": 4.0},
                 EVAL.name: {"answer_loss_base": 4.1, "answer_loss_tuned": 3.9}}  # fmt: skip
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
    pairs = folder.parent / PAIRS
    pairs.write_text('{"instruction": "q"}\n')
    profile = load_profile("cpu-smoke", {"publish": {"repo_id": "me/m", "dataset_repo_id": "me/d"}})
    result = publish(profile, folder, [Q8], pairs)
    assert result["model"]["private"] and result["dataset"]["private"]
    assert hub.repos[("dataset", "me/d")]["files"][PAIRS] == pairs.read_bytes()


def _finished_export(run_root: Path, profile_overrides: dict) -> tuple:
    """A run folder whose 00, 03, 05 and 07 steps are committed (05 with a small adapter), and notebook 08's built
    files (merged model, GGUF files, a log) in its work folder, as they are just before `save_export`."""
    import torch
    from safetensors.torch import save_file

    from helpers import steps
    from helpers.export import build_report
    from helpers.round_trip import RoundTrip
    from helpers.runfolder import RunFolder

    profile = load_profile("cpu-smoke", profile_overrides)
    run = RunFolder(run_root, profile.name, seed=0)
    out = run.begin(steps.PREPARED)
    (out / PAIRS).write_text('{"instruction": "q", "response": "a"}\n')
    run.commit(steps.PREPARED, {"rows": 1})
    run.begin(steps.DATASET)
    run.commit(steps.DATASET, {"train_rows": 24, "eval_rows": 6})
    adapter = run.begin(TRAIN) / ADAPTER
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
    save_file({"base_model.model.lora_A.weight": torch.ones(2, 3)}, adapter / "adapter_model.safetensors")
    run.commit(TRAIN, {"steps": 12, "eval_loss_before": 4.219, "eval_loss_after": 3.141})
    run.begin(EVAL)
    run.commit(EVAL, {"answer_loss_base": 4.062, "answer_loss_tuned": 2.719, "questions": 6})

    work = steps.export_workdir(run)
    (work / steps.MERGED).mkdir()
    (work / steps.MERGED / "config.json").write_text('{"model_type": "llama"}')
    (work / steps.MERGED / "model.safetensors").write_bytes(b"merged weights")
    for gguf_type in profile.export.gguf_types:
        steps.gguf_path(run, gguf_type).write_bytes(b"GGUF " + gguf_type.encode())
    steps.export_log(run, "convert-f16").write_text("converter log")

    def row(identical: bool, agreeing: int) -> dict:
        return {"question": "q", "identical": identical, "agreeing_tokens": agreeing, "tokens": 4,
                "merged_answer": "a", "gguf_answer": "a", "divergence": None}  # fmt: skip

    trips: dict[str, RoundTrip] = {t: RoundTrip(t, [row(True, 4), row(t == "f16", 4 if t == "f16" else 2)], True)
                                   for t in profile.export.gguf_types}  # fmt: skip
    speed = {"transformers generate (merged, 1 stream)": 10.0, f"llama.cpp {profile.export.serve}, 1 stream": 25.0}
    report = build_report(profile, {t: 1000 for t in profile.export.gguf_types}, {}, {}, trips,
                          {"merged": {"loss": 2.5}}, {"served_equals_merged": True}, speed)  # fmt: skip
    return profile, run, report


def _card_numbers(card: str) -> dict:
    """The numbers the model card shows, read back from its text."""

    def groups(pattern: str) -> tuple[str, ...]:
        found = re.search(pattern, card, re.M)
        assert found, f"the card has no line matching {pattern!r}"
        return found.groups()

    evaluation = card.split("## Evaluation (notebook 07)\n", 1)[1].split("\n## ", 1)[0]
    return {
        "steps": int(groups(r"^- (\d+) steps, batch")[0]),
        "loss": tuple(map(float, groups(r"Held-out loss before -> after: ([\d.]+) -> ([\d.]+)\."))),
        "rows": tuple(map(int, groups(r"Rows: (\d+) train / (\d+) held out\."))),
        "evaluation": {k: float(v) for k, v in re.findall(r"^- (\w+): ([\d.]+)$", evaluation, re.M)},
        "round_trip": {t: (int(i), int(q), float(a)) for t, i, q, a in re.findall(
            r"^- GGUF (\w+): (\d+)/(\d+) greedy answers identical to the merged model, token agreement ([\d.]+)$",
            card, re.M)},
    }  # fmt: skip


@pytest.mark.parametrize(("merged", "gguf"), [(False, False), (True, False), (False, True), (True, True)])
def test_publish_sends_the_finished_export_step(hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               merged: bool, gguf: bool) -> None:  # fmt: skip
    """Notebook 08 publishes after `save_export`, from the finished step: the adapter (copied from 05 by
    save_export), the card and the Modelfile always; merged/ and the GGUF files only when the profile says so. The
    old order (publishing the work folder before save_export) sent no adapter, card or Modelfile."""
    from matplotlib.figure import Figure

    from helpers import steps
    from helpers.model import resolve_model
    from helpers.publish import publish

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    overrides = {"publish": {"repo_id": "me/tuned", "dataset_repo_id": "me/pairs", "merged": merged, "gguf": gguf}}
    profile, run, report = _finished_export(tmp_path / "run", overrides)
    gguf_files = [gguf_name(t) for t in profile.export.gguf_types]
    adapter_files = {f"{ADAPTER}/{p.name}" for p in steps.adapter_dir(run).iterdir()}
    assert adapter_files == {ADAPTER_CONFIG, f"{ADAPTER}/adapter_model.safetensors"}
    merged_files = {f"{steps.MERGED}/{p.name}" for p in steps.merged_dir(run).iterdir()}
    expected = {HUB_README, MODELFILE, *adapter_files}
    expected |= merged_files if merged else set()
    expected |= set(gguf_files) if gguf else set()

    # the old order: the work folder, before save_export, holds none of the adapter, the card or the Modelfile
    old = push_folder(steps.export_workdir(run), "me/old-order", profile.publish,
                      allow_patterns=publish_patterns(profile.publish, gguf_files))  # fmt: skip
    assert not set(old.files) & {HUB_README, MODELFILE, *adapter_files}

    card = model_card(profile, resolve_model(profile.model.name), run.manifests(), report)
    modelfile_text = f"FROM ./{gguf_name(profile.export.serve)}\n"
    figure = Figure()
    figure.add_subplot().plot([1, 2])
    final = steps.save_export(run, report, {"sizes": figure}, modelfile_text, card)
    assert final == run.path(steps.EXPORT) and not steps.merged_dir(run).exists()  # moved into the step
    step_files = sorted(p.relative_to(final) for p in final.rglob("*"))
    pairs_folder = sorted(run.path(steps.PREPARED).iterdir())

    result = publish(profile, run.path(steps.EXPORT), gguf_files, steps.prepared_pairs(run))
    pushed = hub.repos[("model", "me/tuned")]["files"]
    assert result["published"] and set(pushed) == expected == set(result["model"]["files"])
    for name in expected:  # every file arrived whole, as the step holds it
        assert pushed[name] == (final / name).read_bytes(), name
    assert pushed[MODELFILE].decode() == modelfile_text and pushed[HUB_README].decode() == card
    assert hub.repos[("dataset", "me/pairs")]["files"] == {PAIRS: (run.path(steps.PREPARED) / PAIRS).read_bytes()}
    # publishing writes nothing into a saved step
    assert sorted(p.relative_to(final) for p in final.rglob("*")) == step_files
    assert sorted(run.path(steps.PREPARED).iterdir()) == pairs_folder

    # the card's numbers are the manifests' (05, 03, 07) and the export's (08's report and its manifest)
    numbers = _card_numbers(pushed[HUB_README].decode())
    train, data, evaluation = run.require(TRAIN), run.require(steps.DATASET), run.require(EVAL)
    assert numbers["steps"] == train["steps"]
    assert numbers["loss"] == (train["eval_loss_before"], train["eval_loss_after"])
    assert numbers["rows"] == (data["train_rows"], data["eval_rows"])
    assert numbers["evaluation"] == {k: v for k, v in evaluation.items()
                                     if isinstance(v, (int, float)) and k != "seed"}  # fmt: skip
    exported = steps.read_json(run, steps.EXPORT, steps.EXPORT_REPORT)
    assert numbers["round_trip"] == {r["type"]: (r["identical"], r["questions"], round(r["token_agreement"], 3))
                                     for r in exported["round_trip"]}  # fmt: skip
    headline = run.require(steps.EXPORT)["round_trip"]
    assert {t: f"{i}/{q} identical, agreement {a:.3f}" for t, (i, q, a) in numbers["round_trip"].items()} == headline
    assert numbers["round_trip"]["q8_0"] == (1, 2, 0.75)  # the test's round trip, not a default
