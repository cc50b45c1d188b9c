"""Node liveness in Redis (Heartbeats).

`heartbeat_{node}` (JSON info, PX ttl) and the sorted set `live_nodes` (member node, score =
expiry in Redis server milliseconds: one clock for every node). live() drops expired members and
returns {node: info}.
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable, Mapping

import redis.asyncio as aioredis

from .redis_client import as_text, canonical_json


# KEYS[1] live set, KEYS[2] heartbeat key; ARGV node, ttl ms, info.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
return now
"""

# KEYS[1] live set. Drops expired members, returns the others.
_LIVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class Heartbeats:
    """Liveness of nodes: each beat() lives `ttl` seconds (Redis server clock)."""

    def __init__(self, redis: aioredis.Redis, *, ttl: float = 15.0, registry: str = "live_nodes",
                 prefix: str = "heartbeat_"):
        if ttl <= 0:
            raise ValueError("heartbeat ttl must be positive")
        self.redis = redis
        self.ttl_ms = max(1, int(ttl * 1000))
        self.registry = registry
        self.prefix = prefix
        self._beat = redis.register_script(_BEAT)
        self._live = redis.register_script(_LIVE)

    def key(self, node: str) -> str:
        return self.prefix + node

    def _beat_call(self, node: str, info: Mapping | None) -> dict:
        """_BEAT's KEYS and ARGV for one node's beat."""
        return {"keys": [self.registry, self.key(node)], "args": [node, self.ttl_ms, canonical_json(dict(info or {}))]}

    async def beat(self, node: str, info: Mapping | None = None) -> None:
        """Say `node` is alive for the next ttl seconds; info: a small JSON-able map (role, load...)."""
        await self._beat(**self._beat_call(node, info))

    async def beat_many(self, infos: Mapping[str, Mapping | None]) -> None:
        """beat() for many nodes in one round trip (the nodes of an IoT host: 500 calls every
        few seconds were a tenth of a host's CPU)."""
        if len(infos) <= 1:
            for node, info in infos.items():
                await self.beat(node, info)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for node, info in infos.items():
                await self._beat(**self._beat_call(node, info), client=pipe)
            await pipe.execute()

    async def keep_beating(self, node: str, info: Mapping | Callable[[], Mapping] | None = None, *,
                           every: float = 5.0) -> None:
        """beat() every `every` seconds until cancelled (a node's liveness task). info: a map,
        or a function returning one, called at each beat (what changes: pending batches, load)."""
        await self.keep_beating_many(lambda: {node: info() if callable(info) else info}, every=every)

    async def keep_beating_many(self, infos: Callable[[], Mapping[str, Mapping | None]], *,
                                every: float = 5.0) -> None:
        """beat_many(infos()) every `every` seconds until cancelled: {node: info} of the nodes
        alive now, asked at each beat."""
        while True:
            await self.beat_many(infos())
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # redis-py may swallow a cancel that lands mid-command
                raise asyncio.CancelledError
            await asyncio.sleep(every)

    async def is_alive(self, node: str) -> bool:
        return bool(await self.redis.exists(self.key(node)))

    async def live(self) -> dict[str, dict]:
        """{node: info} of every node whose last beat has not expired, sorted by node."""
        nodes = [as_text(n) for n in await self._live(keys=[self.registry])]
        if not nodes:
            return {}
        infos = await self.redis.mget([self.key(n) for n in nodes])
        return {node: json.loads(info) for node, info in sorted(zip(nodes, infos)) if info is not None}

    async def forget(self, node: str) -> None:
        """A node that shuts down cleanly leaves at once."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(self.registry, node)
            pipe.delete(self.key(node))
            await pipe.execute()
