"""A workflow definition: its rules, checked once, and the accessors everything reads it through.

A workflow definition (what `workflows/*.json` hold; the same map goes on chain, CBOR-encoded)
says which tasks run in which order, which model with which hyperparameters, how the data is
split and, for a federated workflow, which nodes take part. Its published JSON Schema is
`scheduling/workflow.schema.json` (draft 2020-12; workflow_schema.py); `validate_definition`
below holds every rule of that schema plus the ones a schema cannot express (the task graph is
acyclic, dependencies exist, min_nodes_required <= expected_nodes, ...), with every limit named
once here. The workflow family runs it at deploy and update (pure Python, no jsonschema in
apply()); clients run both (`check_definition`). Other families read a stored definition
through the accessors at the end (federation_config, task_order, train_on, ...), which trust
what deploy checked and refuse, with InvalidTransaction, a record that could not have passed.

Definition (unknown fields are refused at every level, so a typo never passes silently):

    workflow_id      identifier ([A-Za-z0-9][A-Za-z0-9._-]{0,63})
    name             1..128 characters, not blank;  description  optional, <= 4096 characters
    tasks            1..64 of {id: identifier, kind: local_train|aggregate|evaluate|preprocess,
                     depends_on: [task ids]}: unique ids, known dependencies, no cycle
    model            {type: "mlp", input_dim, hidden: [ints], num_classes}; `type` is an open
                     enum: a new type adds an entry to MODEL_CHECKS and a branch to the schema
    hyperparameters  {epochs, batch_size, learning_rate > 0, optimizer: sgd|adam, seed}
    strategy         {name, parameters...}: names and parameter bounds from fl/strategies/
    update_checks    optional, fl/screening.py;  privacy  optional, fl/privacy_block.py;
    secure_aggregation  optional, fl/secagg_block.py;  rewards  optional, fl/rewards_block.py
    data             {dataset: digits|npz, partition: {kind: iid, seed} |
                     {kind: dirichlet, alpha > 0, seed}, test_fraction in (0, 1)}
    federation       {coordinator_node, participant_nodes | participant_group, expected_nodes,
                     min_nodes_required, round_timeout (whole seconds), rounds, train_on:
                     compute|iot (optional, default "compute": where local training runs)}

Federated vs single-node: with `federation` the workflow needs `strategy` and
`data.partition`, a local_train task, an aggregate task that depends (directly or through other
tasks) on a local_train, and an evaluate task. Without it (single-node) it needs a local_train
task and may not hold an aggregate task; `strategy` and `data.partition` may be left out (they
are checked when present).

The coordinator is one of the participants: it is an IoT node with data of its own that also
opens each round, so `participant_nodes` is exactly the set of nodes that may submit,
`expected_nodes == len(participant_nodes)` and nobody is counted twice. Node identities on
chain are compressed secp256k1 public keys (66 lowercase hex, a point on the curve); files may
name nodes instead ("iot-1") until `resolve_node_names` maps them to keys.

Participants are listed in one of two ways, exactly one per definition:
- `participant_nodes`: up to MAX_PARTICIPANTS keys in the definition itself (its payload must fit
  MAX_PAYLOAD_BYTES);
- `participant_group`: the id of a *participant group* of up to MAX_GROUP_MEMBERS keys that the
  workflow's owner registered on chain beforehand, in parts of at most MAX_GROUP_PART_MEMBERS
  (trustmesh-workflow register_group; the rules: workflow_groups.py). At deploy and update the
  family reads the group, requires it complete, `expected_nodes` equal to its size and the
  coordinator among its members, and copies the member list into the workflow record
  ("participants"), where open_round (federation_config) and the readers take it from.
`trustmesh workflow deploy` / `trustmesh run` turn a file listing more than MAX_PARTICIPANTS
participant_nodes into such a group automatically.

Numbers: integers must be integers (5, not 5.0; never booleans); NaN and infinities are refused.
Canonical CBOR keeps floats exact, so the stored definition equals the submitted one.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from trustmesh.fl import privacy_block, rewards_block, screening, secagg_block
from trustmesh.fl import strategies as strategy_registry
from trustmesh.ledger.processor import InvalidTransaction

from .common import PUBLIC_KEY, require, require_int, require_match
from .definition_fields import (
    DefinitionError, a_map, choice, distinct_nodes, fields, identifier, integer, items, node, number, parameters, tagged,
    text,
)
from .definition_tasks import MAX_TASKS, TASK_KINDS, check_tasks, closures, topological_order  # noqa: F401

ROOT = "definition"

OPTIMIZERS = ("sgd", "adam")
DATASETS = ("digits", "npz")
PARTITIONS = ("iid", "dirichlet")
TRAIN_ON = ("compute", "iot")
DEFAULT_TRAIN_ON = "compute"

# Bounds (MAX_TASKS: definition_tasks.py); scheduling/workflow.schema.json states the same ones
# (tests check they agree).
MAX_NAME = 128
MAX_DESCRIPTION = 4096
MAX_INPUT_DIM = 1_000_000
MAX_HIDDEN_LAYERS = 16
MAX_LAYER_WIDTH = 65_536
MAX_CLASSES = 100_000
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65_536
MAX_SEED = 2**32 - 1          # what numpy and torch both take
MAX_PARTICIPANTS = 512        # ~35 KB of keys, inside the 64 KiB payload limit
MAX_GROUP_MEMBERS = 10_000    # a participant group (federation.participant_group): ~680 KB of keys in state
MAX_GROUP_PART_MEMBERS = 500  # keys per register_group transaction: ~34 KB, inside the 64 KiB payload limit
MAX_GROUP_PARTS = -(-MAX_GROUP_MEMBERS // MAX_GROUP_PART_MEMBERS)  # 20
MAX_ROUND_TIMEOUT = 7 * 24 * 3600
MAX_ROUNDS = 10_000           # also bounds a workflow's round index record


# --------------------------------------------------------------------------- sections


def _check_mlp(model: dict, path: str) -> None:
    fields(model, path, ("type", "input_dim", "hidden", "num_classes"))
    integer(model["input_dim"], f"{path}.input_dim", 1, MAX_INPUT_DIM)
    hidden = items(model["hidden"], f"{path}.hidden", 0, MAX_HIDDEN_LAYERS)
    for i, width in enumerate(hidden):
        integer(width, f"{path}.hidden[{i}]", 1, MAX_LAYER_WIDTH)
    integer(model["num_classes"], f"{path}.num_classes", 2, MAX_CLASSES)


# Model types: the open enum. A new type adds its check here and a branch to the schema.
MODEL_CHECKS: dict[str, Callable[[dict, str], None]] = {"mlp": _check_mlp}


def _check_hyperparameters(hp: Any, path: str) -> None:
    fields(hp, path, ("epochs", "batch_size", "learning_rate", "optimizer", "seed"))
    integer(hp["epochs"], f"{path}.epochs", 1, MAX_EPOCHS)
    integer(hp["batch_size"], f"{path}.batch_size", 1, MAX_BATCH_SIZE)
    number(hp["learning_rate"], f"{path}.learning_rate", above=0)
    choice(hp["optimizer"], f"{path}.optimizer", OPTIMIZERS)
    integer(hp["seed"], f"{path}.seed", 0, MAX_SEED)


def _check_privacy(block: Any, path: str, definition: Mapping) -> None:
    """fl/privacy_block.py: its choice and number fields, then the rules across fields."""
    a_map(block, path)
    choices, numbers = privacy_block.fields(block)
    parameters(block, path, numbers, choices)
    for name in choices:
        choice(block[name], f"{path}.{name}", privacy_block.CHOICES[name])
    _no_problem(path, privacy_block.problem(block, definition))


def _check_secure_aggregation(block: Any, path: str, definition: Mapping) -> None:
    """fl/secagg_block.py: protocol, threshold, neighbours, then the rules across the definition."""
    a_map(block, path)
    parameters(block, path, secagg_block.NUMBERS, ("protocol",))
    choice(block["protocol"], f"{path}.protocol", secagg_block.PROTOCOLS)
    _no_problem(path, secagg_block.problem(block, definition))


def _check_rewards(block: Any, path: str, definition: Mapping) -> None:
    """fl/rewards_block.py: integer amounts and basis-point shares, fee_account a public key, then
    the rules across fields (shares sum to 10000, per_round <= total, a federation to pay)."""
    fields(block, path, tuple(rewards_block.NUMBERS), rewards_block.OPTIONAL)
    for name, bound in rewards_block.NUMBERS.items():
        integer(block[name], f"{path}.{name}", bound.low, bound.high)
    if "fee_account" in block:
        node(block["fee_account"], f"{path}.fee_account", False)
    if "score" in block:
        choice(block["score"], f"{path}.score", rewards_block.SCORES)
    if "permutations" in block:
        bound = rewards_block.PERMUTATIONS
        integer(block["permutations"], f"{path}.permutations", bound.low, bound.high)
    _no_problem(path, rewards_block.problem(block, definition))


def _no_problem(path: str, problem: str | None) -> None:
    if problem is not None:
        raise DefinitionError(f"{path}: {problem}")


def _check_data(data: Any, path: str) -> None:
    fields(data, path, ("dataset", "test_fraction"), ("partition",))
    choice(data["dataset"], f"{path}.dataset", DATASETS)
    if "partition" in data:
        ppath = f"{path}.partition"
        partition = data["partition"]
        if tagged(partition, ppath, "kind", PARTITIONS) == "dirichlet":
            fields(partition, ppath, ("kind", "alpha", "seed"))
            number(partition["alpha"], f"{ppath}.alpha", above=0)
        else:
            fields(partition, ppath, ("kind", "seed"))
        integer(partition["seed"], f"{ppath}.seed", 0, MAX_SEED)
    number(data["test_fraction"], f"{path}.test_fraction", above=0, below=1)


def _check_federation(fed: Any, path: str, allow_names: bool) -> None:
    fields(fed, path, ("coordinator_node", "expected_nodes", "min_nodes_required", "round_timeout", "rounds"),
           ("participant_nodes", "participant_group", "train_on"))
    coordinator = node(fed["coordinator_node"], f"{path}.coordinator_node", allow_names)
    if ("participant_nodes" in fed) == ("participant_group" in fed):
        if "participant_nodes" in fed:
            raise DefinitionError(
                f"{path} has both participant_nodes and participant_group; give exactly one: the node list "
                f"(up to {MAX_PARTICIPANTS}) or the id of a registered participant group (up to {MAX_GROUP_MEMBERS})"
            )
        raise DefinitionError(
            f"{path} lacks the required field 'participant_nodes' (the participants' keys, up to "
            f"{MAX_PARTICIPANTS}), or instead 'participant_group' (the id of a registered participant group)"
        )
    if "participant_group" in fed:
        identifier(fed["participant_group"], f"{path}.participant_group")
        # the group's size and members are on chain: deploy checks expected_nodes and the coordinator there
        expected = integer(fed["expected_nodes"], f"{path}.expected_nodes", 1, MAX_GROUP_MEMBERS)
    else:
        participants = items(fed["participant_nodes"], f"{path}.participant_nodes", 1, MAX_PARTICIPANTS)
        first = distinct_nodes(participants, f"{path}.participant_nodes", allow_names)
        expected = integer(fed["expected_nodes"], f"{path}.expected_nodes", 1, MAX_PARTICIPANTS)
        if expected != len(participants):
            raise DefinitionError(
                f"{path}.expected_nodes is {expected} but participant_nodes lists {len(participants)} "
                f"node(s); they must be equal"
            )
    minimum = integer(fed["min_nodes_required"], f"{path}.min_nodes_required", 1,
                      MAX_GROUP_MEMBERS if "participant_group" in fed else MAX_PARTICIPANTS)
    if minimum > expected:
        raise DefinitionError(
            f"{path}.min_nodes_required ({minimum}) must be between 1 and expected_nodes ({expected})"
        )
    if "participant_nodes" in fed and coordinator not in first:
        raise DefinitionError(
            f"{path}.coordinator_node {coordinator} is not one of participant_nodes; the coordinator "
            f"contributes data too, so list it among the participants"
        )
    integer(fed["round_timeout"], f"{path}.round_timeout", 1, MAX_ROUND_TIMEOUT)
    integer(fed["rounds"], f"{path}.rounds", 1, MAX_ROUNDS)
    if "train_on" in fed:
        choice(fed["train_on"], f"{path}.train_on", TRAIN_ON)


# --------------------------------------------------------------------------- the whole definition


def validate_definition(definition: Any, *, allow_node_names: bool = False) -> dict:
    """Every rule of a workflow definition, pure Python; returns it unchanged or raises DefinitionError.

    The processor calls it with allow_node_names=False (nodes must be public keys); a client
    checking a file before `resolve_node_names` passes True.
    """
    root = ROOT
    fields(definition, root, ("workflow_id", "name", "tasks", "model", "hyperparameters", "data"),
           ("description", "strategy", "update_checks", "privacy", "secure_aggregation", "rewards", "federation"))
    identifier(definition["workflow_id"], f"{root}.workflow_id")
    text(definition["name"], f"{root}.name", MAX_NAME)
    if "description" in definition:
        text(definition["description"], f"{root}.description", MAX_DESCRIPTION, blank_ok=True)
    tasks = check_tasks(definition["tasks"], f"{root}.tasks")
    model = definition["model"]
    MODEL_CHECKS[tagged(model, f"{root}.model", "type", tuple(MODEL_CHECKS))](model, f"{root}.model")
    _check_hyperparameters(definition["hyperparameters"], f"{root}.hyperparameters")
    if "strategy" in definition:
        spec = definition["strategy"]
        name = tagged(spec, f"{root}.strategy", "name", tuple(sorted(strategy_registry.STRATEGIES)))
        parameters(spec, f"{root}.strategy", strategy_registry.STRATEGIES[name].parameters, ("name",))
    if "update_checks" in definition:
        parameters(definition["update_checks"], f"{root}.update_checks", screening.PARAMETERS, ())
    _check_data(definition["data"], f"{root}.data")
    if "min_accuracy" in definition.get("update_checks", {}) and definition["data"]["dataset"] != "digits":
        raise DefinitionError(f"{root}.update_checks.min_accuracy scores each update on a held-out split every node "
                              f"derives alike, which only data.dataset 'digits' has; leave it out for "
                              f"{definition['data']['dataset']!r} data")
    federated = "federation" in definition
    if federated:
        _check_federation(definition["federation"], f"{root}.federation", allow_node_names)
    _check_shape(definition, tasks, federated)
    if "privacy" in definition:
        _check_privacy(definition["privacy"], f"{root}.privacy", definition)
    if "secure_aggregation" in definition:
        _check_secure_aggregation(definition["secure_aggregation"], f"{root}.secure_aggregation", definition)
    if "rewards" in definition:
        _check_rewards(definition["rewards"], f"{root}.rewards", definition)
    return definition


def _check_shape(definition: dict, tasks: list[dict], federated: bool) -> None:
    """What a federated or single-node workflow must hold."""
    root = ROOT
    kinds = [t["kind"] for t in tasks]
    if not federated:
        if "local_train" not in kinds:
            raise DefinitionError(f"{root}.tasks: a workflow needs a local_train task")
        if "aggregate" in kinds:
            raise DefinitionError(
                f"{root}.tasks[{kinds.index('aggregate')}] is an aggregate task but the workflow has no "
                f"federation: add a federation section or drop the task"
            )
        return
    if "strategy" not in definition:
        raise DefinitionError(f"{root} lacks the required field 'strategy' (a federated workflow needs one)")
    if "partition" not in definition["data"]:
        raise DefinitionError(f"{root}.data lacks the required field 'partition' (a federated workflow splits the data)")
    if "local_train" not in kinds:
        raise DefinitionError(f"{root}.tasks: a federated workflow needs a local_train task")
    if "aggregate" not in kinds:
        raise DefinitionError(f"{root}.tasks: a federated workflow needs an aggregate task")
    closure, _ = closures(topological_order(tasks))
    trains = {t["id"] for t in tasks if t["kind"] == "local_train"}
    if not any(closure[t["id"]] & trains for t in tasks if t["kind"] == "aggregate"):
        raise DefinitionError(
            f"{root}.tasks: an aggregate task must depend (directly or through other tasks) on a "
            f"local_train task; none does"
        )
    if "evaluate" not in kinds:
        raise DefinitionError(f"{root}.tasks: a federated workflow needs an evaluate task")
    spec = definition["strategy"]
    problem = strategy_registry.STRATEGIES[spec["name"]].federation_problem(spec, definition["federation"])
    _no_problem(f"{root}.strategy {spec['name']!r}", problem)


# --------------------------------------------------------------------------- reading a stored definition
#
# A stored definition passed validate_definition when it was deployed, so these read it as it
# is. What the families build on is still looked at, so that a record no deploy could have
# written (state from other code) is refused with InvalidTransaction, never an internal error.


def is_federated(definition: Mapping) -> bool:
    return "federation" in definition


def _block(definition: Any, name: str) -> Any:
    return definition.get(name) if isinstance(definition, Mapping) else None


def federation(definition: Any) -> Mapping | None:
    """The federation section, or None for a single-node workflow."""
    return _block(definition, "federation")


def train_on(definition: Any, workflow_id: str | None = None) -> str:
    """Where local training runs: "compute" (the default) or "iot"."""
    section = federation(definition)
    value = section.get("train_on", DEFAULT_TRAIN_ON) if isinstance(section, Mapping) else DEFAULT_TRAIN_ON
    if value not in TRAIN_ON:
        raise InvalidTransaction(f"workflow {workflow_id!r}: federation.train_on must be 'compute' or 'iot', got {value!r}")
    return value


def strategy(definition: Any) -> Mapping:
    """The aggregation strategy {name, parameters...}; plain FedAvg where none is named."""
    return _block(definition, "strategy") or {"name": "fedavg"}


def privacy(definition: Any) -> Mapping | None:
    """The differential-privacy block (fl/privacy_block.py), or None."""
    return _block(definition, "privacy")


def secure_aggregation(definition: Any) -> Mapping | None:
    """The secure-aggregation block (fl/secagg_block.py), or None."""
    return _block(definition, "secure_aggregation")


def rewards(definition: Any) -> Mapping | None:
    """The rewards block (fl/rewards_block.py), or None."""
    return _block(definition, "rewards")


def update_checks(definition: Any) -> Mapping:
    """The update checks (fl/screening.py) by name; empty when none are asked for."""
    return _block(definition, "update_checks") or {}


def stored_definition(workflow_id: str, record: Any) -> dict:
    """The definition map of a stored workflow record."""
    if not isinstance(record, dict) or not isinstance(record.get("definition"), dict):
        raise InvalidTransaction(f"workflow {workflow_id!r} is stored without a definition map; redeploy it")
    return record["definition"]


def task_order(workflow_id: str, definition: Any) -> list[dict]:
    """The stored definition's tasks in topological_order (check_tasks refuses a broken graph)."""
    tasks = _block(definition, "tasks")
    if not isinstance(tasks, list) or not tasks:
        raise InvalidTransaction(f"workflow {workflow_id!r} has no task list in its definition; deploy a workflow with tasks")
    try:
        check_tasks(tasks, f"{ROOT}.tasks")
    except DefinitionError as exc:
        raise InvalidTransaction(f"workflow {workflow_id!r} is stored with a broken task graph ({exc}); redeploy it") \
            from None
    return topological_order(tasks)


