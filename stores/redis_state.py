"""Redis state of TrustMesh FL (redis.asyncio): federation cache, blobs, task delivery, heartbeats.

Connect with `await connect(url)` (a `redis.asyncio.Redis` with decode_responses=False: blobs are
bytes; every helper here decodes what it reads). Standalone Redis: the federation cache runs Lua
scripts over two keys whose names the design fixes, which a Redis Cluster would place in
different slots.

Federation cache (FederationCache)
----------------------------------
A fast, rebuildable copy of the on-chain rounds of trustmesh-federation, filled only from
*committed* events (`EventSubscriber` delivers committed blocks only) or from chain state.

Why it exists although no node of ours reads it: the design (ARCHITECTURE.md, "Data placement")
publishes these two keys as the place where submissions accumulate in arrival order, for tools
that watch a federation without walking the chain (a dashboard, a monitoring script, the design
seed's consumers). Our nodes and the audit read the chain itself, so the cache is never on a
round's path and never trusted: any compute node keeps it filled, and a test checks that the
cache filled from events equals one rebuilt from chain state. The keys:

    iot_data_{workflow}_{schedule}_{app}_federated      list, one canonical-JSON element per
                                                        accepted submission, in arrival order:
        {"digest": sha256 hex, "metadata": {...}, "node": key, "position": 1-based, "samples": int}
    federation_state_{workflow}_{schedule}              hash, all values strings:
        workflow_id, schedule_id, round, coordinator, workflow_version ("" if none),
        expected_nodes (count), expected_node_keys (comma-separated, in the workflow's order),
        min_nodes_required, round_timeout, round_start_time (chain time, unix seconds),
        status (collecting | ready | timeout), status_reason ("" | all-submitted | closed),
        submitted_nodes (count), app, submissions_key (the list's name),
        node:<key> (that node's 1-based position; the idempotency marker)
    trustmesh_federation_cache_cursor                   hash {block_id, block_num}: last block applied

`app` is the workflow's entry task: the first task of `definition["tasks"]` with no
`depends_on` (the design seed's `dependency_graph["start"]`, the task that consumes the
submissions; "preprocess" in workflows/federated-digits.json). It is resolved from the
workflow record on chain when a round is first cached (or passed as `app=` to FederationCache)
and recorded in the hash, so readers find the list through `submissions_key` without resolving
anything.

Each event is applied by one Lua script (atomic) and idempotently: a round is opened once
(`schedule_id` field), a submission is keyed by its node (`node:<key>`, one submission per node
per round on chain) and must land at its on-chain `position`, a status moves collecting ->
ready|timeout once. Replaying any events adds nothing. An event that does not fit (the cache
missed earlier events: started late, Redis flushed) makes the cache rebuild that round from chain
state when it has a REST client, else raises FederationCacheGap. A rebuild never moves a round
backwards (fewer submissions, or collecting after final), so it cannot undo an event applied
meanwhile. Elements and hash fields hold only what chain state holds, so a cache filled from
events equals one rebuilt from the chain.

Blobs (BlobStore)
-----------------
`blob_{sha256 hex}` -> bytes. put() returns the digest (SET NX; a stored value whose digest does
not match is repaired); get() refuses to return bytes whose sha256 differs from the name
(BlobCorrupted) and values over the size limit (BlobTooLarge, checked inside Redis before any
byte is sent).

Task delivery (TaskQueue)
-------------------------
One Redis stream per queue (`tasks_{node}` for a compute node: task_stream()), one consumer group
(default "workers"), a consumer per worker process. publish() = XADD {"task": canonical JSON};
read() first takes over messages another consumer left pending longer than `claim_idle_ms`
(XAUTOCLAIM), then new ones (XREADGROUP >); recover() gives a restarted consumer its own pending
messages (XREADGROUP 0); ack() = XACK + XDEL. A group that vanished (a Redis restarted without
its data, or flushed) is made again and the read raises DeliveriesLost, so the publisher
re-derives the lost messages instead of waiting on an empty stream. A message delivered more than `max_deliveries` times
goes to `{stream}_dead` instead of being handed out again. A consumer killed mid-task thus loses
nothing: the task stays pending until someone acks it.

Heartbeats (Heartbeats)
-----------------------
`heartbeat_{node}` (JSON info, PX ttl) and the sorted set `live_nodes` (member node, score =
expiry in Redis server milliseconds: one clock for every node). live() drops expired members and
returns {node: info}.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from trustmesh.ledger import payload as cbor
from trustmesh.scheduling import federation, layout
from trustmesh.scheduling.common import MAX_RECORD_BYTES

LOGGER = logging.getLogger(__name__)

HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


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


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, (bytes, bytearray)) else str(value)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# =========================================================================== federation cache

FEDERATION_EVENTS = (
    federation.EVENT_ROUND_OPENED,
    federation.EVENT_SUBMISSION_ACCEPTED,
    federation.EVENT_ROUND_READY,
    federation.EVENT_ROUND_TIMEOUT,
)
CURSOR_KEY = "trustmesh_federation_cache_cursor"
NODE_FIELD = "node:"


def submissions_key(workflow_id: str, schedule_id: str, app: str) -> str:
    """The arrival-ordered submission list of a round."""
    return f"iot_data_{workflow_id}_{schedule_id}_{app}_federated"


def federation_key(workflow_id: str, schedule_id: str) -> str:
    """The federation-state hash of a round."""
    return f"federation_state_{workflow_id}_{schedule_id}"


def entry_task(definition: Mapping) -> str:
    """The `app` part of the list key: the first task (definition order) that depends on nothing."""
    for task in definition.get("tasks") or ():
        if isinstance(task, Mapping) and not task.get("depends_on"):
            return str(task["id"])
    raise ValueError(f"workflow {definition.get('workflow_id')!r} has no task without dependencies")


class FederationCacheGap(RuntimeError):
    """An event does not fit the cached round (earlier events were missed) and no REST client
    was given to rebuild the round from the chain."""


def _submission_element(node: str, digest: str, samples: int, metadata: Mapping, position: int) -> str:
    return _canonical_json({"node": node, "digest": digest, "samples": int(samples),
                            "metadata": dict(metadata), "position": int(position)})


def _round_fields(record: Mapping, app: str) -> dict[str, str]:
    """The hash of a round as chain state holds it (also what the events produce, field for field)."""
    submitted = list(record["submitted_nodes"])
    status = record["status"]
    if status == federation.READY:
        reason = "all-submitted" if len(submitted) == len(record["expected_nodes"]) else "closed"
    elif status == federation.TIMEOUT:
        reason = "closed"
    else:
        reason = ""
    version = record.get("workflow_version")
    fields = {
        "workflow_id": record["workflow_id"],
        "schedule_id": record["schedule_id"],
        "round": str(record["round"]),
        "coordinator": record["coordinator"],
        "workflow_version": "" if version is None else str(version),
        "expected_nodes": str(len(record["expected_nodes"])),
        "expected_node_keys": ",".join(record["expected_nodes"]),
        "min_nodes_required": str(record["min_nodes_required"]),
        "round_timeout": str(record["round_timeout"]),
        "round_start_time": str(record["round_start"]),
        "status": status,
        "status_reason": reason,
        "submitted_nodes": str(len(submitted)),
        "app": app,
        "submissions_key": submissions_key(record["workflow_id"], record["schedule_id"], app),
    }
    for position, node in enumerate(submitted, start=1):
        fields[NODE_FIELD + node] = str(position)
    return fields


def _event_parts(event: Any) -> tuple[str, dict[str, str]]:
    """(event_type, attributes) of a protobuf Event or a REST receipt's event dict."""
    if isinstance(event, Mapping):
        attributes = event.get("attributes") or []
        return event["event_type"], {a["key"]: a["value"] for a in attributes}
    return event.event_type, {a.key: a.value for a in event.attributes}


