"""The federation cache (FederationCache): a rebuildable Redis copy of trustmesh-federation's rounds.

Standalone Redis: it runs Lua scripts over two keys whose names the design fixes, which a Redis
Cluster would place in different slots.

A fast, rebuildable copy of the on-chain rounds of trustmesh-federation, filled only from
*committed* events (`EventSubscriber` delivers committed blocks only) or from chain state.

Why it exists although no node of ours reads it: the design (ARCHITECTURE.md, "Data placement")
publishes these two keys as the place where submissions accumulate in arrival order, for tools
that watch a federation without walking the chain (a dashboard, a monitoring script, the design
seed's consumers). Our nodes and the audit read the chain itself, so the cache is never on a
round's path and never trusted: one compute node at a time keeps it filled (the holder of a
lease, stores/lease.py; another takes over within seconds of its end), and a test checks that
the cache filled from events equals one rebuilt from chain state. The keys:

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
    trustmesh_federation_cache_keeper                   the keeping node's key (a lease, PX ttl)

`app` is the workflow's entry task: the first task of `definition["tasks"]` with no
`depends_on` (the design seed's `dependency_graph["start"]`, the task that consumes the
submissions; "preprocess" in workflows/federated-digits.json). It is resolved from the
workflow record on chain when a round is first cached (or passed as `app=` to FederationCache)
and recorded in the hash, so readers find the list through `submissions_key` without resolving
anything.

Each event is applied by one Lua script (atomic) and idempotently: a round is opened once
(`schedule_id` field), a submission is keyed by its node (`node:<key>`, one submission per node
per round on chain) and must land at its on-chain `position`, a status moves collecting ->
ready|timeout once. Replaying any events adds nothing. apply_block() sends a block's consecutive
submissions together (one pipeline reads their rounds' list keys, one runs their scripts and
records the cursor), so a block costs a few Redis round trips however many submissions it holds.
An event that does not fit (the cache missed earlier events: started late, Redis flushed) makes
the cache rebuild that round from chain state when it has a REST client, else raises
FederationCacheGap. A rebuild never moves a round backwards (fewer submissions, or collecting
after final), so it cannot undo an event applied meanwhile. Elements and hash fields hold only
what chain state holds, so a cache filled from events equals one rebuilt from the chain.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any, Awaitable, Callable, Mapping

import redis.asyncio as aioredis

from trustmesh.cancelling import cancel_and_wait
from trustmesh.ledger import payload as cbor
from trustmesh.scheduling import federation, layout
from trustmesh.scheduling.reader import FederationReader
from trustmesh.scheduling.common import MAX_RECORD_BYTES

from .lease import Lease
from .redis_client import as_text, canonical_json

LOGGER = logging.getLogger(__name__)


FEDERATION_EVENTS = (
    federation.EVENT_ROUND_OPENED,
    federation.EVENT_SUBMISSION_ACCEPTED,
    federation.EVENT_ROUND_READY,
    federation.EVENT_ROUND_TIMEOUT,
)
CURSOR_KEY = "trustmesh_federation_cache_cursor"
KEEPER_KEY = "trustmesh_federation_cache_keeper"  # the lease of the node that keeps the cache filled
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
    return canonical_json({"node": node, "digest": digest, "samples": int(samples),
                            "metadata": dict(metadata), "position": int(position)})


def _submit_args(attrs: Mapping[str, str]) -> list[str]:
    """ARGV of _SUBMIT for a submission-accepted event."""
    element = _submission_element(attrs["node"], attrs["digest"], int(attrs["samples"]),
                                  json.loads(attrs.get("metadata") or "{}"), int(attrs["position"]))
    return [attrs["node"], attrs["position"], element]


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

# KEYS[1] the cursor, then each submission's round hash; ARGV block_id, block_num, then each
# submission's node and position. Records the block only if every submission is in the cache: one
# that did not fit is applied after this script, and the cursor must not claim it before that.
_CURSOR = """
for i = 2, #KEYS do
  if redis.call('HGET', KEYS[i], 'node:' .. ARGV[2 * i - 1]) ~= ARGV[2 * i] then return 0 end
