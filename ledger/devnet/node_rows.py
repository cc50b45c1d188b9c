"""Merkle nodes as rows of the store: the packed form the state worker makes and the SQL
that unpacks it inside SQLite (store.py runs it in the block's transaction).

Kept apart from store.py so the state worker imports only this and merkle.py.
"""

from __future__ import annotations

from .merkle import storage_rows

# A block brings ~30 new Merkle nodes per new address, folded into ~1-3 rows (merkle.storage_rows:
# chains of one-child nodes share a row). executemany binds each row in Python and so takes the
# GIL back once per row: with the next block executing on the event loop meanwhile (chain.py
# pipelines them), that convoy made storing 3x slower. Instead the rows go in as ONE blob that
# SQLite splits itself (recursive CTE; no unhex() before SQLite 3.41), so the whole insert runs
# inside one statement step, without the GIL. Record: 64-char hash, 10-digit length, row bytes;
# in hash order so the b-tree is walked once, in sequence. A key already stored keeps its row:
# it holds the same nodes.
INSERT_NODES = """
INSERT OR IGNORE INTO merkle_nodes (hash, data)
WITH RECURSIVE node(pos, hash, data) AS (
    SELECT 1, NULL, NULL
    UNION ALL
    SELECT pos + 74 + CAST(CAST(substr(?1, pos + 64, 10) AS TEXT) AS INTEGER),
           CAST(substr(?1, pos, 64) AS TEXT),
           substr(?1, pos + 74, CAST(CAST(substr(?1, pos + 64, 10) AS TEXT) AS INTEGER))
    FROM node WHERE pos <= length(?1)
)
SELECT hash, data FROM node WHERE hash IS NOT NULL
"""


def pack_new_nodes(new_nodes: dict[str, bytes]) -> bytes:
    """What commit_block stores for the nodes a Merkle update made (merkle.storage_rows,
    packed for INSERT_NODES). The state worker makes it, outside the validator's GIL."""
    return _pack_rows(storage_rows(new_nodes))


def _pack_rows(rows: dict[str, bytes]) -> bytes:
    parts: list[bytes] = []
    append = parts.append
    for node_hash in sorted(rows):
        data = rows[node_hash]
        if len(node_hash) != 64 or not node_hash.isascii():
            raise ValueError(f"not a node hash: {node_hash!r}")
        append(node_hash.encode())
        append(b"%010d" % len(data))
        append(bytes(data))
    return b"".join(parts)
