"""Determinism: a whole federated round, replayed block by block on a fresh validator, gives
the same state root at every block.

Validator A runs the round with BlockInfo injection (wall-clock timestamps). Validator B starts
empty without an injector and is fed A's blocks, BlockInfo batches included, one block per
submission: every validator of a real network re-executes a publisher's blocks just so.
"""

from __future__ import annotations

import hashlib

from helpers.chain_round import trained_round
from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.devnet.block_info import BlockInfoHandler
from trustmesh.ledger.devnet.store import ChainStore
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, schedule, workflow
from helpers.family_scenario import HANDLERS, _WORKFLOWS


async def _one_round(client) -> None:
    round_ = await trained_round(client, heartbeats=True, metrics={"loss": 0.5, "accuracy": 0.8})
    keys, by_key, tasks, sid, commit = (round_[k] for k in ("keys", "by_key", "tasks", "sid", "commit"))
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
