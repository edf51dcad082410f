import pytest

from helpers.profiles import load_profile


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
