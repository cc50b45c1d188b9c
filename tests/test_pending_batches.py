"""Pending batches, end to end against real servers: a RestClient remembers the batches it
submitted until a status read says they are final (or its waiter gives up), a node's heartbeat
carries them (keep_beating with a function), and the dashboard's Nodes page and JSON API show
them per node, confirmed with the REST API's /batch_statuses, live in a headless Chromium.

The dev validator runs with a long --missing-processor-grace: an intkey batch stays PENDING
until the test starts an intkey processor, as with the real validator.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from helpers.dashboard import DashboardProcess, browser  # noqa: F401  (browser: a fixture)
from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import intkey_batch, rest, run, running_processor
from trustmesh.ledger.rest_client import BatchTimeoutError
from trustmesh.ledger.signing import PrivateKey
from trustmesh.stores.heartbeats import Heartbeats
from trustmesh.stores.redis_client import connect
from trustmesh.stores.servers import RedisServer

SIGNER, OTHER = PrivateKey.generate(), PrivateKey.generate()
NODE = SIGNER.public_key().as_hex()  # heartbeats name a node by its key, which signs its batches


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    node = DevnetProcess(tmp_path_factory.mktemp("pending-chain") / "devnet", "--missing-processor-grace", "120")
    node.start()
    yield node
    node.stop()


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


async def until(predicate, timeout: float = 20, pause: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        assert time.monotonic() < deadline, f"not within {timeout} s"
        await asyncio.sleep(pause)
    return value


# ------------------------------------------------------------------------------ the client


def test_a_submitted_batch_is_pending_until_its_status_is_final(chain):
    async def scenario():
        async with rest(chain.rest_url) as client:
            assert client.pending_batches() == [] and client.pending_summary() == {"count": 0, "batches": []}
            before = time.time()
            [first] = await client.submit_batches([intkey_batch(SIGNER, ("set", "p1", 1))])
            await asyncio.sleep(0.3)
            [second] = await client.submit_batches([intkey_batch(OTHER, ("set", "p2", 2))])
            pending = client.pending_batches()
            assert [b for b, _ in pending] == [first, second]  # oldest first
            assert pending[0][1] >= 0.3 > pending[1][1]
            # nodes sharing one client (an iot-host's) each say only what they signed
            other = OTHER.public_key().as_hex()
            assert [b for b, _ in client.pending_batches(signer=other)] == [second]
            assert client.pending_summary(signer=other)["count"] == 1
            summary = client.pending_summary(limit=1)
            assert summary["count"] == 2 and [b for b, _ in summary["batches"]] == [first]
            assert before <= summary["batches"][0][1] <= time.time()
            json.dumps(summary)  # it goes into a heartbeat as it is
            # no intkey processor yet: the validator holds both, and so does the client's view
            statuses = await client.batch_statuses([first, second])
            assert {s["status"] for s in statuses} == {"PENDING"} and len(client.pending_batches()) == 2
            async with running_processor(chain.component_url):
                statuses = await client.wait_for_batches([first, second], 30)
                assert {s["status"] for s in statuses} == {"COMMITTED"}
                assert client.pending_batches() == []
                # an INVALID batch is final too
                [status] = await client.submit_until_final([intkey_batch(SIGNER, ("inc", "nobody-set-this", 1))],
                                                           30)
                assert status["status"] == "INVALID" and client.pending_batches() == []

    run(scenario(), timeout=90)


def test_a_batch_its_waiter_gives_up_on_is_no_longer_pending(chain):
    async def scenario():
        async with rest(chain.rest_url) as client:
            with pytest.raises(BatchTimeoutError):
                await client.submit_until_final([intkey_batch(SIGNER, ("set", "g1", 1))], 1.5)
            assert client.pending_batches() == []
            [waited] = await client.submit_batches([intkey_batch(SIGNER, ("set", "g2", 1))])
            with pytest.raises(BatchTimeoutError):
                await client.wait_for_batches([waited], 1.2)
            assert client.pending_batches() == []
            # a waiter that is cancelled (a node stopping) gives up too
            waiting = asyncio.ensure_future(client.submit_until_final([intkey_batch(SIGNER, ("set", "g3", 1))], 60))
            await until(lambda: asyncio.sleep(0, result=len(client.pending_batches()) == 1))
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            assert client.pending_batches() == []
            async with running_processor(chain.component_url):  # let the validator's queue drain
                [status] = await client.wait_for_batches([waited], 30)
            assert status["status"] == "COMMITTED"

    run(scenario(), timeout=90)


# ------------------------------------------------------------------------------ the heartbeat


def test_keep_beating_calls_an_info_function_at_each_beat_and_still_takes_a_map(redis_server):
    async def scenario():
        redis = await connect(redis_server.url)
        beats = Heartbeats(redis)
        counter = iter(range(1_000_000))
        tasks = [asyncio.ensure_future(beats.keep_beating("fresh", lambda: {"beat": next(counter)}, every=0.05)),
                 asyncio.ensure_future(beats.keep_beating("fixed", {"role": "iot"}, every=0.05))]
        try:
            seen = set()

            async def several():
                seen.add((await beats.live()).get("fresh", {}).get("beat"))
                return len(seen - {None}) >= 3

            await until(several)
            assert (await beats.live())["fixed"] == {"role": "iot"}
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await beats.forget("fresh"), await beats.forget("fixed")
            await redis.aclose()

    run(scenario(), timeout=30)


def test_a_beating_task_cancelled_mid_command_stops(redis_server):
    async def scenario():
        redis = await connect(redis_server.url)
        beats = Heartbeats(redis)
        tasks = [asyncio.ensure_future(beats.keep_beating(n, lambda: {"role": "iot"})) for n in ("c1", "c2")]
        await beats.live()  # the beats' first commands are on the wire now
        for task in tasks:
            task.cancel()
        done, running = await asyncio.wait(tasks, timeout=5)
        assert not running, "a cancelled keep_beating went on beating"
        await beats.forget("c1"), await beats.forget("c2")
        await redis.aclose()

    run(scenario(), timeout=30)


# ------------------------------------------------------------------------------ the dashboard


@pytest.fixture(scope="module")
def dashboard(chain, redis_server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pending-dashboard")
    process = DashboardProcess("--bind", "127.0.0.1:0", "--rest", chain.rest_url, "--validator", chain.component_url,
                               "--redis", redis_server.url, log=folder / "stderr.log",
                               env={"TRUSTMESH_HOME": str(folder / "home")})
    yield process
    assert process.stop() == 0, process.log_path.read_text()


def _shown(browser) -> dict:
    """What the Nodes page shows of pending batches: total, and per node its count and ids."""
    return browser.execute_script("""
        const total = document.getElementById('pending-total');
        const rows = Array.from(document.querySelectorAll('table.pending tbody tr')).map(r => [
            r.dataset.node, r.querySelector('td.count').textContent,
            Array.from(r.querySelectorAll('li[data-batch]')).map(li => li.dataset.batch)]);
        const iot = Array.from(document.querySelectorAll('table.iot td.pending')).map(td => td.textContent);
        return {total: total ? total.dataset.total : null, rows: rows, iot: iot};""")


def _wait(predicate, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"not within {timeout} s"
        time.sleep(0.2)
    return value


def test_the_nodes_page_shows_pending_batches_live_and_confirms_them_with_the_rest_api(
        chain, redis_server, dashboard, browser):
    browser.get(dashboard.url + "nodes")
    _wait(lambda: browser.find_element("id", "live").text == "live", 15)
    browser.execute_script("window.__sameDocument = 'yes';")  # gone if the page reloads
    assert _shown(browser)["total"] == "0"

    async def scenario():
        redis = await connect(redis_server.url)
        beats = Heartbeats(redis, ttl=60)
        async with rest(chain.rest_url) as client:
            # as a node does: its heartbeat says, at each beat, what its RestClient waits for
            info = lambda: {"name": "iot-7", "role": "iot",  # noqa: E731
                            "pending_batches": client.pending_summary(signer=NODE)}
            beating = asyncio.ensure_future(beats.keep_beating(NODE, info, every=0.3))
            # a heartbeat from another version of a node: left out, not fatal
            await beats.beat("03" + "cd" * 32, {"name": "odd", "pending_batches": {"count": "x", "batches": [1]}})
            [batch] = await client.submit_batches([intkey_batch(SIGNER, ("set", "d1", 1))])
            [not_mine] = await client.submit_batches([intkey_batch(OTHER, ("set", "d2", 1))])
            try:
                await asyncio.to_thread(_wait, lambda: _shown(browser)["total"] == "1", 30)
                shown = _shown(browser)
                assert shown["rows"] == [[NODE, "1", [batch]]] and "1 (oldest" in " ".join(shown["iot"])
                status, nodes = await asyncio.to_thread(dashboard.get, "/api/nodes")
                pending = nodes["pending_batches"]
                assert status == 200 and pending["total"] == 1 and pending["error"] is None, nodes
                [row] = pending["nodes"]
                assert (row["key"], row["name"], row["count"]) == (NODE, "iot-7", 1)
                assert row["batches"][0]["id"] == batch and row["batches"][0]["status"] == "PENDING"
                assert 0 <= row["oldest_seconds"] < 30
                assert next(n for n in nodes["iot"] if n["key"] == NODE)["pending"]["count"] == 1
                status, chain_view = await asyncio.to_thread(dashboard.get, "/api/chain")
                assert chain_view["pending_batches"] == 1
                # the node falls silent with the batch in its last heartbeat; the batch then commits
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
                await beats.beat(NODE, info())
                async with rest(chain.rest_url) as other, running_processor(chain.component_url):
                    statuses = await other.wait_for_batches([batch, not_mine], 30)
                assert {s["status"] for s in statuses} == {"COMMITTED"}
                assert (await beats.live())[NODE]["pending_batches"]["batches"][0][0] == batch  # still said
                await asyncio.to_thread(_wait, lambda: _shown(browser)["total"] == "0", 30)
                assert _shown(browser)["rows"] == []
                status, nodes = await asyncio.to_thread(dashboard.get, "/api/nodes")
                assert nodes["pending_batches"]["total"] == 0 and nodes["pending_batches"]["final_since_beat"] == 1
            finally:
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
                await beats.forget(NODE), await beats.forget("03" + "cd" * 32)
                await redis.aclose()

    run(scenario(), timeout=120)
    assert browser.execute_script("return window.__sameDocument;") == "yes", "the page was reloaded"
    assert "Traceback" not in dashboard.log_path.read_text()
