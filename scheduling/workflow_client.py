"""trustmesh-workflow on the client: node names to keys, payloads, signed transactions, decoding,
and participant groups (a federation larger than MAX_PARTICIPANTS: workflow_groups.py)."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction

from . import layout
from . import workflow_groups as groups
from .common import IDENTIFIER, MAX_RECORD_BYTES, PUBLIC_KEY, shown
from .definition import MAX_PARTICIPANTS, ROOT, DefinitionError, participant_group
from .workflow_schema import check_definition


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
        fed["coordinator_node"] = resolve(fed["coordinator_node"], f"{ROOT}.federation.coordinator_node")
    if isinstance(fed.get("participant_nodes"), list):
        fed["participant_nodes"] = [
            resolve(node, f"{ROOT}.federation.participant_nodes[{i}]")
            for i, node in enumerate(fed["participant_nodes"])
        ]
    return result


def deploy_payload(definition: Mapping) -> bytes:
    return cbor.encode({"action": "deploy", "definition": definition})


def update_payload(definition: Mapping, expected_version: int) -> bytes:
    return cbor.encode({"action": "update", "definition": definition, "expected_version": expected_version})


def _transaction(signer, definition: Mapping, payload: Callable[[], bytes], check: bool, kwargs: dict):
    """Signed, with inputs = outputs = the workflow's address (inputs also the signer's participant
    group the definition names, if any); check_definition first if asked."""
    if check:
        check_definition(definition)
    workflow_id = definition.get("workflow_id") if isinstance(definition, Mapping) else None
    if not isinstance(workflow_id, str) or not IDENTIFIER.match(workflow_id):
        raise DefinitionError(f"{ROOT}.workflow_id must be an identifier to address the workflow")
    address = layout.workflow_address(workflow_id)
    inputs = [address]
    group_id = participant_group(definition)
    if group_id is not None:
        inputs.append(layout.participant_group_address(signer.public_key().as_hex(), group_id))
    return make_transaction(signer, layout.WORKFLOW_FAMILY, layout.VERSION, payload(), inputs, [address], **kwargs)


def make_deploy_transaction(signer, definition: Mapping, *, check: bool = True, **kwargs):
    """A signed deploy transaction (inputs = outputs = the workflow address; a definition naming a
    participant group also reads the signer's group of that id, which must be complete).

    check=True runs check_definition (schema + processor rules, keys only) first, so a bad
    definition fails here instead of on chain. kwargs go to builders.make_transaction.
    """
    return _transaction(signer, definition, lambda: deploy_payload(definition), check, kwargs)


def make_update_transaction(signer, definition: Mapping, expected_version: int, *, check: bool = True, **kwargs):
    """A signed update transaction replacing the definition stored at `expected_version`."""
    return _transaction(signer, definition, lambda: update_payload(definition, expected_version), check, kwargs)


# --------------------------------------------------------------------------- participant groups


def register_group_payload(group_id: str, members: list[str], part: int, parts: int) -> bytes:
    return cbor.encode({"action": "register_group", "group_id": group_id, "members": list(members),
                        "part": part, "parts": parts})


def make_register_group_transaction(signer, group_id: str, members: list[str], part: int, parts: int, **kwargs):
    """Part `part` of `parts` of the signer's participant group `group_id` (inputs = outputs = its
    address). Parts go in order; workflow_groups.py has the rules."""
    address = layout.participant_group_address(signer.public_key().as_hex(), group_id)
    return make_transaction(signer, layout.WORKFLOW_FAMILY, layout.VERSION,
                            register_group_payload(group_id, members, part, parts), [address], [address], **kwargs)


def make_register_group_transactions(signer, group_id: str, members: list[str], *, first_part: int = 1,
                                     **kwargs) -> list:
    """The register_group transactions of a whole member list (parts of MAX_GROUP_PART_MEMBERS), from
    part `first_part` on (to continue a registration that stopped halfway)."""
    parts = groups.split_parts(list(members))
    return [make_register_group_transaction(signer, group_id, chunk, number, len(parts), **kwargs)
            for number, chunk in enumerate(parts, start=1) if number >= first_part]


def needs_group(definition: Mapping) -> bool:
    """Whether a definition lists more participant_nodes than one definition may (MAX_PARTICIPANTS):
    `trustmesh workflow deploy` registers them as a participant group and deploys naming it."""
    fed = definition.get("federation") if isinstance(definition, Mapping) else None
    nodes = fed.get("participant_nodes") if isinstance(fed, Mapping) else None
    return isinstance(nodes, list) and len(nodes) > MAX_PARTICIPANTS


def check_grouped_definition(definition: Mapping) -> tuple[dict, list[str]]:
    """The client's full check of a definition listing more than MAX_PARTICIPANTS participant_nodes
    (keys, not names): (the definition naming their group instead, the member list).

    The grouped definition passes check_definition, and the members what registering and deploying
    it require (workflow_groups.check_members), so what would fail on chain fails here, before any
    group part is sent."""
    groups.check_size(definition["federation"])
    grouped, members = groups.as_group(definition)
    check_definition(grouped)
    groups.check_members(definition["federation"])
    return grouped, members


def decode_record(data: bytes) -> dict:
    """The state record {"workflow_id", "owner", "version", "definition"} from its bytes."""
    return cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