# KEYS[1] hash; ARGV field/value pairs. Opens a round once.
_OPEN = """
if redis.call('HEXISTS', KEYS[1], 'schedule_id') == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""

# KEYS[1] hash, KEYS[2] list; ARGV node, position, element.
# 1 appended, 0 already there, -1 round not cached, -2 does not fit (earlier submissions missing).
_SUBMIT = """
if redis.call('HEXISTS', KEYS[1], 'schedule_id') == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'node:' .. ARGV[1]) == 1 then return 0 end
local n = redis.call('LLEN', KEYS[2])
if n + 1 ~= tonumber(ARGV[2]) then return -2 end
redis.call('RPUSH', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[1], 'node:' .. ARGV[1], ARGV[2], 'submitted_nodes', n + 1)
return 1
"""

# KEYS[1] hash; ARGV status, submission count, reason. 1 set, 0 already, -1 not cached, -2 does not fit.
_FINISH = """
if redis.call('HEXISTS', KEYS[1], 'schedule_id') == 0 then return -1 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == ARGV[1] then return 0 end
if status ~= 'collecting' then return -2 end
if tonumber(redis.call('HGET', KEYS[1], 'submitted_nodes')) ~= tonumber(ARGV[2]) then return -2 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'status_reason', ARGV[3])
return 1
"""

# KEYS[1] hash, KEYS[2] list, KEYS[3] a stale list to drop (or the list again);
# ARGV[1] rank of the new state, ARGV[2] number of field/value items, then those, then elements.
# Replaces the round unless the cached one is further along (more submissions, or final).
_REBUILD = """
local status = redis.call('HGET', KEYS[1], 'status')
if status then
  local rank = tonumber(redis.call('HGET', KEYS[1], 'submitted_nodes') or '0') * 2
  if status ~= 'collecting' then rank = rank + 1 end
  if rank > tonumber(ARGV[1]) then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
