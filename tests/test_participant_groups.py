"""Participant groups (scheduling/workflow_groups.py): a federation larger than one definition
payload can list, its members registered on chain in parts and named by the definition.

Every rule on dict state through the handlers' apply() (helpers.dict_ledger), table-driven; the
client side (grouping a long participant list, the schema, the reader's expanded view); and one
run through the dev validator: 1,000 participants registered in parts by `workflow deploy`'s own
code, a workflow naming their group, round 1 opened, a member's submission accepted and an
outsider's refused.
"""

from __future__ import annotations

import copy
import io
import json
import pathlib

import pytest

from helpers.dict_ledger import DictLedger
from helpers.ledger_helpers import rest, running_processor, submit_and_wait
from trustmesh import workflow_runs
from trustmesh.ledger import payload as cbor
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import common, definition, federation, layout, workflow_groups
from trustmesh.scheduling import workflow as wf
from trustmesh.scheduling.federation import FederationHandler, make_open_round_transaction, make_submit_transaction
from trustmesh.scheduling.reader import FederationReader

WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"
OWNER, OTHER, OUTSIDER = PrivateKey.generate(), PrivateKey.generate(), PrivateKey.generate()
ME, THEM = OWNER.public_key().as_hex(), OTHER.public_key().as_hex()
NODES = [PrivateKey.generate() for _ in range(1000)]   # the members; NODES[0] coordinates
KEYS = [n.public_key().as_hex() for n in NODES]
COORDINATOR, C = NODES[0], KEYS[0]
OFF_CURVE_KEY = "02" + "0" * 63 + "5"   # no point on secp256k1 has this x
DIGEST = "ab" * 32


def definition_of(workflow_id: str, participants: list[str], **federation_fields) -> dict:
    """federated-digits with these participant keys (coordinator: the first)."""
    d = wf.load_definition(WORKFLOWS / "federated-digits.json")
    d["workflow_id"] = workflow_id
    d["federation"].update(coordinator_node=participants[0], participant_nodes=list(participants),
                           expected_nodes=len(participants), min_nodes_required=min(7, len(participants)),
                           round_timeout=3600, rounds=2)
    d["federation"].update(federation_fields)
    return d


def grouped(workflow_id: str, group_id: str, size: int, **federation_fields) -> dict:
    """A definition naming participant group `group_id` of `size` members (coordinator C)."""
    d = definition_of(workflow_id, KEYS[:3])
    fed = d["federation"]
    del fed["participant_nodes"]
    fed.update(participant_group=group_id, expected_nodes=size, **federation_fields)
    return d


def batch(signer, *txns):
    return make_batch(signer, list(txns))


def part(signer, group_id, members, number, parts):
    return batch(signer, wf.make_register_group_transaction(signer, group_id, members, number, parts))


def raw_part(signer, body: dict, owner: str | None = None):
    """A register_group transaction with any payload, addressed to the group of `owner` (default the signer)."""
    address = layout.participant_group_address(owner or signer.public_key().as_hex(), str(body.get("group_id")))
    return batch(signer, make_transaction(signer, layout.WORKFLOW_FAMILY, layout.VERSION, cbor.encode(body),
                                          [address], [address]))


def deploy(signer, d):
    return batch(signer, wf.make_deploy_transaction(signer, d, check=False))


def group_record(state, owner, group_id):
    data = state.get(layout.participant_group_address(owner, group_id))
    return None if data is None else cbor.decode(data, max_bytes=10 * 1024 * 1024)


def workflow_record(state, workflow_id):
    return cbor.decode(state[layout.workflow_address(workflow_id)], max_bytes=10 * 1024 * 1024)


async def run_cases(client, cases):
    """cases: (label, batch, expected message fragment or None for COMMITTED), applied in order."""
    wrong = []
    for label, b, expected in cases:
        [status] = await submit_and_wait(client, [b])
        if expected is None:
            if status["status"] != "COMMITTED":
                wrong.append(f"{label}: expected COMMITTED, got {status}")
            continue
        got = (status.get("invalid_transactions") or [{}])[0].get("message", "")
        if status["status"] != "INVALID" or expected not in got:
            wrong.append(f"{label}: expected INVALID with {expected!r}, got {status['status']}: {got}")
    assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------- register_group


