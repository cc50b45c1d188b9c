"""The Redis stores (blobs, task_queue, heartbeats, federation_cache) against a real redis-server (and the dev validator for the federation cache)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import subprocess
import sys

import pytest
from redis.exceptions import AuthenticationError

from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.events import NULL_BLOCK_ID, EventSubscriber
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, workflow
from trustmesh.scheduling.federation import (
    FederationHandler,
    decode_round,
    make_close_round_transaction,
    make_open_round_transaction,
    make_submit_transaction,
)
from trustmesh.scheduling.workflow import WorkflowHandler, make_deploy_transaction
from trustmesh.stores.blobs import BlobCorrupted, BlobNotFound, BlobStore, BlobTooLarge
from trustmesh.stores.federation_cache import (
    CURSOR_KEY,
    FederationCache,
    FederationCacheGap,
    entry_task,
    federation_key,
    rebuild_from_chain,
    submissions_key,
)
from trustmesh.stores.heartbeats import Heartbeats
from trustmesh.stores.redis_client import connect
from trustmesh.stores.task_queue import TaskQueue, task_stream
from trustmesh.stores.servers import CouchServer, RedisServer, ServerNotInstalled, ServerStartError

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"

COORDINATOR, P2, P3 = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
C, K2, K3 = (k.public_key().as_hex() for k in (COORDINATOR, P2, P3))
PARTICIPANTS = [C, K2, K3]


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as server:
        yield server.url


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    node = DevnetProcess(tmp_path_factory.mktemp("redis-state") / "devnet").start()
    yield node
    node.stop()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def fresh(redis_url):
    redis = await connect(redis_url)
    await redis.flushdb()
    return redis


async def snapshot(redis, *, only: str | None = None) -> dict:
    """Every key's type and content (lists and hashes decoded); `only`: keys containing it."""
    out = {}
    async for key in redis.scan_iter(count=1000):
        name = key.decode()
        if only is not None and only not in name:
            continue
        kind = (await redis.type(key)).decode()
        if kind == "list":
            out[name] = [item.decode() for item in await redis.lrange(key, 0, -1)]
        elif kind == "hash":
            out[name] = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
        else:
            out[name] = kind
    return out


# =========================================================================== federation cache


def federated(workflow_id: str, *, timeout: int = 3600, min_nodes: int = 2) -> dict:
    definition = workflow.load_definition(WORKFLOWS / "federated-digits.json")
    definition["workflow_id"] = workflow_id
    definition["federation"].update(coordinator_node=C, participant_nodes=list(PARTICIPANTS),
                                    expected_nodes=len(PARTICIPANTS), min_nodes_required=min_nodes,
                                    round_timeout=timeout, rounds=3)
    return definition


async def commit(client, *batches):
    await submit_and_wait(client, list(batches), raise_invalid=True)


def batch(signer, *transactions):
    return make_batch(signer, list(transactions))


async def committed_blocks(url: str, head_id: str) -> list:
    """Every block since genesis up to head_id, with its federation events (what follow() sees)."""
    blocks = []
    async with EventSubscriber(url, FederationCache.subscriptions(), last_known_block_ids=[NULL_BLOCK_ID]) as events:
        async for block in events:
            blocks.append(block)
            if block.block_id == head_id:
                return blocks
    raise AssertionError("subscriber ended before the head")


def test_the_client_parses_replies_in_c():
    """hiredis (pyproject.toml) installed, redis-py reads replies with it, not its Python parser."""
    from redis._parsers.hiredis import _AsyncHiredisParser

    from trustmesh.stores.redis_client import client

    assert isinstance(client("redis://127.0.0.1:1").connection_pool.make_connection()._parser, _AsyncHiredisParser)


def test_entry_task_names_the_app():
    assert entry_task(workflow.load_definition(WORKFLOWS / "federated-digits.json")) == "preprocess"
    assert entry_task({"tasks": [{"id": "b", "depends_on": ["a"]}, {"id": "a", "depends_on": []}]}) == "a"
    with pytest.raises(ValueError, match="no task without dependencies"):
        entry_task({"workflow_id": "w", "tasks": [{"id": "a", "depends_on": ["a"]}]})
    assert submissions_key("wf", "s1", "preprocess") == "iot_data_wf_s1_preprocess_federated"
    assert federation_key("wf", "s1") == "federation_state_wf_s1"


