"""A compute node killed (SIGKILL) in the middle of a task loses nothing: restarted, it takes its
unacknowledged task again; never restarted, the coordinator reassigns the task once its deadline
passes on chain, and the round completes either way."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import pytest

from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from helpers.federation_run import digits_definition
from trustmesh.iot_node import coordinator
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import workflow
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.redis_client import connect
from trustmesh.stores.task_queue import TaskQueue, task_stream


def _compute_process(name, tmp_path, devnet, redis_url) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "ab")
    # The two compute nodes share this machine's cores as `trustmesh up` makes them: each with
    # torch threads for half of them. Each with a thread per core, they oversubscribe a loaded
    # machine and 40 epochs took 30-50 s instead of 2.
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    return subprocess.Popen(
        [sys.executable, "-m", "trustmesh.cli", "-v", "compute-node", "--name", name,
         "--data-dir", str(tmp_path / name), "--validator", devnet.component_url, "--rest", devnet.rest_url,
         "--redis", redis_url, "--torch-threads", str(threads)], stdout=log, stderr=log)


async def _wait_registered(reader, count):
    while len(await reader.peer_index()) < count:
        await asyncio.sleep(0.1)


async def _busy_node(redis_url, nodes: dict[str, str]) -> str:
    """The first compute node that holds a task it has read but not acknowledged: mid-task."""
    redis = await connect(redis_url)
    try:
        while True:
            for name, key in nodes.items():
                if await TaskQueue(redis, task_stream(key)).pending(name):
                    return name
            await asyncio.sleep(0.02)
    finally:
        await redis.aclose()


@pytest.mark.parametrize("restart", [True, False], ids=["restarted-node-redelivers", "dead-node-reassigned"])
def test_round_completes_after_a_compute_node_is_killed_mid_task(devnet, stores, tmp_path, restart, monkeypatch):
    # The coordinator (in this process) tries a refused reassign again after REASSIGN_RETRY
    # seconds (10); the dead node's tasks come late one after the other, and each refusal while
    # its dependencies are not done yet would cost those 10 s again.
    monkeypatch.setattr(coordinator, "REASSIGN_RETRY", 1.0)
    redis_server, _ = stores
    processes = {name: _compute_process(name, tmp_path, devnet, redis_server.url) for name in ("c0", "c1")}

    async def scenario():
        names = ["iot-1", "iot-2", "iot-3"]
        keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
        definition = digits_definition(keys)
        definition["workflow_id"] = "digits-crash"
        definition["federation"]["rounds"] = 1
        # long enough to be caught mid-task. Killed for good, the node's tasks all run again on
        # the survivor, and the assertions below see them moved whatever the kill caught: a
        # quarter of the training does.
        definition["hyperparameters"]["epochs"] = 40 if restart else 10
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            reader = FederationReader(client)
            await asyncio.wait_for(_wait_registered(reader, 2), 60)
            compute_keys = {name: load_or_create_key(tmp_path / name / "keys", name).public_key().as_hex()
                            for name in processes}
            owner = load_or_create_key(tmp_path / "owner", "owner")
            [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(owner, definition)])])
            assert status["status"] == "COMMITTED"
            common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
            # Restarted: the default deadline (300 s) is far past the wait below, so only redelivery can
            # finish the round; a short one let a slow machine reassign before the node came back.
            iots = [IoTNode(n, tmp_path / n, workflow_id="digits-crash", coordinator=(n == "iot-1"),
                            task_deadline=None if restart else 4, **common) for n in names]
            for node in iots:
                await node.start()
            try:
                victim = await asyncio.wait_for(_busy_node(redis_server.url, compute_keys), 60)
                processes[victim].send_signal(signal.SIGKILL)
                processes[victim].wait()
                if restart:
                    processes[victim] = _compute_process(victim, tmp_path, devnet, redis_server.url)
                await asyncio.wait_for(iots[0].finished.wait(), 120)
            finally:
                for node in iots:
                    await node.stop()
            sid = (await reader.rounds("digits-crash"))["rounds"]["1"]
            result = await reader.round_result(sid)
            assert result["final"] is True
            assignments = await reader.assignments(sid)
            attempts = {t: task["attempt"] for t, task in assignments["tasks"].items()}
            if restart:
                assert set(attempts.values()) == {1}, "the restarted node finished its own tasks"
            else:
                moved = [t for t, n in attempts.items() if n > 1]
                assert moved, "a task of the dead node was reassigned"
                assert all(assignments["tasks"][t]["node"] != compute_keys[victim] for t in moved)

    try:
        run(scenario(), timeout=240)
    finally:
        for proc in processes.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:  # never leave a node running past the test
                    proc.kill()
                    proc.wait()