async def test_a_group_is_registered_part_by_part_in_order_by_its_owner():
    client = DictLedger()
    g = "lab-a"
    first, second, third = KEYS[:500], KEYS[500:900], KEYS[900:1000]
    await run_cases(client, [
        ("part 2 before part 1", part(OWNER, g, second, 2, 3), f"participant group '{g}' of {ME} has no part 1 yet"),
        ("part 1", part(OWNER, g, first, 1, 3), None),
        ("part 1 again", part(OWNER, g, first, 1, 3), "is already being registered (1 of 3 parts in); send part 2 next"),
        ("part 3 out of order", part(OWNER, g, third, 3, 3), f"part 3 of participant group '{g}' of {ME} is out of order: "
                                                           f"1 of 3 parts are in; send part 2 next"),
        ("another owner's part 2", part(OTHER, g, second, 2, 3), f"participant group '{g}' of {THEM} has no part 1 yet"),
        ("parts changed", part(OWNER, g, second, 2, 4), "was started as 3 part(s) (its part 1 said so); send part 2 with parts 3, not 4"),
        ("a member of part 1 again", part(OWNER, g, [KEYS[10]] + second[1:], 2, 3),
         f"already holds member {KEYS[10]} (an earlier part listed it)"),
        ("part 2", part(OWNER, g, second, 2, 3), None),
    ])
    assert group_record(client.state, ME, g) == {"group_id": g, "owner": ME, "parts": 3, "received": 2,
                                                 "members": first + second}
    await run_cases(client, [
        ("part 3", part(OWNER, g, third, 3, 3), None),
        ("part 1 of a complete group", part(OWNER, g, first, 1, 3), "is already registered and complete (1000 members in 3 part(s)); a group never changes"),
        ("part 3 of a complete group", part(OWNER, g, third, 3, 3), "is already registered and complete"),
        # the same id is another group for another key: nobody can take or fill someone else's
        ("the same id, another owner", part(OTHER, g, KEYS[:2], 1, 1), None),
    ])
    assert group_record(client.state, ME, g) == {"group_id": g, "owner": ME, "parts": 3, "received": 3, "members": KEYS}
    assert group_record(client.state, THEM, g)["members"] == KEYS[:2]


def _body(**changes):
    body = {"action": "register_group", "group_id": "g1", "members": KEYS[:3], "part": 1, "parts": 1}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


# (label, payload, message fragment): one bad field each
BAD_PARTS = [
    ("duplicate member", _body(members=[KEYS[0], KEYS[1], KEYS[0]]), f"lists {KEYS[0]} twice (items 0 and 2)"),
    ("key off the curve", _body(members=[KEYS[0], OFF_CURVE_KEY]),
     f"register_group payload field 'members'[1] is not a valid public key: {OFF_CURVE_KEY} is not a point on secp256k1"),
    ("key not hex", _body(members=["02" + "g" * 64]), "field 'members'[0] must be a compressed secp256k1 public key"),
    ("node name", _body(members=["iot-1"]), "'iot-1', a node name"),
    ("member not a string", _body(members=[7]), "field 'members'[0] must be a string"),
    ("no members", _body(members=[]), f"holds 0 keys; a part holds 1 to {wf.MAX_GROUP_PART_MEMBERS}"),
    ("too many in a part", _body(members=KEYS[:wf.MAX_GROUP_PART_MEMBERS + 1]),
     f"holds {wf.MAX_GROUP_PART_MEMBERS + 1} keys; a part holds 1 to {wf.MAX_GROUP_PART_MEMBERS}"),
    ("members not a list", _body(members="x"), "field 'members' must be a list"),
    ("part beyond parts", _body(part=2, parts=1), "field 'part' must be between 1 and 1; got 2"),
    ("part 0", _body(part=0), "field 'part' must be between 1 and 1; got 0"),
    ("too many parts", _body(parts=wf.MAX_GROUP_PARTS + 1), f"field 'parts' must be between 1 and {wf.MAX_GROUP_PARTS}"),
    ("parts as boolean", _body(parts=True), "field 'parts' must be an integer, not a boolean"),
    ("bad group id", _body(group_id="has space"), "field 'group_id' must be an identifier"),
    ("no group id", _body(group_id=None), "lacks the required field 'group_id'"),
    ("unknown field", _body(owner=ME), "register_group payload has unknown field(s) 'owner'"),
]