local nfields = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + nfields))
if #ARGV > 2 + nfields then redis.call('RPUSH', KEYS[2], unpack(ARGV, 3 + nfields)) end
return 1
"""

APPLIED, DUPLICATE, REBUILT, IGNORED = "applied", "duplicate", "rebuilt", "ignored"


class FederationCache:
    """The Redis copy of trustmesh-federation rounds (see the module docstring for its keys)."""

    def __init__(self, redis: aioredis.Redis, *, rest_client=None, app: str | None = None):
        """rest_client: a trustmesh.ledger.rest_client.RestClient, to resolve `app` from the
        workflow on chain and to rebuild a round when events were missed; app: a fixed `app`
        for every workflow instead (then no REST client is needed to apply events)."""
        self.redis = redis
        self.rest_client = rest_client
        self._fixed_app = app
        self._apps: dict[str, str] = {}
        self._open = redis.register_script(_OPEN)
        self._submit = redis.register_script(_SUBMIT)
        self._finish = redis.register_script(_FINISH)
        self._rebuild = redis.register_script(_REBUILD)

    # -- reading ---------------------------------------------------------------------------------

    async def round_state(self, workflow_id: str, schedule_id: str) -> dict[str, str] | None:
        """The round's hash as a {field: str} dict, or None when it is not cached."""
        raw = await self.redis.hgetall(federation_key(workflow_id, schedule_id))
        return {_s(k): _s(v) for k, v in raw.items()} or None

    async def submissions(self, workflow_id: str, schedule_id: str) -> list[dict]:
        """The round's submissions in arrival order (decoded list elements)."""
        key = await self.redis.hget(federation_key(workflow_id, schedule_id), "submissions_key")
        if key is None:
            return []
        return [json.loads(item) for item in await self.redis.lrange(key, 0, -1)]

    async def cursor(self) -> tuple[str, int] | None:
        """(block_id, block_num) of the last block apply_block() finished, or None."""
        raw = await self.redis.hgetall(CURSOR_KEY)
        if not raw:
            return None
        return _s(raw[b"block_id"]), int(raw[b"block_num"])

    # -- app -------------------------------------------------------------------------------------

    async def app_for(self, workflow_id: str, *, rest_client=None, head: str | None = None) -> str:
        """The `app` part of the workflow's list keys (its entry task; cached per workflow)."""
        if self._fixed_app is not None:
            return self._fixed_app
        if workflow_id in self._apps:
            return self._apps[workflow_id]
        rest = rest_client or self.rest_client
        if rest is None:
            raise FederationCacheGap(
                f"cannot name the submission list of workflow {workflow_id!r}: give FederationCache a "
                f"rest_client (to read the workflow's entry task from the chain) or a fixed app=")
        data = await rest.get_state(layout.workflow_address(workflow_id), head=head)
        if data is None:
            raise FederationCacheGap(f"workflow {workflow_id!r} is not on chain (at head {head or 'now'})")
        record = cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
        app = entry_task(record["definition"])
        self._apps[workflow_id] = app
        return app

    # -- events ----------------------------------------------------------------------------------

    async def apply_event(self, event: Any) -> str:
        """Apply one committed federation event (protobuf Event or receipt dict).

        Returns "applied", "duplicate" (already reflected: replay), "rebuilt" (it did not fit,
        the round was rebuilt from chain state) or "ignored" (not a federation event)."""
        event_type, attrs = _event_parts(event)
        if event_type not in FEDERATION_EVENTS:
            return IGNORED
        result = await self._apply(event_type, attrs)
        if result == 1:
            return APPLIED
        if result == 0:
            return DUPLICATE
        where = (f"{event_type} of round {attrs.get('round')} of workflow {attrs['workflow_id']!r} "
                 f"({attrs['schedule_id']})")
        if self.rest_client is None:
            raise FederationCacheGap(
                f"{where} does not follow the cached round (events were missed); give FederationCache a "
                f"rest_client to rebuild it from the chain, or call rebuild_from_chain()")
        LOGGER.info("%s does not fit the cache; rebuilding the round from the chain", where)
        await self.rebuild_round(self.rest_client, attrs["schedule_id"])
        # The rebuilt round must now hold this committed event; if not, the REST API answers
        # from a validator that is behind the one the events came from.
        if await self._apply(event_type, attrs) not in (0, 1):
            raise FederationCacheGap(f"{where} still does not fit after rebuilding the round from the chain "
                                     f"(is the REST API's validator behind the event source?)")
        return REBUILT

    async def _apply(self, event_type: str, attrs: Mapping[str, str]) -> int:
        """One event as one script: 1 applied, 0 already reflected, negative: does not fit."""
        workflow_id, schedule_id = attrs["workflow_id"], attrs["schedule_id"]
        hash_key = federation_key(workflow_id, schedule_id)
        if event_type == federation.EVENT_ROUND_OPENED:
            if await self.redis.hexists(hash_key, "schedule_id"):
                return 0  # no need to resolve the app again
            app = await self.app_for(workflow_id)
            expected = [k for k in attrs["expected_nodes"].split(",") if k]
            fields = {
                "workflow_id": workflow_id, "schedule_id": schedule_id, "round": attrs["round"],
                "coordinator": attrs["coordinator"], "workflow_version": attrs.get("workflow_version", ""),
                "expected_nodes": str(len(expected)), "expected_node_keys": ",".join(expected),
                "min_nodes_required": attrs["min_nodes_required"], "round_timeout": attrs["round_timeout"],
                "round_start_time": attrs["round_start"], "status": federation.COLLECTING, "status_reason": "",
                "submitted_nodes": "0", "app": app,
                "submissions_key": submissions_key(workflow_id, schedule_id, app),
            }
            return await self._open(keys=[hash_key], args=[item for pair in fields.items() for item in pair])
        if event_type == federation.EVENT_SUBMISSION_ACCEPTED:
            list_key = await self.redis.hget(hash_key, "submissions_key")
            if list_key is None:
                return -1
            element = _submission_element(attrs["node"], attrs["digest"], int(attrs["samples"]),
                                          json.loads(attrs.get("metadata") or "{}"), int(attrs["position"]))
            return await self._submit(keys=[hash_key, list_key], args=[attrs["node"], attrs["position"], element])
        status = federation.READY if event_type == federation.EVENT_ROUND_READY else federation.TIMEOUT
        reason = attrs.get("reason", "closed") if status == federation.READY else "closed"
        return await self._finish(keys=[hash_key], args=[status, attrs["submissions"], reason])

    async def apply_block(self, block) -> list[str]:
        """Apply the federation events of one committed block (BlockEvents), in order, then
        record the block as the cursor. Safe to repeat."""
        outcomes = []
        for event in block.events:
            if event.event_type in FEDERATION_EVENTS:
                outcomes.append(await self.apply_event(event))
        await self.redis.hset(CURSOR_KEY, mapping={"block_id": block.block_id, "block_num": str(block.block_num)})
        return outcomes

    @staticmethod
    def subscriptions() -> list:
        """Event subscriptions for EventSubscriber (the four federation event types)."""
        from trustmesh.ledger.events import event_subscription

        return [event_subscription(t) for t in FEDERATION_EVENTS]

    async def follow(self, validator_url: str, *, on_block: Callable[[Any, list], Awaitable[None]] | None = None,
                     from_genesis: bool = True) -> None:
        """Apply every committed block's federation events until cancelled, resuming after the
        cursor (or from genesis when there is none and from_genesis, else from now)."""
        from trustmesh.ledger.events import NULL_BLOCK_ID, EventSubscriber

        cursor = await self.cursor()
        known = [cursor[0]] if cursor else ([NULL_BLOCK_ID] if from_genesis else [])
        async with EventSubscriber(validator_url, self.subscriptions(), last_known_block_ids=known) as events:
            async for block in events:
                outcomes = await self.apply_block(block)
                if on_block is not None:
                    await on_block(block, outcomes)

    # -- rebuilding from chain state -------------------------------------------------------------

    async def _write_round(self, record: Mapping, app: str) -> bool:
        fields = _round_fields(record, app)
        workflow_id, schedule_id = record["workflow_id"], record["schedule_id"]
        hash_key = federation_key(workflow_id, schedule_id)
        list_key = fields["submissions_key"]
        old_list = await self.redis.hget(hash_key, "submissions_key")
        stale = _s(old_list) if old_list is not None and _s(old_list) != list_key else list_key
        elements = [
            _submission_element(node, record["submissions"][node]["digest"], record["submissions"][node]["samples"],
                                record["submissions"][node].get("metadata") or {}, position)
            for position, node in enumerate(record["submitted_nodes"], start=1)
        ]
        rank = len(record["submitted_nodes"]) * 2 + (0 if record["status"] == federation.COLLECTING else 1)
        flat = [item for pair in fields.items() for item in pair]
        written = await self._rebuild(keys=[hash_key, list_key, stale], args=[rank, len(flat), *flat, *elements])
        return written == 1

    async def rebuild_round(self, rest_client, schedule_id: str, *, head: str | None = None) -> bool:
        """Rewrite one round from chain state; False if the chain has no such round or the cache
        is already further along."""
        head = head or (await rest_client.head())["header_signature"]
        record = federation.decode_round(await rest_client.get_state(layout.round_address(schedule_id), head=head))
        if record is None:
            return False
        app = await self.app_for(record["workflow_id"], rest_client=rest_client, head=head)
        return await self._write_round(record, app)

    async def rebuild_from_chain(self, rest_client, workflow_id: str) -> list[str]:
        """Rebuild every round of a workflow from chain state alone, all read at one chain head.
        Returns the schedule_ids of its rounds, in round order."""
        head = (await rest_client.head())["header_signature"]
        index = federation.decode_workflow_rounds(
            await rest_client.get_state(layout.workflow_rounds_address(workflow_id), head=head))
        schedule_ids = [index["rounds"][number] for number in sorted(index["rounds"], key=int)]
        if not schedule_ids:
            return []
        app = await self.app_for(workflow_id, rest_client=rest_client, head=head)
        for schedule_id in schedule_ids:
            data = await rest_client.get_state(layout.round_address(schedule_id), head=head)
            record = federation.decode_round(data)
            if record is None:
                raise FederationCacheGap(f"round {schedule_id} of workflow {workflow_id!r} is indexed but "
                                         f"missing from state at head {head[:16]}")
            await self._write_round(record, app)
        return schedule_ids


