"""A node's link to Redis that outlives a Redis restart.

Redis is a cache: the chain decides what a federation needs, Redis only carries it faster. So
a node treats Redis being down as a pause, never as an end:

- `wait_up()` returns once Redis answers, retrying with capped backoff and saying once on stderr
  what it waits for (`waiting for Redis at 127.0.0.1:6379 (down 3 s)`);
- `call(operation)` runs one Redis operation, waiting out connection failures (a restarted
  server refuses, then answers "LOADING" while it reads its append-only file);
- `watch(on_restart)` notices that the Redis a node talks to is not the one it filled: another
  server process (INFO run_id changed) or the same one with its data gone (FLUSHALL, or a server
  without persistence), and then awaits `on_restart()` so the node re-derives what it had put
  there (its task deliveries from the chain, its blobs from its own copies).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Awaitable, Callable, TypeVar
from urllib.parse import urlsplit

from redis.exceptions import BusyLoadingError, ConnectionError as RedisConnectionError, TimeoutError as RedisTimeout

from trustmesh.outage import Backoff, Outage

LOGGER = logging.getLogger(__name__)

# What a restarting Redis answers (or fails to): transient, waited out. Anything else is a real error.
TRANSIENT = (RedisConnectionError, RedisTimeout, BusyLoadingError, ConnectionError, TimeoutError)

T = TypeVar("T")


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def shown(url: str) -> str:
    """host:port of a redis:// URL, without its password."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}"


class RedisLink:
    def __init__(self, redis, url: str, who: str, *, every: float = 1.0, max_backoff: float = 2.0):
        """redis: a redis.asyncio client; url: where it points (shown in messages); who: this
        node's name; every: seconds between two looks at whether Redis restarted."""
        self.redis = redis
        self.who = who
        self.every = every
        self.outage = Outage("Redis", shown(url))
        self.max_backoff = max_backoff
        # Set by this node in the Redis it fills: when it is missing, that Redis lost our data.
        self.sentinel = f"trustmesh_session_{who}_{secrets.token_hex(4)}"
        self.run_id: str | None = None
        self.restarts = 0  # restarts noticed (for tests and logs)

    def failed(self, exc: BaseException) -> None:
        """A Redis failure seen elsewhere in the node: counts toward the outage (said once)."""
        self.outage.down(_reason(exc))

    async def outlast(self, exc: BaseException) -> None:
        """A Redis failure seen elsewhere in the node: say so (once) and return when Redis is back."""
        self.failed(exc)
        await self.wait_up()

    async def keep_running(self, loop_forever: Callable[[], Awaitable[None]]) -> None:
        """Run a node's Redis loop (its heartbeats), again each time Redis comes back."""
        while True:
            try:
                await loop_forever()
            except TRANSIENT as exc:
                await self.outlast(exc)

    async def wait_up(self) -> None:
        """Return once Redis answers PING (at once when it does)."""
        delays = Backoff(0.1, self.max_backoff)
        while True:
            try:
                await self.redis.ping()
                self.outage.up()
                return
            except TRANSIENT as exc:
                self.outage.down(_reason(exc))
                await asyncio.sleep(delays.next())

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """await operation(), waiting out Redis being down (as often as it takes)."""
        while True:
            try:
                return await operation()
            except TRANSIENT as exc:
                await self.outlast(exc)

    async def _identity(self) -> tuple[str, bool]:
        """(run_id of the server, whether our sentinel is still there)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.info("server")
            pipe.exists(self.sentinel)
            info, present = await pipe.execute()
        return str(info["run_id"]), bool(present)

    async def mark(self) -> None:
        """Remember which Redis (and which of its data) this node filled."""
        self.run_id, _ = await self.call(self._identity)
        await self.call(lambda: self.redis.set(self.sentinel, b"1"))

    async def watch(self, on_restart: Callable[[], Awaitable[None]]) -> None:
        """Until cancelled: when Redis comes back as another server or without our data, await
        on_restart() (again until it succeeds), then go on watching."""
        if self.run_id is None:
            await self.mark()
        while True:
            await asyncio.sleep(self.every)
            run_id, present = await self.call(self._identity)
            if run_id == self.run_id and present:
                continue
            why = "restarted" if run_id != self.run_id else "lost its data"
            LOGGER.warning("%s: Redis %s; re-deriving what this node keeps there", self.who, why)
            self.restarts += 1
            await self.mark()  # first: a restart during on_restart() is then noticed next time
            while True:
                try:
                    await on_restart()
                    break
                except asyncio.CancelledError:
                    raise
                except TRANSIENT:
                    await self.wait_up()
                except Exception:
                    LOGGER.exception("%s: re-deriving after a Redis restart failed; trying again", self.who)
                    await asyncio.sleep(self.every)