@pytest.mark.parametrize("label, body, expected", BAD_PARTS, ids=[c[0] for c in BAD_PARTS])
async def test_each_bad_register_group_payload_is_refused_with_its_message(label, body, expected):
    client = DictLedger()
    before = dict(client.state)
    await run_cases(client, [(label, raw_part(OWNER, body), expected)])
    assert client.state == before
    await run_cases(client, [("a good part afterwards", raw_part(OWNER, _body()), None)])


async def test_a_group_never_exceeds_its_member_limit(monkeypatch):
    monkeypatch.setattr(workflow_groups, "MAX_GROUP_MEMBERS", 5)
    client = DictLedger()
    await run_cases(client, [
        ("part 1", part(OWNER, "g", KEYS[:3], 1, 2), None),
        ("one too many", part(OWNER, "g", KEYS[3:6], 2, 2), "would hold 6 members; a group holds at most 5"),
        ("within the limit", part(OWNER, "g", KEYS[3:5], 2, 2), None),
    ])


def test_a_full_part_fits_the_payload_limit_and_the_limits_agree():
    longest_id = "g" * 64
    payload = wf.register_group_payload(longest_id, KEYS[:wf.MAX_GROUP_PART_MEMBERS], wf.MAX_GROUP_PARTS,
                                        wf.MAX_GROUP_PARTS)
    assert len(payload) < common.MAX_PAYLOAD_BYTES / 1.5
    assert wf.MAX_GROUP_PARTS * wf.MAX_GROUP_PART_MEMBERS >= wf.MAX_GROUP_MEMBERS > wf.MAX_PARTICIPANTS
    assert [len(p) for p in wf.split_parts(KEYS)] == [500, 500]
    assert [len(p) for p in wf.split_parts(KEYS + [ME, THEM])] == [500, 500, 2]


# --------------------------------------------------------------------------- deploy and update naming a group


async def _complete_group(client, signer, group_id, members):
    parts = wf.split_parts(members)
    await run_cases(client, [(f"part {i}", part(signer, group_id, chunk, i, len(parts)), None)
                             for i, chunk in enumerate(parts, start=1)])