end
redis.call('HSET', KEYS[1], 'block_id', ARGV[1], 'block_num', ARGV[2])
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
        self._cursor = redis.register_script(_CURSOR)

    # -- reading ---------------------------------------------------------------------------------

    async def round_state(self, workflow_id: str, schedule_id: str) -> dict[str, str] | None:
        """The round's hash as a {field: str} dict, or None when it is not cached."""
        raw = await self.redis.hgetall(federation_key(workflow_id, schedule_id))
        return {as_text(k): as_text(v) for k, v in raw.items()} or None

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
        return as_text(raw[b"block_id"]), int(raw[b"block_num"])

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
        return await self._apply_event(event_type, attrs)

    async def _apply_event(self, event_type: str, attrs: Mapping[str, str], result: int | None = None) -> str:
        """apply_event() of a parsed event; `result`: its script's, when a pipeline already ran it."""
        if result is None:
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
            return await self._submit(keys=[hash_key, list_key], args=_submit_args(attrs))
        status = federation.READY if event_type == federation.EVENT_ROUND_READY else federation.TIMEOUT
        reason = attrs.get("reason", "closed") if status == federation.READY else "closed"
        return await self._finish(keys=[hash_key], args=[status, attrs["submissions"], reason])

    async def apply_block(self, block) -> list[str]:
        """Apply the federation events of one committed block (BlockEvents), in order, then
        record the block as the cursor. Safe to repeat. Outcomes as apply_event() one by one."""
        events = [_event_parts(e) for e in block.events if e.event_type in FEDERATION_EVENTS]
        cursor = {"block_id": block.block_id, "block_num": str(block.block_num)}
        runs = [list(run) for _, run in itertools.groupby(
            events, key=lambda e: e[0] == federation.EVENT_SUBMISSION_ACCEPTED)]
        outcomes, recorded = [], False
        for number, run in enumerate(runs, start=1):
            if run[0][0] == federation.EVENT_SUBMISSION_ACCEPTED:
                # the cursor rides on the block's last pipeline when the block ends with submissions
                applied, recorded = await self._apply_submissions([attrs for _, attrs in run],
                                                                  cursor if number == len(runs) else None)
                outcomes += applied
            else:
                for event_type, attrs in run:
                    outcomes.append(await self._apply_event(event_type, attrs))
        if not recorded:
            await self.redis.hset(CURSOR_KEY, mapping=cursor)
        return outcomes

    async def _apply_submissions(self, run: list[Mapping[str, str]],
                                 cursor: Mapping[str, str] | None) -> tuple[list[str], bool]:
        """Consecutive submission events in two pipelines (redis-py adds a SCRIPT EXISTS before
        the second) instead of two round trips each: their rounds' list keys, then their _SUBMIT
        scripts in order and _CURSOR when `cursor` is given. Non-transactional is enough: each
        script is atomic and idempotent. Returns their outcomes and whether the cursor was recorded."""
        hash_keys = [federation_key(attrs["workflow_id"], attrs["schedule_id"]) for attrs in run]
        rounds = list(dict.fromkeys(hash_keys))
        lookup = self.redis.pipeline(transaction=False)
        for hash_key in rounds:
            lookup.hget(hash_key, "submissions_key")
        list_keys = dict(zip(rounds, await lookup.execute()))
        pipe = self.redis.pipeline(transaction=False)
        for hash_key, attrs in zip(hash_keys, run):
            if list_keys[hash_key] is not None:
                await self._submit(keys=[hash_key, list_keys[hash_key]], args=_submit_args(attrs), client=pipe)
        if cursor is not None:
            await self._cursor(keys=[CURSOR_KEY, *hash_keys], client=pipe,
                               args=[cursor["block_id"], cursor["block_num"],
                                     *(v for attrs in run for v in (attrs["node"], attrs["position"]))])
        replies = iter(await pipe.execute())
        results = [next(replies) if list_keys[hash_key] is not None else -1 for hash_key in hash_keys]
        outcomes = []
        for attrs, result in zip(run, results):
            # A submission that did not fit wrote nothing: the per-event path runs it again (an
            # earlier one's rebuild of its round may have made it fit) and else rebuilds its round
            # or raises, as if the block were applied event by event. Later submissions to other
            # rounds were applied meanwhile, which a rebuild (of this round's keys only) does not
            # change; if this raises they stay applied, and replaying them adds nothing.
            outcomes.append(await self._apply_event(federation.EVENT_SUBMISSION_ACCEPTED, attrs,
                                                    result if result >= 0 else None))
        return outcomes, cursor is not None and next(replies) == 1

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

    async def follow_while(self, validator_url: str, lease: Lease, *, renew_every: float,
                           **follow_options) -> None:
        """follow() while `lease` is ours, renewed every `renew_every` seconds; returns at once if
        another holds it, and as soon as another takes it. Every compute node may keep the cache
        and one is enough: each keeper costs an event stream and a few scripts per block."""
        if not await lease.hold():
            return
        following = asyncio.ensure_future(self.follow(validator_url, **follow_options))
        try:
            while not (await asyncio.wait([following], timeout=renew_every))[0]:
                if not await lease.hold():
                    return
            following.result()  # follow() ended: raise what ended it
        finally:
            await cancel_and_wait([following])

    # -- rebuilding from chain state -------------------------------------------------------------

    async def _write_round(self, record: Mapping, app: str) -> bool:
        fields = _round_fields(record, app)
        workflow_id, schedule_id = record["workflow_id"], record["schedule_id"]
        hash_key = federation_key(workflow_id, schedule_id)
        list_key = fields["submissions_key"]
        old_list = await self.redis.hget(hash_key, "submissions_key")
        stale = as_text(old_list) if old_list is not None and as_text(old_list) != list_key else list_key
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
        record = await FederationReader(rest_client, head).round(schedule_id)
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
        reader = FederationReader(rest_client, head)
        for schedule_id in schedule_ids:
            record = await reader.round(schedule_id)
            if record is None:
                raise FederationCacheGap(f"round {schedule_id} of workflow {workflow_id!r} is indexed but "
                                         f"missing from state at head {head[:16]}")
            await self._write_round(record, app)
        return schedule_ids


async def rebuild_from_chain(redis: aioredis.Redis, rest_client, workflow_id: str, *, app: str | None = None) -> list[str]:
    """FederationCache(redis, app=app).rebuild_from_chain(rest_client, workflow_id)."""
    return await FederationCache(redis, rest_client=rest_client, app=app).rebuild_from_chain(rest_client, workflow_id)
