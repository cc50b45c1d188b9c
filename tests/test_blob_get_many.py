"""BlobStore.get_many and KeptBlobs.get_many against a real redis-server: what get() gives for
each digest, in one round trip per GET_MANY_CHUNK; and the compute node's reads of a round's
blobs through them (compute-node/tasks.py)."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
import redis.asyncio as aioredis

from trustmesh.compute_node.tasks import InputNotReady, TaskContext, TaskInputError, _blob, _blobs, run_task
from trustmesh.stores import blobs as blobs_module
from trustmesh.stores.blobs import BlobCorrupted, BlobNotFound, BlobStore, BlobTooLarge
from trustmesh.stores.kept_blobs import KeptBlobs
from trustmesh.stores.redis_client import client
from trustmesh.stores.servers import RedisServer


class Counting(aioredis.Connection):
    """A connection that counts what it writes to Redis: one write is one round trip (a pipeline
    writes all its commands at once)."""

    writes = 0

    async def send_packed_command(self, command, check_health=True):
        Counting.writes += 1
        await super().send_packed_command(command, check_health)


@pytest.fixture(scope="module")
def redis_url():
    with RedisServer() as server:
        yield server.url


async def counted(redis_url) -> aioredis.Redis:
    redis = client(redis_url, connection_class=Counting)
    await redis.flushall()
    await redis.script_load(blobs_module._GET_LIMITED)  # loaded on first use, as on a running node
    return redis


async def round_trips(redis, call):
    """(result of `await call()`, round trips it took, EVALSHA and SCRIPT EXISTS Redis ran for it)."""
    await redis.ping()  # a connection made and set up beforehand: its handshake is not counted
    await redis.config_resetstat()
    before = Counting.writes
    result = await call()
    trips = Counting.writes - before
    stats = await redis.info("commandstats")
    return result, trips, {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0)
                           for name in ("evalsha", "script|exists", "set")}


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def outcome(call):
    try:
        return await call
    except Exception as exc:  # noqa: BLE001
        return exc


def same(got, expected) -> bool:
    if isinstance(expected, Exception):
        return type(got) is type(expected) and str(got) == str(expected)
    return got == expected


async def test_get_many_gives_what_get_gives_for_each_in_one_round_trip(redis_url):
    redis = await counted(redis_url)
    blobs = BlobStore(redis, max_bytes=1024)
    present = [os.urandom(100 + i) for i in range(20)]
    names = [await blobs.put(data) for data in present]
    corrupted = await blobs.put(b"an honest update")
    await redis.set(f"blob_{corrupted}", b"a poisoned update")
    oversize = await BlobStore(redis).put(b"z" * 5000)
    wrong_type = digest_of(b"a list")
    await redis.rpush(f"blob_{wrong_type}", b"x")
    missing = digest_of(b"never stored")
    digests = [names[0], missing, *names[1:10], corrupted, oversize, "ABC", wrong_type, *names[10:], names[3]]

    got, trips, commands = await round_trips(redis, lambda: blobs.get_many(digests))
    assert trips == 1  # every read in one pipeline
    assert commands == {"evalsha": len(set(digests)) - 1, "script|exists": 0, "set": 0}  # each once; "ABC" never sent
    expected = [await outcome(blobs.get(d)) for d in digests]
    assert len(got) == len(digests)
    for digest, one, alone in zip(digests, got, expected):
        assert same(one, alone), (digest, one, alone)
    assert got[0] == present[0] and got[-1] == present[3]
    assert {type(got[i]) for i in range(len(got)) if isinstance(got[i], Exception)} == \
           {BlobNotFound, BlobCorrupted, BlobTooLarge, ValueError}
    assert await blobs.get_many([]) == []
    await redis.aclose()


async def test_get_many_reads_a_large_round_in_chunks(redis_url):
    redis = await counted(redis_url)
    blobs = BlobStore(redis)
    data = [i.to_bytes(4, "big") * 16 for i in range(blobs_module.GET_MANY_CHUNK + 5)]
    names = [await blobs.put(d) for d in data]
    got, trips, commands = await round_trips(redis, lambda: blobs.get_many(names))
    assert got == data
    assert trips == 2 and commands["evalsha"] == len(names)
    await redis.aclose()


async def test_get_many_outlasts_a_script_flush(redis_url):
    redis = await counted(redis_url)
    blobs = BlobStore(redis)
    data = [os.urandom(64) for _ in range(5)]
    names = [await blobs.put(d) for d in data] + [digest_of(b"never stored")]
    assert (await blobs.get_many(names))[:5] == data
    await redis.script_flush()  # as after a restart: Redis no longer knows _GET_LIMITED
    got, trips, _ = await round_trips(redis, lambda: blobs.get_many(names))
    assert got[:5] == data and isinstance(got[5], BlobNotFound)
    assert trips == 3  # NOSCRIPT for all, SCRIPT LOAD, all again
    got, trips, _ = await round_trips(redis, lambda: blobs.get_many(names))
    assert got[:5] == data and trips == 1
    await redis.script_flush()
    assert await blobs.get(names[0]) == data[0]  # get() and get_many() share the script alike
    await redis.script_flush()
    assert (await blobs.get_many(names))[:5] == data
    assert await blobs.get(names[1]) == data[1]
    await redis.aclose()


async def test_kept_blobs_get_many_puts_back_what_redis_lost(redis_url, tmp_path, caplog):
    redis = await counted(redis_url)
    kept = KeptBlobs(BlobStore(redis), tmp_path / "blobs")
    data = [os.urandom(300) for _ in range(4)]
    names = [await kept.put(d) for d in data]
    await redis.flushall()  # Redis lost them all
    await kept.blobs.put(data[3])  # ... and one is back already
    other = digest_of(b"someone else's")  # lost too, but not ours to put back
    with caplog.at_level(logging.INFO, logger="trustmesh.stores.kept_blobs"):
        got = await kept.get_many([names[0], other, names[1], names[2], names[3], names[0]])
    assert got[0] == got[5] == data[0] and got[2:5] == data[1:]
    assert isinstance(got[1], BlobNotFound) and str(got[1]) == str(await outcome(kept.get(other)))
    put_back = [r for r in caplog.records if "put back from this node's copy" in r.getMessage()]
    assert sorted(r.getMessage()[5:21] for r in put_back) == sorted(n[:16] for n in names[:3])  # once each
    assert await BlobStore(redis).get_many(names) == data  # in Redis again
    await redis.aclose()


async def test_a_rounds_blobs_are_read_together_with_the_errors_one_read_gives(redis_url):
    redis = await counted(redis_url)
    blobs = BlobStore(redis, max_bytes=1024)
    good = await blobs.put(b"a submission")
    corrupted = await blobs.put(b"another")
    await redis.set(f"blob_{corrupted}", b"tampered")
    wanted = [(good, "submission of a"), (digest_of(b"lost"), "submission of b"), (corrupted, "update c"),
              (await BlobStore(redis).put(b"q" * 2000), "update d"), ("not a digest", "data of e")]
    ctx = TaskContext("node", None, None, blobs)
    got = await _blobs(ctx, wanted)
    for (digest, what), one in zip(wanted, got):
        assert same(one, await outcome(_blob(ctx, digest, what)))
    assert [type(one) for one in got] == [bytes, InputNotReady, TaskInputError, TaskInputError, TaskInputError]
    await redis.aclose()


class _Reader:
    def __init__(self, record):
        self.record = record

    async def round(self, schedule_id):
        return self.record


async def test_preprocess_reads_every_submission_in_one_round_trip(redis_url):
    redis = await counted(redis_url)
    blobs = BlobStore(redis)
    nodes = [f"{i:02x}" * 33 for i in range(60)]
    submissions = {node: {"digest": await blobs.put(os.urandom(200)), "samples": 10} for node in nodes}
    sid = "cd" * 32
    assignments = {"schedule_id": sid, "workflow_id": "w", "round": 1,
                   "tasks": {"preprocess": {"kind": "preprocess", "fetch_dependency_outputs": []}}}
    ctx = TaskContext("node", None, _Reader({"submitted_nodes": nodes, "submissions": submissions}), blobs)
    ctx.rounds.put(sid, {"assignments": assignments, "definition": {}})
    done, trips, commands = await round_trips(redis, lambda: run_task(ctx, sid, "preprocess"))
    assert done.metrics == {"submissions": 60, "samples": 600}
    assert trips == 2 and commands["evalsha"] == 60  # the reads, then the manifest's SET
    await redis.delete(f"blob_{submissions[nodes[7]]['digest']}")
    with pytest.raises(InputNotReady, match=f"submission of {nodes[7][:16]}… {submissions[nodes[7]]['digest'][:16]}… "
                                            f"is not in Redis"):
        await run_task(ctx, sid, "preprocess")
    await redis.aclose()


async def test_a_batch_of_local_trains_reads_its_data_in_one_round_trip_and_fails_alone(redis_url, tmp_path):
    from trustmesh.compute_node.tasks import TaskOutcome, run_local_trains
    from trustmesh.fl.datasets import dump_npz, federated_digits
    from trustmesh.scheduling.schedule import StartingModel
    from trustmesh.scheduling.workflow import load_definition
    from trustmesh.stores.data_bundle import seal_bundle
    from trustmesh.stores.data_envelope import load_or_create_keypair

    from helpers.family_scenario import _WORKFLOWS

    definition = load_definition(_WORKFLOWS / "federated-digits.json")
    definition["hyperparameters"]["epochs"] = 1
    shards = federated_digits(definition["data"], 6).shards
    key, public = load_or_create_keypair(tmp_path / "node.x25519")
    node, sid = "ab" * 33, "cd" * 32
    redis = await counted(redis_url)
    blobs = BlobStore(redis)
    tasks = {}
    for i, shard in enumerate(shards):
        owner = f"{i:02d}" * 33
        digest = await blobs.put(seal_bundle(dump_npz(shard), {node: public}, schedule_id=sid, sender=owner))
        tasks[f"train-{i}"] = {"kind": "local_train", "data_owner": owner, "inputs": [digest],
                               "fetch_dependency_outputs": ["preprocess"]}
    tasks["train-1"]["inputs"] = [digest_of(b"lost")]
    tasks["train-3"]["inputs"] = [await blobs.put(b"not a bundle")]
    ctx = TaskContext(node, key, None, blobs)
    ctx.rounds.put(sid, {"assignments": {"schedule_id": sid, "workflow_id": "w", "round": 3, "tasks": tasks},
                         "definition": definition, "global_model": (None, (), StartingModel("w", 3, None))})
    outcomes, trips, commands = await round_trips(redis, lambda: run_local_trains(ctx, sid, list(tasks)))
    trained = [t for t, o in outcomes.items() if isinstance(o, TaskOutcome)]
    assert len(trained) == 4
    assert trips == 1 + len(trained) and commands["evalsha"] == 6  # the data together, then one SET per update
    assert isinstance(outcomes["train-1"], InputNotReady) and isinstance(outcomes["train-3"], TaskInputError)

    # The round's aggregate reads those updates together too.
    tasks["aggregate"] = {"kind": "aggregate", "fetch_dependency_outputs": trained}
    for task_id in trained:
        ctx.reported[sid, task_id] = {"status": "done", "output_digest": outcomes[task_id].output_digest,
                                      "metrics": outcomes[task_id].metrics}
    ctx.reader = _Reader({"submitted_nodes": []})
    done, trips, commands = await round_trips(redis, lambda: run_task(ctx, sid, "aggregate"))
    assert sorted(done.round_result["participants"]) == sorted(tasks[t]["data_owner"] for t in trained)
    assert commands["evalsha"] == len(trained) and trips == 1 + commands["set"]  # the reads, then its puts
    await redis.delete(f"blob_{outcomes[trained[2]].output_digest}")
    with pytest.raises(InputNotReady, match=f"update {trained[2]} {outcomes[trained[2]].output_digest[:16]}… "
                                            f"is not in Redis"):
        await run_task(ctx, sid, "aggregate")
    await redis.aclose()
