"""The rules of a workflow definition, checked once: validate_definition, its limits and enums.

What a definition holds and why is told in definition.py (import these names from there).
`validate_definition` holds every rule of the published schema (`scheduling/workflow.schema.json`)
plus the ones a schema cannot express (the task graph is acyclic, dependencies exist,
min_nodes_required <= expected_nodes, ...); every limit is named once here. The workflow family
runs it at deploy and update (pure Python, no jsonschema in apply()); clients run it beside the
schema (workflow_schema.check_definition). The checks of single values it is written in:
definition_fields.py; the task graph's: definition_tasks.py.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from trustmesh.fl import privacy_block, rewards_block, screening, secagg_block
from trustmesh.fl import strategies as strategy_registry

from .definition_fields import (
    DefinitionError, a_map, choice, distinct_nodes, fields, identifier, integer, items, node, number, parameters, tagged,
    text,
)
from .definition_tasks import check_tasks, closures, topological_order

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