async def test_cache_from_committed_events_is_idempotent_and_equals_a_rebuild_from_chain(chain, redis_url):
    wf, short = "cache-main", "cache-timeout"

    async with running_processor(chain.component_url, WorkflowHandler(), FederationHandler()), \
            rest(chain.rest_url) as client:
        redis = await fresh(redis_url)
        await commit(client, batch(COORDINATOR, make_deploy_transaction(COORDINATOR, federated(wf))),
                     batch(COORDINATOR, make_deploy_transaction(COORDINATOR, federated(short, timeout=3))))
        await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 1)),
                     batch(COORDINATOR, make_open_round_transaction(COORDINATOR, short, 1)))
        sid1, sid_short = layout.schedule_id_for(wf, 1, C), layout.schedule_id_for(short, 1, C)
        await commit(client,
                     batch(P2, make_submit_transaction(P2, sid1, digest("p2"), 120, {"epochs": 5, "loss": 0.25})),
                     batch(COORDINATOR, make_submit_transaction(COORDINATOR, sid1, digest("c"), 80)),
                     batch(P2, make_submit_transaction(P2, sid_short, digest("p2-short"), 7)))
        await commit(client, batch(P3, make_submit_transaction(P3, sid1, digest("p3"), 40, {"device": "rpi"})))
        await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 2)))
        sid2 = layout.schedule_id_for(wf, 2, C)
        before_r2_submission = (await client.head())["header_signature"]
        await commit(client, batch(P3, make_submit_transaction(P3, sid2, digest("p3-r2"), 41)))
        # past the short workflow's round_timeout in block time (3 s: its submission above must
        # land before it, even on a loaded machine)
        await asyncio.sleep(3.1)
        await commit(client, batch(P2, make_close_round_transaction(P2, sid_short)))
        head = (await client.head())["header_signature"]
        blocks = await committed_blocks(chain.component_url, head)

        # -- filled from events ------------------------------------------------------------
        cache = FederationCache(redis, rest_client=client)
        outcomes = [o for block in blocks for o in await cache.apply_block(block)]
        ours = [e for b in blocks for e in b.events
                if e.event_type.startswith("trustmesh/round") or e.event_type.startswith("trustmesh/sub")]
        assert outcomes == ["applied"] * len(ours) and len(outcomes) == 2 + 4 + 1 + 1 + 1 + 1  # opens, submissions, ready, open r2, submission r2, timeout
        assert await cache.cursor() == (head, blocks[-1].block_num)

        assert [s["node"] for s in await cache.submissions(wf, sid1)] == [K2, C, K3]
        key = submissions_key(wf, sid1, "preprocess")
        assert [json.loads(x) for x in await redis.lrange(key, 0, -1)] == [
            {"node": K2, "digest": digest("p2"), "samples": 120, "metadata": {"epochs": 5, "loss": 0.25},
             "position": 1},
            {"node": C, "digest": digest("c"), "samples": 80, "metadata": {}, "position": 2},
            {"node": K3, "digest": digest("p3"), "samples": 40, "metadata": {"device": "rpi"}, "position": 3},
        ]
        state = await cache.round_state(wf, sid1)
        record = (await client.get_state(layout.round_address(sid1)))
        round_start = decode_round(record)["round_start"]
        assert state == {
            "workflow_id": wf, "schedule_id": sid1, "round": "1", "coordinator": C, "workflow_version": "1",
            "expected_nodes": "3", "expected_node_keys": ",".join(PARTICIPANTS), "min_nodes_required": "2",
            "round_timeout": "3600", "round_start_time": str(round_start), "status": "ready",
            "status_reason": "all-submitted", "submitted_nodes": "3", "app": "preprocess",
            "submissions_key": key, f"node:{K2}": "1", f"node:{C}": "2", f"node:{K3}": "3",
        }
        assert (await cache.round_state(wf, sid2))["status"] == "collecting"
        assert (await cache.round_state(wf, sid2))["submitted_nodes"] == "1"
        timed_out = await cache.round_state(short, sid_short)
        assert (timed_out["status"], timed_out["status_reason"], timed_out["submitted_nodes"]) == \
            ("timeout", "closed", "1")

        # -- replaying the same events adds nothing ----------------------------------------
        filled = await snapshot(redis)
        again = [o for block in blocks for o in await cache.apply_block(block)]
        assert again == ["duplicate"] * len(outcomes)
        assert await snapshot(redis) == filled
        # events as REST receipts carry them (dicts): also duplicates
        as_dicts = [{"event_type": e.event_type, "attributes": [{"key": a.key, "value": a.value}
                                                                for a in e.attributes]}
                    for b in blocks for e in b.events if e.event_type.startswith("trustmesh/")]
        assert {await cache.apply_event(e) for e in as_dicts} == {"duplicate"}

        # -- rebuilt from chain state alone: the same keys, field for field -----------------
        await redis.flushdb()
        assert await cache.rebuild_from_chain(client, wf) == [sid1, sid2]
        assert await rebuild_from_chain(redis, client, short) == [sid_short]
        expected = {k: v for k, v in filled.items() if k != CURSOR_KEY}
        assert await snapshot(redis) == expected
        assert await rebuild_from_chain(redis, client, "never-deployed") == []

        # -- a rebuild from an older head never moves a round backwards --------------------
        assert await cache.rebuild_round(client, sid2, head=before_r2_submission) is False
        assert await snapshot(redis) == expected

        # -- events that do not fit: missed ones are rebuilt from chain, or reported -------
        first_open = next(i for i, b in enumerate(blocks)
                          if any(e.event_type == "trustmesh/round-opened" for e in b.events))
        await redis.flushdb()
        blind = FederationCache(redis, app="preprocess")  # no REST client
        with pytest.raises(FederationCacheGap, match="does not follow the cached round"):
            for block in blocks[first_open + 1:]:
                await blind.apply_block(block)
        await redis.flushdb()
        late = FederationCache(redis, rest_client=client)
        late_outcomes = [o for b in blocks[first_open + 1:] for o in await late.apply_block(b)]
        assert "rebuilt" in late_outcomes
        assert {k: v for k, v in (await snapshot(redis)).items() if k != CURSOR_KEY} == expected

        # a block missed in the middle (the first two submissions) is noticed at the third
        first_submissions = next(i for i, b in enumerate(blocks)
                                 if any(e.event_type == "trustmesh/submission-accepted" for e in b.events))
        await redis.flushdb()
        gappy = FederationCache(redis, rest_client=client)
        skipped = [o for i, b in enumerate(blocks) if i != first_submissions for o in await gappy.apply_block(b)]
        assert "rebuilt" in skipped  # e.g. round 1 at its third submission
        assert {k: v for k, v in (await snapshot(redis)).items() if k != CURSOR_KEY} == expected

        # a round that vanished from the cache is rebuilt at its next event
        await redis.hdel(federation_key(wf, sid2), "schedule_id")
        assert await cache.apply_event(as_dicts[-2]) == "rebuilt"  # the submission to round 2
        assert {k: v for k, v in (await snapshot(redis)).items() if k != CURSOR_KEY} == expected
        await redis.aclose()


