"""trustmesh-workflow's processor: deploy and update rules (pure) and the handler around them;
register_group's rules are in workflow_groups.py."""

from __future__ import annotations

from typing import Any, Mapping

from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction, TransactionHandler

from . import events, layout
from . import workflow_groups as groups
from .common import check_fields, emit, parse_payload, read_record, shown, signer_of, write_records
from .definition import participant_group, validate_definition

FAMILY_NAME = layout.WORKFLOW_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.WORKFLOW_NS

ACTIONS = ("deploy", "update", "register_group")
EVENT_DEPLOYED = events.WORKFLOW_DEPLOYED
EVENT_UPDATED = events.WORKFLOW_UPDATED

_FIELDS = {"deploy": ("action", "definition"), "update": ("action", "definition", "expected_version")}


# --------------------------------------------------------------------------- rules (pure)


def parse_request(action: str, body: Mapping) -> tuple[dict, int | None]:
    """(the validated definition, expected_version for an update) from a payload map."""
    where = f"{action} payload"
    check_fields(body, _FIELDS[action], where=where)
    for name in _FIELDS[action]:
        if name not in body:
            raise InvalidTransaction(f"{where} lacks the required field {name!r}")
    definition = validate_definition(body["definition"])
    if action == "deploy":
        return definition, None
    expected = body["expected_version"]
    if isinstance(expected, bool) or not isinstance(expected, int) or expected < 1:
        raise InvalidTransaction(
            f"update payload field 'expected_version' must be an integer >= 1 (the version you "
            f"read); got {shown(expected)}"
        )
    return definition, expected


def _same_workflow(stored: Mapping, workflow_id: str, then: str) -> None:
    if stored.get("workflow_id") != workflow_id:
        raise InvalidTransaction(
            f"the address of workflow {workflow_id!r} holds workflow {stored.get('workflow_id')!r}; {then}"
        )


def deploy(stored: Mapping | None, definition: dict, signer: str) -> dict:
    """The new record: the workflow id must be free; the signer owns version 1."""
    workflow_id = definition["workflow_id"]
    if stored is not None:
        _same_workflow(stored, workflow_id, "choose another workflow_id")
        raise InvalidTransaction(
            f"workflow {workflow_id!r} is already deployed (version {stored.get('version')}, owner "
            f"{stored.get('owner')}); use update with expected_version, or choose another workflow_id"
        )
    return {"workflow_id": workflow_id, "owner": signer, "version": 1, "definition": definition}


def update(stored: Mapping | None, definition: dict, signer: str, expected: int) -> dict:
    """The replaced record: only its owner, and only from the version it read (optimistic concurrency)."""
    workflow_id = definition["workflow_id"]
    if stored is None:
        raise InvalidTransaction(f"workflow {workflow_id!r} is not deployed; deploy it first")
    _same_workflow(stored, workflow_id, "the workflow_id must match the stored one")
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
    return {"workflow_id": workflow_id, "owner": owner, "version": version + 1, "definition": definition}


# --------------------------------------------------------------------------- handler


class WorkflowHandler(TransactionHandler):
    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, body = parse_payload(transaction, ACTIONS)
        signer = signer_of(transaction)
        if action == "register_group":
            await self._register_group(body, signer, context)
            return
        definition, expected = parse_request(action, body)
        address = layout.workflow_address(definition["workflow_id"])
        stored: Any = await read_record(context, address)
        if action == "deploy":
            record, event = deploy(stored, definition, signer), EVENT_DEPLOYED
        else:
            record, event = update(stored, definition, signer, expected), EVENT_UPDATED
        group_id = participant_group(definition)
        if group_id is not None:
            # the group's members go into the record: open_round and the readers take them from there
            group = await _read_group(context, record["owner"], group_id, action)
            record["participants"] = groups.group_participants(definition, group, record["owner"])
        await write_records(context, {address: record})
        await emit(context, event, workflow_id=record["workflow_id"], version=record["version"], owner=record["owner"])

    async def _register_group(self, body: Mapping, signer: str, context) -> None:
        group_id, members, part, parts = groups.register_request(body)
        address = layout.participant_group_address(signer, group_id)
        stored = await read_record(context, address)
        await write_records(context, {address: groups.register_part(stored, group_id, members, part, parts, signer)})


async def _read_group(context, owner: str, group_id: str, action: str) -> dict | None:
    address = layout.participant_group_address(owner, group_id)
    try:
        return await read_record(context, address)
    except AuthorizationError:
        raise InvalidTransaction(
            f"this {action} names participant group {group_id!r}: list its address {address} "
            f"(layout.participant_group_address(owner, group_id)) in the transaction's inputs "
            f"(make_{action}_transaction does)"
        ) from None
