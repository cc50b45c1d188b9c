"""Redis is a cache: what a node put there survives a Redis restart or comes back from the node.

A real redis-server, killed with SIGKILL and started again on the same port, with and without its
append-only file, or flushed.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal

import pytest

from trustmesh.stores.kept_blobs import KeptBlobs
from trustmesh.stores.redis_link import RedisLink
from trustmesh.stores.blobs import BlobNotFound, BlobStore
from trustmesh.stores.redis_client import client
from trustmesh.stores.task_queue import DeliveriesLost, TaskQueue
from trustmesh.stores.servers import RedisServer


def run(coro):
    return asyncio.run(coro)


def kill_and_restart(server: RedisServer, *, keep_data: bool = True) -> None:
    """SIGKILL redis-server, then start it on the same port (from its append-only file or empty)."""
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait()
    if not keep_data:
        for path in server.work_dir.rglob("appendonly*"):
            if path.is_file():
                path.unlink()
    server.requested_port = server.port
    server.start()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(work_dir=tmp_path / "redis", persist=True)  # appendfsync always, the default
    server.start()
    yield server
    server.stop()


async def test_the_append_only_file_keeps_every_acknowledged_write_through_kill_9(redis_server):
    assert "always" in redis_server.proc.args

    redis = client(redis_server.url)
    queue = TaskQueue(redis, "tasks_n1")
    blobs = BlobStore(redis)
    digests = [await blobs.put(os.urandom(1000)) for _ in range(50)]
    ids = [await queue.publish({"task_id": f"t{i}"}) for i in range(50)]
    [taken] = await queue.read("worker", count=1)
    await redis.aclose()
    kill_and_restart(redis_server)  # right after the last answer: nothing may be missing
    redis = client(redis_server.url)
    queue, blobs = TaskQueue(redis, "tasks_n1"), BlobStore(redis)
    assert [await blobs.exists(d) for d in digests] == [True] * 50
    [pending] = await queue.recover("worker")  # its delivery survived too
    assert pending.message_id == taken.message_id == ids[0]
    assert len(await queue.read("worker", count=100)) == 49
    await redis.aclose()


async def test_a_lost_consumer_group_is_made_again_and_reported(redis_server):
    redis = client(redis_server.url)
    queue = TaskQueue(redis, "tasks_n1")
    await queue.publish({"task_id": "a"})
    await redis.flushall()  # what a Redis restarted without its data looks like
    with pytest.raises(DeliveriesLost):
        await queue.read("worker", block_ms=10)
    # Made again, empty: the publisher re-derives its messages and they flow.
    await queue.publish({"task_id": "b"})
    [message] = await queue.read("worker", block_ms=10)
    assert message.task == {"task_id": "b"}
    with pytest.raises(DeliveriesLost):
        await redis.flushall()
        await queue.recover("worker")
    await redis.aclose()


async def test_kept_blobs_come_back_after_redis_lost_them(redis_server, tmp_path):
    redis = client(redis_server.url)
    kept = KeptBlobs(BlobStore(redis), tmp_path / "blobs")
    data = [os.urandom(500) for _ in range(5)]
    digests = [await kept.put(d) for d in data]
    assert digests == [hashlib.sha256(d).hexdigest() for d in data]
    assert oct((tmp_path / "blobs" / digests[0]).stat().st_mode & 0o777) == "0o600"
    await redis.flushall()
    assert await kept.get(digests[0]) == data[0]  # a reader's miss puts it back
    assert await BlobStore(redis).get(digests[0]) == data[0]
    assert await kept.restore() == 4  # the rest, in one go
    assert [await BlobStore(redis).get(d) for d in digests] == data
    assert await kept.restore() == 0
    # A copy that no longer hashes to its name is never put back.
    (tmp_path / "blobs" / digests[1]).write_bytes(b"tampered")
    await redis.flushall()
    await kept.restore()
    with pytest.raises(BlobNotFound):
        await kept.get(digests[1])
    # Someone else's blob is not ours to put back.
    other = await BlobStore(redis).put(b"not kept here")
    await redis.flushall()
    with pytest.raises(BlobNotFound):
        await kept.get(other)
    await redis.aclose()


async def test_kept_blobs_are_pruned_to_the_newest(redis_server, tmp_path, monkeypatch):
    monkeypatch.setattr("trustmesh.stores.kept_blobs.PRUNE_EVERY", 4)

    redis = client(redis_server.url)
    kept = KeptBlobs(BlobStore(redis), tmp_path / "blobs", keep=3)
    digests = []
    for i in range(8):
        digests.append(await kept.put(bytes([i]) * 10))
        os.utime(tmp_path / "blobs" / digests[-1], (1000 + i, 1000 + i))  # a clear order
    assert set(kept.kept()) == set(digests[5:8])  # pruned at the 4th and the 8th put
    await redis.aclose()


def test_the_link_waits_out_a_restart_says_so_once_and_reports_it(redis_server, capfd):
    async def scenario():
        redis = client(redis_server.url)
        link = RedisLink(redis, redis_server.url, "node-a", every=0.1)
        restarts = []

        async def restarted():
            restarts.append(await redis.exists(link.sentinel))

        await link.mark()
        watching = asyncio.get_running_loop().create_task(link.watch(restarted))
        await asyncio.sleep(0.3)
        assert restarts == []  # the same server, its data there: nothing to re-derive
        os.kill(redis_server.pid, signal.SIGKILL)
        redis_server.proc.wait()
        await asyncio.sleep(2.5)  # down long enough to be announced
        redis_server.requested_port = redis_server.port
        await asyncio.to_thread(redis_server.start)
        for _ in range(100):
            if restarts:
                break
            await asyncio.sleep(0.1)
        assert restarts == [1]  # noticed once; marked again before re-deriving
        assert await link.call(lambda: redis.ping())
        await redis.flushall()  # the same server, its data gone: noticed too
        for _ in range(50):
            if len(restarts) == 2:
                break
            await asyncio.sleep(0.1)
        assert len(restarts) == 2 and link.restarts == 2
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        await redis.aclose()

    run(scenario())
    err = capfd.readouterr().err
    waiting = [line for line in err.splitlines() if line.startswith("waiting for Redis at 127.0.0.1:")]
    assert len(waiting) == 1, err
    assert "Traceback" not in err