async def test_follow_applies_committed_blocks_and_resumes_after_its_cursor(chain, redis_url):
    wf = "cache-follow"

    async def until_cursor(cache, head, task):
        for _ in range(400):
            if task.done():
                task.result()  # raise what stopped it
            cursor = await cache.cursor()
            if cursor and cursor[0] == head:
                return
            await asyncio.sleep(0.025)
        raise AssertionError("follow() did not reach the head")

    async with running_processor(chain.component_url, WorkflowHandler(), FederationHandler()), \
            rest(chain.rest_url) as client:
        redis = await fresh(redis_url)
        cache = FederationCache(redis, rest_client=client)
        seen = []

        async def on_block(block, outcomes):
            seen.extend(outcomes)

        await commit(client, batch(COORDINATOR, make_deploy_transaction(COORDINATOR, federated(wf))))
        await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 1)))
        sid = layout.schedule_id_for(wf, 1, C)
        follower = asyncio.create_task(cache.follow(chain.component_url, on_block=on_block))
        await until_cursor(cache, (await client.head())["header_signature"], follower)
        await commit(client, batch(P2, make_submit_transaction(P2, sid, digest("f-p2"), 3)))
        await until_cursor(cache, (await client.head())["header_signature"], follower)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        assert "duplicate" not in seen and seen.count("applied") >= 2
        assert [s["node"] for s in await cache.submissions(wf, sid)] == [K2]

        # stopped, more blocks commit, started again: it resumes after its cursor, nothing twice
        await commit(client, batch(COORDINATOR, make_submit_transaction(COORDINATOR, sid, digest("f-c"), 4)))
        await commit(client, batch(P3, make_submit_transaction(P3, sid, digest("f-p3"), 5)))
        seen.clear()
        follower = asyncio.create_task(cache.follow(chain.component_url, on_block=on_block))
        await until_cursor(cache, (await client.head())["header_signature"], follower)
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        assert seen == ["applied", "applied", "applied"]  # two submissions and round-ready
        assert [s["node"] for s in await cache.submissions(wf, sid)] == [K2, C, K3]
        assert (await cache.round_state(wf, sid))["status"] == "ready"
        await redis.aclose()


