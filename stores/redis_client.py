"""Connecting to Redis (redis.asyncio): `await connect(url)` gives a `redis.asyncio.Redis` with
decode_responses=False (blobs are bytes; every store decodes what it reads), from a bounded pool."""

from __future__ import annotations

import json
from typing import Any

import redis.asyncio as aioredis


MAX_CONNECTIONS = 64  # per client: a node that fetches a thousand blobs at once waits for a free one


def client(url: str, *, max_connections: int = MAX_CONNECTIONS, **kwargs) -> aioredis.Redis:
    """A redis.asyncio client for `url` (redis://[:password@]host:port/db), bytes in and out;
    it connects on first use. At most max_connections at once: more callers wait their turn
    instead of opening a connection each (a preprocess of a thousand submissions, an IoT host's
    hundreds of nodes), which would swamp Redis and this process's sockets."""
    pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=None,
                                                    decode_responses=False, **kwargs)
    return aioredis.Redis.from_pool(pool)


async def connect(url: str, **kwargs) -> aioredis.Redis:
    """client(url), once Redis answered a PING."""
    redis = client(url, **kwargs)
    await redis.ping()
    return redis


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
