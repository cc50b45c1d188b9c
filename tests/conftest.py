import asyncio
import inspect

import pytest

from helpers.devnet_process import DevnetProcess
from helpers.servers import stores  # noqa: F401  (fixture: Redis and a CouchDB-protocol server per module)
from helpers.dashboard import chromium  # noqa: F401  (fixture: one headless Chromium per run, for `browser`)
from helpers.local_network import processes_of, trustmesh

ASYNC_TEST_TIMEOUT = 120  # seconds: a hung coroutine test fails instead of stalling the suite


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run slow soak and load tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): bound of an `async def` test (default ASYNC_TEST_TIMEOUT)")


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


@pytest.fixture
def start_devnet(tmp_path):
    """Starts dev validators with flags of the test's choosing, `start_devnet(*flags, name="d")`;
    every one still running is stopped after the test."""
    nodes = []

    def start(*flags: str, name: str = "d") -> DevnetProcess:
        node = DevnetProcess(tmp_path / name, *flags).start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """`async def test_…` runs in its own event loop, bounded by ASYNC_TEST_TIMEOUT (or a
    `@pytest.mark.timeout(seconds)`): no nested `async def scenario()` wrapper needed."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    marker = pyfuncitem.get_closest_marker("timeout")
    timeout = marker.args[0] if marker else ASYNC_TEST_TIMEOUT
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(asyncio.wait_for(pyfuncitem.obj(**kwargs), timeout))
    return True


@pytest.fixture
def home(tmp_path):
    """A local network's folder; whatever `trustmesh up` started there is brought down after the
    test, and nothing of it may be left running."""
    home = tmp_path / "net"
    yield home
    # A test that ran `down` itself leaves nothing to stop: a second `down` (a CLI process) would
    # only cost time. Whatever still runs there (a failed test's network) is brought down.
    if (home / "network.json").exists() and processes_of(home):
        trustmesh(home, "down", check=False, timeout=120)
    assert processes_of(home) == [], "the network left processes behind"
