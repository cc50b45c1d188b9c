"""trustmesh-workflow 1.0: the registry of workflow definitions.

A workflow definition (what `workflows/*.json` hold; the same map goes on chain, CBOR-encoded)
says which tasks run in which order, which model with which hyperparameters, how the data is
split and, for a federated workflow, which nodes take part. Its published JSON Schema is
`scheduling/workflow.schema.json` (draft 2020-12); `validate_definition` below holds every rule
of that schema plus the ones a schema cannot express (the task graph is acyclic, dependencies
exist, min_nodes_required <= expected_nodes, ...). The processor runs `validate_definition`
only (pure Python, no jsonschema in apply()); clients run both (`check_definition`).

Definition (unknown fields are refused at every level, so a typo never passes silently):

    workflow_id      identifier ([A-Za-z0-9][A-Za-z0-9._-]{0,63})
    name             1..128 characters, not blank;  description  optional, <= 4096 characters
    tasks            1..64 of {id: identifier, kind: local_train|aggregate|evaluate|preprocess,
                     depends_on: [task ids]}: unique ids, known dependencies, no cycle
    model            {type: "mlp", input_dim, hidden: [ints], num_classes}; `type` is an open
                     enum: a new type adds an entry to MODEL_CHECKS and a branch to the schema
    hyperparameters  {epochs, batch_size, learning_rate > 0, optimizer: sgd|adam, seed}
    strategy         {name: "fedavg"} | {name: "perf_fedavg", alpha in [0, 1]}
    data             {dataset: digits|npz, partition: {kind: iid, seed} |
                     {kind: dirichlet, alpha > 0, seed}, test_fraction in (0, 1)}
    federation       {coordinator_node, participant_nodes, expected_nodes, min_nodes_required,
                     round_timeout (whole seconds), rounds, train_on: compute|iot (optional,
                     default "compute": where local training runs)}

Federated vs single-node: with `federation` the workflow needs `strategy` and
`data.partition`, a local_train task, an aggregate task that depends (directly or through other
tasks) on a local_train, and an evaluate task. Without it (single-node) it needs a local_train
task and may not hold an aggregate task; `strategy` and `data.partition` may be left out (they
are checked when present).

The coordinator is one of the participants: it is an IoT node with data of its own that also
opens each round, so `participant_nodes` is exactly the set of nodes that may submit,
`expected_nodes == len(participant_nodes)` and nobody is counted twice.

Node identities on chain are compressed secp256k1 public keys (66 lowercase hex, a point on
the curve). Files may name nodes instead ("iot-1"); `resolve_node_names` maps names to keys
before deploying and the processor refuses names with a message saying so.

Numbers: integers must be integers (5, not 5.0; never booleans); NaN and infinities are refused.
Canonical CBOR keeps floats exact, so the stored definition equals the submitted one.

Payloads (canonical CBOR maps):

    {"action": "deploy", "definition": {...}}
    {"action": "update", "definition": {...}, "expected_version": int}

"deploy" creates the workflow (its id must be free); the signer becomes its owner, version 1.
"update" replaces the definition: only the owner may, and expected_version must equal the
stored version (optimistic concurrency: a stale writer is refused, not merged); version + 1.

State, at `layout.workflow_address(workflow_id)`:

    {"workflow_id", "owner": signer public key, "version": int >= 1, "definition": {...}}

Events "trustmesh/workflow-deployed" and "trustmesh/workflow-updated", attributes
workflow_id, version, owner. Transaction inputs and outputs: the workflow address only.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import re
from importlib import resources
from typing import Any, Callable, Mapping

from trustmesh.fl import privacy_block, screening, secagg_block
from trustmesh.fl import strategies as strategy_registry
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction
from trustmesh.ledger.processor import InvalidTransaction, TransactionHandler
from trustmesh.ledger.signing import PublicKey, SigningError

from . import events, layout
from .common import IDENTIFIER, PUBLIC_KEY, emit, parse_payload, read_record, shown, signer_of, write_records

FAMILY_NAME = layout.WORKFLOW_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.WORKFLOW_NS

ACTIONS = ("deploy", "update")
EVENT_DEPLOYED = events.WORKFLOW_DEPLOYED
EVENT_UPDATED = events.WORKFLOW_UPDATED
SCHEMA_FILE = "workflow.schema.json"

TASK_KINDS = ("local_train", "aggregate", "evaluate", "preprocess")
OPTIMIZERS = ("sgd", "adam")
STRATEGIES = tuple(sorted(strategy_registry.STRATEGIES))  # names and parameters come from fl/strategies/
DATASETS = ("digits", "npz")
PARTITIONS = ("iid", "dirichlet")
TRAIN_ON = ("compute", "iot")
DEFAULT_TRAIN_ON = "compute"

# Bounds; scheduling/workflow.schema.json states the same ones (tests check they agree).
MAX_NAME = 128
MAX_DESCRIPTION = 4096
MAX_TASKS = 64
MAX_INPUT_DIM = 1_000_000
MAX_HIDDEN_LAYERS = 16
MAX_LAYER_WIDTH = 65_536
MAX_CLASSES = 100_000
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65_536
MAX_SEED = 2**32 - 1          # what numpy and torch both take
MAX_PARTICIPANTS = 512        # ~35 KB of keys, inside the 64 KiB payload limit
MAX_ROUND_TIMEOUT = 7 * 24 * 3600
MAX_ROUNDS = 10_000

_ROOT = "definition"


class DefinitionError(InvalidTransaction):
    """A workflow definition that breaks a rule; the message names the field and what to do.

    An InvalidTransaction, so the processor lets it through as is; clients catch it by name.
    """


# --------------------------------------------------------------------------- field checks


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "an integer", float: "a number", dict: "a map", list: "a list",
             bytes: "bytes", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _fields(value: Any, path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """A map with exactly the allowed string keys and every required one."""
    if not isinstance(value, dict):
        raise DefinitionError(f"{path} must be a map, got {_type_name(value)}")
    allowed = required + optional
    unknown = [k for k in value if k not in allowed]
    if unknown:
        listed = ", ".join(sorted(shown(k) for k in unknown))
        raise DefinitionError(
            f"{path} has unknown field(s) {listed}; allowed: {', '.join(allowed)}"
        )
    for name in required:
        if name not in value:
            raise DefinitionError(f"{path} lacks the required field {name!r}")
    return value


def _int(value: Any, path: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        hint = " (write it without a fraction)" if isinstance(value, float) and math.isfinite(value) \
            and value == int(value) else ""
        raise DefinitionError(f"{path} must be an integer, got {_type_name(value)}{hint}")
    if not low <= value <= high:
        raise DefinitionError(f"{path} must be between {low} and {high}; got {shown(value)}")
    return value


def _number(value: Any, path: str, *, above: float | None = None, low: float | None = None,
            high: float | None = None, below: float | None = None) -> float:
    """A finite int or float; above/below are exclusive bounds, low/high inclusive."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DefinitionError(f"{path} must be a number, got {_type_name(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DefinitionError(f"{path} must be a finite number; got {shown(value)} (NaN and infinities are refused)")
    if above is not None and not value > above:
        raise DefinitionError(f"{path} must be greater than {above}; got {shown(value)}")
    if low is not None and not value >= low:
        raise DefinitionError(f"{path} must be at least {low}; got {shown(value)}")
    if high is not None and not value <= high:
        raise DefinitionError(f"{path} must be at most {high}; got {shown(value)}")
    if below is not None and not value < below:
        raise DefinitionError(f"{path} must be less than {below}; got {shown(value)}")
    return value


def _str(value: Any, path: str, max_length: int, *, blank_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{path} must be a string, got {_type_name(value)}")
    if len(value) > max_length:
        raise DefinitionError(f"{path} is {len(value)} characters long; the limit is {max_length}")
    if not blank_ok and not value.strip():
        raise DefinitionError(f"{path} must not be empty or blank")
    return value


def _choice(value: Any, path: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise DefinitionError(f"{path} must be one of {', '.join(choices)}; got {shown(value)}")
    return value


def _identifier(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{path} must be a string, got {_type_name(value)}")
    if not IDENTIFIER.match(value):
        raise DefinitionError(
            f"{path} must be an identifier (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or "
            f"digit); got {shown(value)}"
        )
    return value


def _list(value: Any, path: str, low: int, high: int) -> list:
    if not isinstance(value, list):
        raise DefinitionError(f"{path} must be a list, got {_type_name(value)}")
    if not low <= len(value) <= high:
        raise DefinitionError(f"{path} must hold between {low} and {high} items; it holds {len(value)}")
    return value


def _node(value: Any, path: str, allow_names: bool) -> str:
    if not isinstance(value, str):
        raise DefinitionError(f"{path} must be a string, got {_type_name(value)}")
    if PUBLIC_KEY.match(value):
        try:
            PublicKey.from_hex(value)
        except SigningError:
            raise DefinitionError(
                f"{path} is not a valid public key: {value} is not a point on secp256k1"
            ) from None
        return value
    if IDENTIFIER.match(value):
        if allow_names:
            return value
        raise DefinitionError(
            f"{path} is {value!r}, a node name: on chain a node is its compressed secp256k1 public "
            f"key (66 hex characters starting 02 or 03); resolve names to keys before deploying "
            f"(resolve_node_names, as `trustmesh workflow deploy` does)"
        )
    raise DefinitionError(
        f"{path} must be a compressed secp256k1 public key (66 lowercase hex characters starting "
        f"02 or 03){' or a node name' if allow_names else ''}; got {shown(value)}"
    )


# --------------------------------------------------------------------------- sections


def _check_tasks(tasks: Any, path: str) -> list[dict]:
    _list(tasks, path, 1, MAX_TASKS)
    where: dict[str, int] = {}
    for i, task in enumerate(tasks):
        tpath = f"{path}[{i}]"
        _fields(task, tpath, ("id", "kind", "depends_on"))
        task_id = _identifier(task["id"], f"{tpath}.id")
        _choice(task["kind"], f"{tpath}.kind", TASK_KINDS)
        deps = _list(task["depends_on"], f"{tpath}.depends_on", 0, MAX_TASKS)
        seen: set[str] = set()
        for j, dep in enumerate(deps):
            _identifier(dep, f"{tpath}.depends_on[{j}]")
            if dep in seen:
                raise DefinitionError(f"{tpath}.depends_on lists {dep!r} twice; name each dependency once")
            seen.add(dep)
        if task_id in where:
            raise DefinitionError(
                f"{tpath}.id {task_id!r} is already the id of {path}[{where[task_id]}]; task ids must be unique"
            )
        where[task_id] = i
    for i, task in enumerate(tasks):
        for dep in task["depends_on"]:
            if dep not in where:
                raise DefinitionError(
                    f"{path}[{i}] ({task['id']!r}) depends on unknown task {dep!r}; "
                    f"known tasks: {', '.join(sorted(where))}"
                )
    cycle = _find_cycle(tasks)
    if cycle:
        raise DefinitionError(
            f"{path} form a cycle: {' -> '.join(cycle)}; the tasks must form a DAG "
            f"(a task may not depend on itself, directly or through others)"
        )
    return tasks


def _find_cycle(tasks: list[dict]) -> list[str] | None:
    """The first dependency cycle in list order, as a closed path of task ids, or None."""
    deps = {t["id"]: t["depends_on"] for t in tasks}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in deps:
        if root in state:
            continue
        path = [root]
        iters = [iter(deps[root])]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def _ancestors(tasks: list[dict], task_id: str) -> set[str]:
    deps = {t["id"]: t["depends_on"] for t in tasks}
    found: set[str] = set()
    todo = list(deps[task_id])
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(deps[current])
    return found


def _check_mlp(model: dict, path: str) -> None:
    _fields(model, path, ("type", "input_dim", "hidden", "num_classes"))
    _int(model["input_dim"], f"{path}.input_dim", 1, MAX_INPUT_DIM)
    hidden = _list(model["hidden"], f"{path}.hidden", 0, MAX_HIDDEN_LAYERS)
    for i, width in enumerate(hidden):
        _int(width, f"{path}.hidden[{i}]", 1, MAX_LAYER_WIDTH)
    _int(model["num_classes"], f"{path}.num_classes", 2, MAX_CLASSES)


# Model types: the open enum. A new type adds its check here and a branch to the schema.
MODEL_CHECKS: dict[str, Callable[[dict, str], None]] = {"mlp": _check_mlp}


def _check_model(model: Any, path: str) -> None:
    if not isinstance(model, dict):
        raise DefinitionError(f"{path} must be a map, got {_type_name(model)}")
    if "type" not in model:
        raise DefinitionError(f"{path} lacks the required field 'type'")
    kind = _choice(model["type"], f"{path}.type", tuple(MODEL_CHECKS))
    MODEL_CHECKS[kind](model, path)


def _check_hyperparameters(hp: Any, path: str) -> None:
    _fields(hp, path, ("epochs", "batch_size", "learning_rate", "optimizer", "seed"))
    _int(hp["epochs"], f"{path}.epochs", 1, MAX_EPOCHS)
    _int(hp["batch_size"], f"{path}.batch_size", 1, MAX_BATCH_SIZE)
    _number(hp["learning_rate"], f"{path}.learning_rate", above=0)
    _choice(hp["optimizer"], f"{path}.optimizer", OPTIMIZERS)
    _int(hp["seed"], f"{path}.seed", 0, MAX_SEED)


def _check_strategy(strategy: Any, path: str) -> None:
    if not isinstance(strategy, dict):
        raise DefinitionError(f"{path} must be a map, got {_type_name(strategy)}")
    if "name" not in strategy:
        raise DefinitionError(f"{path} lacks the required field 'name'")
    name = _choice(strategy["name"], f"{path}.name", tuple(sorted(strategy_registry.STRATEGIES)))
    _check_parameters(strategy, path, strategy_registry.STRATEGIES[name].parameters, ("name",))


def _check_privacy(block: Any, path: str, definition: Mapping) -> None:
    """fl/privacy_block.py: its choice and number fields, then the rules across fields."""
    if not isinstance(block, dict):
        raise DefinitionError(f"{path} must be a map, got {_type_name(block)}")
    choices, numbers = privacy_block.fields(block)
    _check_parameters(block, path, numbers, choices)
    for name in choices:
        _choice(block[name], f"{path}.{name}", privacy_block.CHOICES[name])
    problem = privacy_block.problem(block, definition)
    if problem is not None:
        raise DefinitionError(f"{path}: {problem}")


def _check_secure_aggregation(block: Any, path: str, definition: Mapping) -> None:
    """fl/secagg_block.py: protocol, threshold, neighbours, then the rules across the definition."""
    if not isinstance(block, dict):
        raise DefinitionError(f"{path} must be a map, got {_type_name(block)}")
    _check_parameters(block, path, secagg_block.NUMBERS, ("protocol",))
    _choice(block["protocol"], f"{path}.protocol", secagg_block.PROTOCOLS)
    problem = secagg_block.problem(block, definition)
    if problem is not None:
        raise DefinitionError(f"{path}: {problem}")


def _check_parameters(value: Any, path: str, parameters: Mapping, also: tuple[str, ...]) -> None:
    """A map of `parameters` (name -> Number or Integer bounds, from the registry that owns them):
    with `also` (checked by the caller), required ones when `also` names a choice, else optional."""
    required = (*also, *parameters) if also else ()
    _fields(value, path, required, () if also else tuple(parameters))
    for parameter, bounds in parameters.items():
        if parameter not in value:
            continue
        if bounds.kind == "integer":
            _int(value[parameter], f"{path}.{parameter}", bounds.low, bounds.high)
        else:
            _number(value[parameter], f"{path}.{parameter}", low=bounds.low, high=bounds.high)


def _check_data(data: Any, path: str) -> None:
    _fields(data, path, ("dataset", "test_fraction"), ("partition",))
    _choice(data["dataset"], f"{path}.dataset", DATASETS)
    if "partition" in data:
        ppath = f"{path}.partition"
        partition = data["partition"]
        if not isinstance(partition, dict):
            raise DefinitionError(f"{ppath} must be a map, got {_type_name(partition)}")
        if "kind" not in partition:
            raise DefinitionError(f"{ppath} lacks the required field 'kind'")
        kind = _choice(partition["kind"], f"{ppath}.kind", PARTITIONS)
        if kind == "dirichlet":
            _fields(partition, ppath, ("kind", "alpha", "seed"))
            _number(partition["alpha"], f"{ppath}.alpha", above=0)
        else:
            _fields(partition, ppath, ("kind", "seed"))
        _int(partition["seed"], f"{ppath}.seed", 0, MAX_SEED)
    _number(data["test_fraction"], f"{path}.test_fraction", above=0, below=1)


def _check_federation(fed: Any, path: str, allow_names: bool) -> None:
    _fields(fed, path, ("coordinator_node", "participant_nodes", "expected_nodes", "min_nodes_required",
                        "round_timeout", "rounds"), ("train_on",))
    coordinator = _node(fed["coordinator_node"], f"{path}.coordinator_node", allow_names)
    participants = _list(fed["participant_nodes"], f"{path}.participant_nodes", 1, MAX_PARTICIPANTS)
    first: dict[str, int] = {}
    for i, node in enumerate(participants):
        _node(node, f"{path}.participant_nodes[{i}]", allow_names)
        if node in first:
            raise DefinitionError(
                f"{path}.participant_nodes lists {node} twice (items {first[node]} and {i}); "
                f"list each participant once"
            )
        first[node] = i
    expected = _int(fed["expected_nodes"], f"{path}.expected_nodes", 1, MAX_PARTICIPANTS)
    if expected != len(participants):
        raise DefinitionError(
            f"{path}.expected_nodes is {expected} but participant_nodes lists {len(participants)} "
            f"node(s); they must be equal"
        )
    minimum = _int(fed["min_nodes_required"], f"{path}.min_nodes_required", 1, MAX_PARTICIPANTS)
    if minimum > expected:
        raise DefinitionError(
            f"{path}.min_nodes_required ({minimum}) must be between 1 and expected_nodes ({expected})"
        )
    if coordinator not in first:
        raise DefinitionError(
            f"{path}.coordinator_node {coordinator} is not one of participant_nodes; the coordinator "
            f"contributes data too, so list it among the participants"
        )
    _int(fed["round_timeout"], f"{path}.round_timeout", 1, MAX_ROUND_TIMEOUT)
    _int(fed["rounds"], f"{path}.rounds", 1, MAX_ROUNDS)
    if "train_on" in fed:
        _choice(fed["train_on"], f"{path}.train_on", TRAIN_ON)


def validate_definition(definition: Any, *, allow_node_names: bool = False) -> dict:
    """Every rule of a workflow definition, pure Python; returns it unchanged or raises DefinitionError.

    The processor calls it with allow_node_names=False (nodes must be public keys); a client
    checking a file before `resolve_node_names` passes True.
    """
    root = _ROOT
    _fields(definition, root, ("workflow_id", "name", "tasks", "model", "hyperparameters", "data"),
            ("description", "strategy", "update_checks", "privacy", "secure_aggregation", "federation"))
    _identifier(definition["workflow_id"], f"{root}.workflow_id")
    _str(definition["name"], f"{root}.name", MAX_NAME)
    if "description" in definition:
        _str(definition["description"], f"{root}.description", MAX_DESCRIPTION, blank_ok=True)
    tasks = _check_tasks(definition["tasks"], f"{root}.tasks")
    _check_model(definition["model"], f"{root}.model")
    _check_hyperparameters(definition["hyperparameters"], f"{root}.hyperparameters")
    if "strategy" in definition:
        _check_strategy(definition["strategy"], f"{root}.strategy")
    if "update_checks" in definition:
        _check_parameters(definition["update_checks"], f"{root}.update_checks", screening.PARAMETERS, ())
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
    return definition


def _check_shape(definition: dict, tasks: list[dict], federated: bool) -> None:
    """What a federated or single-node workflow must hold."""
    root = _ROOT
    kinds = [t["kind"] for t in tasks]
    if federated:
        if "strategy" not in definition:
            raise DefinitionError(f"{root} lacks the required field 'strategy' (a federated workflow needs one)")
        if "partition" not in definition["data"]:
            raise DefinitionError(
                f"{root}.data lacks the required field 'partition' (a federated workflow splits the data)"
            )
        if "local_train" not in kinds:
            raise DefinitionError(f"{root}.tasks: a federated workflow needs a local_train task")
        aggregates = [t for t in tasks if t["kind"] == "aggregate"]
        if not aggregates:
            raise DefinitionError(f"{root}.tasks: a federated workflow needs an aggregate task")
        trains = {t["id"] for t in tasks if t["kind"] == "local_train"}
        if not any(_ancestors(tasks, a["id"]) & trains for a in aggregates):
            raise DefinitionError(
                f"{root}.tasks: an aggregate task must depend (directly or through other tasks) on a "
                f"local_train task; none does"
            )
        if "evaluate" not in kinds:
            raise DefinitionError(f"{root}.tasks: a federated workflow needs an evaluate task")
        strategy = definition["strategy"]
        problem = strategy_registry.STRATEGIES[strategy["name"]].federation_problem(strategy, definition["federation"])
        if problem is not None:
            raise DefinitionError(f"{root}.strategy {strategy['name']!r}: {problem}")
    else:
        if "local_train" not in kinds:
            raise DefinitionError(f"{root}.tasks: a workflow needs a local_train task")
        if "aggregate" in kinds:
            i = kinds.index("aggregate")
            raise DefinitionError(
                f"{root}.tasks[{i}] is an aggregate task but the workflow has no federation: "
                f"add a federation section or drop the task"
            )


def train_on(definition: Mapping) -> str:
    """Where local training runs: "compute" (default) or "iot"."""
    return definition.get("federation", {}).get("train_on", DEFAULT_TRAIN_ON)


def is_federated(definition: Mapping) -> bool:
    return "federation" in definition


# --------------------------------------------------------------------------- client side


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows; workflow numbers must be finite")


def parse_definition(text: str | bytes, *, source: str = "definition") -> dict:
    """Parse JSON text strictly: no NaN/Infinity, no duplicate keys. DefinitionError otherwise."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _DuplicateKey as exc:
        raise DefinitionError(f"{source}: the key {exc.args[0]!r} appears twice in one object") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"{source} is not valid JSON: {exc}") from None


def load_definition(path: str | os.PathLike) -> dict:
    """A workflow definition from a JSON file (parsed strictly; not yet validated)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except OSError as exc:
        raise DefinitionError(f"cannot read {os.fspath(path)}: {exc.strerror}") from None
    return parse_definition(text, source=os.fspath(path))


@functools.lru_cache(maxsize=1)
def load_schema() -> dict:
    """The published JSON Schema (scheduling/workflow.schema.json) with its `strategy`
    definition made from the strategy registry (fl/strategies/), as `trustmesh workflow schema`
    prints it."""
    schema = json.loads(resources.files(__package__).joinpath(SCHEMA_FILE).read_text(encoding="utf-8"))
    schema["$defs"]["strategy"] = strategy_registry.schema_of_strategies()
    schema["$defs"]["privacy"] = privacy_block.schema()
    schema["$defs"]["secure_aggregation"] = secagg_block.schema()
    schema["$defs"]["update_checks"] = {
        "type": "object", "additionalProperties": False,
        "properties": {name: bounds.schema() for name, bounds in screening.PARAMETERS.items()}}
    return schema


@functools.lru_cache(maxsize=1)
def _schema_validator():
    import jsonschema
    from jsonschema import validators

    base = jsonschema.Draft202012Validator
    # JSON integers are whole numbers written without a fraction, as the processor sees them in
    # CBOR (5.0 would arrive as a float); bool is never a number.
    checker = base.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)
    )

    def pattern(validator, patrn, instance, schema):
        # ECMA-262 semantics, which JSON Schema specifies: "$" ends the string (Python's "$"
        # would also match before a final newline).
        if validator.is_type(instance, "string"):
            python = patrn[:-1] + r"\Z" if patrn.endswith("$") and not patrn.endswith(r"\$") else patrn
            if not re.search(python, instance):
                yield jsonschema.ValidationError(f"{instance!r} does not match {patrn!r}")

    cls = validators.extend(base, validators={"pattern": pattern}, type_checker=checker)
    schema = load_schema()
    base.check_schema(schema)
    return cls(schema)


def _json_path(parts) -> str:
    text = _ROOT
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


IDENTIFIER_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # common.IDENTIFIER, as the schema writes it
_GENERIC_LAST = {"contains": 1, "not": 1}  # whole-list rules after the specific ones


def _schema_message(error) -> str:
    """jsonschema's message, made specific where it would only repeat the whole instance."""
    if error.validator == "contains":
        kind = error.validator_value.get("$ref", "").rsplit("/", 1)[-1].removesuffix("_task")
        why = "a federated workflow needs local_train, aggregate and evaluate tasks" \
            if "then" in error.schema_path else "every workflow needs one"
        return f"has no {kind} task ({why})"
    if error.validator == "pattern" and error.validator_value == "\\S":
        return "must not be empty or blank"
    if error.validator == "pattern" and error.validator_value == IDENTIFIER_PATTERN:
        return (f"{shown(error.instance)} is not an identifier (1-64 of A-Z a-z 0-9 . _ -, starting "
                f"with a letter or digit)")
    if error.validator == "not":
        return "holds an aggregate task, which needs a federation (add one or drop the task)"
    if error.validator == "anyOf" and error.validator_value == [{"$ref": "#/$defs/public_key"},
                                                                  {"$ref": "#/$defs/identifier"}]:
        return (f"{shown(error.instance)} is neither a compressed secp256k1 public key (66 lowercase hex "
                f"characters starting 02 or 03) nor a node name")
    if error.validator == "uniqueItems":
        seen: list = []
        for item in error.instance:
            if item in seen:
                return f"lists {shown(item)} more than once"
            seen.append(item)
    message = error.message
    return message if len(message) <= 200 else message[:197] + "..."


def schema_errors(definition: Any) -> list[str]:
    """Every way `definition` breaks the JSON Schema, as "path: reason" lines, most specific first."""
    errors = sorted(_schema_validator().iter_errors(definition),
                    key=lambda e: (-len(e.absolute_path), _GENERIC_LAST.get(e.validator, 0),
                                   list(map(str, e.absolute_path)), e.message))
    return [f"{_json_path(e.absolute_path)}: {_schema_message(e)}" for e in errors]


def check_definition(definition: Any, *, allow_node_names: bool = False) -> dict:
    """The client's full check: the JSON Schema first, then every rule the processor applies."""
    problems = schema_errors(definition)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DefinitionError(f"workflow definition does not match {SCHEMA_FILE}: {problems[0]}{more}")
    return validate_definition(definition, allow_node_names=allow_node_names)


def node_names(definition: Mapping) -> list[str]:
    """The node names (not keys) a definition uses, in order of first appearance."""
    fed = definition.get("federation")
    if not isinstance(fed, Mapping):
        return []
    names: list[str] = []
    nodes = [fed.get("coordinator_node")] + list(fed.get("participant_nodes") or [])
    for node in nodes:
        if isinstance(node, str) and not PUBLIC_KEY.match(node) and node not in names:
            names.append(node)
    return names


def resolve_node_names(definition: Mapping, keys: Mapping[str, str]) -> dict:
    """A copy of `definition` with every node name replaced by its public key from `keys`.

    Entries that already are public keys stay as they are. A name missing from `keys` raises
    DefinitionError naming it; the result is not otherwise validated (validate_definition does).
    """
    result = copy.deepcopy(dict(definition))
    fed = result.get("federation")
    if not isinstance(fed, dict):
        return result

    def resolve(node: Any, path: str) -> Any:
        if not isinstance(node, str) or PUBLIC_KEY.match(node):
            return node
        if node not in keys:
            known = ", ".join(sorted(keys)) or "none"
            raise DefinitionError(f"{path}: no public key known for node {node!r} (known: {known})")
        key = keys[node]
        if not isinstance(key, str) or not PUBLIC_KEY.match(key):
            raise DefinitionError(
                f"{path}: the key given for node {node!r} is not a compressed public key in hex: {shown(key)}"
            )
        return key

    if "coordinator_node" in fed:
        fed["coordinator_node"] = resolve(fed["coordinator_node"], f"{_ROOT}.federation.coordinator_node")
    if isinstance(fed.get("participant_nodes"), list):
        fed["participant_nodes"] = [
            resolve(node, f"{_ROOT}.federation.participant_nodes[{i}]")
            for i, node in enumerate(fed["participant_nodes"])
        ]
    return result


def _workflow_id_of(definition: Any) -> str:
    if not isinstance(definition, Mapping) or not isinstance(definition.get("workflow_id"), str) \
            or not IDENTIFIER.match(definition["workflow_id"]):
        raise DefinitionError(f"{_ROOT}.workflow_id must be an identifier to address the workflow")
    return definition["workflow_id"]


def deploy_payload(definition: Mapping) -> bytes:
    return cbor.encode({"action": "deploy", "definition": definition})


def update_payload(definition: Mapping, expected_version: int) -> bytes:
    return cbor.encode({"action": "update", "definition": definition, "expected_version": expected_version})


def make_deploy_transaction(signer, definition: Mapping, *, check: bool = True, **kwargs):
    """A signed deploy transaction (inputs = outputs = the workflow address).

    check=True runs check_definition (schema + processor rules, keys only) first, so a bad
    definition fails here instead of on chain. kwargs go to builders.make_transaction.
    """
    if check:
        check_definition(definition)
    address = layout.workflow_address(_workflow_id_of(definition))
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, deploy_payload(definition),
                            [address], [address], **kwargs)


def make_update_transaction(signer, definition: Mapping, expected_version: int, *, check: bool = True, **kwargs):
    """A signed update transaction replacing the definition stored at `expected_version`."""
    if check:
        check_definition(definition)
    address = layout.workflow_address(_workflow_id_of(definition))
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, update_payload(definition, expected_version),
                            [address], [address], **kwargs)


def decode_record(data: bytes) -> dict:
    """The state record {"workflow_id", "owner", "version", "definition"} from its bytes."""
    return cbor.decode(data, max_bytes=10 * 1024 * 1024)


async def read_workflow(context, workflow_id: str) -> dict | None:
    """For other handlers: the workflow record, or None. Declare workflow_address(id) as an input."""
    return await read_record(context, layout.workflow_address(workflow_id))


# --------------------------------------------------------------------------- processor


_DEPLOY_FIELDS = ("action", "definition")
_UPDATE_FIELDS = ("action", "definition", "expected_version")


class WorkflowHandler(TransactionHandler):
    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, body = parse_payload(transaction, ACTIONS)
        fields = _DEPLOY_FIELDS if action == "deploy" else _UPDATE_FIELDS
        _fields(body, f"{action} payload", fields)
        definition = validate_definition(body["definition"])
        workflow_id = definition["workflow_id"]
        signer = signer_of(transaction)
        address = layout.workflow_address(workflow_id)
        if action == "deploy":
            await self._deploy(context, address, workflow_id, definition, signer)
        else:
            expected = body["expected_version"]
            if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
                raise InvalidTransaction(
                    f"update payload field 'expected_version' must be an integer >= 1 (the version you "
                    f"read); got {shown(expected)}"
                )
            await self._update(context, address, workflow_id, definition, signer, expected)

    async def _deploy(self, context, address, workflow_id, definition, signer) -> None:
        stored = await read_record(context, address)
        if stored is not None:
            if stored.get("workflow_id") != workflow_id:
                raise InvalidTransaction(
                    f"the address of workflow {workflow_id!r} holds workflow {stored.get('workflow_id')!r}; "
                    f"choose another workflow_id"
                )
            raise InvalidTransaction(
                f"workflow {workflow_id!r} is already deployed (version {stored.get('version')}, owner "
                f"{stored.get('owner')}); use update with expected_version, or choose another workflow_id"
            )
        record = {"workflow_id": workflow_id, "owner": signer, "version": 1, "definition": definition}
        await write_records(context, {address: record})
        await emit(context, EVENT_DEPLOYED, workflow_id=workflow_id, version=1, owner=signer)

    async def _update(self, context, address, workflow_id, definition, signer, expected) -> None:
        stored = await read_record(context, address)
        if stored is None:
            raise InvalidTransaction(f"workflow {workflow_id!r} is not deployed; deploy it first")
        if stored.get("workflow_id") != workflow_id:
            raise InvalidTransaction(
                f"the address of workflow {workflow_id!r} holds workflow {stored.get('workflow_id')!r}; "
                f"the workflow_id must match the stored one"
            )
        owner = stored.get("owner")
        if signer != owner:
            raise InvalidTransaction(
                f"only the owner of workflow {workflow_id!r} ({owner}) may update it; this transaction "
                f"is signed by {signer}"
            )
        version = stored.get("version")
        if expected != version:
            raise InvalidTransaction(
                f"expected_version {shown(expected)} does not match the stored version {version} of workflow "
                f"{workflow_id!r} (it changed since you read it, or the number is wrong); read it again, "
                f"re-apply your change and send expected_version {version}"
            )
        new_version = version + 1
        record = {"workflow_id": workflow_id, "owner": owner, "version": new_version, "definition": definition}
        await write_records(context, {address: record})
        await emit(context, EVENT_UPDATED, workflow_id=workflow_id, version=new_version, owner=owner)
