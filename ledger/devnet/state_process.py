"""The state worker's process (state_worker.py starts it): Merkle updates in, roots and
packed node rows out, over one end of a socket pair, until told to stop or the other end
goes away.

It imports only what it uses (merkle.py, node_rows.py, trustmesh/heap.py): it starts beside
the validator, and the first block waits for it.
"""

from __future__ import annotations

import collections
import signal
import sqlite3
import sys
from multiprocessing.connection import Connection

from trustmesh import heap

from .merkle import MerkleRadix
from .node_rows import pack_new_nodes

# Results whose nodes the worker serves from memory: the chain has at most
# ChainSettings.blocks_in_flight blocks between "root asked for" and "on disk".
KEEP_RESULTS = 8


def serve(conn, db_path: str) -> None:
    """The worker's loop until None or EOF: (parent_root, sets, deletes) in; ("root", ok,
    root or message), then ("rows", ok, packed rows or message) out."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the validator's to handle
    db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
    recent: collections.deque = collections.deque(maxlen=KEEP_RESULTS)

    def read_node(node_hash: str) -> bytes | None:
        for nodes in reversed(recent):
            data = nodes.get(node_hash)
            if data is not None:
                return data
        row = db.execute("SELECT data FROM merkle_nodes WHERE hash = ?", (node_hash,)).fetchone()
        return row[0] if row else None

    merkle = MerkleRadix(read_node)
    heap.for_a_service()  # its node cache holds ~100,000 decoded nodes: not walked every few seconds
    heap.settle()
    conn.send(("ready", True, None))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            break  # the validator is gone
        if request is None:
            break  # the validator is closing
        parent_root, sets, deletes = request
        try:
            new_root, new_nodes = merkle.update(parent_root, sets, deletes)
        except Exception as exc:  # a damaged store, a bad address: the chain reports it
            conn.send(("root", False, f"{type(exc).__name__}: {exc}"))
            continue
        recent.append(new_nodes)
        merkle.remember_new(new_nodes)  # the next block walks the same upper nodes
        conn.send(("root", True, new_root))
        try:
            conn.send(("rows", True, pack_new_nodes(new_nodes)))
        except Exception as exc:
            conn.send(("rows", False, f"{type(exc).__name__}: {exc}"))
    db.close()


if __name__ == "__main__":
    try:
        serve(Connection(int(sys.argv[1])), sys.argv[2])
    except (BrokenPipeError, ConnectionResetError):
        pass  # the validator went away while an answer was on its way: nobody to tell