async def test_deploy_naming_a_group_checks_it_and_copies_its_members():
    client = DictLedger()
    members = KEYS[:600]
    await _complete_group(client, OWNER, "big", members)
    await run_cases(client, [("started, not finished", part(OWNER, "half", KEYS[:500], 1, 2), None)])
    outsider_first = [OUTSIDER.public_key().as_hex()] + KEYS[1:3]
    await _complete_group(client, OWNER, "no-coordinator", outsider_first)
    undeclared = wf.make_deploy_transaction(OWNER, grouped("w-inputs", "big", 600), check=False)
    header = pb.TransactionHeader.FromString(undeclared.header)
    no_group_input = make_transaction(OWNER, layout.WORKFLOW_FAMILY, layout.VERSION, undeclared.payload,
                                      [layout.workflow_address("w-inputs")], list(header.outputs))
    await run_cases(client, [
        ("unregistered group", deploy(OWNER, grouped("w1", "nope", 600)),
         f"definition.federation.participant_group names participant group 'nope' of {ME}, which is not registered"),
        ("incomplete group", deploy(OWNER, grouped("w2", "half", 1000)),
         "which is incomplete: 1 of 2 parts are registered; send parts 2 to 2, then deploy"),
        ("expected_nodes not the group's size", deploy(OWNER, grouped("w3", "big", 599)),
         f"definition.federation.expected_nodes is 599 but participant group 'big' of {ME} has 600 members; they must be equal"),
        ("coordinator not a member", deploy(OWNER, grouped("w4", "no-coordinator", 3)),
         f"definition.federation.coordinator_node {C} is not a member of participant group 'no-coordinator'"),
        ("another owner's group", deploy(OTHER, grouped("w5", "big", 600)),
         f"names participant group 'big' of {THEM}, which is not registered: a workflow names one of its owner's groups"),
        ("the group's address not in the inputs", batch(OWNER, no_group_input),
         f"list its address {layout.participant_group_address(ME, 'big')}"),
        ("a complete group", deploy(OWNER, grouped("w6", "big", 600)), None),
    ])
    for wid in ("w1", "w2", "w3", "w4", "w5", "w-inputs"):
        assert layout.workflow_address(wid) not in client.state
    record = workflow_record(client.state, "w6")
    assert record == {"workflow_id": "w6", "owner": ME, "version": 1, "definition": grouped("w6", "big", 600),
                      "participants": members}


async def test_update_switches_between_a_list_and_a_group():
    client = DictLedger()
    await _complete_group(client, OWNER, "big", KEYS[:600])
    listed = definition_of("w", KEYS[:10])
    named = grouped("w", "big", 600)

    def update(d, version):
        return batch(OWNER, wf.make_update_transaction(OWNER, d, version, check=False))

    await run_cases(client, [
        ("deploy with a list", deploy(OWNER, listed), None),
        ("update to an incomplete group", update(grouped("w", "missing", 600), 1), "which is not registered"),
        ("update to the group", update(named, 1), None),
    ])
    assert workflow_record(client.state, "w")["participants"] == KEYS[:600]
    await run_cases(client, [("back to the list", update(listed, 2), None)])
    assert workflow_record(client.state, "w") == {"workflow_id": "w", "owner": ME, "version": 3, "definition": listed}


# (label, federation changes, message fragment): the definition rules of the two ways to list participants
BOTH_OR_NEITHER = [
    ("both", {"participant_nodes": KEYS[:3], "expected_nodes": 3},
     "definition.federation has both participant_nodes and participant_group; give exactly one"),
    ("neither", {"participant_group": None},
     "definition.federation lacks the required field 'participant_nodes' (the participants' keys, up to 512), "
     "or instead 'participant_group'"),
    ("group id not an identifier", {"participant_group": "a b"}, "definition.federation.participant_group must be an identifier"),
    ("expected_nodes beyond a group's limit", {"expected_nodes": wf.MAX_GROUP_MEMBERS + 1},
     f"definition.federation.expected_nodes must be between 1 and {wf.MAX_GROUP_MEMBERS}"),
    ("min_nodes_required above expected_nodes", {"min_nodes_required": 601},
     "definition.federation.min_nodes_required (601) must be between 1 and expected_nodes (600)"),
]


@pytest.mark.parametrize("label, changes, expected", BOTH_OR_NEITHER, ids=[c[0] for c in BOTH_OR_NEITHER])
async def test_a_definition_lists_its_participants_or_names_a_group_exactly_once(label, changes, expected):
    d = grouped("w", "big", 600)
    for key, value in changes.items():
        if value is None:
            del d["federation"][key]
        else:
            d["federation"][key] = value
    with pytest.raises(wf.DefinitionError) as err:
        wf.validate_definition(d)
    assert expected in str(err.value)
    client = DictLedger()
    await _complete_group(client, OWNER, "big", KEYS[:600])
    await run_cases(client, [(label, deploy(OWNER, d), expected)])
    # the schema refuses the same, but for min_nodes_required above expected_nodes (beyond what a schema states)
    assert (wf.schema_errors(d) == []) == (label == "min_nodes_required above expected_nodes")


