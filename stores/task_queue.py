"""Task delivery on Redis streams (TaskQueue).

One Redis stream per queue (`tasks_{node}` for a compute node: task_stream()), one consumer group
(default "workers"), a consumer per worker process. publish() = XADD {"task": canonical JSON};
read() first takes over messages another consumer left pending longer than `claim_idle_ms`
(XAUTOCLAIM), then new ones (XREADGROUP >); recover() gives a restarted consumer its own pending
messages (XREADGROUP 0); ack() = XACK + XDEL. A group that vanished (a Redis restarted without
its data, or flushed) is made again and the read raises DeliveriesLost, so the publisher
re-derives the lost messages instead of waiting on an empty stream. A message delivered more than `max_deliveries` times
goes to `{stream}_dead` instead of being handed out again. A consumer killed mid-task thus loses
nothing: the task stays pending until someone acks it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Iterable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from .redis_client import as_text, canonical_json

LOGGER = logging.getLogger(__name__)


def task_stream(node: str) -> str:
    """The task stream of one compute node (its public key or name)."""
    return f"tasks_{node}"


@dataclass
class TaskMessage:
    message_id: str
    task: dict
    deliveries: int  # times handed out, this one included (1 = first delivery)


_PUBLISH_ONCE = """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then
  return redis.call('XADD', KEYS[1], '*', 'task', ARGV[1])
