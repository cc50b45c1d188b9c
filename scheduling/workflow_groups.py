"""trustmesh-workflow's participant groups: a workflow's participants listed on chain in their own
record, so a federation may be larger than one definition payload can name (pure rules).

A definition lists at most MAX_PARTICIPANTS keys in federation.participant_nodes: their payload
must fit MAX_PAYLOAD_BYTES. A larger federation names a *participant group* instead
(federation.participant_group), which its owner registered beforehand in parts:

    {"action": "register_group", "group_id": identifier, "members": [keys], "part": int, "parts": int}

- a group belongs to the key that registers it: its address is
  layout.participant_group_address(owner, group_id), so nobody else can take, fill or change it;
  a workflow names one of its owner's groups;
- `parts` (1..MAX_GROUP_PARTS) is fixed by part 1; parts come in order 1, 2, ..., parts, each
  with 1..MAX_GROUP_PART_MEMBERS members (a payload well inside 64 KiB);
- members are compressed secp256k1 public keys on the curve, each listed once in the whole
  group, at most MAX_GROUP_MEMBERS in all; their order is kept (participant i is member i, as
  for participant_nodes: fl/datasets.py gives node i shard i);
- the group is complete once part == parts, and never changes after that (a different member
  list is another group_id). An unfinished group can only be continued by its owner.

State, at participant_group_address(owner, group_id):

    {"group_id", "owner", "parts": int, "received": parts registered so far, "members": [keys]}

Deploy and update of a definition naming a group read the group (the transaction lists its
address in its inputs; make_deploy_transaction does) and require it complete, expected_nodes
equal to its size and the coordinator among its members (group_participants); the member list is
then copied into the workflow record as "participants", which open_round fills each round's
expected_nodes from (definition.federation_config) and readers expand the definition with
(reader.FederationReader.workflow). Every bound is in definition_checks.py.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

from trustmesh.ledger.processor import InvalidTransaction

from .common import IDENTIFIER, check_fields, require, require_int, require_match, shown
from .definition import MAX_GROUP_MEMBERS, MAX_GROUP_PART_MEMBERS, MAX_GROUP_PARTS, MAX_PARTICIPANTS, ROOT
from .definition_fields import DefinitionError, distinct_nodes

FIELDS = ("action", "group_id", "members", "part", "parts")
WHERE = "register_group payload"


def complete(group: Mapping) -> bool:
    return group.get("received") == group.get("parts")


def _name(group_id: str, owner: str) -> str:
    return f"participant group {group_id!r} of {owner}"


# --------------------------------------------------------------------------- register_group


def register_request(body: Mapping) -> tuple[str, list[str], int, int]:
    """(group_id, members, part, parts) of a register_group payload, each field checked."""
    check_fields(body, FIELDS, where=WHERE)
    group_id = require_match(body, "group_id", IDENTIFIER,
                             "an identifier (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit)", where=WHERE)
    parts = require_int(body, "parts", 1, MAX_GROUP_PARTS, where=WHERE)
    part = require_int(body, "part", 1, parts, where=WHERE)
    members = require(body, "members", list, where=WHERE)
    if not 1 <= len(members) <= MAX_GROUP_PART_MEMBERS:
        raise InvalidTransaction(
            f"{WHERE} field 'members' holds {len(members)} keys; a part holds 1 to {MAX_GROUP_PART_MEMBERS} "
            f"(split the group into more parts, at most {MAX_GROUP_PARTS})"
        )
    distinct_nodes(members, f"{WHERE} field 'members'", False, what="member")
    return group_id, list(members), part, parts


def register_part(stored: Mapping | None, group_id: str, members: list[str], part: int, parts: int,
                  signer: str) -> dict:
    """The group record once part `part` of `parts` is added; `stored` is what the signer's
    address for `group_id` holds (None: nothing yet)."""
    name = _name(group_id, signer)
    if stored is not None and (stored.get("group_id") != group_id or stored.get("owner") != signer):
        raise InvalidTransaction(
            f"the address of {name} holds participant group {shown(stored.get('group_id'))} of "
            f"{shown(stored.get('owner'))}; choose another group_id"
        )
    if stored is not None and complete(stored):
        raise InvalidTransaction(
            f"{name} is already registered and complete ({len(stored['members'])} members in {stored['parts']} "
            f"part(s)); a group never changes: name it in federation.participant_group as it is, or register "
            f"the new member list under another group_id"
        )
    if part == 1:
        if stored is not None:
            raise InvalidTransaction(
                f"{name} is already being registered ({stored['received']} of {stored['parts']} parts in); "
                f"send part {stored['received'] + 1} next, or register under another group_id"
            )
        before: list[str] = []
    else:
        if stored is None:
            raise InvalidTransaction(
                f"{name} has no part 1 yet: a group belongs to the key that registers part 1, and its parts "
                f"go in order 1, 2, ...; send part 1 first (signed by the same key)"
            )
        if part != stored["received"] + 1:
            raise InvalidTransaction(
                f"part {part} of {name} is out of order: {stored['received']} of {stored['parts']} parts are in; "
                f"send part {stored['received'] + 1} next"
            )
        if parts != stored["parts"]:
            raise InvalidTransaction(
                f"{name} was started as {stored['parts']} part(s) (its part 1 said so); send part {part} "
                f"with parts {stored['parts']}, not {parts}"
            )
        before = list(stored["members"])
    held = set(before)
    for member in members:
        if member in held:
            raise InvalidTransaction(
                f"{name} already holds member {member} (an earlier part listed it); list each member once"
            )
    if len(before) + len(members) > MAX_GROUP_MEMBERS:
        raise InvalidTransaction(
            f"{name} would hold {len(before) + len(members)} members; a group holds at most {MAX_GROUP_MEMBERS}"
        )
    return {"group_id": group_id, "owner": signer, "parts": parts, "received": part, "members": before + members}


# --------------------------------------------------------------------------- deploy and update


def group_participants(definition: Mapping, group: Mapping | None, owner: str) -> list[str]:
    """The members of the participant group a (validated) definition names, which `owner` (the
    workflow's owner) registered: the group is complete, expected_nodes is its size and the
    coordinator is a member."""
    fed = definition["federation"]
    group_id = fed["participant_group"]
    path = f"{ROOT}.federation"
    name = _name(group_id, owner)
    if group is None:
        raise InvalidTransaction(
            f"{path}.participant_group names {name}, which is not registered: a workflow names one of its "
            f"owner's groups; register it first (register_group, parts 1..n, signed by the owner; "
            f"`trustmesh workflow deploy` does so for a file listing more than {MAX_PARTICIPANTS} participant_nodes)"
        )
    if not complete(group):
        raise InvalidTransaction(
            f"{path}.participant_group names {name}, which is incomplete: {group['received']} of {group['parts']} "
            f"parts are registered; send parts {group['received'] + 1} to {group['parts']}, then deploy"
        )
    members = group["members"]
    if fed["expected_nodes"] != len(members):
        raise InvalidTransaction(
            f"{path}.expected_nodes is {fed['expected_nodes']} but {name} has {len(members)} members; "
            f"they must be equal (every member is expected in every round)"
        )
    if fed["coordinator_node"] not in members:
        raise InvalidTransaction(
            f"{path}.coordinator_node {fed['coordinator_node']} is not a member of {name}; the coordinator "
            f"contributes data too, so it must be one of the group's members"
        )
    return list(members)


# --------------------------------------------------------------------------- clients


def group_id_for(members: list[str]) -> str:
    """The id `trustmesh workflow deploy` gives the group of a member list: derived from the list,
    so deploying the same list again reuses the group, and a changed list makes another one."""
    return "participants-" + hashlib.sha256("\n".join(members).encode()).hexdigest()[:32]


def split_parts(members: list[str]) -> list[list[str]]:
    """The member list in parts of at most MAX_GROUP_PART_MEMBERS, in order."""
    return [members[i:i + MAX_GROUP_PART_MEMBERS] for i in range(0, len(members), MAX_GROUP_PART_MEMBERS)]


def as_group(definition: Mapping) -> tuple[dict, list[str]]:
    """(a copy of `definition` naming the group of its participant_nodes instead of listing them,
    that member list); the group's id is group_id_for(members)."""
    fed = dict(definition["federation"])
    members = list(fed.pop("participant_nodes"))
    return {**definition, "federation": {**fed, "participant_group": group_id_for(members)}}, members


def check_size(fed: Mapping) -> list:
    """The participant_nodes of a federation section, at most MAX_GROUP_MEMBERS of them."""
    members = fed["participant_nodes"]
    if len(members) > MAX_GROUP_MEMBERS:
        raise DefinitionError(
            f"{ROOT}.federation.participant_nodes lists {len(members)} nodes; a federation holds at most "
            f"{MAX_GROUP_MEMBERS} (more than {MAX_PARTICIPANTS} are registered on chain as a participant group)"
        )
    return members


def check_members(fed: Mapping) -> list[str]:
    """The participant_nodes of a (grouped-checked) federation section that `as_group` would
    register: keys on the curve, each once, at most MAX_GROUP_MEMBERS, as many as expected_nodes,
    the coordinator among them. DefinitionError (in the definition's words) otherwise."""
    path = f"{ROOT}.federation"
    members = check_size(fed)
    first = distinct_nodes(members, f"{path}.participant_nodes", False)
    if fed["expected_nodes"] != len(members):
        raise DefinitionError(
            f"{path}.expected_nodes is {fed['expected_nodes']} but participant_nodes lists {len(members)} "
            f"node(s); they must be equal"
        )
    if fed["coordinator_node"] not in first:
        raise DefinitionError(
            f"{path}.coordinator_node {fed['coordinator_node']} is not one of participant_nodes; the coordinator "
            f"contributes data too, so list it among the participants"
        )
    return members
