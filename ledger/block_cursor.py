"""Where a block follower left off: the last block it handled, kept in a file, and a subscriber
that resumes right after it.

Written whole or not at all: a process killed mid-write must not come back with half an id. A
block id that is not on the validator's chain (a fresh dev network under an old data dir), or a
file that does not hold one, means replaying from genesis; every follower here is idempotent, so
that repeats nothing it must not.
"""

from __future__ import annotations

import logging
import os
import pathlib
import weakref
from typing import Sequence

from .events import NULL_BLOCK_ID, EventSubscriber, UnknownBlockError

LOGGER = logging.getLogger(__name__)


RECORD_BYTES = 256  # the file's size: a block id (128 hex) padded with spaces, rewritten in place


class BlockCursor:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        self._fd: int | None = None

    def read(self) -> str:
        """The last block handled; "" before the first."""
        return self.path.read_text(errors="replace").strip() if self.path.exists() else ""

    def save(self, block_id: str) -> None:
        """One pwrite(2) of the fixed-size record over the last: the kernel does not cut a write
        within one page short for a signal, so a process killed at any point leaves the old id or
        the new one. (Writing a file and renaming it over the old one, per block, held a compute
        node's event loop ~3 ms a time on a loaded machine: open, write, rename.)"""
        record = block_id.encode().ljust(RECORD_BYTES)
        if len(record) > RECORD_BYTES:
            raise ValueError(f"a block id is at most {RECORD_BYTES} characters, not {len(block_id)}")
        if self._fd is None:  # kept open: one system call per block
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            weakref.finalize(self, os.close, fd)
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, RECORD_BYTES)  # a longer file from before: this record alone counts
            self._fd = fd
            return
        os.pwrite(self._fd, record, 0)

    async def subscribe(self, validator_url: str, subscriptions: Sequence, *, new_from_genesis: bool,
                        who: str = "a follower") -> EventSubscriber:
        """A started subscriber that resumes after the last block handled. Before the first:
        every block since genesis (new_from_genesis) or only those from now on."""
        known = self.read()
        start = [known] if known else ([NULL_BLOCK_ID] if new_from_genesis else [])
        subscriber = EventSubscriber(validator_url, subscriptions, last_known_block_ids=start)
        try:
            await subscriber.start()
        except UnknownBlockError:
            LOGGER.warning("%s: its last block %s… is not on this chain; replaying every block", who, known[:16])
            await subscriber.close()
            subscriber = EventSubscriber(validator_url, subscriptions, last_known_block_ids=[NULL_BLOCK_ID])
            await subscriber.start()
        return subscriber