def participant_group(definition: Any) -> str | None:
    """The participant group a federated definition names (federation.participant_group), or None
    where it lists participant_nodes itself (or is single-node)."""
    section = federation(definition)
    group = section.get("participant_group") if isinstance(section, Mapping) else None
    return group if isinstance(group, str) else None


def federation_config(workflow_id: str, record: Any) -> dict:
    """The federation section of a stored workflow record, as open_round uses it:
    {coordinator, participants, min_nodes_required, round_timeout, rounds}.

    participants: federation.participant_nodes, or where the definition names a participant group,
    the members deploy copied from the group into the record's "participants".
    Each field is held to _check_federation's limits (the record voice of the federation family:
    "... field 'rounds' must be ..."), so a record no deploy could have written is refused."""
    section = federation(stored_definition(workflow_id, record))
    if section is None:
        raise InvalidTransaction(
            f"workflow {workflow_id!r} is a single-node workflow (its definition has no 'federation' "
            f"section); rounds exist only for federated workflows"
        )
    where = f"workflow {workflow_id!r} definition.federation"
    if not isinstance(section, dict):
        raise InvalidTransaction(f"{where} must be a map; redeploy the workflow")
    coordinator = require_match(section, "coordinator_node", PUBLIC_KEY, "a 66-hex public key", where=where)
    if "participant_group" in section:
        listed, limit = f"participant group {str(section['participant_group'])[:80]!r}", MAX_GROUP_MEMBERS
        members = record.get("participants")
        if not isinstance(members, list):
            raise InvalidTransaction(
                f"workflow {workflow_id!r} names {listed} but its record holds no member list "
                f"('participants'); redeploy it"
            )
        where_list, name = f"workflow {workflow_id!r} record", "participants"
    else:
        listed, limit = "participant_nodes", MAX_PARTICIPANTS
        members = require(section, "participant_nodes", list, where=where)
        where_list, name = where, "participant_nodes"
    if not 1 <= len(members) <= limit:
        raise InvalidTransaction(f"{where_list} field {name!r} must list 1 to {limit} node keys")
    for key in members:
        if not isinstance(key, str) or not PUBLIC_KEY.match(key):
            raise InvalidTransaction(f"{where_list} field {name!r} holds {str(key)[:80]!r}, not a 66-hex public key")
    if len(set(members)) != len(members):
        raise InvalidTransaction(f"{where_list} field {name!r} lists a node twice")
    expected = section.get("expected_nodes")
    if isinstance(expected, bool) or not isinstance(expected, int) or expected != len(members):
        raise InvalidTransaction(
            f"{where} field 'expected_nodes' ({str(expected)[:80]}) does not match {listed} "
            f"({len(members)} nodes); every participant is expected in every round"
        )
    if "participant_group" in section and coordinator not in members:
        raise InvalidTransaction(f"{where} field 'coordinator_node' is not a member of {listed}; redeploy the workflow")
    return {
        "coordinator": coordinator,
        "participants": list(members),
        "min_nodes_required": require_int(section, "min_nodes_required", 1, len(members), where=where),
        "round_timeout": require_int(section, "round_timeout", 1, MAX_ROUND_TIMEOUT, where=where),
        "rounds": require_int(section, "rounds", 1, MAX_ROUNDS, where=where),
    }
