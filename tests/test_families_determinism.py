"""Determinism: a whole federated round, replayed block by block on a fresh validator, gives
the same state root at every block.

Validator A runs the round with BlockInfo injection (wall-clock timestamps). Validator B starts
empty without an injector and is fed A's blocks, BlockInfo batches included, one block per
submission: every validator of a real network re-executes a publisher's blocks just so.
"""

from __future__ import annotations

import hashlib

from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.devnet.block_info import BlockInfoHandler
from trustmesh.ledger.devnet.store import ChainStore
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import federation, layout, peers, schedule, workflow
from helpers.family_scenario import HANDLERS, _WORKFLOWS


async def _one_round(client) -> None:
    coordinator = PrivateKey.generate()
    participants = [coordinator, PrivateKey.generate(), PrivateKey.generate()]
    nodes = [PrivateKey.generate(), PrivateKey.generate()]
    keys = {f"iot-{i + 1}": p.public_key().as_hex() for i, p in enumerate(participants)}
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["federation"].update(participant_nodes=list(keys), expected_nodes=3, min_nodes_required=2)
    definition = workflow.resolve_node_names(definition, keys)
    wid = definition["workflow_id"]

    async def commit(*txns_by_signer):
        statuses = await submit_and_wait(client, [make_batch(s, [t]) for s, t in txns_by_signer], timeout=60)
        assert {s["status"] for s in statuses} == {"COMMITTED"}, statuses

    await commit((coordinator, workflow.make_deploy_transaction(coordinator, definition)))
    await commit(*[(n, peers.make_register_transaction(n, name=f"c{i}", encryption_public_key="ab" * 32,
                                                       cpu_cores=2, memory_mb=2048)) for i, n in enumerate(nodes)])
    await commit(*[(n, peers.make_heartbeat_transaction(n)) for n in nodes])  # liveness: chain time replayed
    await commit((coordinator, federation.make_open_round_transaction(coordinator, wid, 1)))
    sid = layout.schedule_id_for(wid, 1, coordinator.public_key().as_hex())
    await commit(*[(p, federation.make_submit_transaction(p, sid, f"{i:064x}", 10 + i))
                   for i, p in enumerate(participants)])
    await commit((coordinator, schedule.make_assign_transaction(coordinator, sid, wid)))
    tasks = schedule.decode_record(await client.get_state(layout.assignments_address(sid)))["tasks"]
    by_key = {n.public_key().as_hex(): n for n in nodes}
    order = ["preprocess", *sorted(t for t in tasks if t.startswith("train:")), "aggregate"]
    for task_id in order:
        node = by_key[tasks[task_id]["node"]]
        await commit((node, schedule.make_report_transaction(
            node, sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(),
            metrics={"loss": 0.5, "accuracy": 0.8})))
    aggregator = by_key[tasks["aggregate"]["node"]]
    submitted = sorted(keys.values())
    await commit((aggregator, schedule.make_round_result_transaction(
        aggregator, sid, hashlib.sha256(b"aggregate").hexdigest(), submitted,
        {k: 1 / 4 for k in submitted[:2]} | {submitted[2]: 1 / 2}, {"accuracy": 0.9, "loss": 0.3})))
    evaluator = by_key[tasks["evaluate"]["node"]]
    await commit((evaluator, schedule.make_report_transaction(
        evaluator, sid, "evaluate", "done", output_digest="34" * 32, metrics={"accuracy": 0.9, "loss": 0.3})))
    result = schedule.decode_record(await client.get_state(layout.round_result_address(sid)))
    assert result["final"] is True


def test_replayed_blocks_give_identical_state_roots(tmp_path):
    a = DevnetProcess(tmp_path / "a").start()
    try:
        async def record():
            async with running_processor(a.component_url, *HANDLERS.values()), rest(a.rest_url) as client:
                await _one_round(client)

        run(record(), timeout=180)
    finally:
        a.stop()
    store = ChainStore(tmp_path / "a")  # A's blocks, batches included, as it stored them
    blocks = list(store.blocks_ascending(1))
    roots_a = [pb.BlockHeader.FromString(b.header).state_root_hash for b in blocks]
    store.close()
    assert len(blocks) >= 10

    b = DevnetProcess(tmp_path / "b", "--no-block-info").start()
    try:
        async def replay():
            handlers = [*HANDLERS.values(), BlockInfoHandler()]
            async with running_processor(b.component_url, *handlers), rest(b.rest_url) as client:
                roots = []
                for block in blocks:
                    statuses = await submit_and_wait(client, list(block.batches), timeout=60)
                    assert {s["status"] for s in statuses} == {"COMMITTED"}, statuses
                    head = await client.head()
                    roots.append(head["header"]["state_root_hash"])
                return roots

        roots_b = run(replay(), timeout=180)
    finally:
        b.stop()
    assert roots_b == roots_a


def test_trustmesh_processors_command_serves_every_family(devnet):
    """The command operators run beside a validator registers all four families."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "processors", "--endpoint", devnet.component_url],
                            stderr=subprocess.PIPE, text=True)
    try:
        async def scenario():
            async with rest(devnet.rest_url) as client:
                coordinator = PrivateKey.generate()
                definition = workflow.load_definition(_WORKFLOWS / "single-node-digits.json")
                [status] = await submit_and_wait(
                    client, [make_batch(coordinator, [workflow.make_deploy_transaction(coordinator, definition)])],
                    timeout=30)
                assert status["status"] == "COMMITTED"

        run(scenario())
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    for family in (layout.WORKFLOW_FAMILY, layout.PEER_FAMILY, layout.FEDERATION_FAMILY, layout.SCHEDULE_FAMILY):
        assert f"processor registered: {family} 1.0" in devnet.log()
