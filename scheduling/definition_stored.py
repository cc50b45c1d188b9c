"""Reading a stored workflow definition: the typed accessors every family and node uses.

A stored definition passed validate_definition (definition_checks.py) when it was deployed, so
these read it as it is. What the families build on is still looked at, so that a record no
deploy could have written (state from other code) is refused with InvalidTransaction, never an
internal error. Import these names from definition.py.
"""

from __future__ import annotations

from typing import Any, Mapping

from trustmesh.ledger.processor import InvalidTransaction

from .common import PUBLIC_KEY, require, require_int, require_match
from .definition_checks import (
    DEFAULT_TRAIN_ON, MAX_GROUP_MEMBERS, MAX_PARTICIPANTS, MAX_ROUND_TIMEOUT, MAX_ROUNDS, ROOT, TRAIN_ON,
)
from .definition_fields import DefinitionError
from .definition_tasks import check_tasks, topological_order


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
    Each field is held to the limits of definition_checks._check_federation (in the record voice of
    the federation family: "... field 'rounds' must be ..."), so a record no deploy could have
    written is refused."""
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
