"""trustmesh-peer's names, limits and rules: payload checks and liveness, pure (no I/O);
peers_handler.py applies them, peers.py documents the family."""

from __future__ import annotations

import re
from typing import Any, Mapping

from trustmesh.ledger.processor import InvalidTransaction

from . import events, layout
from .common import HEX64, IDENTIFIER, check_fields, parse_payload, require, require_int, require_match

FAMILY_NAME = layout.PEER_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.PEER_NS

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


def last_seen_of(record: Any) -> int | None:
    """The chain time a liveness record holds, or None for a missing or malformed record."""
    value = record.get("last_seen") if isinstance(record, Mapping) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_live(last_seen: int | None, now: int, window: int | None = None) -> bool:
    """Seen at most `window` (default LIVENESS_SECONDS, read at call time) seconds before chain
    time `now`. Integers only, so every validator decides alike."""
    window = LIVENESS_SECONDS if window is None else window
    return last_seen is not None and now - last_seen <= window
