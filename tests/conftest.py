import os
import sys
from pathlib import Path

import pytest
from filelock import FileLock

from helpers.profiles import load_profile

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


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory, worker_id) -> Chain:
    """Notebooks 00-09 under cpu-smoke, run once for the session (tests/smoke_chain.py). `make test` sends every
    test that reads it to one worker (the xdist group below); the lock keeps it to one run under any other split."""
    shared = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        shared = shared.parent
    with FileLock(shared / "chain.lock"):
        saved = shared / "chain.json"
        if saved.is_file():
            return Chain.load(saved)
        chain = run_chain(shared / "chain")
        chain.save(saved)
    return chain


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the groups into node ids
def pytest_collection_modifyitems(items):
    # `make test` (pytest -n 2 --dist loadgroup): the tests that read the chain run on its worker, none waits idle.
    for item in items:
        if "smoke_chain" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("chain"))
