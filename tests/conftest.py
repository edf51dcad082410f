import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from helpers.profiles import load_profile
from helpers.steps import CHAIN

sys.path.insert(0, str(Path(__file__).parent))
from smoke_chain import Chain, run_chain  # noqa: E402


def pytest_configure(config):
    # Under `pytest -n 2` (make test) each worker, and every process it starts, gets one core: two workers each
    # spinning two OpenMP threads on two cores slow every matrix product several times over.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_addoption(parser):
    parser.addoption("--profile", default="cpu-smoke", help="profile for the notebook chain test (gpu: rtx4090)")


@pytest.fixture(scope="session")
def smoke():
    return load_profile("cpu-smoke")


@pytest.fixture(scope="session")
def tokenizer(smoke):
    from helpers.model import load_tokenizer

    return load_tokenizer(smoke)[0]


@pytest.fixture(scope="session")
def sample_rows():
    from helpers.data import load_rows

    return load_rows("sample").rows


def shared_chain(tmp_path_factory, worker_id: str, name: str, **how) -> Chain:
    """A notebook chain run once for the whole session, whichever worker asks first (the lock keeps it to one run);
    `make test` sends every test that reads it to one worker (the xdist groups below)."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    with FileLock(shared / f"{name}.lock"):
        saved = shared / f"{name}.json"
        if saved.is_file():
            return Chain.load(saved)
        chain = run_chain(shared / name, **how)
        chain.save(saved)
    return chain


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory, worker_id) -> Chain:
    """Notebooks 00-09 under cpu-smoke (tests/smoke_chain.py)."""
    return shared_chain(tmp_path_factory, worker_id, "chain")


@pytest.fixture(scope="session")
def llama_chain(tmp_path_factory, worker_id) -> Chain:
    """Notebooks 01-09 under cpu-llama31: the GPU profile's code path on the Llama 3.1 twin in 4-bit."""
    only = [step.notebook[:2] for step in CHAIN[1:]]
    return shared_chain(tmp_path_factory, worker_id, "llama-chain", profile="cpu-llama31", only=only)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the groups into node ids
def pytest_collection_modifyitems(items):
    # `make test` (pytest -n 2 --dist loadgroup): the tests that read a chain run on its worker, none waits idle.
    for item in items:
        for chain in ("smoke_chain", "llama_chain"):
            if chain in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(chain))
