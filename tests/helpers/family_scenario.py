"""A whole federation round run through the four handlers' apply() on in-memory state.

apply() is a pure function of (payload, state), so a dict holding the state is the real
thing here, not a stand-in: this is how the fuzz tests reach deep states (a deployed workflow,
registered nodes, an open and a scheduled round) and mutate payloads there.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib

from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet.block_info import CONFIG_ADDRESS, block_info_address
from trustmesh.ledger.processor import AuthorizationError
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import federation, layout, peers, schedule, workflow
from trustmesh.scheduling.handlers import federation_handlers


class DictContext:
    """Context over a dict, enforcing the transaction's declared inputs and outputs."""

    def __init__(self, state: dict[str, bytes], inputs=("",), outputs=("",)):
        self.state = state
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self.events: list = []

    def _allowed(self, addresses, allowed):
        for a in addresses:
            if not any(a.startswith(p) for p in allowed):
                raise AuthorizationError(f"{a} outside declared addresses")

    async def get_state(self, addresses, timeout=None):
        addresses = list(addresses)
        self._allowed(addresses, self.inputs)
        return {a: self.state[a] for a in addresses if a in self.state}

    async def set_state(self, entries, timeout=None):
        self._allowed(entries, self.outputs)
        self.state.update(entries)
        return list(entries)

    async def delete_state(self, addresses, timeout=None):
        addresses = list(addresses)
        self._allowed(addresses, self.outputs)
        for a in addresses:
            self.state.pop(a, None)
        return addresses

    async def add_event(self, event_type, attributes=(), data=b"", timeout=None):
        self.events.append((event_type, list(attributes)))

    async def add_receipt_data(self, data, timeout=None):
        pass


HANDLERS = {h.family_name: h for h in federation_handlers()}


def request(signer: PrivateKey, family: str, payload: bytes) -> "pb.TpProcessRequest":
    header = pb.TransactionHeader(
        family_name=family, family_version=layout.VERSION, signer_public_key=signer.public_key().as_hex(),
        batcher_public_key=signer.public_key().as_hex(), payload_sha512=hashlib.sha512(payload).hexdigest(),
    )
    return pb.TpProcessRequest(header=header, payload=payload, signature="0" * 128, context_id="fuzz")


def set_chain_time(state: dict[str, bytes], timestamp: int, block_num: int = 5) -> None:
    state[CONFIG_ADDRESS] = pb.BlockInfoConfig(
        latest_block=block_num, oldest_block=0, target_count=256, sync_tolerance=300).SerializeToString()
    state[block_info_address(block_num)] = pb.BlockInfo(block_num=block_num, timestamp=timestamp).SerializeToString()


def apply(state, signer, family, payload):
    return asyncio.run(HANDLERS[family].apply(request(signer, family, payload), DictContext(state)))


