"""trustmesh-peer 1.0: the registry of compute nodes.

A compute node signs its own registration; the signer's public key IS the node, so the record
lives at `layout.peer_address(signer)` and nobody else can write it.

Payload (canonical CBOR map):

    {"action": "register" | "update",
     "name": identifier,                                   # e.g. "gpu-box-3"
     "encryption_public_key": 64 hex,                      # X25519, what IoT nodes encrypt for
     "resources": {"cpu_cores": int >= 1, "memory_mb": int >= 1, "accelerator": str (optional)}}
    {"action": "heartbeat"}                                # nothing else

"register" creates the record (once); "update" replaces name, key and resources of an existing
record (all fields again). Unknown fields are refused, so a payload can never claim to speak for
another node. "heartbeat" (a registered node, every HEARTBEAT_SECONDS or so) says the signer is
alive: it records the chain time of its block (BlockInfo, the agreed timestamp deadlines use).

Liveness, decided from the chain alone so every validator agrees: a node is *live* at chain time
`now` when it was seen (heartbeat, register or update) at most LIVENESS_SECONDS before:
`now - last_seen <= LIVENESS_SECONDS`. The schedule family reassigns late tasks only to live
nodes that missed no deadline since they were last seen, and prefers them when it assigns a
round (`is_live`, `read_last_seen`; schedule.responsive).

State:

    peer_address(node)     {"node", "name", "encryption_public_key", "resources", "revision"}
                           revision: 1 at register, +1 per update (a heartbeat never touches it)
    PEER_INDEX_ADDRESS     CBOR list of every registered node key, sorted; how the schedule
                           family enumerates nodes (register writes it, update does not touch it)
    liveness_address(node) {"node", "last_seen"}: chain time (Unix seconds of the block's BlockInfo)
                           of the node's latest heartbeat, register or update; never moves back.
                           register/update write it when the chain has BlockInfo (a heartbeat
                           requires it)

Events (attributes are strings; enough to rebuild a cache of the registry):

    trustmesh/peer-registered, trustmesh/peer-updated
        node, name, encryption_public_key, cpu_cores, memory_mb, revision[, accelerator]

A heartbeat emits no event (it is frequent and changes nothing a cache of the registry holds).

Client side: `make_heartbeat_transaction(signer)`, and `keep_heartbeating(rest, signer)`, the loop
a compute node runs beside its work.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any, Iterable, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.block_info import latest_block_timestamp
from trustmesh.ledger.processor import InvalidTransaction, TransactionHandler

from . import events, layout
from .common import (
    MAX_RECORD_BYTES,
    check_fields,
    HEX64,
    IDENTIFIER,
    chain_time,
    emit,
    parse_payload,
    read_record,
    read_records,
    require,
    require_int,
    require_match,
    signer_of,
    write_records,
)

FAMILY_NAME = layout.PEER_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.PEER_NS

LOGGER = logging.getLogger(__name__)

ACTIONS = ("register", "update", "heartbeat")
EVENT_REGISTERED = events.PEER_REGISTERED
EVENT_UPDATED = events.PEER_UPDATED

MAX_PEERS = 10_000            # bounds the index record (~67 bytes a key)
MAX_CPU_CORES = 4096
MAX_MEMORY_MB = 16 * 1024 * 1024  # 16 TiB
LIVENESS_SECONDS = 90         # seen this long ago (chain time) or less: live; what reassignment trusts
HEARTBEAT_SECONDS = 30        # how often keep_heartbeating sends one: 3 chances per liveness window
ACCELERATOR = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9 ._:/+()-]{0,63}\Z")

_PAYLOAD_FIELDS = frozenset({"action", "name", "encryption_public_key", "resources"})
_RESOURCE_FIELDS = frozenset({"cpu_cores", "memory_mb", "accelerator"})

# X25519 public keys of small order (RFC 7748; libsodium's blacklist): a shared secret with any
# of them is all zeros, so data "encrypted for" such a node would be readable by anyone.
_P25519 = 2**255 - 19
_SMALL_ORDER_U = frozenset({
    0, 1, _P25519 - 1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
})


# --------------------------------------------------------------------------- checks


def check_encryption_key(value: str) -> str:
    """64 lowercase hex of a 32-byte X25519 public key that is not of small order."""
    u = (int.from_bytes(bytes.fromhex(value), "little") & ((1 << 255) - 1)) % _P25519
    if u in _SMALL_ORDER_U:
        raise InvalidTransaction(
            "payload field 'encryption_public_key' is a small-order X25519 point (shared secrets with it "
            "are all zeros); send the node's real X25519 public key"
        )
    return value


def parse_resources(value: Any) -> dict:
    if not isinstance(value, dict):
        raise InvalidTransaction(
            "payload field 'resources' must be a map {cpu_cores, memory_mb[, accelerator]}, "
            f"got {type(value).__name__}"
        )
    where = "resources"
    check_fields(value, _RESOURCE_FIELDS, where)
    resources = {
        "cpu_cores": require_int(value, "cpu_cores", 1, MAX_CPU_CORES, where=where),
        "memory_mb": require_int(value, "memory_mb", 1, MAX_MEMORY_MB, where=where),
    }
    if "accelerator" in value:
        resources["accelerator"] = require_match(
            value, "accelerator", ACCELERATOR,
            "1-64 characters: letters, digits, space and . _ : / + ( ) - (e.g. 'nvidia-a100')", where=where,
        )
    return resources


def parse_peer_payload(transaction) -> tuple[str, dict]:
    """(action, {name, encryption_public_key, resources}) of a valid payload ({} for a heartbeat)."""
    action, body = parse_payload(transaction, ACTIONS)
    if "node" in body:
        raise InvalidTransaction(
            "payload field 'node' is not allowed: the transaction's signer is the node, so a node "
            "can only register, update or heartbeat for itself"
        )
    if action == "heartbeat":
        check_fields(body, {"action"}, where="payload of action 'heartbeat'")
        return action, {}
    check_fields(body, _PAYLOAD_FIELDS)
    fields = {
        "name": require_match(body, "name", IDENTIFIER, "an identifier (1-64 of A-Z a-z 0-9 . _ -, "
                              "starting with a letter or digit)"),
        "encryption_public_key": check_encryption_key(
            require_match(body, "encryption_public_key", HEX64, "a 32-byte X25519 public key as 64 lowercase hex")
        ),
        "resources": parse_resources(require(body, "resources", dict)),
    }
    return action, fields


# --------------------------------------------------------------------------- handler


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
            if len(index) >= MAX_PEERS:
                raise InvalidTransaction(
                    f"the peer registry is full ({MAX_PEERS} nodes); no further node can register"
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


# --------------------------------------------------------------------------- readers


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


def decode_peer_index(data: bytes | None) -> list[str]:
    """The index as stored (e.g. from RestClient.get_state(PEER_INDEX_ADDRESS)); [] when absent."""
    if data is None:
        return []
    value = cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
    if not isinstance(value, list):
        raise ValueError(f"peer index at {layout.PEER_INDEX_ADDRESS} is not a CBOR list")
    return value


def decode_peer(data: bytes | None) -> dict | None:
    return None if data is None else cbor.decode(data, max_bytes=MAX_RECORD_BYTES)


def decode_liveness(data: bytes | None) -> dict | None:
    """A liveness record as stored (e.g. RestClient.get_state(liveness_address(node)))."""
    return None if data is None else cbor.decode(data, max_bytes=1024 * 1024)


def last_seen_of(record: Any) -> int | None:
    """The chain time a liveness record holds, or None for a missing or malformed record."""
    value = record.get("last_seen") if isinstance(record, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_live(last_seen: int | None, now: int, window: int | None = None) -> bool:
    """Seen at most `window` (default LIVENESS_SECONDS, read at call time) seconds before chain
    time `now`. Integers only, so every validator decides alike."""
    window = LIVENESS_SECONDS if window is None else window
    return last_seen is not None and now - last_seen <= window


async def read_last_seen(context, nodes: Iterable[str]) -> dict[str, int | None]:
    """node -> last_seen (None when never seen); inside a handler: their liveness addresses (or
    PEER_NS) in inputs."""
    nodes = list(dict.fromkeys(nodes))
    if not nodes:
        return {}
    found = await read_records(context, [layout.liveness_address(n) for n in nodes])
    return {n: last_seen_of(found.get(layout.liveness_address(n))) for n in nodes}


# --------------------------------------------------------------------------- client


def make_peer_payload(action: str, *, name: str, encryption_public_key: str, cpu_cores: int, memory_mb: int,
                      accelerator: str | None = None) -> bytes:
    resources: dict = {"cpu_cores": cpu_cores, "memory_mb": memory_mb}
    if accelerator is not None:
        resources["accelerator"] = accelerator
    return cbor.encode({"action": action, "name": name, "encryption_public_key": encryption_public_key,
                        "resources": resources})


def make_register_transaction(signer, *, name: str, encryption_public_key: str, cpu_cores: int, memory_mb: int,
                              accelerator: str | None = None, **kwargs):
    """Register the signer as a compute node. Reads/writes its record, the peer index and its
    liveness record (registering counts as seen); reads BlockInfo."""
    node = signer.public_key().as_hex()
    addresses = [layout.peer_address(node), layout.PEER_INDEX_ADDRESS, layout.liveness_address(node)]
    payload = make_peer_payload("register", name=name, encryption_public_key=encryption_public_key,
                                cpu_cores=cpu_cores, memory_mb=memory_mb, accelerator=accelerator)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, [*addresses, layout.BLOCK_INFO_NS],
                            addresses, **kwargs)


def make_update_transaction(signer, *, name: str, encryption_public_key: str, cpu_cores: int, memory_mb: int,
                            accelerator: str | None = None, **kwargs):
    """Replace the signer's own record (all fields). Reads/writes only that record and its
    liveness record (an update counts as seen); reads BlockInfo."""
    node = signer.public_key().as_hex()
    addresses = [layout.peer_address(node), layout.liveness_address(node)]
    payload = make_peer_payload("update", name=name, encryption_public_key=encryption_public_key,
                                cpu_cores=cpu_cores, memory_mb=memory_mb, accelerator=accelerator)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, [*addresses, layout.BLOCK_INFO_NS],
                            addresses, **kwargs)


def heartbeat_payload() -> bytes:
    return cbor.encode({"action": "heartbeat"})


def make_heartbeat_transaction(signer, **kwargs):
    """The signer (a registered compute node) is alive. Reads its registry record and BlockInfo;
    writes only its liveness record."""
    node = signer.public_key().as_hex()
    liveness = layout.liveness_address(node)
    inputs = [layout.peer_address(node), liveness, layout.BLOCK_INFO_NS]
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, heartbeat_payload(), inputs, [liveness], **kwargs)


async def keep_heartbeating(rest, signer, every: float = HEARTBEAT_SECONDS, *, retry: float = 5.0,
                            commit_timeout: float = 60.0) -> None:
    """Send a heartbeat now and then every `every` seconds until cancelled (a compute node's
    on-chain liveness; run it as a task beside the node's work).

    rest: a RestClient. Never raises for a failed heartbeat (REST API or validator away, batch
    not committed in time, refused): it logs one warning per outage, tries again after `retry`
    seconds (at most `every`), and logs once when heartbeats commit again. CancelledError
    propagates, so cancelling the task stops it at once.
    """
    node = signer.public_key().as_hex()
    failing: str | None = None  # what the current outage looks like (None: the last beat committed)
    while True:
        try:
            ids = await rest.submit_batches([make_batch(signer, [make_heartbeat_transaction(signer)])])
            [status] = await rest.wait_for_batches(ids, commit_timeout, raise_invalid=False)
            if status.get("status") != "COMMITTED":
                message = (status.get("invalid_transactions") or [{}])[0].get("message") or status.get("status")
                raise RuntimeError(f"heartbeat not committed: {message}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a heartbeat must outlive any outage
            if failing is None:
                LOGGER.warning("heartbeat of node %s… failed (%s); retrying every %.0f s until it commits",
                               node[:16], exc, min(retry, every))
            else:
                LOGGER.debug("heartbeat of node %s… failed again: %s", node[:16], exc)
            failing = str(exc)
            await asyncio.sleep(min(retry, every))
            continue
        if failing is not None:
            LOGGER.info("heartbeat of node %s… commits again", node[:16])
            failing = None
        await asyncio.sleep(every)
