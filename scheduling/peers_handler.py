"""trustmesh-peer's processor, and the reads of the registry other families' handlers make
(the family: peers.py)."""

from __future__ import annotations

from typing import Iterable

from trustmesh.ledger.block_info import latest_block_timestamp
from trustmesh.ledger.processor import InvalidTransaction, TransactionHandler

from . import layout
from . import peers_rules as rules
from .common import chain_time, emit, read_record, read_records, signer_of, write_records
from .peers_client import decode_peer_index
from .peers_rules import (
    EVENT_REGISTERED, EVENT_UPDATED, FAMILY_NAME, FAMILY_VERSION, NAMESPACE, last_seen_of, parse_peer_payload,
)


class PeerHandler(TransactionHandler):
    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, fields = parse_peer_payload(transaction)
        node = signer_of(transaction)
        address = layout.peer_address(node)
        current = await read_record(context, address)

        if action == "register":
            if current is not None:
                raise InvalidTransaction(
                    f"node {node} is already registered (as {current.get('name')!r}, revision "
                    f"{current.get('revision')}); send action 'update' to change its record"
                )
            index = await read_peer_index(context)
            if len(index) >= rules.MAX_PEERS:
                raise InvalidTransaction(
                    f"the peer registry is full ({rules.MAX_PEERS} nodes); no further node can register"
                )
            record = {"node": node, **fields, "revision": 1}
            seen = await _seen(context, node, await latest_block_timestamp(context))
            await write_records(context, {address: record, layout.PEER_INDEX_ADDRESS: sorted({*index, node}), **seen})
            await _emit(context, EVENT_REGISTERED, record)
        elif action == "update":
            if current is None:
                raise InvalidTransaction(
                    f"node {node} is not registered; send action 'register' first (a node can only "
                    f"update its own record)"
                )
            record = {"node": node, **fields, "revision": int(current.get("revision", 0)) + 1}
            seen = await _seen(context, node, await latest_block_timestamp(context))
            await write_records(context, {address: record, **seen})
            await _emit(context, EVENT_UPDATED, record)
        else:  # heartbeat
            if current is None:
                raise InvalidTransaction(
                    f"node {node} is not registered, so its heartbeat means nothing; send action "
                    f"'register' first (only registered compute nodes take tasks)"
                )
            await write_records(context, await _seen(context, node, await chain_time(context)))


async def _seen(context, node: str, now: int | None) -> dict[str, dict]:
    """The liveness record to write for `node` seen at chain time `now` ({} without BlockInfo).
    last_seen never moves back, so a block stamped earlier (within BlockInfo's tolerance) cannot
    make a node look older than it is."""
    if now is None:
        return {}
    address = layout.liveness_address(node)
    last = last_seen_of(await read_record(context, address))
    if last is not None and last > now:
        now = last
    return {address: {"node": node, "last_seen": now}}


async def _emit(context, event_type: str, record: dict) -> None:
    resources = record["resources"]
    extra = {"accelerator": resources["accelerator"]} if "accelerator" in resources else {}
    await emit(
        context, event_type,
        node=record["node"], name=record["name"], encryption_public_key=record["encryption_public_key"],
        cpu_cores=resources["cpu_cores"], memory_mb=resources["memory_mb"], revision=record["revision"], **extra,
    )


async def read_peer_index(context) -> list[str]:
    """Sorted keys of every registered node (inside a handler: PEER_INDEX_ADDRESS in inputs)."""
    found = await context.get_state([layout.PEER_INDEX_ADDRESS])
    try:
        return decode_peer_index(found.get(layout.PEER_INDEX_ADDRESS))
    except ValueError as exc:
        raise InvalidTransaction(f"peer registry state is unreadable: {exc}") from None


async def read_peer(context, node: str) -> dict | None:
    """A node's registry record, or None (inside a handler: its peer_address in inputs)."""
    return await read_record(context, layout.peer_address(node))


async def read_last_seen(context, nodes: Iterable[str]) -> dict[str, int | None]:
    """node -> last_seen (None when never seen); inside a handler: their liveness addresses (or
    PEER_NS) in inputs."""
    nodes = list(dict.fromkeys(nodes))
    if not nodes:
        return {}
    found = await read_records(context, [layout.liveness_address(n) for n in nodes])
    return {n: last_seen_of(found.get(layout.liveness_address(n))) for n in nodes}
