"""Blobs a node wrote, kept on its own disk too, so a blob lost with Redis comes back.

The chain names every blob a round needs by its sha256; Redis only carries the bytes. Whoever
wrote a blob (an IoT node its sealed data, a compute node its updates and models) keeps a copy
in its data dir, `DIR/<sha256>` (0600), and puts it back when Redis lost it: `restore()` after
a Redis restart, and `get()` of a blob that is gone. Copies beyond the newest `keep` are pruned:
a round needs its blobs only until the next rounds have built on them.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pathlib

from trustmesh.whole_files import write_whole

from .blobs import BlobError, BlobNotFound, BlobStore

LOGGER = logging.getLogger(__name__)

DEFAULT_KEEP = 4096
PRUNE_EVERY = 256  # puts between two prunings (listing the folder is not free)


class KeptBlobs:
    """A BlobStore (put, get, exists, delete, key, max_bytes) that keeps what it puts on disk."""

    def __init__(self, blobs: BlobStore, directory: str | os.PathLike, *, keep: int = DEFAULT_KEEP):
        self.blobs = blobs
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keep = keep
        self._puts = 0

    @property
    def max_bytes(self) -> int:
        return self.blobs.max_bytes

    def key(self, digest: str) -> str:
        return self.blobs.key(digest)

    def _path(self, digest: str) -> pathlib.Path:
        self.blobs.key(digest)  # checks it is a sha256 (a file name we may use)
        return self.directory / digest

    def _write(self, digest: str, data: bytes) -> None:
        path = self._path(digest)
        if path.exists():
            os.utime(path)  # newest again: pruning keeps what is in use
            return
        # whole or absent, never half a blob under its name; not synced: Redis and the chain's
        # digests are the other copies, and a copy that does not hash to its name is never read
        write_whole(path, data, mode=0o600, durable=False)

    def _read(self, digest: str) -> bytes | None:
        """The kept copy, if there is one that still hashes to its name."""
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            return None
        return data if hashlib.sha256(data).hexdigest() == digest else None

    def _prune(self) -> None:
        for stale in self.kept()[self.keep:]:
            (self.directory / stale).unlink(missing_ok=True)

    async def put(self, data: bytes) -> str:
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) <= self.blobs.max_bytes:  # an oversize blob is refused by Redis below
            await asyncio.to_thread(self._write, digest, data)
        self._puts += 1
        if self._puts % PRUNE_EVERY == 0:
            await asyncio.to_thread(self._prune)
        return await self.blobs.put(data)

    async def get(self, digest: str) -> bytes:
        try:
            return await self.blobs.get(digest)
        except BlobNotFound as missing:
            found = await self._put_back(digest, missing)
            if found is missing:
                raise
            return found

    async def get_many(self, digests: list[str]) -> list[bytes | BlobError | ValueError]:
        """BlobStore.get_many, with what Redis lacks put back from this node's copies as get() does."""
        results = await self.blobs.get_many(digests)
        lost = {digest: result for digest, result in zip(digests, results) if isinstance(result, BlobNotFound)}
        if lost:  # after a Redis restart many at once: the disk reads side by side
            found = dict(zip(lost, await asyncio.gather(*(self._put_back(d, m) for d, m in lost.items()))))
            results = [found.get(digest, result) if isinstance(result, BlobNotFound) else result
                       for digest, result in zip(digests, results)]
        return results

    async def _put_back(self, digest: str, missing: BlobNotFound) -> bytes | BlobNotFound:
        """A blob Redis lacks: this node's copy, put back into Redis; `missing` when there is none."""
        data = await asyncio.to_thread(self._read, digest)
        if data is None:
            return missing
        LOGGER.info("blob %s… was not in Redis; put back from this node's copy", digest[:16])
        await self.blobs.put(data)
        return data

    async def exists(self, digest: str) -> bool:
        return await self.blobs.exists(digest)

    async def delete(self, digest: str) -> bool:
        await asyncio.to_thread(self._path(digest).unlink, missing_ok=True)
        return await self.blobs.delete(digest)

    def kept(self) -> list[str]:
        """Digests of the copies on disk, newest first."""
        files = [p for p in self.directory.iterdir() if len(p.name) == 64]
        return [p.name for p in sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)]

    async def restore(self) -> int:
        """Put back every kept blob Redis does not have; returns how many."""
        restored = 0
        digests = await asyncio.to_thread(self.kept)
        present = []
        for start in range(0, len(digests), 256):  # one round trip per 256 looks
            async with self.blobs.redis.pipeline(transaction=False) as pipe:
                for digest in digests[start:start + 256]:
                    pipe.exists(self.blobs.key(digest))
                present += await pipe.execute()
        for digest, there in zip(digests, present):
            if there:
                continue
            data = await asyncio.to_thread(self._read, digest)
            if data is None:
                continue
            await self.blobs.put(data)
            restored += 1
        if restored:
            LOGGER.info("put back %d blob(s) Redis had lost", restored)
        return restored
