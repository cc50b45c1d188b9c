"""trustmesh-workflow on the client: node names to keys, payloads, signed transactions, decoding."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction

from . import layout
from .common import IDENTIFIER, PUBLIC_KEY, shown
from .definition import ROOT, DefinitionError
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
    """Signed, with inputs = outputs = the workflow's address; check_definition first if asked."""
    if check:
        check_definition(definition)
    workflow_id = definition.get("workflow_id") if isinstance(definition, Mapping) else None
    if not isinstance(workflow_id, str) or not IDENTIFIER.match(workflow_id):
        raise DefinitionError(f"{ROOT}.workflow_id must be an identifier to address the workflow")
    address = layout.workflow_address(workflow_id)
    return make_transaction(signer, layout.WORKFLOW_FAMILY, layout.VERSION, payload(), [address], [address], **kwargs)


def make_deploy_transaction(signer, definition: Mapping, *, check: bool = True, **kwargs):
    """A signed deploy transaction (inputs = outputs = the workflow address).

    check=True runs check_definition (schema + processor rules, keys only) first, so a bad
    definition fails here instead of on chain. kwargs go to builders.make_transaction.
    """
    return _transaction(signer, definition, lambda: deploy_payload(definition), check, kwargs)


def make_update_transaction(signer, definition: Mapping, expected_version: int, *, check: bool = True, **kwargs):
    """A signed update transaction replacing the definition stored at `expected_version`."""
    return _transaction(signer, definition, lambda: update_payload(definition, expected_version), check, kwargs)


def decode_record(data: bytes) -> dict:
    """The state record {"workflow_id", "owner", "version", "definition"} from its bytes."""
    return cbor.decode(data, max_bytes=10 * 1024 * 1024)