# =========================================================================== blobs


async def test_a_lease_has_one_holder_until_it_lapses(redis_url):
    from trustmesh.stores.lease import Lease

    redis = await fresh(redis_url)
    first, second = (Lease(redis, "job", name, ttl=0.3) for name in ("first", "second"))
    assert await first.hold() and not await second.hold()
    await asyncio.sleep(0.2)
    assert await first.hold()  # renewed: another 0.3 s from now
    await asyncio.sleep(0.2)
    assert not await second.hold()
    await asyncio.sleep(0.4)  # the first stopped renewing: it lapses
    assert await second.hold() and not await first.hold()
    await redis.flushall()  # a Redis that came back empty: the next to ask takes it
    assert await first.hold() and not await second.hold()
    with pytest.raises(ValueError):
        Lease(redis, "job", "x", ttl=0)
    await redis.aclose()


async def test_one_node_at_a_time_keeps_the_cache_and_another_takes_over(chain, redis_url):
    """Two keepers of one cache (two compute nodes): the one without the lease does nothing and
    returns; the holder follows until another takes the lease, then stops."""
    from trustmesh.stores.federation_cache import KEEPER_KEY
    from trustmesh.stores.lease import Lease

    wf = "cache-keeper"
    async with running_processor(chain.component_url, WorkflowHandler(), FederationHandler()), \
            rest(chain.rest_url) as client:
        redis = await fresh(redis_url)
        applied = {"a": 0, "b": 0}

        def counter(name):
            async def on_block(block, outcomes):
                applied[name] += 1
            return on_block

        keepers = {name: (FederationCache(redis, rest_client=client), Lease(redis, KEEPER_KEY, name, ttl=1.0))
                   for name in ("a", "b")}

        def keep(name, renew_every=0.05):
            cache, lease = keepers[name]
            return asyncio.create_task(cache.follow_while(chain.component_url, lease, renew_every=renew_every,
                                                          on_block=counter(name)))

        holder = keep("a")
        await asyncio.sleep(0.2)
        await asyncio.wait_for(keep("b", renew_every=30), 2)  # "a" holds it: "b" returns at once, no following
        await commit(client, batch(COORDINATOR, make_deploy_transaction(COORDINATOR, federated(wf))))
        head = (await client.head())["header_signature"]
        for _ in range(200):
            if (await keepers["a"][0].cursor() or [None])[0] == head:
                break
            await asyncio.sleep(0.025)
        assert applied["a"] >= 1 and applied["b"] == 0 and not holder.done()
        await redis.set(KEEPER_KEY, "b")  # another took it (the holder lapsed, say): "a" stops
        await asyncio.wait_for(holder, 5)
        taken_over = keep("b")
        await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 1)))
        head = (await client.head())["header_signature"]
        for _ in range(200):
            if (await keepers["b"][0].cursor() or [None])[0] == head:
                break
            await asyncio.sleep(0.025)
        assert applied["b"] >= 1 and not taken_over.done()
        taken_over.cancel()
        await asyncio.gather(taken_over, return_exceptions=True)
        sid = layout.schedule_id_for(wf, 1, C)
        assert (await keepers["a"][0].round_state(wf, sid))["status"] == "collecting"
        await redis.aclose()


