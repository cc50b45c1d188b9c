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

The family in parts: peers_rules.py (names, limits, payload checks, liveness: pure),
peers_handler.py (the processor and the registry reads other handlers make), peers_client.py
(payloads, transactions, decoders, keep_heartbeating). Every name callers used from this module
before is importable from here.
"""

from __future__ import annotations

from .peers_client import (  # noqa: F401
    decode_liveness, decode_peer, decode_peer_index, heartbeat_payload, keep_heartbeating, make_heartbeat_transaction,
    make_peer_payload, make_register_transaction, make_update_transaction,
)
from .peers_handler import PeerHandler, read_last_seen, read_peer, read_peer_index  # noqa: F401
from .peers_rules import (  # noqa: F401
    ACCELERATOR, ACTIONS, EVENT_REGISTERED, EVENT_UPDATED, FAMILY_NAME, FAMILY_VERSION, HEARTBEAT_SECONDS,
    LIVENESS_SECONDS, MAX_CPU_CORES, MAX_MEMORY_MB, MAX_PEERS, NAMESPACE, check_encryption_key, is_live, last_seen_of,
    parse_peer_payload, parse_resources,
)