def test_a_listed_federation_still_holds_at_most_512():
    too_many = definition_of("w", KEYS[:wf.MAX_PARTICIPANTS + 1])
    with pytest.raises(wf.DefinitionError, match=r"participant_nodes must hold between 1 and 512 items; it holds 513"):
        wf.validate_definition(too_many)
    wf.validate_definition(definition_of("w", KEYS[:wf.MAX_PARTICIPANTS]))


# --------------------------------------------------------------------------- rounds of a group's workflow


async def test_open_round_fills_expected_nodes_with_the_group_and_only_members_submit():
    client = DictLedger()
    await _complete_group(client, OWNER, "big", KEYS)
    await run_cases(client, [("deploy", deploy(OWNER, grouped("w", "big", 1000)), None)])
    await run_cases(client, [("open round 1", batch(COORDINATOR, make_open_round_transaction(COORDINATOR, "w", 1)), None)])
    sid = layout.schedule_id_for("w", 1, C)
    record = await FederationReader(client).round(sid)
    assert record["expected_nodes"] == KEYS and record["min_nodes_required"] == 3
    await run_cases(client, [
        ("a member", batch(NODES[999], make_submit_transaction(NODES[999], sid, DIGEST, 10)), None),
        ("an outsider", batch(OUTSIDER, make_submit_transaction(OUTSIDER, sid, DIGEST, 10)),
         f"signer {OUTSIDER.public_key().as_hex()} is not an expected node of round 1 of workflow 'w'"),
    ])
    assert (await FederationReader(client).round(sid))["submitted_nodes"] == [KEYS[999]]


def test_federation_config_of_a_group_workflow_is_checked_defensively():
    d = grouped("w", "g", 3)
    good = {"workflow_id": "w", "owner": ME, "version": 1, "definition": d, "participants": KEYS[:3]}
    assert definition.federation_config("w", good)["participants"] == KEYS[:3]
    for changes, expected in [
        ({"participants": None}, "names participant group 'g' but its record holds no member list"),
        ({"participants": KEYS[:4]}, "'expected_nodes' (3) does not match participant group 'g' (4 nodes)"),
        ({"participants": KEYS[1:4]}, "'coordinator_node' is not a member of participant group 'g'"),
        ({"participants": [C, C, KEYS[1]]}, "field 'participants' lists a node twice"),
        ({"participants": [C, "iot-2", KEYS[2]]}, "holds 'iot-2', not a 66-hex public key"),
        ({"participants": []}, f"field 'participants' must list 1 to {wf.MAX_GROUP_MEMBERS} node keys"),
    ]:
        record = {**good, **changes}
        if changes.get("participants", 0) is None:
            del record["participants"]
        with pytest.raises(InvalidTransaction) as err:
            definition.federation_config("w", record)
        assert expected in str(err.value), (expected, str(err.value))


# --------------------------------------------------------------------------- client side


class ListingLedger(DictLedger):
    """DictLedger with the REST client's list_state, for FederationReader.workflows()."""

    async def list_state(self, prefix: str = "", *, head=None):
        for address in sorted(self.state):
            if address.startswith(prefix):
                yield address, self.state[address]


async def test_the_reader_expands_a_group_into_participant_nodes():
    client = ListingLedger()
    await _complete_group(client, OWNER, "big", KEYS[:600])
    await run_cases(client, [("deploy", deploy(OWNER, grouped("w", "big", 600)), None),
                             ("a listed one", deploy(OWNER, definition_of("small", KEYS[:10])), None)])
    reader = FederationReader(client)
    expanded = await reader.workflow("w")
    assert expanded["definition"]["federation"]["participant_nodes"] == KEYS[:600]
    assert expanded["definition"]["federation"]["participant_group"] == "big"
    raw = await reader.workflow("w", expanded=False)
    assert "participant_nodes" not in raw["definition"]["federation"] and raw["participants"] == KEYS[:600]
    assert raw["definition"] == grouped("w", "big", 600)
    by_id = {r["workflow_id"]: r for r in await reader.workflows()}
    assert by_id["w"] == expanded
    assert by_id["small"] == await reader.workflow("small", expanded=False)   # a listed one as it is
    assert {r["workflow_id"] for r in await reader.workflows(expanded=False)} == {"w", "small"}
    assert (await reader.participant_group(ME, "big"))["members"] == KEYS[:600]