async def test_blobs_are_content_addressed_and_verified(redis_url):
    redis = await fresh(redis_url)
    blobs = BlobStore(redis, max_bytes=1024)
    data = bytes(range(256)) * 3
    name = await blobs.put(data)
    assert name == hashlib.sha256(data).hexdigest()
    assert await blobs.put(data) == name  # idempotent
    assert await blobs.get(name) == data and await blobs.exists(name)
    assert await redis.get(f"blob_{name}") == data
    empty = await blobs.put(b"")
    assert await blobs.get(empty) == b""

    # tampered in Redis directly: refused, never returned
    await redis.set(f"blob_{name}", b"poisoned model update")
    with pytest.raises(BlobCorrupted, match=f"blob {name} is corrupted.*refusing to return them"):
        await blobs.get(name)
    await redis.set(f"blob_{name}", data[:-1] + b"\x00")
    with pytest.raises(BlobCorrupted):
        await blobs.get(name)
    assert await blobs.put(data) == name  # put() repairs it
    assert await blobs.get(name) == data
    await redis.delete(f"blob_{name}")
    await redis.rpush(f"blob_{name}", b"x")
    with pytest.raises(BlobCorrupted, match="not a string"):
        await blobs.get(name)

    # size limit both ways: checked inside Redis before any byte is sent
    with pytest.raises(BlobTooLarge, match="1025 bytes is over the limit of 1024"):
        await blobs.put(b"x" * 1025)
    big = b"y" * 5000
    big_name = await BlobStore(redis).put(big)
    with pytest.raises(BlobTooLarge, match="stored as 5000 bytes"):
        await blobs.get(big_name)

    missing = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(BlobNotFound, match=f"no blob {missing}"):
        await blobs.get(missing)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        await blobs.get("ABC")
    with pytest.raises(TypeError):
        await blobs.put("text")
    assert await blobs.delete(empty) and not await blobs.exists(empty)

    expiring = BlobStore(redis, ttl=0.2)
    short = await expiring.put(b"hot model update")
    assert 0 < await redis.pttl(f"blob_{short}") <= 200
    await asyncio.sleep(0.3)
    with pytest.raises(BlobNotFound):
        await expiring.get(short)
    await redis.aclose()


# =========================================================================== tasks

CRASHING_CONSUMER = r"""
import asyncio, os, signal, sys
from trustmesh.stores.redis_client import connect
from trustmesh.stores.task_queue import TaskQueue

async def main():
    redis = await connect(sys.argv[1])
    queue = TaskQueue(redis, sys.argv[2], claim_idle_ms=10**9)
    [message] = await queue.read(sys.argv[3], count=1, block_ms=5000)
    print(message.message_id, message.task["task_id"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # dies mid-task: no XACK

asyncio.run(main())
"""


def crash_a_consumer(redis_url: str, stream: str, consumer: str) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", CRASHING_CONSUMER, redis_url, stream, consumer],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    message_id, task_id = done.stdout.split()
    return message_id, task_id


def test_a_task_of_a_killed_consumer_is_claimed_by_another(redis_url):
    stream = task_stream("02" + "ab" * 32)

    async def publish():
        redis = await fresh(redis_url)
        published = await TaskQueue(redis, stream).publish({"task_id": "train-1", "schedule_id": "ab" * 32,
                                                            "kind": "local_train"})
        await redis.aclose()
        return published

    published = run(publish())
    message_id, task_id = crash_a_consumer(redis_url, stream, "worker-a")
    assert (message_id, task_id) == (published, "train-1")

    async def after_crash():
        redis = await connect(redis_url)
        queue = TaskQueue(redis, stream, claim_idle_ms=1000)
        [pending] = await queue.pending()
        assert (pending["message_id"], pending["consumer"], pending["deliveries"]) == (published, "worker-a", 1)
        if pending["idle_ms"] < 700:  # (a loaded machine may have taken longer to get here)
            assert await queue.read("worker-b") == []  # not idle long enough yet: worker-a may be alive
        await asyncio.sleep(max(0, 1000 - pending["idle_ms"]) / 1000 + 0.05)
        [message] = await queue.read("worker-b")
        assert (message.message_id, message.deliveries) == (published, 2)
        assert message.task == {"task_id": "train-1", "schedule_id": "ab" * 32, "kind": "local_train"}
        assert (await queue.pending())[0]["consumer"] == "worker-b"
        assert await queue.ack(message.message_id) is True
        assert await queue.ack(message.message_id) is False
        assert await queue.pending() == [] and await redis.xlen(stream) == 0
        await redis.aclose()

    run(after_crash())


