"""trustmesh-workflow 1.0: deploy and update, every rule broken once.

Deploys, events and a sample of the broken rules go through one dev validator process for the
module (each test starts the handler in its own event loop and submits its batches together);
every rule on its own runs table-driven on dict state through the handler's apply()
(helpers.dict_ledger).
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import pathlib

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.devnet_process import DevnetProcess
from helpers.dict_ledger import DictLedger
from helpers.ledger_helpers import rest, running_processor, submit_and_wait
from trustmesh.ledger import payload as cbor
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import common, layout
from trustmesh.fl import strategies as strategy_registry
from trustmesh.scheduling import workflow as wf

WORKFLOWS = pathlib.Path(__file__).resolve().parent.parent / "workflows"
FEDERATED = WORKFLOWS / "federated-digits.json"
SINGLE = WORKFLOWS / "single-node-digits.json"

OWNER = PrivateKey.generate()
OTHER = PrivateKey.generate()
NODE_KEYS = {f"iot-{i}": PrivateKey.generate().public_key().as_hex() for i in range(1, 11)}
# "02" + x where x is no point's x-coordinate on secp256k1 (x^3 + 7 is not a square mod p).
OFF_CURVE_KEY = "02" + "0" * 63 + "5"


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    """One dev validator process for the module (the conftest `devnet` fixture is per test)."""
    node = DevnetProcess(tmp_path_factory.mktemp("workflow") / "devnet", "--max-batches-per-block", "100").start()
    yield node
    node.stop()


def federated(workflow_id: str = "federated-digits") -> dict:
    definition = wf.resolve_node_names(wf.load_definition(FEDERATED), NODE_KEYS)
    definition["workflow_id"] = workflow_id
    return definition


def single(workflow_id: str = "single-node-digits") -> dict:
    definition = wf.load_definition(SINGLE)
    definition["workflow_id"] = workflow_id
    return definition


def batch_of(signer, txn):
    return make_batch(signer, [txn])


def raw_txn(signer, payload: bytes, workflow_id: str):
    address = layout.workflow_address(workflow_id)
    return make_transaction(signer, wf.FAMILY_NAME, wf.FAMILY_VERSION, payload, [address], [address])


def deploy(definition, signer=OWNER):
    return batch_of(signer, wf.make_deploy_transaction(signer, definition, check=False))


def update(definition, expected_version, signer=OWNER):
    return batch_of(signer, wf.make_update_transaction(signer, definition, expected_version, check=False))


def message(status: dict) -> str:
    return status["invalid_transactions"][0]["message"]


async def stored(client, workflow_id: str) -> dict | None:
    data = await client.get_state(layout.workflow_address(workflow_id))
    return None if data is None else wf.decode_record(data)


def event_attributes(receipt: dict) -> list[tuple[str, dict]]:
    return [(e["event_type"], {a["key"]: a["value"] for a in e.get("attributes", [])})
            for e in receipt.get("events", [])]


# --------------------------------------------------------------------------- on chain


async def test_example_workflows_deploy_with_owner_version_and_event(ledger):
    fed, one = federated(), single()
    wf.check_definition(fed)
    wf.check_definition(one)

    async with running_processor(ledger.component_url, wf.WorkflowHandler()), rest(ledger.rest_url) as client:
        batches = [batch_of(OWNER, wf.make_deploy_transaction(OWNER, fed)),
                   batch_of(OTHER, wf.make_deploy_transaction(OTHER, one))]
        statuses = await submit_and_wait(client, batches)
        assert [s["status"] for s in statuses] == ["COMMITTED", "COMMITTED"], statuses

        record = await stored(client, "federated-digits")
        assert record == {"workflow_id": "federated-digits", "owner": OWNER.public_key().as_hex(),
                          "version": 1, "definition": fed}
        # floats survive exactly, and the stored bytes are the canonical encoding
        assert record["definition"]["hyperparameters"]["learning_rate"] == 0.01
        assert await client.get_state(layout.workflow_address("federated-digits")) == cbor.encode(record)
        assert record["definition"]["federation"]["participant_nodes"] == [NODE_KEYS[f"iot-{i}"] for i in range(1, 11)]
        assert wf.train_on(record["definition"]) == "compute"

        record = await stored(client, "single-node-digits")
        assert record["owner"] == OTHER.public_key().as_hex() and record["version"] == 1
        assert record["definition"] == one and not wf.is_federated(record["definition"])

        receipts = await client.get_receipts([b.transactions[0].header_signature for b in batches])
        assert event_attributes(receipts[0]) == [(wf.EVENT_DEPLOYED, {
            "workflow_id": "federated-digits", "version": "1", "owner": OWNER.public_key().as_hex()})]
        assert event_attributes(receipts[1])[0][0] == wf.EVENT_DEPLOYED


async def test_update_rules_owner_optimistic_version_and_no_redeploy():
    wid = "update-rules"
    v1 = federated(wid)
    v2 = copy.deepcopy(v1)
    v2["hyperparameters"]["learning_rate"] = 0.005
    v2["federation"]["rounds"] = 8
    v3 = copy.deepcopy(v2)
    v3["strategy"] = {"name": "perf_fedavg", "alpha": 0.25}
    owner = OWNER.public_key().as_hex()

    client = DictLedger()  # the rules on dict state; deploys and events through the validator above
    [status] = await submit_and_wait(client, [update(v1, 1)])
    assert status["status"] == "INVALID"
    assert f"workflow '{wid}' is not deployed; deploy it first" in message(status)

    [status] = await submit_and_wait(client, [deploy(v1)])
    assert status["status"] == "COMMITTED"

    # applied in submission order, each batch seeing the ones before it
    cases = [
        (update(v2, 1, signer=OTHER), f"only the owner of workflow '{wid}' ({owner}) may update it"),
        (update(v2, 1), None),
        (update(v3, 1), "expected_version 1 does not match the stored version 2"),
        (update(v3, 7), "expected_version 7 does not match the stored version 2"),
        (update(v3, 2), None),
        (deploy(v1), f"workflow '{wid}' is already deployed (version 3, owner {owner})"),
        (deploy(v1, signer=OTHER), f"workflow '{wid}' is already deployed"),
    ]
    statuses = await submit_and_wait(client, [b for b, _ in cases])
    check_outcomes([(f"case {i}", b, m) for i, (b, m) in enumerate(cases)], statuses)

    record = await stored(client, wid)
    assert record == {"workflow_id": wid, "owner": owner, "version": 3, "definition": v3}
    receipts = await client.get_receipts([cases[4][0].transactions[0].header_signature])
    assert event_attributes(receipts[0]) == [(wf.EVENT_UPDATED, {"workflow_id": wid, "version": "3",
                                                                  "owner": owner})]


def check_outcomes(cases, statuses):
    """cases: (label, batch, expected message fragment or None for COMMITTED); all reported at once."""
    by_id = {s["id"]: s for s in statuses}
    wrong = []
    for label, batch, expected in cases:
        status = by_id[batch.header_signature]
        if expected is None:
            if status["status"] != "COMMITTED":
                wrong.append(f"{label}: expected COMMITTED, got {status}")
        elif status["status"] != "INVALID" or expected not in message(status):
            wrong.append(f"{label}: expected INVALID with {expected!r}, got {status}")
    assert not wrong, "\n".join(wrong)


def _with(path: str, value, base=None):
    """A copy of the federated definition with the field at dotted `path` set (value DELETE removes it)."""
    definition = copy.deepcopy(base if base is not None else federated("x"))
    *parents, last = path.split(".")
    target = definition
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        last = int(last)
    if value is DELETE:
        del target[last]
    else:
        target[last] = value
    return definition


DELETE = object()
KEYS = list(NODE_KEYS.values())


def _tasks(*specs):
    return [{"id": i, "kind": k, "depends_on": list(d)} for i, k, d in specs]


BASE_TASKS = [("train", "local_train", []), ("aggregate", "aggregate", ["train"]), ("evaluate", "evaluate", ["aggregate"])]

# (label, definition, fragment of the processor's message)
BROKEN_DEFINITIONS = [
    ("cycle", _with("tasks", _tasks(("a", "preprocess", ["c"]), ("b", "local_train", ["a"]), ("c", "aggregate", ["b"]),
                                    ("evaluate", "evaluate", ["c"]))),
     "definition.tasks form a cycle: a -> c -> b -> a"),
    ("self dependency", _with("tasks.1.depends_on", ["train"]), "form a cycle: train -> train"),
    ("unknown dependency", _with("tasks.2.depends_on", ["trian"]),
     "definition.tasks[2] ('aggregate') depends on unknown task 'trian'; known tasks: aggregate, evaluate, preprocess, train"),
    ("duplicate task id", _with("tasks.3.id", "train"),
     "definition.tasks[3].id 'train' is already the id of definition.tasks[1]; task ids must be unique"),
    ("dependency listed twice", _with("tasks.2.depends_on", ["train", "train"]),
     "definition.tasks[2].depends_on lists 'train' twice"),
    ("min > expected", _with("federation.min_nodes_required", 11),
     "definition.federation.min_nodes_required (11) must be between 1 and expected_nodes (10)"),
    ("min 0", _with("federation.min_nodes_required", 0), "definition.federation.min_nodes_required must be between 1"),
    ("expected != participants", _with("federation.expected_nodes", 9),
     "definition.federation.expected_nodes is 9 but participant_nodes lists 10 node(s)"),
    ("duplicate participant", _with("federation.participant_nodes", KEYS[:9] + [KEYS[3]]),
     f"definition.federation.participant_nodes lists {KEYS[3]} twice (items 3 and 9)"),
    ("coordinator not a participant", _with("federation.coordinator_node", PrivateKey.generate().public_key().as_hex()),
     "is not one of participant_nodes"),
    ("key off the curve", _with("federation.participant_nodes.4", OFF_CURVE_KEY),
     f"definition.federation.participant_nodes[4] is not a valid public key: {OFF_CURVE_KEY} is not a point on secp256k1"),
    ("key not hex", _with("federation.participant_nodes.4", "02" + "g" * 64),
     "definition.federation.participant_nodes[4] must be a compressed secp256k1 public key"),
    ("uppercase key", _with("federation.coordinator_node", KEYS[0].upper()),
     "definition.federation.coordinator_node must be a compressed secp256k1 public key (66 lowercase hex"),
    ("unresolved node name", _with("federation.coordinator_node", "iot-1"),
     "definition.federation.coordinator_node is 'iot-1', a node name: on chain a node is its compressed secp256k1 public key"),
    ("missing hyperparameters", _with("hyperparameters", DELETE), "definition lacks the required field 'hyperparameters'"),
    ("missing depends_on", _with("tasks.0.depends_on", DELETE), "definition.tasks[0] lacks the required field 'depends_on'"),
    ("missing federation field", _with("federation.rounds", DELETE), "definition.federation lacks the required field 'rounds'"),
    ("unknown field", _with("federation.min_node_required", 3),
     "definition.federation has unknown field(s) 'min_node_required'; allowed: coordinator_node"),
    ("epochs as string", _with("hyperparameters.epochs", "5"), "definition.hyperparameters.epochs must be an integer, got a string"),
    ("epochs as float", _with("hyperparameters.epochs", 5.0),
     "definition.hyperparameters.epochs must be an integer, got a number (write it without a fraction)"),
    ("epochs as boolean", _with("hyperparameters.epochs", True), "epochs must be an integer, got a boolean"),
    ("tasks as map", _with("tasks", {"train": "local_train"}), "definition.tasks must be a list, got a map"),
    ("definition as list", [1, 2], "definition must be a map, got a list"),
    ("unknown task kind", _with("tasks.1.kind", "train"),
     "definition.tasks[1].kind must be one of local_train, aggregate, evaluate, preprocess; got 'train'"),
    ("bad workflow id", _with("workflow_id", "has space"), "definition.workflow_id must be an identifier"),
    ("blank name", _with("name", "   "), "definition.name must not be empty or blank"),
    ("NaN learning rate", _with("hyperparameters.learning_rate", math.nan),
     "definition.hyperparameters.learning_rate must be a finite number; got nan"),
    ("infinite alpha", _with("data.partition.alpha", math.inf), "definition.data.partition.alpha must be a finite number; got inf"),
    ("zero learning rate", _with("hyperparameters.learning_rate", 0.0), "learning_rate must be greater than 0"),
    ("unknown optimizer", _with("hyperparameters.optimizer", "rmsprop"), "optimizer must be one of sgd, adam; got 'rmsprop'"),
    ("unknown model type", _with("model.type", "cnn"), "definition.model.type must be one of mlp; got 'cnn'"),
    ("mlp without num_classes", _with("model.num_classes", DELETE), "definition.model lacks the required field 'num_classes'"),
    ("hidden width 0", _with("model.hidden", [64, 0]), "definition.model.hidden[1] must be between 1 and 65536; got 0"),
    ("perf_fedavg alpha > 1", _with("strategy", {"name": "perf_fedavg", "alpha": 1.5}),
     "definition.strategy.alpha must be at most 1; got 1.5"),
    ("perf_fedavg without alpha", _with("strategy", {"name": "perf_fedavg"}), "definition.strategy lacks the required field 'alpha'"),
    ("fedavg with alpha", _with("strategy", {"name": "fedavg", "alpha": 0.5}), "definition.strategy has unknown field(s) 'alpha'"),
    ("dirichlet alpha 0", _with("data.partition.alpha", 0), "definition.data.partition.alpha must be greater than 0; got 0"),
    ("iid with alpha", _with("data.partition", {"kind": "iid", "alpha": 1.0, "seed": 1}),
     "definition.data.partition has unknown field(s) 'alpha'"),
    ("test_fraction 1", _with("data.test_fraction", 1), "definition.data.test_fraction must be less than 1; got 1"),
    ("unknown dataset", _with("data.dataset", "mnist"), "definition.data.dataset must be one of digits, npz"),
    ("train_on gpu", _with("federation.train_on", "gpu"), "definition.federation.train_on must be one of compute, iot; got 'gpu'"),
    ("round_timeout 0", _with("federation.round_timeout", 0), "definition.federation.round_timeout must be between 1 and 604800"),
    ("rounds 0", _with("federation.rounds", 0), "definition.federation.rounds must be between 1 and 10000; got 0"),
    ("federated without strategy", _with("strategy", DELETE),
     "definition lacks the required field 'strategy' (a federated workflow needs one)"),
    ("federated without partition", _with("data.partition", DELETE), "definition.data lacks the required field 'partition'"),
    ("federated without aggregate", _with("tasks", _tasks(("train", "local_train", []), ("evaluate", "evaluate", ["train"]))),
     "a federated workflow needs an aggregate task"),
    ("aggregate not after training", _with("tasks", _tasks(("train", "local_train", []), ("prep", "preprocess", []),
                                                           ("aggregate", "aggregate", ["prep"]), ("evaluate", "evaluate", ["aggregate"]))),
     "an aggregate task must depend (directly or through other tasks) on a local_train task"),
    ("federated without evaluate", _with("tasks", _tasks(*BASE_TASKS[:2])), "a federated workflow needs an evaluate task"),
    ("federated without local_train", _with("tasks", _tasks(("prep", "preprocess", []), ("aggregate", "aggregate", ["prep"]),
                                                            ("evaluate", "evaluate", ["aggregate"]))),
     "a federated workflow needs a local_train task"),
    ("single node with aggregate", _with("tasks", _tasks(*BASE_TASKS), base=single("x")),
     "definition.tasks[1] is an aggregate task but the workflow has no federation"),
    ("single node without local_train", _with("tasks", _tasks(("prep", "preprocess", []), ("evaluate", "evaluate", ["prep"])),
                                              base=single("x")),
     "definition.tasks: a workflow needs a local_train task"),
    ("no tasks", _with("tasks", []), "definition.tasks must hold between 1 and 64 items; it holds 0"),
]


def _non_canonical(definition) -> bytes:
    # "definition" before "action": valid CBOR, but not in deterministic key order
    return cbor2.dumps({"definition": definition, "action": "deploy"})


# (label, raw payload, fragment of the message)
BROKEN_PAYLOADS = [
    ("non-canonical CBOR", _non_canonical(federated("x")), "payload is CBOR but not canonical"),
    ("not CBOR", b"\xff\xfe{", "payload is not valid CBOR"),
    ("JSON instead of CBOR", json.dumps({"action": "deploy"}).encode(), "payload is not valid CBOR"),
    ("payload not a map", cbor.encode(["deploy"]), "payload must be a CBOR map with an 'action' field"),
    ("unknown action", cbor.encode({"action": "delete", "definition": federated("x")}),
     "action must be one of deploy, register_group, update; got 'delete'"),
    ("no action", cbor.encode({"definition": federated("x")}), "action must be one of deploy, register_group, update; got None"),
    ("deploy without definition", cbor.encode({"action": "deploy"}), "deploy payload lacks the required field 'definition'"),
    ("deploy with extra field", cbor.encode({"action": "deploy", "definition": federated("x"), "owner": "me"}),
     "deploy payload has unknown field(s) 'owner'"),
    ("update without expected_version", cbor.encode({"action": "update", "definition": federated("x")}),
     "update payload lacks the required field 'expected_version'"),
    ("expected_version as string", cbor.encode({"action": "update", "definition": federated("x"), "expected_version": "1"}),
     "update payload field 'expected_version' must be an integer >= 1"),
    ("expected_version 0", cbor.encode({"action": "update", "definition": federated("x"), "expected_version": 0}),
     "update payload field 'expected_version' must be an integer >= 1 (the version you read); got 0"),
]


def _broken_cases():
    """(label, batch, fragment): every broken definition and payload, each to its own workflow id."""
    cases = []
    for i, (label, definition, expected) in enumerate(BROKEN_DEFINITIONS):
        wid = f"broken-{i}"
        if isinstance(definition, dict) and definition.get("workflow_id") == "x":
            definition = {**definition, "workflow_id": wid}
        cases.append((label, batch_of(OWNER, raw_txn(OWNER, wf.deploy_payload(definition), wid)), expected))
    for i, (label, payload, expected) in enumerate(BROKEN_PAYLOADS):
        cases.append((label, batch_of(OWNER, raw_txn(OWNER, payload, f"payload-{i}")), expected))
    return cases


BROKEN_CASES = _broken_cases()


@pytest.mark.parametrize("label, batch, expected", BROKEN_CASES, ids=[label for label, _, _ in BROKEN_CASES])
async def test_each_broken_rule_is_rejected_with_its_message(label, batch, expected):
    """Each rule through the handler's apply() on dict state (helpers.dict_ledger): refused with
    its message, nothing written, and a valid deploy still goes through afterwards."""
    client = DictLedger()
    before = dict(client.state)
    statuses = await submit_and_wait(client, [batch])
    check_outcomes([(label, batch, expected)], statuses)
    assert client.state == before
    [status] = await submit_and_wait(client, [deploy(federated("after-the-bad-ones"))])
    assert status["status"] == "COMMITTED"


async def test_broken_rules_are_rejected_through_the_dev_validator(ledger):
    """A sample of the cases above, submitted together, as the validator reports them."""
    cases = BROKEN_CASES[::6] + BROKEN_CASES[len(BROKEN_DEFINITIONS):]

    async with running_processor(ledger.component_url, wf.WorkflowHandler()), rest(ledger.rest_url) as client:
        statuses = await submit_and_wait(client, [b for _, b, _ in cases], timeout=60)
        check_outcomes(cases, statuses)
        # nothing was written by any of them
        written = {address async for address, _ in client.list_state(layout.WORKFLOW_NS)}
        assert not written & {layout.workflow_address(f"broken-{i}") for i in range(len(BROKEN_DEFINITIONS))}
        assert not written & {layout.workflow_address(f"payload-{i}") for i in range(len(BROKEN_PAYLOADS))}
        # and valid ones still go through afterwards
        [status] = await submit_and_wait(client, [deploy(federated("after-the-bad-ones"))])
        assert status["status"] == "COMMITTED"


def test_every_broken_definition_is_refused_by_the_pure_check_without_a_validator():
    for label, definition, expected in BROKEN_DEFINITIONS:
        with pytest.raises(wf.DefinitionError) as err:
            wf.validate_definition(definition)
        assert expected in str(err.value), label


# --------------------------------------------------------------------------- client side


def test_schema_is_valid_draft_2020_12_and_accepts_both_example_files():
    import jsonschema

    schema = wf.load_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in (FEDERATED, SINGLE):
        definition = wf.load_definition(path)
        assert wf.schema_errors(definition) == [], path
        wf.check_definition(definition, allow_node_names=True)
    # the federated file names its nodes: the schema takes names, the processor's rules do not
    with pytest.raises(wf.DefinitionError, match="a node name"):
        wf.check_definition(wf.load_definition(FEDERATED))
    assert wf.node_names(wf.load_definition(FEDERATED)) == [f"iot-{i}" for i in range(1, 11)]
    assert wf.node_names(wf.load_definition(SINGLE)) == []
    # the example files are what the brief promises
    fed = wf.load_definition(FEDERATED)
    assert len(fed["federation"]["participant_nodes"]) == fed["federation"]["expected_nodes"] == 10
    assert fed["data"]["partition"]["kind"] == "dirichlet" and fed["model"]["type"] == "mlp"
    assert "federation" not in wf.load_definition(SINGLE)


# Broken definitions the schema itself catches (structure, types, bounds): (label, definition, schema path).
SCHEMA_CATCHES = {
    "missing hyperparameters": "definition: 'hyperparameters' is a required property",
    "missing depends_on": "definition.tasks[0]: 'depends_on' is a required property",
    "missing federation field": "definition.federation: 'rounds' is a required property",
    "unknown field": "definition.federation: Additional properties are not allowed ('min_node_required' was unexpected)",
    "epochs as string": "definition.hyperparameters.epochs: '5' is not of type 'integer'",
    "epochs as float": "definition.hyperparameters.epochs: 5.0 is not of type 'integer'",
    "epochs as boolean": "definition.hyperparameters.epochs: True is not of type 'integer'",
    "tasks as map": "definition.tasks: {'train': 'local_train'} is not of type 'array'",
    "definition as list": "definition: [1, 2] is not of type 'object'",
    "unknown task kind": "definition.tasks[1].kind: 'train' is not one of",
    "bad workflow id": "definition.workflow_id: 'has space' is not an identifier",
    "blank name": "definition.name: must not be empty or blank",
    "duplicate participant": f"definition.federation.participant_nodes: lists '{KEYS[3]}' more than once",
    "dependency listed twice": "definition.tasks[2].depends_on: lists 'train' more than once",
    "key not hex": "definition.federation.participant_nodes[4]: '02gggg",
    "uppercase key": "definition.federation.coordinator_node: '0",
    "zero learning rate": "definition.hyperparameters.learning_rate: 0.0 is less than or equal to the minimum of 0",
    "unknown optimizer": "definition.hyperparameters.optimizer: 'rmsprop' is not one of",
    "unknown model type": "definition.model.type: 'cnn' is not one of ['mlp']",
    "mlp without num_classes": "definition.model: 'num_classes' is a required property",
    "hidden width 0": "definition.model.hidden[1]: 0 is less than the minimum of 1",
    "perf_fedavg alpha > 1": "definition.strategy.alpha: 1.5 is greater than the maximum of 1",
    "perf_fedavg without alpha": "definition.strategy: 'alpha' is a required property",
    "fedavg with alpha": "definition.strategy: Additional properties are not allowed ('alpha' was unexpected)",
    "dirichlet alpha 0": "definition.data.partition.alpha: 0 is less than or equal to the minimum of 0",
    "iid with alpha": "definition.data.partition: Additional properties are not allowed ('alpha' was unexpected)",
    "test_fraction 1": "definition.data.test_fraction: 1 is greater than or equal to the maximum of 1",
    "unknown dataset": "definition.data.dataset: 'mnist' is not one of",
    "train_on gpu": "definition.federation.train_on: 'gpu' is not one of",
    "round_timeout 0": "definition.federation.round_timeout: 0 is less than the minimum of 1",
    "rounds 0": "definition.federation.rounds: 0 is less than the minimum of 1",
    "min 0": "definition.federation.min_nodes_required: 0 is less than the minimum of 1",
    "federated without strategy": "definition: 'strategy' is a required property",
    "federated without partition": "definition.data: 'partition' is a required property",
    "federated without aggregate": "definition.tasks: has no aggregate task (a federated workflow needs",
    "federated without evaluate": "definition.tasks: has no evaluate task",
    "federated without local_train": "definition.tasks: has no local_train task",
    "single node with aggregate": "definition.tasks: holds an aggregate task, which needs a federation",
    "single node without local_train": "definition.tasks: has no local_train task (every workflow needs one)",
    "no tasks": "definition.tasks: [] should be non-empty",
}
# What only the processor's rules can see (a JSON Schema cannot state them).
BEYOND_THE_SCHEMA = {
    "cycle", "self dependency", "unknown dependency", "duplicate task id", "min > expected",
    "expected != participants", "coordinator not a participant", "key off the curve",
    "unresolved node name", "NaN learning rate", "infinite alpha", "aggregate not after training",
}


def test_schema_and_processor_rules_agree_on_every_broken_definition():
    labels = {label for label, _, _ in BROKEN_DEFINITIONS}
    assert set(SCHEMA_CATCHES) | BEYOND_THE_SCHEMA == labels and not set(SCHEMA_CATCHES) & BEYOND_THE_SCHEMA
    for label, definition, _ in BROKEN_DEFINITIONS:
        problems = wf.schema_errors(definition)
        if label in SCHEMA_CATCHES:
            assert any(p.startswith(SCHEMA_CATCHES[label]) for p in problems), (label, problems)
        else:
            # names are fine for the schema (files may name nodes); the rest is beyond what a
            # schema states. The client's full check still refuses all of them.
            assert problems == [], (label, problems)
        with pytest.raises(wf.DefinitionError):
            wf.check_definition(definition)
    # the most specific problem comes first
    with pytest.raises(wf.DefinitionError, match=r"definition.tasks: \[\] should be non-empty \(and 3 more\)"):
        wf.check_definition(_with("tasks", []))


def test_schema_bounds_and_enums_match_the_python_constants():
    defs = wf.load_schema()["$defs"]
    assert defs["identifier"]["pattern"] == wf.IDENTIFIER_PATTERN
    assert common.IDENTIFIER.pattern == r"\A" + wf.IDENTIFIER_PATTERN[1:-1] + r"\Z"
    assert common.PUBLIC_KEY.pattern == r"\A" + defs["public_key"]["pattern"][1:-1] + r"\Z"
    assert defs["task"]["properties"]["kind"]["enum"] == list(wf.TASK_KINDS)
    assert defs["task"]["properties"]["depends_on"]["maxItems"] == wf.MAX_TASKS
    assert wf.load_schema()["properties"]["tasks"]["maxItems"] == wf.MAX_TASKS
    assert wf.load_schema()["properties"]["name"]["maxLength"] == wf.MAX_NAME
    assert wf.load_schema()["properties"]["description"]["maxLength"] == wf.MAX_DESCRIPTION
    assert defs["model"]["properties"]["type"]["enum"] == list(wf.MODEL_CHECKS)
    mlp = defs["mlp"]["properties"]
    assert (mlp["input_dim"]["maximum"], mlp["hidden"]["maxItems"], mlp["hidden"]["items"]["maximum"],
            mlp["num_classes"]["maximum"]) == (wf.MAX_INPUT_DIM, wf.MAX_HIDDEN_LAYERS, wf.MAX_LAYER_WIDTH, wf.MAX_CLASSES)
    hp = defs["hyperparameters"]["properties"]
    assert (hp["epochs"]["maximum"], hp["batch_size"]["maximum"], defs["seed"]["maximum"]) == \
        (wf.MAX_EPOCHS, wf.MAX_BATCH_SIZE, wf.MAX_SEED)
    assert hp["optimizer"]["enum"] == list(wf.OPTIMIZERS)
    assert defs["strategy"]["properties"]["name"]["enum"] == sorted(strategy_registry.STRATEGIES)
    assert defs["data"]["properties"]["dataset"]["enum"] == list(wf.DATASETS)
    assert defs["partition"]["properties"]["kind"]["enum"] == list(wf.PARTITIONS)
    fed = defs["federation"]["properties"]
    assert fed["participant_nodes"]["maxItems"] == fed["expected_nodes"]["maximum"] == \
        fed["min_nodes_required"]["maximum"] == wf.MAX_PARTICIPANTS
    assert (fed["round_timeout"]["maximum"], fed["rounds"]["maximum"]) == (wf.MAX_ROUND_TIMEOUT, wf.MAX_ROUNDS)
    assert fed["train_on"]["enum"] == list(wf.TRAIN_ON) and fed["train_on"]["default"] == wf.DEFAULT_TRAIN_ON
    assert set(defs["federation"]["required"]) | {"train_on"} == set(fed)


def test_schema_patterns_end_at_the_end_of_the_string():
    for field in ("workflow_id",):
        assert wf.schema_errors(_with(field, "digits\n")) != []
        with pytest.raises(wf.DefinitionError):
            wf.validate_definition(_with(field, "digits\n"))
    assert wf.schema_errors(_with("federation.coordinator_node", KEYS[0] + "\n")) != []


def test_json_files_are_parsed_strictly(tmp_path):
    text = FEDERATED.read_text()
    with pytest.raises(wf.DefinitionError, match="NaN is not a number JSON allows"):
        wf.parse_definition(text.replace('"learning_rate": 0.01', '"learning_rate": NaN'))
    with pytest.raises(wf.DefinitionError, match="Infinity is not a number JSON allows"):
        wf.parse_definition(text.replace('"alpha": 0.5', '"alpha": Infinity'))
    with pytest.raises(wf.DefinitionError, match="the key 'epochs' appears twice"):
        wf.parse_definition(text.replace('"epochs": 5,', '"epochs": 5, "epochs": 50,'))
    with pytest.raises(wf.DefinitionError, match="is not valid JSON"):
        wf.parse_definition(text[:-10])
    with pytest.raises(wf.DefinitionError, match="cannot read"):
        wf.load_definition(tmp_path / "missing.json")


def test_resolve_node_names():
    definition = wf.load_definition(FEDERATED)
    resolved = wf.resolve_node_names(definition, NODE_KEYS)
    assert resolved["federation"]["coordinator_node"] == NODE_KEYS["iot-1"]
    assert definition["federation"]["coordinator_node"] == "iot-1"  # the input is left alone
    wf.validate_definition(resolved)
    # keys already in place stay; a mix works
    partly = wf.resolve_node_names(resolved, {})
    assert partly == resolved
    with pytest.raises(wf.DefinitionError, match=r"participant_nodes\[9\]: no public key known for node 'iot-10'"):
        wf.resolve_node_names(definition, {k: v for k, v in NODE_KEYS.items() if k != "iot-10"})
    with pytest.raises(wf.DefinitionError, match="the key given for node 'iot-1' is not a compressed public key"):
        wf.resolve_node_names(definition, {**NODE_KEYS, "iot-1": "nope"})
    assert wf.resolve_node_names(wf.load_definition(SINGLE), {}) == wf.load_definition(SINGLE)


def test_client_builders_check_first_and_address_only_the_workflow():
    with pytest.raises(wf.DefinitionError, match="min_nodes_required"):
        wf.make_deploy_transaction(OWNER, _with("federation.min_nodes_required", 11))
    with pytest.raises(wf.DefinitionError, match="does not match workflow.schema.json"):
        wf.make_update_transaction(OWNER, _with("model.type", "cnn"), 1)
    definition = federated("builder")
    txn = wf.make_update_transaction(OWNER, definition, 4)
    header = pb.TransactionHeader.FromString(txn.header)
    assert (header.family_name, header.family_version) == ("trustmesh-workflow", "1.0")
    assert list(header.inputs) == list(header.outputs) == [layout.workflow_address("builder")]
    assert cbor.decode(txn.payload) == {"action": "update", "definition": definition, "expected_version": 4}
    assert wf.WorkflowHandler.namespaces == [layout.WORKFLOW_NS]


# --------------------------------------------------------------------------- never another exception

_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**9000, max_value=2**9000)
            | st.floats() | st.text(max_size=80) | st.binary(max_size=20))
_VALUES = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=20) | st.integers(), inner, max_size=4), max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, prefix + (i,))


_ALL_PATHS = [p for p in _paths(federated("fuzz")) if p]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(_ALL_PATHS), value=_VALUES, drop=st.booleans())
def test_any_value_anywhere_is_a_definition_error_or_valid(path, value, drop):
    definition = federated("fuzz")
    target = definition
    for part in path[:-1]:
        target = target[part]
    if drop:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    try:
        wf.validate_definition(definition)
    except wf.DefinitionError as exc:
        assert str(exc) and len(str(exc)) < 2000
    try:
        wf.check_definition(definition)
    except wf.DefinitionError:
        pass


class _Txn:
    def __init__(self, payload: bytes):
        self.payload = payload

        class header:
            signer_public_key = KEYS[0]
        self.header = header


class _Context:
    """Empty state; records writes and events (only for the pure-apply check below)."""

    def __init__(self):
        self.writes, self.events = {}, []

    async def get_state(self, addresses):
        return {}

    async def set_state(self, entries):
        self.writes.update(entries)
        return list(entries)

    async def add_event(self, event_type, attributes=(), data=b""):
        self.events.append((event_type, list(attributes)))


@settings(max_examples=300, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["action", "definition", "expected_version", "x"]),
                            st.sampled_from(["deploy", "update"]) | _VALUES, max_size=4))
def test_apply_raises_only_invalid_transaction_for_any_payload(body):
    try:
        payload = cbor.encode(body)
    except cbor.PayloadError:
        return
    try:
        asyncio.run(wf.WorkflowHandler().apply(_Txn(payload), _Context()))
    except InvalidTransaction:
        pass