def test_a_long_participant_list_becomes_a_group_when_checked_on_the_client():
    listed = definition_of("w", KEYS)
    assert wf.needs_group(listed) and not wf.needs_group(definition_of("w", KEYS[:512]))
    named, members = wf.check_grouped_definition(listed)
    assert members == KEYS and named["federation"]["participant_group"] == wf.group_id_for(KEYS)
    assert "participant_nodes" not in named["federation"] and wf.schema_errors(named) == []
    assert wf.group_id_for(KEYS) == wf.group_id_for(list(KEYS)) != wf.group_id_for(KEYS[::-1])
    for changes, expected in [
        ({"expected_nodes": 999}, "definition.federation.expected_nodes is 999 but participant_nodes lists 1000 node(s)"),
        ({"coordinator_node": OUTSIDER.public_key().as_hex()}, "is not one of participant_nodes"),
        ({"participant_nodes": KEYS[:999] + [KEYS[5]]}, f"participant_nodes lists {KEYS[5]} twice (items 5 and 999)"),
        ({"participant_nodes": KEYS[:999] + [OFF_CURVE_KEY]}, "participant_nodes[999] is not a valid public key"),
        ({"participant_nodes": KEYS[:999] + ["iot-1000"]}, "participant_nodes[999] is 'iot-1000', a node name"),
    ]:
        broken = copy.deepcopy(listed)
        broken["federation"].update(changes)
        with pytest.raises(wf.DefinitionError) as err:
            wf.check_grouped_definition(broken)
        assert expected in str(err.value), (expected, str(err.value))
    too_many = definition_of("w", KEYS * 11)
    with pytest.raises(wf.DefinitionError, match=f"lists 11000 nodes; a federation holds at most {wf.MAX_GROUP_MEMBERS}"):
        wf.check_grouped_definition(too_many)
    # the deploy transaction reads the signer's group; a register_group part only its group
    header = pb.TransactionHeader.FromString(wf.make_deploy_transaction(OWNER, named, check=False).header)
    assert list(header.inputs) == [layout.workflow_address("w"), layout.participant_group_address(ME, named["federation"]["participant_group"])]
    assert list(header.outputs) == [layout.workflow_address("w")]
    txns = wf.make_register_group_transactions(OWNER, "g", KEYS, first_part=2)
    assert len(txns) == 1 and cbor.decode(txns[0].payload)["part"] == 2
    header = pb.TransactionHeader.FromString(txns[0].header)
    assert list(header.inputs) == list(header.outputs) == [layout.participant_group_address(ME, "g")]


def test_schema_bounds_of_a_grouped_federation_match_the_python_constants():
    defs = wf.load_schema()["$defs"]
    fed = defs["grouped_federation"]["properties"]
    assert fed["expected_nodes"]["maximum"] == fed["min_nodes_required"]["maximum"] == wf.MAX_GROUP_MEMBERS
    assert defs["federation"]["properties"]["participant_nodes"]["maxItems"] == wf.MAX_PARTICIPANTS
    assert set(defs["grouped_federation"]["required"]) | {"train_on"} == set(fed)
    listed = defs["federation"]["properties"]
    for name in ("round_timeout", "rounds", "train_on", "coordinator_node"):
        assert fed[name] == {**listed[name], **({"description": fed[name]["description"]}
                                               if name == "coordinator_node" else {})}, name
    problems = wf.schema_errors(grouped("w", "g", wf.MAX_GROUP_MEMBERS + 1))
    assert any(p.startswith("definition.federation.expected_nodes:") for p in problems), problems
    assert wf.schema_errors(grouped("w", "g", wf.MAX_GROUP_MEMBERS)) == []


