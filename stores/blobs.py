"""Content-addressed blobs in Redis (BlobStore).

`blob_{sha256 hex}` -> bytes. put() returns the digest (SET NX; a stored value whose digest does
not match is repaired); get() refuses to return bytes whose sha256 differs from the name
(BlobCorrupted) and values over the size limit (BlobTooLarge, checked inside Redis before any
byte is sent). get_many() reads many alike in one round trip per GET_MANY_CHUNK.
"""

from __future__ import annotations

import hashlib
import logging
import re

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

LOGGER = logging.getLogger(__name__)

HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024
# Reads per get_many() pipeline: a round of 1,000 participants is 4 round trips, none of them
# one enormous reply (Redis buffers a pipeline's replies until the client reads them).
GET_MANY_CHUNK = 256


class BlobError(Exception):
    """A blob could not be stored or read."""


class BlobNotFound(BlobError, KeyError):
    def __str__(self) -> str:  # KeyError would show repr()
        return str(self.args[0]) if self.args else "blob not found"


class BlobTooLarge(BlobError):
    pass


class BlobCorrupted(BlobError):
    """The bytes stored under a digest do not hash to it; they are never returned."""


# KEYS[1]; ARGV[1] limit. {1, value} | {0, size} (over the limit) | {-1} (missing).
_GET_LIMITED = """
local n = redis.call('STRLEN', KEYS[1])
if n > tonumber(ARGV[1]) then return {0, n} end
local value = redis.call('GET', KEYS[1])
if not value then return {-1} end
return {1, value}
"""


def _check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not HEX64.match(digest):
        raise ValueError(f"a blob digest is a sha256 as 64 lowercase hex, got {str(digest)[:80]!r}")
    return digest


class BlobStore:
    """Content-addressed bytes: `blob_{sha256 hex}`."""

    def __init__(self, redis: aioredis.Redis, *, max_bytes: int = DEFAULT_MAX_BLOB_BYTES,
                 ttl: float | None = None, prefix: str = "blob_"):
        """max_bytes: largest blob put() accepts and get() returns; ttl: seconds a blob lives
        (refreshed by put()), None to keep it until deleted."""
        self.redis = redis
        self.max_bytes = max_bytes
        self.ttl_ms = None if ttl is None else int(ttl * 1000)
        self.prefix = prefix
        self._get_limited = redis.register_script(_GET_LIMITED)

    def key(self, digest: str) -> str:
        return self.prefix + _check_digest(digest)

    async def put(self, data: bytes) -> str:
        """Store `data`; returns its sha256 (64 lowercase hex), which names it."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"a blob is bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) > self.max_bytes:
            raise BlobTooLarge(f"blob of {len(data)} bytes is over the limit of {self.max_bytes} bytes")
        digest = hashlib.sha256(data).hexdigest()
        key = self.prefix + digest
        if await self.redis.set(key, data, nx=True, px=self.ttl_ms):
            return digest
        try:
            await self.get(digest)  # same name, so same bytes, unless someone tampered with them
        except (BlobCorrupted, BlobTooLarge, BlobNotFound):
            LOGGER.warning("repairing blob %s: the stored value did not match its digest", digest)
            await self.redis.set(key, data, px=self.ttl_ms)
            return digest
        if self.ttl_ms is not None:
            await self.redis.pexpire(key, self.ttl_ms)
        return digest

    async def get(self, digest: str) -> bytes:
        """The bytes named `digest`, verified. Raises BlobNotFound, BlobTooLarge, BlobCorrupted."""
        key = self.key(digest)
        try:
            reply = await self._get_limited(keys=[key], args=[self.max_bytes])
        except ResponseError as exc:
            reply = exc
        return self._checked(digest, key, reply)

    async def get_many(self, digests: list[str]) -> list[bytes | BlobError | ValueError]:
        """get() of each digest, in order, in one pipeline per GET_MANY_CHUNK: its bytes, verified,
        or the exception get() would raise for it (BlobNotFound, BlobTooLarge, BlobCorrupted, or
        ValueError for a digest that is no sha256), so one bad blob does not hide the others.
        Raises only what fails them all (Redis unreachable)."""
        results: list = [None] * len(digests)
        wanted: dict[str, list[int]] = {}  # each digest read once, however often it is named
        for index, digest in enumerate(digests):
            try:
                self.key(digest)
            except ValueError as exc:
                results[index] = exc
                continue
            wanted.setdefault(digest, []).append(index)
        unique = list(wanted)
        for start in range(0, len(unique), GET_MANY_CHUNK):
            chunk = unique[start:start + GET_MANY_CHUNK]
            keys = [self.prefix + digest for digest in chunk]
            for digest, key, reply in zip(chunk, keys, await self._get_limited_many(keys)):
                try:
                    found = self._checked(digest, key, reply)
                except BlobError as exc:
                    found = exc
                for index in wanted[digest]:
                    results[index] = found
        return results

    async def _get_limited_many(self, keys: list[str]) -> list:
        """_GET_LIMITED's reply (or ResponseError) for each key, in one pipeline. EVALSHA itself,
        not the AsyncScript: a pipeline running that asks SCRIPT EXISTS first, a second round trip
        every time; here the script is loaded only once Redis says it lacks it (a restart, a
        SCRIPT FLUSH)."""
        async def run() -> list:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.evalsha(self._get_limited.sha, 1, key, self.max_bytes)
                return await pipe.execute(raise_on_error=False)  # a WRONGTYPE is that blob's alone

        replies = await run()
        if any(isinstance(reply, NoScriptError) for reply in replies):
            self._get_limited.sha = await self.redis.script_load(_GET_LIMITED)
            replies = await run()
            for reply in replies:
                if isinstance(reply, NoScriptError):  # flushed again at once: Redis's trouble, no blob's
                    raise reply
        return replies

    def _checked(self, digest: str, key: str, reply) -> bytes:
        """The bytes of a _GET_LIMITED reply (or its ResponseError) for `digest`, or the BlobError
        that says why not: get() and get_many() judge a reply alike."""
        if isinstance(reply, ResponseError):
            raise BlobCorrupted(f"blob {digest}: the value under {key} is not a string ({reply})")
        if reply[0] == -1:
            raise BlobNotFound(f"no blob {digest} in Redis (key {key}): never stored, expired or deleted")
        if reply[0] == 0:
            raise BlobTooLarge(f"blob {digest} is stored as {reply[1]} bytes, over the limit of {self.max_bytes}; "
                               f"not read")
        data = reply[1]
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise BlobCorrupted(f"blob {digest} is corrupted: the {len(data)} bytes stored under {key} hash to "
                                f"{actual}; refusing to return them")
        return data

    async def exists(self, digest: str) -> bool:
        return bool(await self.redis.exists(self.key(digest)))

    async def delete(self, digest: str) -> bool:
        return bool(await self.redis.delete(self.key(digest)))
