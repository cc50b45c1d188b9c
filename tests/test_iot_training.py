"""federation.train_on "iot": every IoT node trains on its own data and submits only its update.

Real parts as in tests/test_federated_round.py (dev validator, the four families, Redis, a
CouchDB-protocol server, compute nodes, IoT nodes). Checked: the rounds complete; each local_train
is reported by its IoT node, never a compute node; every update digest on chain names the stored
bytes; a canary row of raw data reaches no store, not even sealed (no data bundle in Redis); the
audit passes; a restarted IoT node finishes the task it held; a task of a pipelined round waits
for the previous round's global model.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

import pytest

from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from helpers.federation_run import scan_stores as _scan_for_canary
from helpers.federation_run import (start_compute_nodes, start_iot_nodes, until_every_round_is_final,
                                    until_history_is_recorded)
from trustmesh import audit
from trustmesh.fl import model_format
from trustmesh.fl.datasets import dump_npz, federated_digits, make_canary, with_canary
from trustmesh.compute_node.node import ComputeNode
from trustmesh.endpoints import Endpoints
from trustmesh.iot_node import commitment
from trustmesh.iot_node.local_training import LocalTrainer
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import workflow
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.scheduling.reader import FederationReader
from trustmesh.scheduling.schedule import StartingModel
from trustmesh.stores.redis_client import connect

from helpers.family_scenario import _WORKFLOWS

ROUNDS = 2


def _definition(workflow_id: str, keys: dict[str, str], rounds: int) -> dict:
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["workflow_id"] = workflow_id
    definition["hyperparameters"]["epochs"] = 2
    definition["federation"].update(participant_nodes=list(keys), coordinator_node="iot-1", expected_nodes=len(keys),
                                    min_nodes_required=2, rounds=rounds, round_timeout=60, train_on="iot")
    return workflow.resolve_node_names(definition, keys)


async def _deploy(client, folder, definition) -> None:
    owner = load_or_create_key(folder / "owner", "owner")
    [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(owner, definition)])])
    assert status["status"] == "COMMITTED", status


def test_iot_nodes_train_their_own_data_and_no_raw_data_reaches_a_store(devnet, stores, tmp_path, caplog):  # noqa: F811
    caplog.set_level(logging.INFO)
    redis_server, couch_server = stores
    canary = make_canary()
    names = ["iot-1", "iot-2", "iot-3"]
    keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
    definition = _definition("digits-iot", keys, ROUNDS)
    # iot-3 brings its own data file, with a canary row nobody could guess
    shard = federated_digits(definition["data"], 3).shards[2]
    iot3_data = dump_npz(with_canary(shard, canary))
    (tmp_path / "iot-3.npz").write_bytes(iot3_data)

    async def scenario():
        common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            computes = await start_compute_nodes(2, tmp_path, couch_server.url, common)
            await _deploy(client, tmp_path, definition)
            iots = await start_iot_nodes(names, tmp_path, "digits-iot", common)
            try:
                await until_every_round_is_final(iots, ROUNDS)
                await until_history_is_recorded(computes, ROUNDS)  # the audit below reads it
            finally:
                for node in iots + computes:
                    await node.stop()
            trained = await _check_rounds(client, redis_server.url, keys, {n.node for n in computes}, iot3_data,
                                          commitment.SaltStore(tmp_path / "iot-3" / "commitment-salts"))
            await _scan_for_canary(client, canary, couch_server.url, redis_server.url)
            await _no_data_bundle_in_redis(redis_server.url)
            report = await audit.audit_workflow("digits-iot", Endpoints(
                validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url, couch=couch_server.url))
            assert report.ok, audit.render_text(report)
            return trained, iots, computes

    trained, iots, computes = run(scenario(), timeout=300)
    # each IoT node ran exactly its own tasks, one per round; compute nodes ran none of them
    for node in iots:
        assert sorted(node.trainer.completed) == sorted(trained[node.node])
    ran_by_computes = {key for node in computes for key in node.completed}
    assert not ran_by_computes & {key for keys_ in trained.values() for key in keys_}
    assert all(node.completed for node in computes), "compute nodes still preprocess, aggregate and evaluate"


async def _check_rounds(client, redis_url, keys, compute_keys, iot3_data, iot3_salts) -> dict[str, list]:
    """Every round's submissions are commitments, and every local_train was trained and reported
    by its own IoT node, its update on chain naming the stored bytes. Returns node -> its tasks."""
    reader = FederationReader(client)
    redis = await connect(redis_url)
    trained: dict[str, list] = {key: [] for key in keys.values()}
    try:
        index = await reader.rounds("digits-iot")
        assert index["latest"] == ROUNDS
        for number in range(1, ROUNDS + 1):
            sid = index["rounds"][str(number)]
            record = await reader.round(sid)
            assert record["status"] == "ready" and sorted(record["submitted_nodes"]) == sorted(keys.values())
            for node, submission in record["submissions"].items():
                assert submission["metadata"]["format"] == commitment.FORMAT
                blob = await redis.get(f"blob_{submission['digest']}")
                assert hashlib.sha256(blob).hexdigest() == submission["digest"]
                body = cbor.decode(blob)
                assert body["node"] == node and body["schedule_id"] == sid and "envelopes" not in body
                assert body["samples"] == submission["samples"]
            iot3_blob = await redis.get(f"blob_{record['submissions'][keys['iot-3']]['digest']}")
            iot3_samples = record["submissions"][keys["iot-3"]]["samples"]
            commitment.check_commitment(iot3_blob, iot3_data, iot3_samples, schedule_id=sid, node=keys["iot-3"],
                                        salt=iot3_salts.of_round(sid))
            # hiding: without the node's salt, the data does not match its commitment
            assert cbor.decode(iot3_blob)["salted_sha256"] != hashlib.sha256(iot3_data).hexdigest()
            with pytest.raises(commitment.CommitmentError, match="data changed"):
                commitment.check_commitment(iot3_blob, iot3_data, iot3_samples, schedule_id=sid,
                                            node=keys["iot-3"], salt=bytes(commitment.SALT_BYTES))
            salt_file = iot3_salts.directory / sid
            assert salt_file.stat().st_mode & 0o777 == 0o600
            assignments = await reader.assignments(sid)
            assert assignments["train_on"] == "iot"
            definition = (await reader.workflow("digits-iot"))["definition"]
            for task_id in assignments["order"]:
                task, status = assignments["tasks"][task_id], await reader.task_status(sid, task_id)
                assert status["status"] == "done", (task_id, status)
                blob = await redis.get(f"blob_{status['output_digest']}")
                assert blob is not None and hashlib.sha256(blob).hexdigest() == status["output_digest"], task_id
                if task["kind"] != "local_train":
                    assert status["node"] in compute_keys
                    continue
                owner = task["data_owner"]
                reporter = [h["node"] for h in status["history"] if h["status"] == "done"]
                assert reporter == [owner] and status["node"] == owner and owner not in compute_keys, status
                assert {"loss", "accuracy", "samples", "compute_seconds", "task_seconds"} <= set(status["metrics"])
                assert status["metrics"]["samples"] == record["submissions"][owner]["samples"]
                model_format.load(blob, status["output_digest"], definition["model"])
                trained[owner].append((sid, task_id))
            result = await reader.round_result(sid)
            assert result["final"] is True and sorted(result["participants"]) == sorted(keys.values())
        return trained
    finally:
        await redis.aclose()


async def _no_data_bundle_in_redis(redis_url) -> None:
    """Not even sealed: no blob is a data bundle (stores/data_bundle.py), whoever could open it."""
    redis = await connect(redis_url)
    try:
        async for key in redis.scan_iter(match="blob_*", count=500):
            try:
                body = cbor.decode(await redis.get(key))
            except Exception:
                continue  # models and other non-CBOR outputs
            assert not (isinstance(body, dict) and "envelopes" in body), f"a data bundle in Redis at {key!r}"
    finally:
        await redis.aclose()


def test_a_restarted_iot_node_finishes_the_task_it_held(devnet, stores, tmp_path, caplog, monkeypatch):  # noqa: F811
    """iot-2 is stopped while training (its task assigned to it on chain), then started afresh: it
    finds the task in chain state, not in an event, and finishes it at the same attempt."""
    caplog.set_level(logging.INFO)
    redis_server, _ = stores
    names = ["iot-1", "iot-2"]
    keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
    definition = _definition("digits-iot-restart", keys, 1)

    async def scenario():
        common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            reader = FederationReader(client)
            compute = ComputeNode("compute-0", tmp_path / "compute-0", **common)
            await compute.start()
            await _deploy(client, tmp_path, definition)
            coordinator = IoTNode("iot-1", tmp_path / "iot-1", workflow_id="digits-iot-restart", coordinator=True,
                                  **common)
            first = IoTNode("iot-2", tmp_path / "iot-2", workflow_id="digits-iot-restart", coordinator=False, **common)
            training = asyncio.Event()
            train, first_life = LocalTrainer._train, []

            async def stuck(self, pending):  # iot-2's first life never gets past the start of its training
                if self.name == "iot-2" and first_life in ([], [self]):
                    first_life[:] = [self]
                    training.set()
                    await asyncio.Event().wait()
                return await train(self, pending)

            # on the class, before the node starts: its trainer may pick the task up at once
            monkeypatch.setattr(LocalTrainer, "_train", stuck)

            restarted = None
            try:
                await coordinator.start()
                await first.start()
                await asyncio.wait_for(training.wait(), 90)
                await first.stop()
                sid = (await reader.rounds("digits-iot-restart"))["rounds"]["1"]
                task_id = f"train:{keys['iot-2'][:16]}"
                held = await reader.task_status(sid, task_id)
                assert held["status"] == "assigned" and held["node"] == keys["iot-2"], held
                restarted = IoTNode("iot-2", tmp_path / "iot-2", workflow_id="digits-iot-restart", coordinator=False,
                                    **common)
                await restarted.start()
                await asyncio.wait_for(coordinator.finished.wait(), 120)
            finally:
                for node in [coordinator, restarted, compute]:
                    if node is not None:
                        await node.stop()
            status = await reader.task_status(sid, task_id)
            assert status["status"] == "done" and status["node"] == keys["iot-2"] and status["attempt"] == 1, status
            assert restarted.trainer.completed == [(sid, task_id)]
            assert (await reader.round_result(sid))["final"] is True

    run(scenario(), timeout=200)
    assert "picking up train:" in caplog.text


# --------------------------------------------------------------------------- pipelined rounds (no servers)


class _Chain:
    """Just what LocalTrainer reads: round 2's assignments, and whether round 1's model is on chain."""

    def __init__(self):
        self.model_on_chain = False
        self.statuses = {"preprocess": {"status": "assigned"}}

    async def assignments(self, sid):
        return {"schedule_id": sid, "workflow_id": "wf", "round": 2, "order": ["preprocess", "train:n"],
                "tasks": {"preprocess": {"kind": "preprocess", "fetch_dependency_outputs": []},
                          "train:n": {"kind": "local_train", "fetch_dependency_outputs": ["preprocess"]}}}

    async def workflow(self, workflow_id):
        return {"definition": {}}

    async def task_status(self, sid, task_id):
        return self.statuses.get(task_id)

    async def starting_model(self, workflow_id, number):
        if not self.model_on_chain:
            raise LookupError(f"round {number - 1} of {workflow_id!r} has no global model on chain yet")
        # the model's bytes do not matter here, only that the chain now names where training starts
        return StartingModel(workflow_id, number, None)


def test_a_task_of_a_pipelined_round_waits_for_the_previous_global_model(tmp_path):
    chain = _Chain()
    trainer = LocalTrainer("iot", load_or_create_key(tmp_path, "iot"), validator_url="tcp://127.0.0.1:1",
                           reader=chain, blobs=None, commit=None, local_data=None, workflows=None, salts=None)
    node = trainer.node
    started = []

    async def scenario():
        trainer._run = lambda pending: _record(started, pending)
        assigned = {"schedule_id": "s2", "task_id": "train:n", "node": node, "kind": "local_train", "attempt": "1"}
        await trainer._on_event("trustmesh/task-assigned", assigned)
        await trainer._on_event("trustmesh/task-done", {"schedule_id": "s2", "task_id": "preprocess"})
        assert started == []  # inputs ready, but round 1's global model is not on chain yet
        chain.model_on_chain = True
        await trainer._on_event("trustmesh/round-result", {"workflow_id": "other", "round": "1"})
        await trainer._on_event("trustmesh/round-result", {"workflow_id": "wf", "round": "2"})
        await asyncio.sleep(0)
        assert started == []  # another workflow's round, or not an earlier round: nothing to re-check
        await trainer._on_event("trustmesh/round-result", {"workflow_id": "wf", "round": "1"})
        await asyncio.sleep(0)
        assert started == ["train:n"]
        await trainer._on_event("trustmesh/round-result", {"workflow_id": "wf", "round": "1"})  # no second start
        await asyncio.sleep(0)
        assert started == ["train:n"]

    asyncio.run(scenario())


async def _record(started, pending):
    started.append(pending.task_id)


SID = "5c" * 32


def test_salt_store_keeps_one_private_salt_per_round_and_says_when_one_is_missing(tmp_path):
    salts = commitment.SaltStore(tmp_path / "salts")
    first = salts.for_round(SID)
    assert len(first) == commitment.SALT_BYTES and salts.for_round(SID) == first  # made once, then kept
    assert commitment.SaltStore(tmp_path / "salts").of_round(SID) == first       # across restarts
    assert salts.for_round("7d" * 32) != first
    assert (tmp_path / "salts" / SID).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "salts").stat().st_mode & 0o777 == 0o700
    with pytest.raises(commitment.CommitmentError, match="no commitment salt for round 8e8e"):
        salts.of_round("8e" * 32)
    with pytest.raises(commitment.CommitmentError, match="not a schedule id"):
        salts.for_round("../../keys/iot")
    (tmp_path / "salts" / SID).write_bytes(b"short")
    with pytest.raises(commitment.CommitmentError, match="damaged"):
        salts.of_round(SID)


def test_a_commitment_binds_salt_data_samples_round_and_node():
    data, salt = b"npz bytes", os.urandom(commitment.SALT_BYTES)
    blob = commitment.make_commitment(data, 7, schedule_id=SID, node="02" * 33, salt=salt)
    commitment.check_commitment(blob, data, 7, schedule_id=SID, node="02" * 33, salt=salt)
    for changed, message in [(dict(data=b"other"), "data changed"), (dict(samples=8), "data changed"),
                             (dict(salt=os.urandom(32)), "data changed"),
                             (dict(schedule_id="6d" * 32), "not to this node and round"),
                             (dict(node="03" * 33), "not to this node and round")]:
        args = dict(data=data, samples=7, schedule_id=SID, node="02" * 33, salt=salt) | changed
        with pytest.raises(commitment.CommitmentError, match=message):
            commitment.check_commitment(blob, args.pop("data"), args.pop("samples"), **args)
    unsalted_v1 = cbor.encode({"v": 1, "format": "local-commitment-v1", "schedule_id": SID, "node": "02" * 33,
                               "samples": 7, "data_sha256": hashlib.sha256(data).hexdigest()})
    with pytest.raises(commitment.CommitmentError, match="unsalted v1"):
        commitment.check_commitment(unsalted_v1, data, 7, schedule_id=SID, node="02" * 33, salt=salt)
