"""Per-round costs of the schedule family that must not grow with the participants squared: a
local_train's done report reads its own status, its inputs' count and its dependents, never
every task of the round (each task's status counts its unsettled inputs down). Rules on dict
state, as the processor applies them."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from helpers.family_scenario import _WORKFLOWS, HANDLERS, DictContext, request, set_chain_time
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import federation, layout, peers, schedule, workflow


class CountingContext(DictContext):
    def __init__(self, state):
        super().__init__(state)
        self.read = 0

    async def get_state(self, addresses, timeout=None):
        addresses = list(addresses)
        self.read += len(addresses)
        return await super().get_state(addresses, timeout)


def _apply(state, signer, family, payload) -> int:
    """Apply; the number of addresses the transaction read."""
    context = CountingContext(state)
    asyncio.run(HANDLERS[family].apply(request(signer, family, payload), context))
    return context.read


def _scheduled_round(participants: int):
    """State of one round of `participants`, assigned to two compute nodes: (state, schedule_id,
    task -> its node's key, keys by public key)."""
    coordinator, *others = [PrivateKey.generate() for _ in range(participants)]
    members = [coordinator, *others]
    nodes = [PrivateKey.generate() for _ in range(2)]
    names = {f"iot-{i + 1}": p.public_key().as_hex() for i, p in enumerate(members)}
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["federation"].update(coordinator_node="iot-1", participant_nodes=list(names),
                                    expected_nodes=participants, min_nodes_required=participants, round_timeout=600)
    definition = workflow.resolve_node_names(definition, names)
    workflow_id = definition["workflow_id"]
    sid = layout.schedule_id_for(workflow_id, 1, coordinator.public_key().as_hex())
    state: dict[str, bytes] = {}
    set_chain_time(state, 1_700_000_000)
    _apply(state, coordinator, layout.WORKFLOW_FAMILY, workflow.deploy_payload(definition))
    for i, node in enumerate(nodes):
        _apply(state, node, layout.PEER_FAMILY, peers.make_peer_payload(
            "register", name=f"compute-{i}", encryption_public_key="ab" * 32, cpu_cores=2, memory_mb=4096))
    _apply(state, coordinator, layout.FEDERATION_FAMILY, federation.make_open_round_payload(workflow_id, 1))
    for i, member in enumerate(members):
        _apply(state, member, layout.FEDERATION_FAMILY, federation.make_submit_payload(sid, f"{i:064x}", 10 + i))
    _apply(state, coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(sid))
    tasks = schedule.decode_record(state[layout.assignments_address(sid)])["tasks"]
    signers = {n.public_key().as_hex(): n for n in nodes}
    return state, sid, {t: signers[task["node"]] for t, task in tasks.items()}


def _done(state, sid, task_id, signer) -> int:
    return _apply(state, signer, layout.SCHEDULE_FAMILY, schedule.report_payload(
        sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(),
        metrics={"loss": 0.5, "accuracy": 0.8}))


def _status(state, sid, task_id) -> dict:
    return cbor.decode(state[layout.task_status_address(sid, task_id)])


def _reads_per_train_report(participants: int) -> list[int]:
    state, sid, holders = _scheduled_round(participants)
    _done(state, sid, "preprocess", holders["preprocess"])
    return [_done(state, sid, t, holders[t]) for t in sorted(holders) if t.startswith("train:")]


def test_a_local_train_report_reads_the_same_few_records_however_many_participants():
    small, large = _reads_per_train_report(8), _reads_per_train_report(64)
    assert len(large) == 64
    # the assignments, the task's own status, its dependent (the aggregate), its node's load,
    # BlockInfo and the lineage records: a handful, the same at 8 and at 64 participants
    assert max(large) == max(small) <= 15, (max(small), max(large))


def test_the_aggregate_gets_its_deadline_when_the_last_input_settles_and_not_before():
    state, sid, holders = _scheduled_round(6)
    trains = sorted(t for t in holders if t.startswith("train:"))
    assert _status(state, sid, "aggregate")["unsettled_inputs"] == 7  # preprocess and six local_trains
    _done(state, sid, "preprocess", holders["preprocess"])
    for count, task_id in enumerate(trains, 1):
        before = _status(state, sid, "aggregate")["deadline"]
        _done(state, sid, task_id, holders[task_id])
        aggregate = _status(state, sid, "aggregate")
        assert aggregate["unsettled_inputs"] == 6 - count
        assert (aggregate["deadline"] != before) == (count == len(trains)), count
    with pytest.raises(Exception, match="cannot be done before its dependencies"):
        _done(state, sid, "evaluate", holders["evaluate"])


def test_status_records_written_before_the_count_existed_are_counted_from_their_inputs():
    """A chain whose rounds were assigned by the code before unsettled_inputs keeps going."""
    counted, sid, holders = _scheduled_round(5)
    legacy = dict(counted)
    for task_id in holders:
        address = layout.task_status_address(sid, task_id)
        record = cbor.decode(legacy[address])
        del record["unsettled_inputs"]
        legacy[address] = cbor.encode(record)
    for state in (counted, legacy):
        _done(state, sid, "preprocess", holders["preprocess"])
        trains = sorted(t for t in holders if t.startswith("train:"))
        with pytest.raises(Exception, match="cannot be done before its dependencies: train:"):
            _done(state, sid, "aggregate", holders["aggregate"])
        for task_id in trains:
            _done(state, sid, task_id, holders[task_id])
        _done(state, sid, "aggregate", holders["aggregate"])
    for task_id in holders:  # the same deadlines and statuses either way
        with_count, without = _status(counted, sid, task_id), _status(legacy, sid, task_id)
        with_count.pop("unsettled_inputs")
        assert with_count == without, task_id