class Round:
    """Keys and the state after each step of one federated round (3 participants, 2 nodes).
    privacy: a workflow `privacy` block; with where "server" the round opens committed to
    `noise_seed` (32 bytes). secure_aggregation: that block, with train_on "iot" (the
    participants then train their own data) and all three participants required."""

    noise_seed = bytes(range(32))

    def __init__(self, privacy: dict | None = None, secure_aggregation: dict | None = None):
        self.coordinator = PrivateKey.generate()
        self.participants = [self.coordinator] + [PrivateKey.generate() for _ in range(2)]
        self.nodes = [PrivateKey.generate() for _ in range(2)]
        keys = {f"iot-{i + 1}": p.public_key().as_hex() for i, p in enumerate(self.participants)}
        definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
        fed = definition["federation"]
        fed.update(coordinator_node="iot-1", participant_nodes=list(keys), expected_nodes=3,
                   min_nodes_required=2, round_timeout=60)
        if privacy is not None:
            definition["privacy"] = privacy
        if secure_aggregation is not None:
            definition["secure_aggregation"] = secure_aggregation
            fed.update(train_on="iot", min_nodes_required=3)
        self.definition = workflow.resolve_node_names(definition, keys)
        server_noise = (privacy or {}).get("where") == "server"
        commitment = hashlib.sha256(self.noise_seed).hexdigest() if server_noise else None
        self.workflow_id = self.definition["workflow_id"]
        self.schedule_id = layout.schedule_id_for(self.workflow_id, 1, self.coordinator.public_key().as_hex())
        self.states: dict[str, dict[str, bytes]] = {}
        state: dict[str, bytes] = {}
        set_chain_time(state, 1_700_000_000)
        apply(state, self.coordinator, layout.WORKFLOW_FAMILY, workflow.deploy_payload(self.definition))
        for i, node in enumerate(self.nodes):
            apply(state, node, layout.PEER_FAMILY, peers.make_peer_payload(
                "register", name=f"compute-{i}", encryption_public_key="ab" * 32, cpu_cores=2 + i, memory_mb=4096))
        self.states["registered"] = copy.deepcopy(state)
        apply(state, self.coordinator, layout.FEDERATION_FAMILY,
              federation.make_open_round_payload(self.workflow_id, 1, commitment))
        self.states["collecting"] = copy.deepcopy(state)
        self.states["expired"] = copy.deepcopy(state)
        set_chain_time(self.states["expired"], 1_700_000_000 + 61, block_num=6)
        for i, participant in enumerate(self.participants):
            apply(state, participant, layout.FEDERATION_FAMILY,
                  federation.make_submit_payload(self.schedule_id, f"{i:064x}", 10 + i, {"kind": "update"}))
        self.states["ready"] = copy.deepcopy(state)
        apply(state, self.coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(self.schedule_id))
        self.states["scheduled"] = copy.deepcopy(state)
        tasks = schedule.decode_record(state[layout.assignments_address(self.schedule_id)])["tasks"]
        self.assigned = {task_id: task["node"] for task_id, task in tasks.items()}
        self.states["late"] = copy.deepcopy(state)
        set_chain_time(self.states["late"], 1_700_000_000 + 3600, block_num=7)
        for node in self.nodes:  # still heartbeating an hour on: live, so a late task can move
            apply(self.states["late"], node, layout.PEER_FAMILY, peers.heartbeat_payload())
        by_key = {n.public_key().as_hex(): n for n in [*self.nodes, *self.participants]}
        order = ["preprocess", *sorted(t for t in tasks if t.startswith("train:")), "aggregate"]
        for task_id in order:
            apply(state, by_key[self.assigned[task_id]], layout.SCHEDULE_FAMILY, schedule.report_payload(
                self.schedule_id, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(),
                metrics={"loss": 0.5, "accuracy": 0.8}))
        self.states["aggregated"] = copy.deepcopy(state)

    def valid_payloads(self):
        """(state name, signer, family, payload) of valid next steps, the seeds for mutation."""
        sid = self.schedule_id
        yield "registered", self.coordinator, layout.WORKFLOW_FAMILY, workflow.update_payload(self.definition, 1)
        yield "registered", self.nodes[0], layout.PEER_FAMILY, peers.make_peer_payload(
            "update", name="compute-0", encryption_public_key="cd" * 32, cpu_cores=8, memory_mb=8192)
        yield "registered", self.nodes[1], layout.PEER_FAMILY, peers.heartbeat_payload()
        yield "registered", self.coordinator, layout.FEDERATION_FAMILY, federation.make_open_round_payload(self.workflow_id, 1)
        yield "collecting", self.participants[1], layout.FEDERATION_FAMILY, federation.make_submit_payload(sid, "ef" * 32, 5)
        yield "expired", self.coordinator, layout.FEDERATION_FAMILY, federation.make_close_round_payload(sid)
        yield "ready", self.coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(sid, 120)
        by_key = {n.public_key().as_hex(): n for n in self.nodes}
        yield "scheduled", by_key[self.assigned["preprocess"]], layout.SCHEDULE_FAMILY, schedule.report_payload(
            sid, "preprocess", "running")
        yield "late", self.coordinator, layout.SCHEDULE_FAMILY, schedule.reassign_payload(sid, "preprocess")
        keys = sorted(p.public_key().as_hex() for p in self.participants)
        yield "aggregated", by_key[self.assigned["aggregate"]], layout.SCHEDULE_FAMILY, schedule.round_result_payload(
            sid, hashlib.sha256(b"aggregate").hexdigest(), keys, {k: 0.25 for k in keys[:2]} | {keys[2]: 0.5},
            {"accuracy": 0.9, "loss": 0.3})
        yield "aggregated", by_key[self.assigned["evaluate"]], layout.SCHEDULE_FAMILY, schedule.report_payload(
            sid, "evaluate", "done", output_digest="34" * 32, metrics={"accuracy": 0.9, "loss": 0.3})


import pathlib  # noqa: E402

_WORKFLOWS = pathlib.Path(__file__).resolve().parents[2] / "workflows"