async def test_publish_once_sets_its_marker_and_adds_the_message_in_one_step(redis_url):
    redis = await fresh(redis_url)
    queue = TaskQueue(redis, "tasks_once")
    first = await queue.publish_once({"task_id": "t"}, "marker_t", ttl_seconds=60)
    assert first is not None and await queue.publish_once({"task_id": "t"}, "marker_t") is None
    assert await redis.xlen("tasks_once") == 1 and 0 < await redis.ttl("marker_t") <= 60
    await redis.delete("marker_t")  # a marker that expired: the task may be published again
    assert await queue.publish_once({"task_id": "t"}, "marker_t") not in (None, first)
    await redis.aclose()


async def test_publish_once_many_publishes_each_unmarked_task_once_in_one_round_trip(redis_url):
    redis = await fresh(redis_url)
    queue = TaskQueue(redis, "tasks_many")
    assert await queue.publish_once_many([]) == []
    await queue.publish_once({"task_id": "t1"}, "marker_t1")
    await redis.script_flush()  # as after a Redis restart: the pipeline loads the script again
    found = await queue.publish_once_many([({"task_id": f"t{i}"}, f"marker_t{i}") for i in range(4)], ttl_seconds=60)
    assert found[1] is None and all(found[i] is not None for i in (0, 2, 3))  # t1 was published before
    messages = await queue.read("worker", count=10)
    assert [m.task["task_id"] for m in messages] == ["t1", "t0", "t2", "t3"]
    assert 0 < await redis.ttl("marker_t3") <= 60
    assert await queue.publish_once_many([({"task_id": "t0"}, "marker_t0"), ({"task_id": "t2"}, "marker_t2")]) == [None, None]
    await redis.aclose()


async def test_a_worker_blocked_on_the_stream_takes_tasks_published_together_in_one_read(redis_url):
    """A compute node waiting for work wakes once a round's trainings are all in, and trains them
    together: woken after the first of them, it trained that one alone before the rest."""
    redis = await fresh(redis_url)
    queue = TaskQueue(redis, "tasks_together")
    await queue.ensure_group()
    waiting = asyncio.ensure_future(queue.read("worker", count=64, block_ms=5000))
    await asyncio.sleep(0.2)  # the read is blocked in Redis
    await queue.publish_once_many([({"task_id": f"t{i}"}, f"marker_t{i}") for i in range(20)])
    messages = await asyncio.wait_for(waiting, 10)
    assert [m.task["task_id"] for m in messages] == [f"t{i}" for i in range(20)]
    # and acked together, in one round trip: True only when every one was still pending
    assert await queue.ack(*[m.message_id for m in messages[:10]]) is True
    assert await queue.ack(*[m.message_id for m in messages[5:]]) is False
    assert await queue.pending() == []
    await redis.aclose()


def test_a_restarted_consumer_recovers_its_own_pending_task_at_once(redis_url):
    stream = "tasks_restart"

    async def publish():
        redis = await fresh(redis_url)
        queue = TaskQueue(redis, stream, claim_idle_ms=60_000)
        ids = [await queue.publish({"task_id": f"t{i}"}) for i in range(2)]
        await redis.aclose()
        return ids

    ids = run(publish())
    message_id, _ = crash_a_consumer(redis_url, stream, "worker-c")

    async def restart():
        redis = await connect(redis_url)
        queue = TaskQueue(redis, stream, claim_idle_ms=60_000)
        [recovered] = await queue.recover("worker-c")  # no waiting for the idle time
        assert recovered.message_id == message_id == ids[0] and recovered.task == {"task_id": "t0"}
        assert recovered.deliveries >= 1
        await queue.ack(recovered.message_id)
        assert await queue.recover("worker-c") == []
        [second] = await queue.read("worker-c")  # then new work as usual
        assert second.message_id == ids[1] and second.task == {"task_id": "t1"}
        await queue.ack(second.message_id)
        assert await queue.pending() == []
        await redis.aclose()

    run(restart())


