"""Durable chain storage for the dev validator: one SQLite file per data dir.

A block, its receipts and the Merkle nodes of its new state root are written in ONE SQLite
transaction, so after any crash (kill -9 included) the file holds either the whole block or
none of it: the chain head and its state root always agree. WAL + synchronous=FULL makes a
committed block survive the process dying right after commit.
"""

from __future__ import annotations

import pathlib
import sqlite3
import threading
from typing import Iterable, Iterator

from .. import protos as pb
from .node_rows import INSERT_NODES

_SCHEMA = """
CREATE TABLE IF NOT EXISTS merkle_nodes (hash TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (
    block_num INTEGER PRIMARY KEY, block_id TEXT NOT NULL UNIQUE, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY, block_num INTEGER NOT NULL, position INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS transactions (
    txn_id TEXT PRIMARY KEY, block_num INTEGER NOT NULL, batch_id TEXT NOT NULL,
    position INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (txn_id TEXT PRIMARY KEY, data BLOB NOT NULL) WITHOUT ROWID;
"""

class ChainStore:
    """Blocks by number and id, batch/transaction index, receipts and state nodes."""

    def __init__(self, data_dir: str | pathlib.Path):
        self.path = pathlib.Path(data_dir) / "chain.sqlite3"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Reads use one connection on the event loop's thread; commit_block writes through its
        # own connection so it can run in a worker thread (WAL lets the reader go on meanwhile).
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._writer = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._writer.execute("PRAGMA synchronous=FULL")
        # Each block inserts Merkle rows at random keys: with SQLite's 2 MB default cache nearly
        # every insert re-reads a b-tree page (measured ~25% of commit_block with a row per
        # node). The cache only grows as pages are used.
        self._writer.execute("PRAGMA cache_size=-65536")
        self._lock = threading.Lock()
        self._head: pb.Block | None = None
        row = self._db.execute("SELECT data FROM blocks ORDER BY block_num DESC LIMIT 1").fetchone()
        if row:
            self._head = pb.Block.FromString(row[0])

    # -- reads -------------------------------------------------------------------------

    @property
    def head(self) -> "pb.Block | None":
        return self._head

    def get_node(self, node_hash: str) -> bytes | None:
        """The row stored under a node hash, for MerkleRadix: the node, or a chain row topped
        by it (merkle.storage_rows). None for a node folded into another row, or unknown."""
        row = self._db.execute("SELECT data FROM merkle_nodes WHERE hash = ?", (node_hash,)).fetchone()
        return row[0] if row else None

    def block_by_num(self, block_num: int) -> "pb.Block | None":
        row = self._db.execute("SELECT data FROM blocks WHERE block_num = ?", (block_num,)).fetchone()
        return pb.Block.FromString(row[0]) if row else None

    def block_by_id(self, block_id: str) -> "pb.Block | None":
        row = self._db.execute("SELECT data FROM blocks WHERE block_id = ?", (block_id,)).fetchone()
        return pb.Block.FromString(row[0]) if row else None

    def block_num_of(self, block_id: str) -> int | None:
        row = self._db.execute("SELECT block_num FROM blocks WHERE block_id = ?", (block_id,)).fetchone()
        return row[0] if row else None

    def blocks_descending(self, from_num: int) -> Iterator["pb.Block"]:
        """Blocks from from_num down to genesis, read lazily in pages. The first page is two
        blocks: most asks are for the head alone (every REST state read without a head asks for
        it, paging wants one more), and blocks of a hundred batches are large to read for nothing."""
        num, size = from_num, 2
        while num >= 0:
            rows = self._db.execute(
                "SELECT block_num, data FROM blocks WHERE block_num <= ? ORDER BY block_num DESC LIMIT ?",
                (num, size),
            ).fetchall()
            size = 64
            if not rows:
                return
            for block_num, data in rows:
                yield pb.Block.FromString(data)
                num = block_num - 1

    def blocks_ascending(self, from_num: int) -> Iterator["pb.Block"]:
        num = from_num
        while True:
            rows = self._db.execute(
                "SELECT block_num, data FROM blocks WHERE block_num >= ? ORDER BY block_num LIMIT 64", (num,)
            ).fetchall()
            if not rows:
                return
            for block_num, data in rows:
                yield pb.Block.FromString(data)
                num = block_num + 1

    def batch_location(self, batch_id: str) -> tuple[int, int] | None:
        """(block_num, position in block) of a committed batch."""
        row = self._db.execute(
            "SELECT block_num, position FROM batches WHERE batch_id = ?", (batch_id,)
        ).fetchone()
        return (row[0], row[1]) if row else None

    def transaction_location(self, txn_id: str) -> tuple[int, str, int] | None:
        """(block_num, batch_id, position in batch) of a committed transaction."""
        row = self._db.execute(
            "SELECT block_num, batch_id, position FROM transactions WHERE txn_id = ?", (txn_id,)
        ).fetchone()
        return (row[0], row[1], row[2]) if row else None

    def committed_transactions(self, txn_ids: Iterable[str]) -> set[str]:
        ids = list(txn_ids)
        found: set[str] = set()
        for i in range(0, len(ids), 500):  # stay under SQLite's host-parameter limit
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0] for r in self._db.execute(f"SELECT txn_id FROM transactions WHERE txn_id IN ({marks})", chunk)
            )
        return found

    def committed_batches(self, batch_ids: Iterable[str]) -> set[str]:
        ids = list(batch_ids)
        found: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0] for r in self._db.execute(f"SELECT batch_id FROM batches WHERE batch_id IN ({marks})", chunk)
            )
        return found

    def receipt(self, txn_id: str) -> "pb.TransactionReceipt | None":
        row = self._db.execute("SELECT data FROM receipts WHERE txn_id = ?", (txn_id,)).fetchone()
        return pb.TransactionReceipt.FromString(row[0]) if row else None

    # -- the one write path ------------------------------------------------------------

    def commit_block(
        self,
        block: "pb.Block",
        rows: bytes,
        receipts: Iterable["pb.TransactionReceipt"],
    ) -> None:
        """``rows``: node_rows.pack_new_nodes() of the Merkle nodes new in the block's state root."""
        header = pb.BlockHeader.FromString(block.header)
        with self._lock:
            cur = self._writer.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute(INSERT_NODES, (rows,))
                cur.execute(
                    "INSERT INTO blocks (block_num, block_id, data) VALUES (?, ?, ?)",
                    (header.block_num, block.header_signature, block.SerializeToString()),
                )
                cur.executemany(
                    "INSERT INTO batches (batch_id, block_num, position) VALUES (?, ?, ?)",
                    ((b.header_signature, header.block_num, i) for i, b in enumerate(block.batches)),
                )
                cur.executemany(
                    "INSERT INTO transactions (txn_id, block_num, batch_id, position) VALUES (?, ?, ?, ?)",
                    (
                        (t.header_signature, header.block_num, b.header_signature, i)
                        for b in block.batches
                        for i, t in enumerate(b.transactions)
                    ),
                )
                cur.executemany(
                    "INSERT INTO receipts (txn_id, data) VALUES (?, ?)",
                    ((r.transaction_id, r.SerializeToString()) for r in receipts),
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        self._head = block

    def close(self) -> None:
        with self._lock:
            self._writer.close()
        self._db.close()
