"""A federation round as stored (three kinds of record) and as its readers see it (one map).

Stored (federation.py describes the fields):

    round_address(sid)               the core: small, rewritten by every submit
    round_roster_address(sid)        {expected_nodes: [keys]}, written once by open_round
    round_member_address(sid, node)  {} for an expected node that has not submitted, then
                                     {digest, samples, metadata, position}; written once by open_round
                                     and once by the node's submit, all under round_members_prefix(sid)

So a submit reads and writes the core and one member record whatever the round's size; the
round's lists are read once, when it becomes ready or times out (its event names them).

`assemble` gives the round in the one shape every reader of rounds uses (processors through
`read_round`, clients through reader.FederationReader.round):

    {core fields but the counts, expected_nodes: [keys], submissions: {node: {digest, samples,
     metadata}}, submitted_nodes: [keys in arrival order]}
"""

from __future__ import annotations

from typing import Iterable, Mapping

from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction

from . import layout
from .common import read_records

COUNTS = ("expected", "submitted")  # in the core only; the assembled round has the lists instead


def round_inputs(schedule_id: str) -> list[str]:
    """What a transaction that reads a whole round (assemble) declares in its inputs."""
    return [layout.round_address(schedule_id), layout.round_roster_address(schedule_id),
            layout.round_members_prefix(schedule_id)]


def member_addresses(schedule_id: str, nodes: Iterable[str]) -> dict[str, str]:
    """member address -> node."""
    return {layout.round_member_address(schedule_id, n): n for n in nodes}


def expected_of(roster: Mapping | None) -> list[str]:
    nodes = (roster or {}).get("expected_nodes")
    return [n for n in nodes if isinstance(n, str)] if isinstance(nodes, list) else []


def members_of(schedule_id: str, roster: Mapping | None, found: Mapping[str, Mapping]) -> dict[str, Mapping]:
    """node -> member record, from records found by address (a state read or a prefix listing)."""
    return {node: found[a] for a, node in member_addresses(schedule_id, expected_of(roster)).items() if a in found}


def assemble(core: Mapping, roster: Mapping | None, members: Mapping[str, Mapping]) -> dict:
    """The round in its readers' shape. Members beyond the core's `submitted` count are left
    out, so a core read at one block and members listed at a later one give the round as it was
    at the core's block (a member is written in the same transaction as the count)."""
    submitted = core.get("submitted")
    arrived = sorted(
        (m["position"], node) for node, m in members.items()
        if isinstance(m, Mapping) and isinstance(m.get("position"), int)
        and (not isinstance(submitted, int) or m["position"] <= submitted)
    )
    order = [node for _, node in arrived]
    record = {k: v for k, v in core.items() if k not in COUNTS}
    record["expected_nodes"] = expected_of(roster)
    record["submissions"] = {node: {k: members[node][k] for k in ("digest", "samples", "metadata")} for node in order}
    record["submitted_nodes"] = order
    return record


async def read_members(context, schedule_id: str) -> tuple[dict, dict[str, Mapping]]:
    """(roster, node -> member record) through a processor's context: O(expected nodes), once per
    round (its end, its assignment, its result)."""
    roster_address = layout.round_roster_address(schedule_id)
    try:
        roster = (await read_records(context, [roster_address])).get(roster_address) or {}
        addresses = member_addresses(schedule_id, expected_of(roster))
        found = await read_records(context, list(addresses)) if addresses else {}
    except AuthorizationError:
        raise InvalidTransaction(
            f"this action reads round {schedule_id}'s roster and member records: list {roster_address} and the "
            f"prefix {layout.round_members_prefix(schedule_id)} in the transaction's inputs (the make_*_transaction "
            f"helpers do)"
        ) from None
    return roster, {addresses[a]: m for a, m in found.items()}


async def read_round(context, schedule_id: str) -> dict | None:
    """The assembled round (None when no round has this id) through a processor's context."""
    address = layout.round_address(schedule_id)
    core = (await read_records(context, [address])).get(address)
    if core is None:
        return None
    roster, members = await read_members(context, schedule_id)
    return assemble(core, roster, members)


def split(record: Mapping) -> dict[str, dict]:
    """The stored records (address -> record) of a round given in the assembled shape: the inverse
    of `assemble` (tests and tools that build a round by hand)."""
    sid = record["schedule_id"]
    expected = list(record["expected_nodes"])
    order = list(record["submitted_nodes"])
    core = {k: v for k, v in record.items() if k not in ("expected_nodes", "submissions", "submitted_nodes")}
    core.update(expected=len(expected), submitted=len(order))
    members = {layout.round_member_address(sid, n): {} for n in expected}
    for position, node in enumerate(order, start=1):
        members[layout.round_member_address(sid, node)] = {**record["submissions"][node], "position": position}
    return {layout.round_address(sid): core, layout.round_roster_address(sid): {"expected_nodes": expected}, **members}