async def test_new_tasks_wait_for_a_reader_and_poison_tasks_go_to_the_dead_stream(redis_url):
    redis = await fresh(redis_url)
    queue = TaskQueue(redis, "tasks_poison", claim_idle_ms=100, max_deliveries=2)
    reader = asyncio.create_task(queue.read("w1", block_ms=2000))
    await asyncio.sleep(0.1)
    assert not reader.done()
    poison = await queue.publish({"task_id": "boom"})
    [first] = await reader
    assert (first.message_id, first.deliveries) == (poison, 1)
    await asyncio.sleep(0.15)
    [second] = await queue.read("w2")  # w1 "crashed"
    assert second.deliveries == 2
    await asyncio.sleep(0.15)
    assert await queue.read("w3") == []  # third delivery: buried instead
    [dead] = await queue.dead()
    assert dead["origin_id"] == poison and dead["deliveries"] == "3" and json.loads(dead["task"]) == \
        {"task_id": "boom"} and "delivered 3 times" in dead["reason"]
    assert await queue.pending() == [] and await redis.xlen("tasks_poison") == 0

    # several consumers share the work; each message goes to exactly one (a queue whose messages
    # do not look abandoned after 100 ms: a GC pause between the two reads must not hand w1's to w2)
    shared = TaskQueue(redis, "tasks_shared", claim_idle_ms=60_000)
    ids = {await shared.publish({"task_id": f"job{i}"}) for i in range(6)}
    got = await shared.read("w1", count=4) + await shared.read("w2", count=4)
    assert {m.message_id for m in got} == ids and len(got) == 6
    for message in got:
        await shared.ack(message.message_id)
    await redis.aclose()


# =========================================================================== heartbeats


async def test_heartbeats_expire(redis_url):
    redis = await fresh(redis_url)
    beats = Heartbeats(redis, ttl=1.0)
    await beats.beat("compute-a", {"role": "compute", "queue": 0})
    await beats.beat("compute-b")
    assert await beats.live() == {"compute-a": {"role": "compute", "queue": 0}, "compute-b": {}}
    assert 0 < await redis.pttl("heartbeat_compute-a") <= 1000
    await asyncio.sleep(0.6)
    await beats.beat("compute-b", {"queue": 2})  # b keeps beating, a went silent
    await asyncio.sleep(0.6)
    assert await beats.live() == {"compute-b": {"queue": 2}}
    assert not await beats.is_alive("compute-a") and await beats.is_alive("compute-b")
    assert await redis.zrange("live_nodes", 0, -1) == [b"compute-b"]  # expired members pruned
    await beats.forget("compute-b")
    assert await beats.live() == {} and not await beats.is_alive("compute-b")
    with pytest.raises(ValueError):
        Heartbeats(redis, ttl=0)
    await redis.aclose()


async def test_many_nodes_beat_in_one_round_trip_even_after_redis_forgot_the_script(redis_url):
    redis = await fresh(redis_url)
    beats = Heartbeats(redis, ttl=5.0)
    infos = {f"iot-{i}": {"role": "iot", "n": i} for i in range(50)}
    await beats.beat_many(infos)
    assert await beats.live() == infos
    await redis.script_flush()  # as after a Redis restart: the pipeline loads the script again
    await beats.beat_many({"iot-1": {"role": "iot", "n": -1}, "iot-2": None})
    live = await beats.live()
    assert live["iot-1"] == {"role": "iot", "n": -1} and live["iot-2"] == {} and len(live) == 50
    assert 4000 < await redis.pttl("heartbeat_iot-49") <= 5000
    await beats.beat_many({})  # nothing to say: nothing sent
    await redis.aclose()


def test_redis_server_with_password(tmp_path):
    with RedisServer(password="s3cret p@ss", work_dir=tmp_path / "redis") as server:
        assert server.url.startswith("redis://:s3cret%20p%40ss@127.0.0.1:")

        async def scenario():
            redis = await connect(server.url)
            assert await redis.ping()
            await redis.aclose()
            with pytest.raises(AuthenticationError):
                await connect(f"redis://127.0.0.1:{server.port}/0")

        run(scenario())
        pid = server.pid
        assert b"s3cret" not in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()  # not shown by ps
        assert (server.work_dir / "redis.conf").stat().st_mode & 0o077 == 0
    assert server.proc.returncode is not None
    assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_server_errors_name_the_install_step(tmp_path, redis_url):
    with pytest.raises(ServerNotInstalled, match=r"apt-get install -y redis-server"):
        RedisServer(binary=str(tmp_path / "no-redis-server"))
    with pytest.raises(ServerNotInstalled, match=r"npm ci --prefix tools/couchdb-local"):
        CouchServer(script=tmp_path / "no-pouchdb-server")
    busy = int(redis_url.rsplit(":", 1)[1].split("/")[0])  # the module's server holds this port
    with pytest.raises(ServerStartError, match="exited with status") as failed:
        RedisServer(port=busy).start(timeout=10)
    assert "Address already in use" in str(failed.value)
