"""Whole federated rounds through every real part: dev validator, the four families, Redis,
a CouchDB-protocol server, two compute nodes and three IoT nodes; then every on-chain digest is
checked against the stored bytes, and no store holds an IoT node's raw data in plaintext."""

from __future__ import annotations

import asyncio
import hashlib
import logging


from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh.fl import model_format
from trustmesh.fl.datasets import dump_npz, federated_digits, make_canary, with_canary
from trustmesh.compute_node.history_recorder import HistoryRecorder
from trustmesh.ledger.block_cursor import BlockCursor
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import workflow
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.couch import CouchClient, CouchHistory
from trustmesh.stores.blobs import BlobStore
from trustmesh.stores.federation_cache import FederationCache
from trustmesh.stores.redis_client import connect

from helpers.federation_run import (digits_definition, finals_recorded, start_compute_nodes, start_iot_nodes,
                                    until_every_round_is_final, until_history_is_recorded)
from helpers.federation_run import scan_stores as _scan_for_canary
from helpers.federation_run import until as _until

ROUNDS = 2


def test_rounds_complete_every_digest_verifies_and_raw_data_never_leaks(devnet, stores, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    redis_server, couch_server = stores
    canary = make_canary()

    async def scenario():
        names = ["iot-1", "iot-2", "iot-3"]
        keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
        definition = digits_definition(keys, ROUNDS)
        # iot-3 brings its own data file, with a canary row nobody could guess
        shard = federated_digits(definition["data"], 3).shards[2]
        (tmp_path / "iot-3.npz").write_bytes(dump_npz(with_canary(shard, canary)))

        common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            computes = await start_compute_nodes(2, tmp_path, couch_server.url, common)
            # the trainings' statuses a round's history needs come from the statuses its aggregate
            # read (no second REST read each); the replay below, from the chain alone, must match
            assert all(node.recorder.task_statuses == node.context.task_statuses for node in computes)
            owner = load_or_create_key(tmp_path / "owner", "owner")
            [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(
                owner, definition)])])
            assert status["status"] == "COMMITTED", status
            iots = await start_iot_nodes(names, tmp_path, "digits-e2e", common)
            try:
                await until_every_round_is_final(iots, ROUNDS)
                assert all(node.trainer is None for node in iots)  # no IoT-side training asked: no task stream
                await until_history_is_recorded(computes, ROUNDS)
            finally:
                for node in iots + computes:
                    await node.stop()
            await _check_every_digest(client, definition, couch_server.url, redis_server.url)
            await _check_history_rebuilds_from_the_chain(devnet, computes, couch_server.url, redis_server.url, tmp_path)
            await _scan_for_canary(client, canary, couch_server.url, redis_server.url)
            return computes

    computes = run(scenario(), timeout=300)
    assert all(node.completed for node in computes), "both compute nodes took part"


async def _history_docs(couch_url: str, db: str) -> dict:
    async with CouchClient(couch_url) as couch:
        docs = await couch.all_docs(db)
    return {d["_id"]: {k: v for k, v in d.items() if k not in ("_rev", "_attachments")} for d in docs}


async def _check_history_rebuilds_from_the_chain(devnet, computes, couch_url, redis_url, tmp_path) -> None:
    """A history lost with its database comes back by replaying the chain from genesis: the same
    documents, written by the nodes that reported each round."""
    redis = await connect(redis_url)
    async with rest(devnet.rest_url) as client, CouchClient(couch_url) as couch:
        replayed = []
        for node in computes:
            history = CouchHistory(couch, db="replayed")
            await history.ensure()
            replayed.append(HistoryRecorder(node.node, FederationReader(client), BlobStore(redis), history,
                                            validator_url=devnet.component_url,
                                            cursor=BlockCursor(tmp_path / f"{node.name}.replay-block")))
        runs = [asyncio.get_running_loop().create_task(r.run()) for r in replayed]
        try:
            await asyncio.wait_for(_until(lambda: finals_recorded([_Recorded(r) for r in replayed]) == ROUNDS), 60)
        finally:
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
    await redis.aclose()
    original, rebuilt = await _history_docs(couch_url, "trustmesh"), await _history_docs(couch_url, "replayed")
    assert rebuilt == original and len(original) == 1 + ROUNDS + 3 + 1  # workflow, rounds, participants, final


class _Recorded:
    def __init__(self, recorder):
        self.recorder = recorder


def accuracy_of(result) -> float:
    return result["evaluations"]["evaluate"]["metrics"]["accuracy"]


async def _check_every_digest(client, definition, couch_url, redis_url) -> None:
    reader = FederationReader(client)
    redis = await connect(redis_url)
    try:
        index = await reader.rounds("digits-e2e")
        assert index["latest"] == ROUNDS
        accuracies = []
        for number in range(1, ROUNDS + 1):
            sid = index["rounds"][str(number)]
            record = await reader.round(sid)
            assert record["status"] == "ready" and len(record["submitted_nodes"]) == 3
            for node, submission in record["submissions"].items():
                blob = await redis.get(f"blob_{submission['digest']}")
                assert hashlib.sha256(blob).hexdigest() == submission["digest"]
            assignments = await reader.assignments(sid)
            for task_id in assignments["order"]:
                status = await reader.task_status(sid, task_id)
                assert status["status"] == "done", (task_id, status)
                blob = await redis.get(f"blob_{status['output_digest']}")
                assert blob is not None and hashlib.sha256(blob).hexdigest() == status["output_digest"], task_id
            result = await reader.round_result(sid)
            assert result["final"] is True
            assert sorted(result["participants"]) == sorted(record["submitted_nodes"])
            assert abs(sum(result["aggregation_weights"].values()) - 1) < 1e-9
            digest = result["global_model_digest"]
            blob = await redis.get(f"blob_{digest}")
            model_format.load(blob, digest, definition["model"])
            async with CouchClient(couch_url) as couch:
                stored = await CouchHistory(couch).get_round_model("digits-e2e", number, expected_digest=digest)
            assert stored == blob
            accuracies.append(result["evaluations"]["evaluate"]["metrics"]["accuracy"])
            # the Redis federation cache, filled from committed events, agrees with the chain
            cache = FederationCache(redis)
            cached = await cache.submissions("digits-e2e", sid)
            assert [c["node"] for c in cached] == record["submitted_nodes"]
            assert [c["digest"] for c in cached] == [record["submissions"][n]["digest"] for n in record["submitted_nodes"]]
            assert (await cache.round_state("digits-e2e", sid))["status"] == "ready"
            async with CouchClient(couch_url) as couch:
                history = CouchHistory(couch)
                doc = await history.get_round("digits-e2e", number)
                participation = {n: (await history.get_participation("digits-e2e", n))["rounds"][str(number)]
                                 for n in result["participants"]}
            assert doc["global_model_digest"] == digest and sorted(doc["participants"]) == sorted(result["participants"])
            assert doc["status"] == "final" and doc["metrics"]["accuracy"] == accuracy_of(result)
            for node, entry in participation.items():  # each update as the chain has it
                assert entry["weight"] == result["aggregation_weights"][node] and entry["digest"] == doc["update_digests"][node]
        assert accuracies[-1] > 0.5, accuracies  # it learned something, with 2 epochs on 3 shards
        async with CouchClient(couch_url) as couch:
            history = CouchHistory(couch)
            assert (await history.get_workflow("digits-e2e"))["definition"] == definition
            final = await history.get_final_model("digits-e2e", expected_digest=digest)  # the last round's model
            assert final == blob and (await history.get_workflow("digits-e2e"))["final_model_digest"] == digest
    finally:
        await redis.aclose()