async def rebuild_from_chain(redis: aioredis.Redis, rest_client, workflow_id: str, *, app: str | None = None) -> list[str]:
    """FederationCache(redis, app=app).rebuild_from_chain(rest_client, workflow_id)."""
    return await FederationCache(redis, rest_client=rest_client, app=app).rebuild_from_chain(rest_client, workflow_id)


# =========================================================================== blobs

DEFAULT_MAX_BLOB_BYTES = 64 * 1024 * 1024


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
            raise BlobCorrupted(f"blob {digest}: the value under {key} is not a string ({exc})") from None
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


# =========================================================================== task delivery


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
        message_id = await self.redis.xadd(self.stream, {"task": _canonical_json(dict(task))})
        return _s(message_id)

    async def publish_once(self, task: Mapping, marker: str, ttl_seconds: int = 24 * 3600) -> str | None:
        """Append a task unless `marker` is set, setting it in the same step (one script), so a
        crash can never leave the marker without the message; None if it was published before."""
        await self.ensure_group()
        message_id = await self._publish_once(keys=[self.stream, marker],
                                              args=[_canonical_json(dict(task)), ttl_seconds])
        return _s(message_id) if message_id else None

    async def _deliveries(self, message_id: str) -> int:
        entries = await self.redis.xpending_range(self.stream, self.group, message_id, message_id, 1)
        return int(entries[0]["times_delivered"]) if entries else 1

    async def _decode(self, entries: Iterable, *, counted: bool) -> list[TaskMessage]:
        messages = []
        for message_id, fields in entries:
            message_id = _s(message_id)
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
        dead = {**{_s(k): v for k, v in fields.items()}, "origin_id": message_id, "deliveries": str(deliveries),
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

    async def ack(self, message_id: str) -> bool:
        """Done with a task: acknowledge and delete it. False if it was not pending (already acked)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, message_id)
            pipe.xdel(self.stream, message_id)
            acked, _ = await pipe.execute()
        return bool(acked)

    async def pending(self, consumer: str | None = None, *, count: int = 100) -> list[dict]:
        """Pending messages: [{message_id, consumer, idle_ms, deliveries}]."""
        await self.ensure_group()
        entries = await self.redis.xpending_range(self.stream, self.group, "-", "+", count, consumername=consumer)
        return [{"message_id": _s(e["message_id"]), "consumer": _s(e["consumer"]),
                 "idle_ms": int(e["time_since_delivered"]), "deliveries": int(e["times_delivered"])}
                for e in entries]

    async def dead(self, count: int = 100) -> list[dict]:
        """Messages moved to the dead stream: [{message_id, task, origin_id, deliveries, reason}]."""
        entries = await self.redis.xrange(self.dead_stream, count=count)
        return [{"message_id": _s(mid), **{_s(k): _s(v) for k, v in fields.items()}} for mid, fields in entries]


# =========================================================================== heartbeats

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

    async def beat(self, node: str, info: Mapping | None = None) -> None:
        """Say `node` is alive for the next ttl seconds; info: a small JSON-able map (role, load...)."""
        await self._beat(keys=[self.registry, self.key(node)],
                         args=[node, self.ttl_ms, _canonical_json(dict(info or {}))])

    async def keep_beating(self, node: str, info: Mapping | Callable[[], Mapping] | None = None, *,
                           every: float = 5.0) -> None:
        """beat() every `every` seconds until cancelled (a node's liveness task). info: a map,
        or a function returning one, called at each beat (what changes: pending batches, load)."""
        while True:
            await self.beat(node, info() if callable(info) else info)
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # redis-py may swallow a cancel that lands mid-command
                raise asyncio.CancelledError
            await asyncio.sleep(every)

    async def is_alive(self, node: str) -> bool:
        return bool(await self.redis.exists(self.key(node)))

    async def live(self) -> dict[str, dict]:
        """{node: info} of every node whose last beat has not expired, sorted by node."""
        nodes = [_s(n) for n in await self._live(keys=[self.registry])]
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


__all__ = [
    "client", "connect", "FederationCache", "FederationCacheGap", "rebuild_from_chain", "submissions_key", "federation_key",
    "entry_task", "FEDERATION_EVENTS", "CURSOR_KEY", "BlobStore", "BlobError", "BlobNotFound", "BlobTooLarge",
    "BlobCorrupted", "DEFAULT_MAX_BLOB_BYTES", "TaskQueue", "TaskMessage", "DeliveriesLost", "task_stream", "Heartbeats",
]
