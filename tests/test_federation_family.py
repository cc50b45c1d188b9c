"""trustmesh-federation: rounds, submissions, timeouts, every rule. A whole happy path through the
dev validator; each rule on dict state through the handlers' apply() (helpers.dict_ledger), where
block time is set instead of waited for.

Workflows are deployed through the real trustmesh-workflow family (scheduling/workflow.py).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import hashlib
import pathlib
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.devnet_process import DevnetProcess
from helpers.dict_ledger import DictLedger
from helpers.ledger_helpers import rest, running_processor, submit_and_wait
from trustmesh.ledger import payload as cbor
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.devnet.block_info import CONFIG_ADDRESS, block_info_address
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import federation, federation_records, layout, workflow
from trustmesh.scheduling.federation import (
    FederationHandler,
    make_close_round_transaction,
    make_open_round_transaction,
    make_submit_transaction,
)
from trustmesh.scheduling.reader import FederationReader
from trustmesh.scheduling.workflow import WorkflowHandler, make_deploy_transaction

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"

COORDINATOR = PrivateKey.generate()   # an IoT node with data of its own that also opens rounds
P2 = PrivateKey.generate()
P3 = PrivateKey.generate()
OUTSIDER = PrivateKey.generate()
C, K2, K3 = (k.public_key().as_hex() for k in (COORDINATOR, P2, P3))
PARTICIPANTS = [C, K2, K3]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    node = DevnetProcess(tmp_path_factory.mktemp("federation-family") / "devnet").start()
    yield node
    node.stop()


@pytest.fixture
def client() -> DictLedger:
    """The rules on dict state through the handlers' apply(), driven like the validator
    (helpers.dict_ledger); the happy path below runs through the dev validator (`chain`)."""
    return DictLedger()


def federated(workflow_id: str, *, min_nodes: int = 2, timeout: int = 3600, rounds: int = 3) -> dict:
    definition = workflow.load_definition(WORKFLOWS / "federated-digits.json")
    definition["workflow_id"] = workflow_id
    definition["federation"].update(coordinator_node=C, participant_nodes=list(PARTICIPANTS),
                                    expected_nodes=len(PARTICIPANTS), min_nodes_required=min_nodes,
                                    round_timeout=timeout, rounds=rounds)
    return definition


def single_node(workflow_id: str) -> dict:
    definition = workflow.load_definition(WORKFLOWS / "single-node-digits.json")
    definition["workflow_id"] = workflow_id
    return definition


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def message(status: dict) -> str:
    assert status["status"] == "INVALID", status
    return status["invalid_transactions"][0]["message"]


def batch(signer, *transactions):
    return make_batch(signer, list(transactions))


async def events_of(client, transaction) -> dict[str, dict[str, str]]:
    [receipt] = await client.get_receipts([transaction.header_signature])
    return {e["event_type"]: {a["key"]: a["value"] for a in e.get("attributes", [])} for e in receipt.get("events", [])}


async def commit(client, *batches):
    statuses = await submit_and_wait(client, list(batches), raise_invalid=True)
    assert all(s["status"] == "COMMITTED" for s in statuses)


async def deploy(client, *definitions):
    await commit(client, *(batch(COORDINATOR, make_deploy_transaction(COORDINATOR, d)) for d in definitions))


async def round_record(client, schedule_id) -> dict:
    """The round as its readers see it: core, roster and members assembled (federation_records)."""
    return await FederationReader(client).round(schedule_id)


async def stored_core(client, schedule_id) -> dict:
    return federation.decode_round(await client.get_state(layout.round_address(schedule_id)))


def raw(signer, body, inputs, outputs=None):
    """A trustmesh-federation transaction with any payload and addresses (to break rules on purpose)."""
    data = cbor.encode(body)
    return make_transaction(signer, layout.FEDERATION_FAMILY, layout.VERSION, data, inputs,
                            inputs if outputs is None else outputs)


def submit_raw(signer, schedule_id, **fields):
    body = {"action": "submit", "schedule_id": schedule_id, "digest": digest("x"), "samples": 10, **fields}
    return raw(signer, {k: v for k, v in body.items() if v is not None}, [layout.round_address(schedule_id)])


def handlers():
    return WorkflowHandler(), FederationHandler()


async def check_rejections(client, cases):
    """cases: (signer, transaction, expected fragment); each in its own batch, all in one submission."""
    statuses = await submit_and_wait(client, [batch(s, t) for s, t, _ in cases])
    assert len(statuses) == len(cases)
    for (_, _, expected), status in zip(cases, statuses):
        assert expected in message(status), (expected, message(status))


# --------------------------------------------------------------------------- happy path


async def test_three_participants_reach_ready_and_rounds_are_numbered(chain, monkeypatch):
    wf = "fl-happy"
    from trustmesh.ledger import processor as runtime

    asked = []  # the context of each state request the processor makes (a round trip through the validator)
    plain_call = runtime.Context._call

    async def counted(self, request_type, *args, **kwargs):
        if request_type == pb.Message.TP_STATE_GET_REQUEST:
            asked.append(self.context_id)
        return await plain_call(self, request_type, *args, **kwargs)

    async with running_processor(chain.component_url, *handlers()), rest(chain.rest_url) as client:
        await deploy(client, federated(wf, rounds=2))
        before = int(time.time())
        opening = make_open_round_transaction(COORDINATOR, wf, 1)
        await commit(client, batch(COORDINATOR, opening))
        sid = layout.schedule_id_for(wf, 1, C)

        record = await round_record(client, sid)
        assert before - 1 <= record["round_start"] <= int(time.time()) + 1
        assert record == {
            "schedule_id": sid, "workflow_id": wf, "workflow_version": 1, "round": 1, "coordinator": C,
            "expected_nodes": PARTICIPANTS, "min_nodes_required": 2, "round_timeout": 3600,
            "round_start": record["round_start"], "status": "collecting", "submissions": {},
            "submitted_nodes": [],
        }
        # stored: a small core with counts, the roster once, one empty member record per expected node
        assert await stored_core(client, sid) == {
            "schedule_id": sid, "workflow_id": wf, "workflow_version": 1, "round": 1, "coordinator": C,
            "expected": 3, "submitted": 0, "min_nodes_required": 2, "round_timeout": 3600,
            "round_start": record["round_start"], "status": "collecting",
        }
        assert cbor.decode(await client.get_state(layout.round_roster_address(sid))) == {"expected_nodes": PARTICIPANTS}
        assert [cbor.decode(await client.get_state(layout.round_member_address(sid, n))) for n in PARTICIPANTS] == [{}] * 3
        index = federation.decode_workflow_rounds(await client.get_state(layout.workflow_rounds_address(wf)))
        assert index == {"rounds": {"1": sid}, "latest": 1}
        assert (await events_of(client, opening))[federation.EVENT_ROUND_OPENED] == {
            "workflow_id": wf, "round": "1", "schedule_id": sid, "coordinator": C,
            "expected_nodes": ",".join(PARTICIPANTS), "min_nodes_required": "2", "round_timeout": "3600",
            "round_start": str(record["round_start"]), "workflow_version": "1",
        }

        # two of three: still collecting, arrival order kept
        first = make_submit_transaction(P2, sid, digest("p2-update"), 120, {"epochs": 5, "loss": 0.25})
        second = make_submit_transaction(COORDINATOR, sid, digest("c-update"), 80)
        monkeypatch.setattr(runtime.Context, "_call", counted)
        await commit(client, batch(P2, first), batch(COORDINATOR, second))
        monkeypatch.undo()
        # each submit: its round's core, its member record and the clock's config, then the clock's block
        assert sorted(collections.Counter(asked).values()) == [2, 2], asked
        record = await round_record(client, sid)
        assert record["status"] == "collecting"
        assert record["submitted_nodes"] == [K2, C]
        assert record["submissions"][K2] == {"digest": digest("p2-update"), "samples": 120,
                                             "metadata": {"epochs": 5, "loss": 0.25}}
        assert cbor.decode(await client.get_state(layout.round_member_address(sid, K2))) == {
            "digest": digest("p2-update"), "samples": 120, "metadata": {"epochs": 5, "loss": 0.25}, "position": 1}
        assert (await stored_core(client, sid))["submitted"] == 2
        accepted = (await events_of(client, first))[federation.EVENT_SUBMISSION_ACCEPTED]
        assert accepted == {"schedule_id": sid, "node": K2, "digest": digest("p2-update"), "samples": "120",
                            "metadata": '{"epochs":5,"loss":0.25}', "workflow_id": wf, "round": "1",
                            "position": "1"}
        assert federation.EVENT_ROUND_READY not in await events_of(client, second)

        # the last expected node: ready in the same transaction
        last = make_submit_transaction(P3, sid, digest("p3-update"), 40, {"device": "rpi-4"})
        await commit(client, batch(P3, last))
        record = await round_record(client, sid)
        assert record["status"] == "ready"
        assert record["submitted_nodes"] == [K2, C, K3]
        events = await events_of(client, last)
        assert events[federation.EVENT_SUBMISSION_ACCEPTED]["position"] == "3"
        assert events[federation.EVENT_ROUND_READY] == {
            "schedule_id": sid, "workflow_id": wf, "round": "1", "reason": "all-submitted",
            "submissions": "3", "submitted_nodes": ",".join([K2, C, K3]),
        }

        # round 2 opens now that round 1 is ready; there is no round 3
        await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 2)))
        sid2 = layout.schedule_id_for(wf, 2, C)
        index = federation.decode_workflow_rounds(await client.get_state(layout.workflow_rounds_address(wf)))
        assert index == {"rounds": {"1": sid, "2": sid2}, "latest": 2}
        assert (await round_record(client, sid2))["status"] == "collecting"
        await check_rejections(client, [
            (COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 3),
             f"workflow '{wf}' has 2 round(s); round 3 is beyond them"),
        ])


# --------------------------------------------------------------------------- open_round rules


async def test_open_round_rules(client):
    wf, single = "fl-open-rules", "single-node-open"

    await deploy(client, federated(wf), single_node(single))
    inputs_no_clock, outputs = federation.open_round_addresses(wf, 1, C)
    inputs_no_clock.remove(layout.BLOCK_INFO_NS)
    open_body = {"action": "open_round", "workflow_id": wf, "round": 1}
    await check_rejections(client, [
        (P2, make_open_round_transaction(P2, wf, 1), f"only the coordinator of workflow '{wf}' ({C})"),
        (COORDINATOR, make_open_round_transaction(COORDINATOR, "nope", 1), "unknown workflow 'nope'"),
        (COORDINATOR, make_open_round_transaction(COORDINATOR, single, 1), "is a single-node workflow"),
        (COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 2),
         f"rounds go up by one: the next round of workflow '{wf}' is 1, not 2"),
        (COORDINATOR, raw(COORDINATOR, {**open_body, "round": 0}, inputs_no_clock),
         "field 'round' must be between 1 and"),
        (COORDINATOR, raw(COORDINATOR, {**open_body, "round": "1"}, inputs_no_clock),
         "field 'round' must be an integer"),
        (COORDINATOR, raw(COORDINATOR, {**open_body, "workflow_id": "bad id"}, inputs_no_clock),
         "field 'workflow_id' must be a workflow id"),
        (COORDINATOR, raw(COORDINATOR, {**open_body, "extra": 1}, inputs_no_clock),
         "unknown field(s) 'extra'"),
        (COORDINATOR, raw(COORDINATOR, {**open_body, "action": "open"}, inputs_no_clock),
         "action must be one of close_round, open_round, submit; got 'open'"),
        (COORDINATOR, raw(COORDINATOR, open_body, inputs_no_clock, outputs),
         f"list the namespace {layout.BLOCK_INFO_NS} in the transaction's inputs"),
    ])
    assert await client.get_state(layout.workflow_rounds_address(wf)) is None

    await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 1)))
    sid = layout.schedule_id_for(wf, 1, C)
    inputs_no_previous, outputs2 = federation.open_round_addresses(wf, 2, C)
    inputs_no_previous.remove(layout.round_address(sid))
    await check_rejections(client, [
        (COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 1),
         f"round 1 of workflow '{wf}' was already opened (schedule_id {sid}); the next round is 2"),
        (COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 2),
         f"round 1 of workflow '{wf}' ({sid}) is still collecting; it must be ready or timeout"),
        (COORDINATOR, raw(COORDINATOR, {**open_body, "round": 2}, inputs_no_previous, outputs2),
         f"and the previous round's {layout.round_address(sid)}"),
    ])
    index = federation.decode_workflow_rounds(await client.get_state(layout.workflow_rounds_address(wf)))
    assert index == {"rounds": {"1": sid}, "latest": 1}


def test_federation_config_of_a_stored_workflow_is_checked_defensively():
    good = {"definition": {"federation": {"coordinator_node": C, "participant_nodes": PARTICIPANTS,
                                          "expected_nodes": 3, "min_nodes_required": 2, "round_timeout": 5,
                                          "rounds": 2}}}
    assert federation.federation_config("w", good)["participants"] == PARTICIPANTS

    def broken(**changes):
        record = copy.deepcopy(good)
        record["definition"]["federation"].update(changes)
        return record

    for record, expected in [
        ({"definition": None}, "stored without a definition map"),
        (broken(min_nodes_required=4), "'min_nodes_required' must be between 1 and 3"),
        (broken(expected_nodes=2), "'expected_nodes' (2) does not match participant_nodes"),
        (broken(participant_nodes=[C, C, K2]), "lists a node twice"),
        (broken(participant_nodes=["iot-1"]), "not a 66-hex public key"),
        (broken(coordinator_node="iot-1"), "'coordinator_node' must be a 66-hex public key"),
        (broken(round_timeout=0), "'round_timeout' must be between 1 and"),
        (broken(rounds=True), "'rounds' must be an integer, not a boolean"),
    ]:
        with pytest.raises(InvalidTransaction) as err:
            federation.federation_config("w", record)
        assert expected in str(err.value), (expected, str(err.value))


# --------------------------------------------------------------------------- submit rules


async def test_submit_rules(client):
    wf = "fl-submit-rules"

    await deploy(client, federated(wf))
    await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, wf, 1)))
    sid = layout.schedule_id_for(wf, 1, C)
    await commit(client, batch(P2, make_submit_transaction(P2, sid, digest("p2"), 10)))
    before = await client.get_state(layout.round_address(sid))
    unknown = "ab" * 32

    await check_rejections(client, [
        (P3, make_submit_transaction(P3, unknown, digest("p3"), 10), f"unknown schedule_id {unknown}"),
        (OUTSIDER, make_submit_transaction(OUTSIDER, sid, digest("o"), 10),
         f"signer {OUTSIDER.public_key().as_hex()} is not an expected node of round 1 of workflow '{wf}'"),
        (P2, make_submit_transaction(P2, sid, digest("p2-again"), 10),
         f"node {K2} already submitted to round 1 of workflow '{wf}' ({sid}) (digest {digest('p2')})"),
        (P3, submit_raw(P3, sid, digest="xyz"), "the sha256 of the off-chain blob as 64 lowercase hex"),
        (P3, submit_raw(P3, sid, digest=digest("x").upper()), "64 lowercase hex"),
        (P3, submit_raw(P3, sid, digest=bytes(32)), "field 'digest' must be a string, got bytes"),
        (P3, submit_raw(P3, sid, samples=0), "field 'samples' must be between 1 and"),
        (P3, submit_raw(P3, sid, samples=True), "field 'samples' must be an integer, not a boolean"),
        (P3, submit_raw(P3, sid, samples=None), "lacks the required field 'samples'"),
        (P3, submit_raw(P3, sid, metadata=[1]), "field 'metadata' must be a map"),
        (P3, submit_raw(P3, sid, metadata={"pixels": bytes(64)}), "raw data never goes on chain"),
        (P3, submit_raw(P3, sid, metadata={"notes": "x" * 300}), "is 300 characters; the limit is 256"),
        (P3, submit_raw(P3, sid, metadata={f"k{i}": "y" * 250 for i in range(5)}),
         "bytes encoded; the limit is 1024"),
        (P3, submit_raw(P3, sid, metadata={"nested": {"a": 1}}),
         "metadata value 'nested' must be a string, number, boolean, null or a list of those"),
        (P3, submit_raw(P3, sid, metadata={"bad key": 1}), "metadata key 'bad key' must be an identifier"),
        (P3, submit_raw(P3, sid, metadata={"xs": list(range(33))}), "is a list of 33 items; the limit is 32"),
        (P3, submit_raw(P3, sid, metadata={"loss": float("nan")}), "must be a finite number"),
        (P3, submit_raw(P3, sid, metadata={"big": 2**64}), "must fit in a signed 64-bit integer"),
        (P3, submit_raw(P3, sid, blob="raw bytes"), "unknown field(s) 'blob'"),
        (P3, submit_raw(P3, "not-hex"), "field 'schedule_id' must be a schedule_id (64 lowercase hex)"),
    ])
    assert await client.get_state(layout.round_address(sid)) == before

    # metadata at the edge of the rules is fine
    ok = {"epochs": 5, "loss": 0.125, "tags": ["a", "b"], "device": None, "gpu": False, "note": "z" * 256}
    await commit(client, batch(P3, make_submit_transaction(P3, sid, digest("p3"), 7, ok)))
    assert (await round_record(client, sid))["submissions"][K3]["metadata"] == ok


# --------------------------------------------------------------------------- close_round and timeouts


async def test_close_round_after_timeout_ready_or_timeout(client):
    enough, short, wait = "fl-close-enough", "fl-close-short", "fl-close-wait"

    await deploy(client, federated(enough, timeout=1), federated(short, timeout=1), federated(wait))
    await commit(client, *(batch(COORDINATOR, make_open_round_transaction(COORDINATOR, w, 1))
                           for w in (enough, short, wait)))
    sid_enough, sid_short, sid_wait = (layout.schedule_id_for(w, 1, C) for w in (enough, short, wait))
    await commit(client,
                 batch(COORDINATOR, make_submit_transaction(COORDINATOR, sid_enough, digest("c"), 5)),
                 batch(P2, make_submit_transaction(P2, sid_enough, digest("p2"), 6)),
                 batch(P2, make_submit_transaction(P2, sid_short, digest("p2s"), 6)))

    # too early: the message says how long is left
    [status] = await submit_and_wait(client, [batch(OUTSIDER, make_close_round_transaction(OUTSIDER, sid_wait))])
    text = message(status)
    assert f"round 1 of workflow '{wait}' ({sid_wait}) cannot be closed yet" in text
    remaining = int(re.search(r"(\d+) s remain", text).group(1))
    assert 3598 <= remaining <= 3600, text

    client.advance(2)  # past round_start + round_timeout in block time (on a validator: a 1.1 s sleep)
    # past its timeout a round takes no more submissions, even before anyone closes it
    await check_rejections(client, [
        (P3, make_submit_transaction(P3, sid_short, digest("too-late"), 1),
         f"round 1 of workflow '{short}' ({sid_short}) passed its round_timeout"),
    ])
    close_enough = make_close_round_transaction(OUTSIDER, sid_enough)  # anyone may close
    close_short = make_close_round_transaction(P3, sid_short)
    await commit(client, batch(OUTSIDER, close_enough), batch(P3, close_short))

    record = await round_record(client, sid_enough)
    assert record["status"] == "ready" and record["submitted_nodes"] == [C, K2]
    assert (await events_of(client, close_enough))[federation.EVENT_ROUND_READY] == {
        "schedule_id": sid_enough, "workflow_id": enough, "round": "1", "reason": "closed",
        "submissions": "2", "submitted_nodes": f"{C},{K2}",
    }
    record = await round_record(client, sid_short)
    assert record["status"] == "timeout" and record["submitted_nodes"] == [K2]
    assert (await events_of(client, close_short))[federation.EVENT_ROUND_TIMEOUT] == {
        "schedule_id": sid_short, "workflow_id": short, "round": "1", "submissions": "1",
        "min_nodes_required": "2", "submitted_nodes": K2,
    }

    await check_rejections(client, [
        (OUTSIDER, make_close_round_transaction(OUTSIDER, sid_enough),
         f"round 1 of workflow '{enough}' ({sid_enough}) is already ready; only a collecting round"),
        (OUTSIDER, make_close_round_transaction(OUTSIDER, sid_short), "is already timeout"),
        (P3, make_submit_transaction(P3, sid_enough, digest("late"), 1),
         f"round 1 of workflow '{enough}' ({sid_enough}) is ready; it no longer accepts submissions"),
        (P3, make_submit_transaction(P3, sid_short, digest("late"), 1), "is timeout; it no longer accepts"),
        (OUTSIDER, make_close_round_transaction(OUTSIDER, "cd" * 32), f"unknown schedule_id {'cd' * 32}"),
        (OUTSIDER, raw(OUTSIDER, {"action": "close_round", "schedule_id": sid_wait},
                       [layout.round_address(sid_wait)]), "list the namespace 00b10c"),
    ])

    # a timed-out round is finished: the next one opens
    await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, short, 2)),
                 batch(COORDINATOR, make_open_round_transaction(COORDINATOR, enough, 2)))
    index = federation.decode_workflow_rounds(await client.get_state(layout.workflow_rounds_address(short)))
    assert index == {"rounds": {"1": sid_short, "2": layout.schedule_id_for(short, 2, C)}, "latest": 2}
    # what round 2 trains from: a timed-out round left no model, so the seeded start; a
    # ready round without an aggregate result is an error, not a silent fresh start
    reader = FederationReader(client)
    assert await reader.previous_global_model(short, 2) is None
    with pytest.raises(LookupError, match=f"round 1 of '{enough}' has no global model on chain yet"):
        await reader.previous_global_model(enough, 2)


def test_client_helpers_declare_exact_addresses():
    sid = layout.schedule_id_for("w", 2, C)
    roster, members = layout.round_roster_address(sid), layout.round_members_prefix(sid)
    header = pb.TransactionHeader.FromString(make_open_round_transaction(COORDINATOR, "w", 2).header)
    assert list(header.inputs) == [layout.workflow_address("w"), layout.workflow_rounds_address("w"),
                                   layout.round_address(sid), layout.round_address(layout.schedule_id_for("w", 1, C)),
                                   layout.BLOCK_INFO_NS]
    assert list(header.outputs) == [layout.round_address(sid), layout.workflow_rounds_address("w"), roster, members]
    header = pb.TransactionHeader.FromString(make_open_round_transaction(COORDINATOR, "w", 1).header)
    assert layout.BLOCK_INFO_NS in header.inputs and len(header.inputs) == 4
    header = pb.TransactionHeader.FromString(make_submit_transaction(P2, sid, digest("d"), 1).header)
    assert list(header.inputs) == [layout.round_address(sid), roster, members, layout.BLOCK_INFO_NS]
    assert list(header.outputs) == [layout.round_address(sid), layout.round_member_address(sid, K2)]
    header = pb.TransactionHeader.FromString(make_close_round_transaction(P2, sid).header)
    assert list(header.inputs) == [layout.round_address(sid), roster, members, layout.BLOCK_INFO_NS]
    assert list(header.outputs) == [layout.round_address(sid)]
    # a round's member addresses: namespace, kind, 30 hex of the round, 32 of the node; one prefix per round
    assert len(layout.round_member_address(sid, K2)) == 70 and layout.round_member_address(sid, K2).startswith(members)
    assert len(members) == 38 and members.startswith(layout.FEDERATION_NS + layout.ROUND_MEMBER)


# --------------------------------------------------------------------------- any payload: InvalidTransaction only


class MemoryContext:
    """In-memory stand-in for a processor Context (the fuzz test only; the rules are tested above)."""

    def __init__(self, state: dict[str, bytes]):
        self.state = dict(state)
        self.events = []

    async def get_state(self, addresses):
        return {a: self.state[a] for a in addresses if a in self.state}

    async def set_state(self, entries):
        self.state.update(entries)
        return list(entries)

    async def add_event(self, event_type, attributes=(), data=b""):
        self.events.append((event_type, list(attributes)))


class Txn:
    def __init__(self, payload: bytes, signer: str):
        self.payload = payload
        self.header = pb.TransactionHeader(signer_public_key=signer)


def _fuzz_state() -> dict[str, bytes]:
    definition = federated("fuzz")
    open_sid = layout.schedule_id_for("fuzz", 1, C)
    round_record = {"schedule_id": open_sid, "workflow_id": "fuzz", "workflow_version": 1, "round": 1,
                    "coordinator": C, "expected_nodes": PARTICIPANTS, "min_nodes_required": 2,
                    "round_timeout": 5, "round_start": 1000, "status": "collecting", "submissions": {},
                    "submitted_nodes": []}
    return {
        layout.workflow_address("fuzz"): cbor.encode({"workflow_id": "fuzz", "owner": C, "version": 1,
                                                      "definition": definition}),
        **{a: cbor.encode(r) for a, r in federation_records.split(round_record).items()},
        CONFIG_ADDRESS: pb.BlockInfoConfig(latest_block=3, oldest_block=0, target_count=256,
                                           sync_tolerance=300).SerializeToString(),
        block_info_address(3): pb.BlockInfo(block_num=3, timestamp=2000).SerializeToString(),
    }


FUZZ_STATE = _fuzz_state()
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True), st.text(max_size=20), st.binary(max_size=8),
                    st.sampled_from(["fuzz", layout.schedule_id_for("fuzz", 1, C), digest("x"), C, "ab" * 32]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                      max_leaves=12)
FIELDS = st.sampled_from(["workflow_id", "round", "schedule_id", "digest", "samples", "metadata", "extra"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=st.sampled_from(["open_round", "submit", "close_round", "other"]),
       fields=st.dictionaries(FIELDS, VALUES, max_size=5),
       signer=st.sampled_from([C, K2, OUTSIDER.public_key().as_hex()]))
def test_any_payload_is_applied_or_refused_as_invalid(action, fields, signer):
    context = MemoryContext(FUZZ_STATE)
    try:
        payload = cbor.encode({"action": action, **fields})
    except cbor.PayloadError:
        return

    async def apply():
        await FederationHandler().apply(Txn(payload, signer), context)

    try:
        asyncio.run(apply())
    except InvalidTransaction as exc:
        assert str(exc)
    for event_type, attributes in context.events:
        assert event_type.startswith("trustmesh/") and all(isinstance(v, str) for _, v in attributes)


# --------------------------------------------------------------------------- a submit costs the same at any size


class Metered(DictLedger):
    """DictLedger that counts the state bytes each transaction reads and writes (issue #17: a
    submit used to read and rewrite the whole round, so a round of n submissions cost O(n²))."""

    def __init__(self):
        super().__init__()
        self.metered: list[tuple[int, int]] = []  # (bytes read, bytes written) per transaction

    async def apply_transaction(self, txn, state):
        from helpers.family_scenario import HANDLERS, DictContext

        header = pb.TransactionHeader.FromString(txn.header)
        request = pb.TpProcessRequest(header=header, payload=txn.payload, signature=txn.header_signature,
                                      context_id="dict")
        usage = [0, 0]

        class Context(DictContext):
            async def get_state(self, addresses, timeout=None):
                found = await super().get_state(addresses, timeout)
                usage[0] += sum(len(v) for v in found.values())
                return found

            async def set_state(self, entries, timeout=None):
                usage[1] += sum(len(v) for v in entries.values())
                return await super().set_state(entries, timeout)

        context = Context(state, header.inputs, header.outputs)
        await HANDLERS[header.family_name].apply(request, context)
        self.metered.append(tuple(usage))
        return context.events


def _many(workflow_id: str, keys: list[PrivateKey], min_nodes: int, timeout: int = 3600) -> dict:
    definition = federated(workflow_id, min_nodes=min_nodes, timeout=timeout)
    nodes = [k.public_key().as_hex() for k in keys]
    definition["federation"].update(participant_nodes=nodes, expected_nodes=len(nodes))
    return definition


async def test_a_submit_reads_and_writes_the_same_bytes_at_the_first_and_the_last_of_64():
    client = Metered()
    keys = [COORDINATOR] + [PrivateKey.generate() for _ in range(63)]
    nodes = [k.public_key().as_hex() for k in keys]
    await deploy(client, _many("fl-64", keys, min_nodes=32))
    await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, "fl-64", 1)))
    sid = layout.schedule_id_for("fl-64", 1, C)
    order = keys[1:][::-1] + [COORDINATOR]  # not the workflow's order: arrival order is what counts
    metadata = {"epochs": 5, "loss": 0.25}

    client.metered.clear()
    transactions = []
    for i, key in enumerate(order):
        txn = make_submit_transaction(key, sid, digest(f"u{i}"), 100 + i, metadata)
        transactions.append(txn)
        await commit(client, batch(key, txn))
        if i == 0:  # refused, and state unchanged: a node outside the round, the same node again
            before = dict(client.state)
            await check_rejections(client, [
                (OUTSIDER, make_submit_transaction(OUTSIDER, sid, digest("o"), 1),
                 f"signer {OUTSIDER.public_key().as_hex()} is not an expected node of round 1 of workflow 'fl-64'"),
                (key, make_submit_transaction(key, sid, digest("again"), 1),
                 f"already submitted to round 1 of workflow 'fl-64' ({sid}) (digest {digest('u0')})"),
            ])
            assert client.state == before
            del client.metered[1:]
    reads, writes = [r for r, _ in client.metered], [w for _, w in client.metered]
    assert len(writes) == 64
    # every submit writes the core and its own member record: a few hundred bytes, the 1st as the 64th
    # (up to a byte or two for the count's CBOR width and "ready" instead of "collecting")
    assert max(writes) - min(writes) <= 8 and max(writes) < 600, writes
    # and reads the same until the last, which reads the roster and the members once for round-ready
    assert max(reads[:-1]) - min(reads[:-1]) <= 8 and max(reads[:-1]) < 600, reads
    assert reads[-1] > 64 * 66, reads[-1]

    arrival = [k.public_key().as_hex() for k in order]
    events = await events_of(client, transactions[-1])
    assert events[federation.EVENT_ROUND_READY] == {
        "schedule_id": sid, "workflow_id": "fl-64", "round": "1", "reason": "all-submitted",
        "submissions": "64", "submitted_nodes": ",".join(arrival),
    }
    record = await round_record(client, sid)
    assert record["status"] == "ready" and record["submitted_nodes"] == arrival and record["expected_nodes"] == nodes
    assert record["submissions"][arrival[5]] == {"digest": digest("u5"), "samples": 105, "metadata": metadata}


async def test_close_round_with_fewer_than_expected_names_who_submitted():
    client = DictLedger()
    keys = [COORDINATOR] + [PrivateKey.generate() for _ in range(63)]
    await deploy(client, _many("fl-64-close", keys, min_nodes=32, timeout=60))
    await commit(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, "fl-64-close", 1)))
    sid = layout.schedule_id_for("fl-64-close", 1, C)
    arrived = keys[20:60]
    for i, key in enumerate(arrived):
        await commit(client, batch(key, make_submit_transaction(key, sid, digest(f"c{i}"), 10)))
    assert (await round_record(client, sid))["status"] == "collecting"
    client.advance(61)
    close = make_close_round_transaction(OUTSIDER, sid)
    await commit(client, batch(OUTSIDER, close))
    names = [k.public_key().as_hex() for k in arrived]
    assert (await events_of(client, close))[federation.EVENT_ROUND_READY] == {
        "schedule_id": sid, "workflow_id": "fl-64-close", "round": "1", "reason": "closed",
        "submissions": "40", "submitted_nodes": ",".join(names),
    }
    record = await round_record(client, sid)
    assert record["status"] == "ready" and record["submitted_nodes"] == names and len(record["submissions"]) == 40
