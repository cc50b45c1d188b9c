"""A lease in Redis (Lease): one holder at a time of a job that any of several processes can do
and one is enough for, such as keeping the federation cache filled.

The key holds the holder's name and expires `ttl` seconds after its last renewal (Redis server
clock). hold() takes a free lease or renews one's own, in one script; a holder that stops renewing
(dead, or cut off from Redis) loses it after ttl, and one that finds another's name has lost it.
Between a holder's last renewal and its expiry two processes may believe they hold it, so a lease
guards only work that is safe to do twice (idempotent), never work that must be done once.
"""

from __future__ import annotations

import redis.asyncio as aioredis

# KEYS[1] the lease; ARGV holder, ttl ms. 1: held by ARGV[1] now (taken or renewed), 0: another's.
_HOLD = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""


class Lease:
    def __init__(self, redis: aioredis.Redis, key: str, holder: str, *, ttl: float):
        if ttl <= 0:
            raise ValueError("a lease's ttl must be positive")
        self.key, self.holder, self.ttl_ms = key, holder, max(1, int(ttl * 1000))
        self._hold = redis.register_script(_HOLD)

    async def hold(self) -> bool:
        """Take the lease if it is free, renew it if it is ours; False if another holds it."""
        return await self._hold(keys=[self.key], args=[self.holder, self.ttl_ms]) == 1
