"""Notebook 00: the replies cache (resuming, what is never cached) and the pairs pushed as a private dataset."""

import json
from types import SimpleNamespace

import httpx
import pytest
from datasets import Dataset
from huggingface_hub.errors import RepositoryNotFoundError

from helpers.data import DataError
from helpers.documents import Chunk
from helpers.prepare import generate_replies
from helpers.publish import PublicRepoError
from helpers.publish_pairs import push_to_hub
from helpers.replies import select_pairs

CHUNK = Chunk("doc.md", 0, "Doc", "Passphrases beat short passwords.")
GOOD = json.dumps({"pairs": [{"question": "What beats short passwords?", "answer": "Passphrases do, " * 3}]})


class CannedReplies:
    """A generator that returns the same replies for every chunk (a stand-in for a helper LLM); counts its calls."""

    def __init__(self, replies: list[str]):
        self.replies_given, self.calls = replies, 0

    def replies(self, chunk, n, temperature):
        self.calls += 1
        return self.replies_given


def test_a_finished_chunk_is_cached_and_not_asked_again(tmp_path):
    generator, cache = CannedReplies([GOOD]), tmp_path / "cache.jsonl"
    for _ in range(2):
        assert generate_replies([CHUNK], generator, cache, n=1, temperature=0.7) == {CHUNK.id: [GOOD]}
    assert generator.calls == 1
    assert [json.loads(line) for line in cache.read_text().splitlines()] == [{"id": CHUNK.id, "replies": [GOOD]}]


def test_a_chunk_with_a_refused_reply_is_not_cached_so_a_rerun_asks_again(tmp_path):
    deep = "[" * 1000 + "]" * 1000
    braces = json.dumps({"pairs": [{"question": "Why [[[[ here?", "answer": "Brackets in strings do not nest."}]})
    generator = CannedReplies([deep, '{"pairs": ' * 5000, "x" * 200_000, GOOD, braces])
    cache = tmp_path / "cache.jsonl"
    for _ in range(2):  # nothing refused is read back from the cache: the second run asks again
        replies = generate_replies([CHUNK], generator, cache, n=5, temperature=0.7)
        selection = select_pairs(replies, [CHUNK], "You are a security expert.")
        assert [r["instruction"] for r in selection.rows] == ["What beats short passwords?", "Why [[[[ here?"]
        assert dict(selection.dropped) == {"reply nested too deep": 2, "reply too long": 1}
    assert generator.calls == 2, "the refused replies were cached, so the chunk was never asked again"
    assert cache.read_text() == ""


def test_cache_lines_of_the_wrong_shape_are_skipped_and_their_chunk_asked_again(tmp_path):
    cache = tmp_path / "cache.jsonl"
    lines = ["null", "[]", '"text"', '{"replies": [1]}', '{"id": "doc.md#0:cut off', "[" * 100_000]
    lines += [json.dumps({"id": CHUNK.id, "replies": bad}) for bad in ("text", None, {"a": 1}, [None], [1])]
    lines += [json.dumps({"id": [CHUNK.id], "replies": [GOOD]}), json.dumps({"id": CHUNK.id, "replies": ["[" * 50]})]
    cache.write_text("\n".join(lines) + "\n")
    generator = CannedReplies([GOOD])
    replies = generate_replies([CHUNK], generator, cache, n=1, temperature=0.7)
    assert generator.calls == 1, "an edited or cut-off cache line was taken for the chunk's replies"
    assert replies == {CHUNK.id: [GOOD]}
    assert [r["instruction"] for r in select_pairs(replies, [CHUNK], "system").rows] == ["What beats short passwords?"]


def test_push_to_hub_needs_a_token_and_is_never_implicit(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(DataError, match="HF_TOKEN"):
        push_to_hub([{"subject": "s"}], "someone/pairs")


class FakeHub:
    """Stands in for huggingface_hub.HfApi: dataset repos by id with their privacy; no network."""

    repos: dict[str, bool] = {}  # repo id -> private
    created: list = []

    def __init__(self, endpoint=None, token=None):
        assert token == "hf_test_token"  # pragma: allowlist secret

    def repo_info(self, repo_id, repo_type=None):
        assert repo_type == "dataset"
        if repo_id not in self.repos:
            request = httpx.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}")
            raise RepositoryNotFoundError("no such repo", response=httpx.Response(404, request=request))
        return SimpleNamespace(private=self.repos[repo_id])

    def create_repo(self, repo_id, repo_type=None, private=False, exist_ok=False):
        assert repo_type == "dataset"
        self.created.append((repo_id, private))
        self.repos.setdefault(repo_id, private)

    def list_repo_files(self, repo_id, repo_type=None):
        return ["data/train-00000-of-00001.parquet"]


@pytest.fixture
def hub(monkeypatch):
    """The fake Hub, the uploads `datasets` would have made (repo id, rows), and the repos an upload turns public
    (as if someone changed it on the Hub meanwhile)."""
    FakeHub.repos, FakeHub.created = {}, []
    state = SimpleNamespace(repos=FakeHub.repos, created=FakeHub.created, uploads=[], turns_public=set())

    def upload(dataset, repo_id, **kwargs):
        state.uploads.append((repo_id, len(dataset)))
        if repo_id in state.turns_public:
            state.repos[repo_id] = False

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")  # pragma: allowlist secret
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.setattr("huggingface_hub.HfApi", FakeHub)
    monkeypatch.setattr(Dataset, "push_to_hub", upload)
    return state


ROWS = [{"subject": "s", "system": "x", "instruction": "q?", "response": "an answer of five words"}]


def test_push_to_hub_refuses_an_existing_public_repo(hub):
    """`datasets.push_to_hub(private=True)` leaves an existing public repo public: the pairs would be published."""
    hub.repos["me/pairs"] = False
    with pytest.raises(PublicRepoError, match="The dataset repo me/pairs exists and is public") as err:
        push_to_hub(ROWS, "me/pairs")
    assert "publish.allow_public: true. Nothing was uploaded." in str(err.value)
    assert hub.uploads == [] and hub.created == []
    published = push_to_hub(ROWS, "me/pairs", allow_public=True)  # asked for on purpose: uploaded, and said so
    assert hub.uploads == [("me/pairs", 1)] and published.private is False


def test_push_to_hub_creates_a_missing_repo_private_and_reads_it_back(hub):
    published = push_to_hub(ROWS, "me/new-pairs")
    assert hub.created == [("me/new-pairs", True)] and hub.uploads == [("me/new-pairs", 1)]
    assert published.private is True and published.url == "https://huggingface.co/datasets/me/new-pairs"
    hub.turns_public.add("me/new-pairs")
    with pytest.raises(PublicRepoError, match="The dataset repo me/new-pairs came back public after the upload"):
        push_to_hub(ROWS, "me/new-pairs")
