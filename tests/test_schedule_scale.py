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
from trustmesh.scheduling import federation, federation_records, layout, peers, schedule, workflow


class CountingContext(DictContext):
    def __init__(self, state):
        super().__init__(state)
        self.read = 0
        self.bytes_read = 0

    async def get_state(self, addresses, timeout=None):
        addresses = list(addresses)
        self.read += len(addresses)
        found = await super().get_state(addresses, timeout)
        self.bytes_read += sum(len(value) for value in found.values())
        return found


def _apply(state, signer, family, payload, *, measure: str = "read") -> int:
    """Apply; the number of addresses the transaction read (measure "bytes_read": their bytes)."""
    context = CountingContext(state)
    asyncio.run(HANDLERS[family].apply(request(signer, family, payload), context))
    return getattr(context, measure)


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


def _done(state, sid, task_id, signer, *, measure: str = "read") -> int:
    return _apply(state, signer, layout.SCHEDULE_FAMILY, schedule.report_payload(
        sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(),
        metrics={"loss": 0.5, "accuracy": 0.8}), measure=measure)


def _status(state, sid, task_id) -> dict:
    return cbor.decode(state[layout.task_status_address(sid, task_id)])


def _reads_per_train_report(participants: int, measure: str = "read") -> list[int]:
    state, sid, holders = _scheduled_round(participants)
    _done(state, sid, "preprocess", holders["preprocess"])
    return [_done(state, sid, t, holders[t], measure=measure) for t in sorted(holders) if t.startswith("train:")]


def test_a_local_train_report_reads_the_same_bytes_however_many_participants():
    """Not the round's assignments record (every task: ~330 KB at 1,000 participants, read by
    each of a round's reports would be quadratic): the task's status says its kind, round and
    dependents (task_graph.report_view)."""
    small, large = _reads_per_train_report(8, "bytes_read"), _reads_per_train_report(64, "bytes_read")
    typical = sorted(small)[len(small) // 2]
    # every report but the one whose aggregate becomes ready then (it sets that deadline in the
    # assignments, once per round) reads what one of 8 does, give or take a longer counter
    assert sum(b > typical + 64 for b in large) <= 1, (typical, sorted(large)[-3:])
    assert sorted(large)[-2] <= typical + 64


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


def _aggregated_round(participants: int):
    state, sid, holders = _scheduled_round(participants)
    for task_id in ["preprocess", *sorted(t for t in holders if t.startswith("train:")), "aggregate"]:
        _done(state, sid, task_id, holders[task_id])
    submitted = asyncio.run(federation_records.read_round(DictContext(state), sid))["submitted_nodes"]
    return state, sid, holders, submitted


def _result_payload(sid, submitted, **changes):
    weights = {node: (0.0 if i == 0 else 1 / (len(submitted) - 1)) for i, node in enumerate(submitted)}
    fields = dict(participants=sorted(submitted), aggregation_weights=weights, metrics={"accuracy": 0.9, "loss": 0.3},
                  rejected={submitted[0]: "its update's norm is 40x the median"},
                  contributions={node: 0.1 * i for i, node in enumerate(submitted)}, submitted=submitted)
    fields.update(changes)
    return schedule.round_result_payload(sid, hashlib.sha256(b"aggregate").hexdigest(), fields.pop("participants"),
                                         fields.pop("aggregation_weights"), fields.pop("metrics"), **fields)


def test_a_large_round_result_names_participants_by_position_and_records_the_same(monkeypatch):
    from trustmesh.scheduling.schedule import client

    state, sid, holders, submitted = _aggregated_round(6)
    keyed_state, positional_state = dict(state), dict(state)
    keyed = _result_payload(sid, submitted)
    monkeypatch.setattr(client, "KEYED_RESULT_MAX_BYTES", 0)  # as a thousand participants would make it
    positional = _result_payload(sid, submitted)
    assert cbor.decode(positional)["participants"] == sorted(range(6), key=lambda i: submitted[i])
    assert len(positional) < len(keyed) / 2
    signer = holders["aggregate"]
    _apply(keyed_state, signer, layout.SCHEDULE_FAMILY, keyed)
    _apply(positional_state, signer, layout.SCHEDULE_FAMILY, positional)
    address = layout.round_result_address(sid)
    assert cbor.decode(positional_state[address])["rejected"] == {submitted[0]: "its update's norm is 40x the median"}
    assert positional_state[address] == keyed_state[address]


@pytest.mark.parametrize("change, message", [
    (lambda p: {**p, "participants": [*p["participants"][:-1], 6]}, "position 6; the round's submitted_nodes has positions 0 to 5"),
    (lambda p: {**p, "aggregation_weights": p["aggregation_weights"][:-1]}, "one value per participant"),
    (lambda p: {**p, "participants": [0, *p["participants"][1:-1], 0], }, "names a node twice"),
    (lambda p: {**p, "rejected": {"02" + "ab" * 32: "x"}}, "keyed by position too"),
])
def test_a_positional_round_result_is_refused_when_its_positions_do_not_fit(monkeypatch, change, message):
    from trustmesh.scheduling.schedule import client

    state, sid, holders, submitted = _aggregated_round(6)
    monkeypatch.setattr(client, "KEYED_RESULT_MAX_BYTES", 0)
    payload = cbor.decode(_result_payload(sid, submitted))
    with pytest.raises(Exception, match=message):
        _apply(state, holders["aggregate"], layout.SCHEDULE_FAMILY, cbor.encode(change(payload)))


def test_a_record_a_rule_only_looks_at_is_decoded_once_per_stored_bytes():
    """The lineage rule reads the previous round's result (~150 KB at 1,000 participants) in each
    of the next round's 1,000 reports: decoded once for the same bytes, read anew when they change."""
    from trustmesh.ledger.processor import AuthorizationError
    from trustmesh.scheduling.common import read_record_to_look_at

    address = layout.round_result_address("ab" * 15)
    state = {address: cbor.encode({"global_model_digest": "a" * 64, "participants": list(range(1000))})}
    first = asyncio.run(read_record_to_look_at(DictContext(state), address))
    assert asyncio.run(read_record_to_look_at(DictContext(dict(state)), address)) is first
    state[address] = cbor.encode({"global_model_digest": "b" * 64, "participants": []})
    assert asyncio.run(read_record_to_look_at(DictContext(state), address))["global_model_digest"] == "b" * 64
    assert asyncio.run(read_record_to_look_at(DictContext({}), address)) is None
    with pytest.raises(AuthorizationError):  # a read outside the declared inputs is still refused
        asyncio.run(read_record_to_look_at(DictContext(state, inputs=("00",)), address))
