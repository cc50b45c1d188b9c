import pytest

from helpers.devnet_process import DevnetProcess


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run slow soak and load tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def devnet(tmp_path):
    """A fresh dev validator in its own process, stopped after the test."""
    node = DevnetProcess(tmp_path / "devnet").start()
    yield node
    node.stop()