def test_prepare_turns_a_thousand_names_into_a_checked_definition(tmp_path):
    nodes_dir = tmp_path / "nodes"
    for i, key in enumerate(KEYS, start=1):
        (nodes_dir / f"iot-{i}" / "keys").mkdir(parents=True)
        (nodes_dir / f"iot-{i}" / "keys" / f"iot-{i}.pub").write_text(key + "\n")
    d = definition_of("big", KEYS)
    d["federation"].update(coordinator_node="iot-1", participant_nodes=[f"iot-{i}" for i in range(1, 1001)])
    path = tmp_path / "big.json"
    path.write_text(json.dumps(d))
    prepared = workflow_runs.prepare(str(path), nodes_dir)
    assert prepared["federation"]["participant_nodes"] == KEYS and prepared["federation"]["coordinator_node"] == C
    d["federation"]["expected_nodes"] = 999
    path.write_text(json.dumps(d))
    with pytest.raises(wf.DefinitionError, match="expected_nodes is 999 but participant_nodes lists 1000"):
        workflow_runs.prepare(str(path), nodes_dir)


# --------------------------------------------------------------------------- through the dev validator


@pytest.mark.timeout(240)
async def test_a_thousand_participants_through_the_dev_validator(devnet):
    listed = definition_of("thousand", KEYS)
    async with running_processor(devnet.component_url, wf.WorkflowHandler(), FederationHandler()), \
            rest(devnet.rest_url) as client:
        out = io.StringIO()
        outcome, record = await workflow_runs.deploy(client, OWNER, listed, out=out)
        group_id = wf.group_id_for(KEYS)
        assert outcome == "deployed", out.getvalue()
        assert out.getvalue().splitlines() == [
            f"participant group {group_id}: registering 1000 participants in 2 part(s) (more than 512 do not fit one definition)",
            f"participant group {group_id}: part 1/2 committed (500/1000 participants)",
            f"participant group {group_id}: part 2/2 committed (1000/1000 participants)",
        ]
        # the reader's expanded view lists them all, in order; the stored definition names the group
        assert record["definition"]["federation"]["participant_nodes"] == KEYS
        reader = FederationReader(client)
        stored = await reader.workflow("thousand", expanded=False)
        assert stored["definition"]["federation"]["participant_group"] == group_id
        assert stored["participants"] == KEYS and "participant_nodes" not in stored["definition"]["federation"]
        group = await reader.participant_group(ME, group_id)
        assert (group["parts"], group["received"], group["members"]) == (2, 2, KEYS)

        # deploying the same file again changes nothing, and registers nothing
        again = io.StringIO()
        assert (await workflow_runs.deploy(client, OWNER, listed, out=again))[0] == "unchanged"
        assert again.getvalue() == f"participant group {group_id}: 1000 members, registered already\n"

        opening = make_open_round_transaction(COORDINATOR, "thousand", 1)
        [status] = await submit_and_wait(client, [batch(COORDINATOR, opening)], timeout=60)
        assert status["status"] == "COMMITTED", status
        sid = layout.schedule_id_for("thousand", 1, C)
        round_ = await reader.round(sid)
        assert round_["expected_nodes"] == KEYS and round_["status"] == "collecting"

        member, outsider = NODES[777], OUTSIDER
        statuses = await submit_and_wait(client, [batch(member, make_submit_transaction(member, sid, DIGEST, 12)),
                                                  batch(outsider, make_submit_transaction(outsider, sid, DIGEST, 12))],
                                         timeout=60)
        assert statuses[0]["status"] == "COMMITTED", statuses[0]
        assert statuses[1]["status"] == "INVALID"
        assert f"signer {outsider.public_key().as_hex()} is not an expected node" in \
            statuses[1]["invalid_transactions"][0]["message"]
        round_ = await reader.round(sid)
        assert round_["submitted_nodes"] == [KEYS[777]] and round_["status"] == "collecting"