end
return false
"""


class DeliveriesLost(RuntimeError):
    """The stream's consumer group is gone (Redis restarted without it, or was flushed): the
    messages it held are lost. The group is made again, empty; the publisher re-derives what
    belongs in it (a compute node: from the chain, TaskQueue's user must do so)."""


def _no_group(exc: ResponseError) -> bool:
    return str(exc).startswith("NOGROUP")


class TaskQueue:
    """At-least-once task delivery on a Redis stream with one consumer group."""

    def __init__(self, redis: aioredis.Redis, stream: str, *, group: str = "workers",
                 claim_idle_ms: int = 30_000, max_deliveries: int = 5, dead_stream: str | None = None):
        """claim_idle_ms: a message pending that long without an ack is taken over by the next
        reader (its consumer is presumed dead: keep tasks shorter, or ack and re-publish);
        max_deliveries: after that many deliveries a message goes to dead_stream
        (default `{stream}_dead`)."""
        self.redis = redis
        self.stream = stream
        self.group = group
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.dead_stream = dead_stream or f"{stream}_dead"
        self._group_ready = False
        self._publish_once = redis.register_script(_PUBLISH_ONCE)

    async def ensure_group(self) -> None:
        """Create the stream and its group if missing (new groups start at the stream's beginning)."""
        if self._group_ready:
            return
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def _lost(self) -> DeliveriesLost:
        """The group vanished under us: make it again and say so."""
        self._group_ready = False
        await self.ensure_group()
        LOGGER.warning("the consumer group of %s was gone (Redis lost it); made it again, empty", self.stream)
        return DeliveriesLost(f"the consumer group {self.group!r} of {self.stream} was lost with Redis's data")

    def forget_group(self) -> None:
        """Look for the group again before the next read (call when Redis restarted)."""
        self._group_ready = False

    async def publish(self, task: Mapping) -> str:
        """Append a task (a JSON-able map); returns its message id."""
        await self.ensure_group()
        message_id = await self.redis.xadd(self.stream, {"task": canonical_json(dict(task))})
        return as_text(message_id)

    async def publish_once(self, task: Mapping, marker: str, ttl_seconds: int = 24 * 3600) -> str | None:
        """Append a task unless `marker` is set, setting it in the same step (one script), so a
        crash can never leave the marker without the message; None if it was published before."""
        await self.ensure_group()
        message_id = await self._publish_once(**self._publish_call(task, marker, ttl_seconds))
        return as_text(message_id) if message_id else None

    def _publish_call(self, task: Mapping, marker: str, ttl_seconds: int) -> dict:
        """_PUBLISH_ONCE's KEYS and ARGV for one task."""
        return {"keys": [self.stream, marker], "args": [canonical_json(dict(task)), ttl_seconds]}

    async def publish_once_many(self, tasks: list[tuple[Mapping, str]],
                                ttl_seconds: int = 24 * 3600) -> list[str | None]:
        """publish_once for each (task, marker), in one round trip (a round's hundreds of
        trainings become runnable together); each its own script call, so each stands alone.
        In MULTI/EXEC: a worker blocked reading the stream wakes once all are in and takes them
        together, not after the first script (it then trained one alone before the rest)."""
        if len(tasks) <= 1:
            return [await self.publish_once(task, marker, ttl_seconds) for task, marker in tasks]
        await self.ensure_group()
        async with self.redis.pipeline(transaction=True) as pipe:
            for task, marker in tasks:
                await self._publish_once(**self._publish_call(task, marker, ttl_seconds), client=pipe)
            found = await pipe.execute()
        return [as_text(message_id) if message_id else None for message_id in found]

    async def _deliveries(self, message_id: str) -> int:
        entries = await self.redis.xpending_range(self.stream, self.group, message_id, message_id, 1)
        return int(entries[0]["times_delivered"]) if entries else 1

    async def _decode(self, entries: Iterable, *, counted: bool) -> list[TaskMessage]:
        messages = []
        for message_id, fields in entries:
            message_id = as_text(message_id)
            if not fields:  # deleted from the stream while pending: nothing to deliver
                await self.redis.xack(self.stream, self.group, message_id)
                continue
            deliveries = await self._deliveries(message_id) if counted else 1
            try:
                task = json.loads(fields[b"task"])
            except (KeyError, ValueError) as exc:
                await self._bury(message_id, fields, deliveries, f"undecodable task: {exc}")
                continue
            if deliveries > self.max_deliveries:
                await self._bury(message_id, fields, deliveries, f"delivered {deliveries} times")
                continue
            messages.append(TaskMessage(message_id, task, deliveries))
        return messages

    async def _bury(self, message_id: str, fields: Mapping, deliveries: int, why: str) -> None:
        LOGGER.warning("task %s on %s goes to %s: %s", message_id, self.stream, self.dead_stream, why)
        dead = {**{as_text(k): v for k, v in fields.items()}, "origin_id": message_id, "deliveries": str(deliveries),
                "reason": why}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xadd(self.dead_stream, dead)
            pipe.xack(self.stream, self.group, message_id)
            pipe.xdel(self.stream, message_id)
            await pipe.execute()

    async def claim_stale(self, consumer: str, *, count: int = 10) -> list[TaskMessage]:
        """Take over messages pending longer than claim_idle_ms (their consumer presumably died)."""
        await self.ensure_group()
        try:
            reply = await self.redis.xautoclaim(self.stream, self.group, consumer, self.claim_idle_ms,
                                                start_id="0-0", count=count)
        except ResponseError as exc:
            if _no_group(exc):
                raise await self._lost() from None
            raise
        claimed = reply[1]
        if claimed:
            LOGGER.info("%s claimed %d stale task(s) on %s", consumer, len(claimed), self.stream)
        return await self._decode(claimed, counted=True)

    async def read(self, consumer: str, *, count: int = 1, block_ms: int | None = None) -> list[TaskMessage]:
        """Up to `count` tasks for `consumer`: stale ones first, then new ones (waiting up to
        block_ms for one when given). Ack each with ack() once its work is done."""
        messages = await self.claim_stale(consumer, count=count)
        if len(messages) >= count:
            return messages
        try:
            reply = await self.redis.xreadgroup(self.group, consumer, {self.stream: ">"},
                                                count=count - len(messages), block=block_ms)
        except ResponseError as exc:
            if _no_group(exc):
                raise await self._lost() from None
            raise
        for _stream, entries in reply or []:
            messages += await self._decode(entries, counted=False)
        return messages

    async def recover(self, consumer: str, *, count: int = 100) -> list[TaskMessage]:
        """The messages `consumer` had read but not acked (call once when a worker restarts)."""
        await self.ensure_group()
        try:
            reply = await self.redis.xreadgroup(self.group, consumer, {self.stream: "0"}, count=count)
        except ResponseError as exc:
            if _no_group(exc):
                raise await self._lost() from None
            raise
        messages = []
        for _stream, entries in reply or []:
            messages += await self._decode(entries, counted=True)
        return messages

    async def ack(self, *message_ids: str) -> bool:
        """Done with these tasks (one, or those of one report): acknowledge and delete them, in
        one round trip. False if any was not pending (already acked)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, *message_ids)
            pipe.xdel(self.stream, *message_ids)
            acked, _ = await pipe.execute()
        return acked == len(message_ids)

    async def pending(self, consumer: str | None = None, *, count: int = 100) -> list[dict]:
        """Pending messages: [{message_id, consumer, idle_ms, deliveries}]."""
        await self.ensure_group()
        entries = await self.redis.xpending_range(self.stream, self.group, "-", "+", count, consumername=consumer)
        return [{"message_id": as_text(e["message_id"]), "consumer": as_text(e["consumer"]),
                 "idle_ms": int(e["time_since_delivered"]), "deliveries": int(e["times_delivered"])}
                for e in entries]

    async def dead(self, count: int = 100) -> list[dict]:
        """Messages moved to the dead stream: [{message_id, task, origin_id, deliveries, reason}]."""
        entries = await self.redis.xrange(self.dead_stream, count=count)
        return [{"message_id": as_text(mid), **{as_text(k): as_text(v) for k, v in fields.items()}} for mid, fields in entries]
