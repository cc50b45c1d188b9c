"""One federated round through a dev validator, up to its aggregate: the set-up the families'
end-to-end rule tests share (determinism replays it, the rewards tests pay it)."""

from __future__ import annotations

import hashlib

from helpers.family_scenario import _WORKFLOWS
from helpers.ledger_helpers import submit_and_wait
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import federation, layout, peers, rewards, schedule, workflow


async def trained_round(client, *, rewards_block: dict | None = None, heartbeats: bool = False,
                        metrics: dict | None = None) -> dict:
    """A federated-digits workflow (3 participants, iot-1 coordinating and owning it, 2 compute
    nodes) deployed (with `rewards_block` escrowed), round 1 opened, submitted, assigned, and its
    preprocess, trainings and aggregate reported done (with `metrics`).
    -> {coordinator, participants, nodes, keys, by_key, sid, wid, tasks, commit}; commit(*(signer,
    txn)) submits one batch each and asserts every one committed."""
    coordinator = PrivateKey.generate()
    participants = [coordinator, PrivateKey.generate(), PrivateKey.generate()]
    nodes = [PrivateKey.generate(), PrivateKey.generate()]
    keys = {f"iot-{i + 1}": p.public_key().as_hex() for i, p in enumerate(participants)}
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["federation"].update(participant_nodes=list(keys), expected_nodes=3, min_nodes_required=2)
    if rewards_block is not None:
        definition["federation"]["rounds"] = 1
        definition["rewards"] = rewards_block
    definition = workflow.resolve_node_names(definition, keys)
    wid = definition["workflow_id"]

    async def commit(*txns_by_signer):
        statuses = await submit_and_wait(client, [make_batch(s, [t]) for s, t in txns_by_signer], timeout=60)
        assert {s["status"] for s in statuses} == {"COMMITTED"}, statuses

    await commit((coordinator, workflow.make_deploy_transaction(coordinator, definition)))
    await commit(*[(n, peers.make_register_transaction(n, name=f"c{i}", encryption_public_key="ab" * 32,
                                                       cpu_cores=2, memory_mb=2048)) for i, n in enumerate(nodes)])
    if heartbeats:
        await commit(*[(n, peers.make_heartbeat_transaction(n)) for n in nodes])  # liveness: chain time replayed
    if rewards_block is not None:
        await commit((coordinator, rewards.make_escrow_transaction(coordinator, wid)))
    await commit((coordinator, federation.make_open_round_transaction(coordinator, wid, 1)))
    sid = layout.schedule_id_for(wid, 1, coordinator.public_key().as_hex())
    await commit(*[(p, federation.make_submit_transaction(p, sid, f"{i:064x}", 10 + i))
                   for i, p in enumerate(participants)])
    await commit((coordinator, schedule.make_assign_transaction(coordinator, sid, wid)))
    tasks = schedule.decode_record(await client.get_state(layout.assignments_address(sid)))["tasks"]
    by_key = {n.public_key().as_hex(): n for n in nodes}
    for task_id in ["preprocess", *sorted(t for t in tasks if t.startswith("train:")), "aggregate"]:
        node = by_key[tasks[task_id]["node"]]
        await commit((node, schedule.make_report_transaction(
            node, sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(), metrics=metrics)))
    return {"coordinator": coordinator, "participants": participants, "nodes": nodes, "keys": keys,
            "by_key": by_key, "sid": sid, "wid": wid, "tasks": tasks, "commit": commit}
