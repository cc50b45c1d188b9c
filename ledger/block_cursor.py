"""Where a block follower left off: the last block it handled, kept in a file, and a subscriber
that resumes right after it.

Written whole or not at all: a process killed mid-write must not come back with half an id. A
block id that is not on the validator's chain (a fresh dev network under an old data dir) means
replaying from genesis; every follower here is idempotent, so that repeats nothing it must not.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Sequence

from .events import NULL_BLOCK_ID, EventSubscriber, UnknownBlockError

LOGGER = logging.getLogger(__name__)


class BlockCursor:
    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)

    def read(self) -> str:
        """The last block handled; "" before the first."""
        return self.path.read_text().strip() if self.path.exists() else ""

    def save(self, block_id: str) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(block_id)
        os.replace(partial, self.path)

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
