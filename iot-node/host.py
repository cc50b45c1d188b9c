"""Many IoT nodes in one process, for local networks and simulations (`trustmesh iot-host`).

Each hosted node is a whole IoTNode: its own key pair (0600, in its own folder), its own data
shard, its own signed transactions, its own heartbeat. What a host shares among them is what
would otherwise be multiplied by the number of nodes:

- one event stream from the validator, fanned out to every node (a validator delivers each
  block once per subscriber);
- one REST connection pool, whose batch submissions made within a few milliseconds of each
  other go out in one POST /batches and are waited on with one status request
  (ledger/coalescing_rest.py), and whose chain-state reads are shared by every node reading the same
  record at the same chain head (SharedReader);
- one Redis connection pool, one watch for a Redis restart that tells every node, and one
  heartbeat for all of them every few seconds (one round trip);
- for nodes that train their own data (train_on "iot"), one subscription to task events, each
  trainer handed its own assignments and the events that concern every round.

A real deployment runs one IoT node per device, unchanged (`trustmesh iot-node`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Callable, Sequence

from trustmesh.cancelling import cancel_and_wait
from trustmesh.ledger.events import BLOCK_COMMIT, EventSubscriber, event_subscription
from trustmesh.ledger.coalescing_rest import CoalescingRest
from trustmesh.ledger.rest_client import RestClient
from trustmesh.scheduling import events
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.heartbeats import Heartbeats
from trustmesh.stores.redis_link import RedisLink
from trustmesh.stores.redis_client import client

from .trainer_events import OWN_TASK_EVENTS, subscriptions as task_subscriptions
from .node import EVENTS, IoTNode
from .participant import fetch_verified_model

LOGGER = logging.getLogger(__name__)

_ABSENT = object()
WORKFLOW_WRITES = (events.WORKFLOW_DEPLOYED, events.WORKFLOW_UPDATED)  # the only writes of workflow records
MODELS_KEPT = 8  # global models a host keeps fetched and checked (rounds overlap by one)


class SharedReader(FederationReader):
    """A FederationReader for every node of a host: a record read at the chain head is read once
    per block, however many nodes ask. The host starts a new generation on each block before
    any node hears of it, so no node acts on a record older than the block that told it to act.

    Records come back as the same decoded objects to every node: nodes treat what they read
    from the chain as read-only (they build new dicts to change anything)."""

    def __init__(self, rest: RestClient):
        super().__init__(rest)
        self.generation = 0
        self._cache: dict[str, object] = {}
        self._reading: dict[str, asyncio.Future] = {}
        self.reads = 0  # REST reads made (tests and benchmarks compare it with the nodes' asks)
        self.lists = 0  # listings of the workflows made

    def new_block(self, block=None) -> None:
        """A block came: what was read may be older than it. The list of workflows is kept across
        a block without a deploy or update (`block`'s events say; only those write workflow
        records): at 1,000 nodes it is ~70 KB listed and decoded per block otherwise."""
        self.generation += 1
        workflows = self._cache.get("workflows", _ABSENT)
        self._cache.clear()
        self._reading.clear()
        if workflows is not _ABSENT and block is not None and not any(
                e.event_type in WORKFLOW_WRITES for e in block.events):
            self._cache["workflows"] = workflows

    async def _once(self, key: str, read, *, counted: bool = True):
        """read() made once per block for every node that asks for `key` meanwhile."""
        found = self._cache.get(key, _ABSENT)
        if found is not _ABSENT:
            return found
        pending = self._reading.get(key)
        if pending is None:
            pending = self._reading[key] = asyncio.get_running_loop().create_task(self._settle(key, read, counted))
        return await asyncio.shield(pending)

    async def _settle(self, key: str, read, counted: bool):
        generation = self.generation
        self.reads += counted
        try:
            found = await read()
        finally:
            if self.generation == generation:
                self._reading.pop(key, None)
        if self.generation == generation:  # a block came meanwhile: what we read may be older than it
            self._cache[key] = found
        return found

    async def _record(self, address: str):
        return await self._once(address, lambda: super(SharedReader, self)._record(address))

    async def workflows(self) -> list[dict]:
        return await self._once("workflows", self._list_workflows, counted=False)

    async def _list_workflows(self) -> list[dict]:
        self.lists += 1
        return await super().workflows()

    async def _members(self, schedule_id: str, roster) -> dict:
        """A round's member records (one listing), read once per block like any record."""
        return await self._once("members:" + schedule_id, lambda: super(SharedReader, self)._members(schedule_id, roster))

    async def round(self, schedule_id: str) -> dict | None:
        """The assembled round, once per block for all the host's nodes: assembling a round of a
        thousand members for each of a thousand nodes was a million steps a block."""
        return await self._once("round:" + schedule_id, lambda: super(SharedReader, self).round(schedule_id),
                                counted=False)


class _Inbox:
    """One hosted node's view of one of the host's event streams (what IoTNode and its trainer
    read as their subscriber); `node`: only that node's own task assignments are delivered."""

    def __init__(self, node: str | None = None):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.node = node
        self.assignments = 0  # task assignments delivered (a trainer's: its own only)

    def deliver(self, block) -> None:
        if self.node is not None:  # another node's assignment is not this trainer's business
            own = [e for e in block.events if e.event_type not in OWN_TASK_EVENTS
                   or any(a.key == "node" and a.value == self.node for a in e.attributes)]
            if len(own) != len(block.events):
                block = dataclasses.replace(block, events=own)
            self.assignments += sum(e.event_type in OWN_TASK_EVENTS for e in block.events)
        self.queue.put_nowait(block)

    async def next_block(self):
        return await self.queue.get()


class IoTHost:
    """Runs IoT nodes `names` (data and keys in data_root/NAME) in this process."""

    beat_every = 5.0  # seconds between the host's heartbeats for its nodes (each lives 15 s)

    def __init__(self, names: Sequence[str], data_root: str | os.PathLike, *, validator_url: str, rest_url: str,
                 redis_url: str, workflow_id: str | None = None, task_deadline: int | None = None,
                 torch_threads: int | None = None, on_round=None):
        if not names:
            raise ValueError("an IoT host needs at least one node name")
        self.names = list(names)
        self.data_root = pathlib.Path(data_root)
        self.validator_url, self.rest_url, self.redis_url = validator_url, rest_url, redis_url
        self.options = dict(workflow_id=workflow_id, task_deadline=task_deadline, torch_threads=torch_threads,
                            on_round=on_round)
        self.nodes: list[IoTNode] = []
        self._inboxes: list[_Inbox] = []
        self._trainer_inboxes: list[_Inbox] = []
        self._tasks: list[asyncio.Task] = []
        self.task_subscriber: EventSubscriber | None = None  # started by the first node that trains itself
        self._task_stream_started = asyncio.Lock()
        self._models: dict[tuple, asyncio.Task] = {}  # (digest, spec) -> its fetch and check, the last few
        self.beats: dict[str, Callable[[], dict]] = {}  # node -> its heartbeat's info(), beaten by the host for all

    def inbox(self) -> _Inbox:
        """A new node's share of the event stream."""
        inbox = _Inbox()
        self._inboxes.append(inbox)
        return inbox

    async def trainer_inbox(self, node: str) -> _Inbox:
        """A node's share of the host's task events, for the node's own local training (train_on
        "iot"): one subscription for every trainer of the host, not one each. Registered before it
        returns, so a trainer that reads chain state next misses nothing committed after."""
        async with self._task_stream_started:
            if self.task_subscriber is None:
                subscriber = EventSubscriber(self.validator_url, task_subscriptions(None))
                await subscriber.start()
                self.task_subscriber = subscriber
                self._tasks.append(asyncio.get_running_loop().create_task(self._pump_tasks()))
        inbox = _Inbox(node)
        self._trainer_inboxes.append(inbox)
        return inbox

    async def verified_model(self, digest: str, model_spec, blobs) -> bytes:
        """A final global model every node of the host collects, fetched from Redis and checked
        once for all of them (500 nodes each fetching and parsing it was a seventh of a host's CPU
        at 1,000 participants). A fetch that fails is forgotten, so the next ask tries again."""
        key = (digest, json.dumps(model_spec, sort_keys=True))
        fetch = self._models.get(key)
        if fetch is None:
            fetch = self._models[key] = asyncio.get_running_loop().create_task(
                fetch_verified_model(blobs, digest, model_spec))
            fetch.add_done_callback(lambda done: self._models.pop(key, None)
                                    if done.cancelled() or done.exception() is not None else None)
            while len(self._models) > MODELS_KEPT:
                self._models.pop(next(iter(self._models)))
        return await asyncio.shield(fetch)

    async def _pump_tasks(self) -> None:
        while True:
            block = await self.task_subscriber.next_block()
            for inbox in self._trainer_inboxes:
                inbox.deliver(block)

    async def start(self, progress=None) -> None:
        """Connect once, then start each node; progress(started, total) after each."""
        self.rest = CoalescingRest(self.rest_url, patience=math.inf)
        self.reader = SharedReader(self.rest)
        self.redis = client(self.redis_url)
        self.link = RedisLink(self.redis, self.redis_url, f"iot-host-{self.names[0]}")
        await self.link.wait_up()
        await self.link.mark()
        self.subscriber = EventSubscriber(self.validator_url, [event_subscription(e) for e in EVENTS])
        await self.subscriber.start()
        loop = asyncio.get_running_loop()
        heartbeats = Heartbeats(self.redis)
        beat_all = lambda: heartbeats.keep_beating_many(  # noqa: E731
            lambda: {n: info() for n, info in self.beats.items()}, every=self.beat_every)
        self._tasks = [loop.create_task(self._pump()), loop.create_task(self.link.watch(self._redis_restarted)),
                       loop.create_task(self.link.keep_running(beat_all))]  # through Redis outages
        for count, name in enumerate(self.names, 1):
            node = IoTNode(name, self.data_root / name, validator_url=self.validator_url, rest_url=self.rest_url,
                           redis_url=self.redis_url, host=self, **self.options)
            await node.start()
            self.nodes.append(node)
            if progress is not None:
                progress(count, len(self.names))
        LOGGER.info("IoT host: %d nodes (%s … %s) ready", len(self.nodes), self.names[0], self.names[-1])

    async def _pump(self) -> None:
        while True:
            block = await self.subscriber.next_block()
            self.reader.new_block(block)  # before any node hears of the block
            if all(e.event_type == BLOCK_COMMIT for e in block.events):
                continue  # every block carries one; alone it asks nothing of a node (IoTNode._react)
            for inbox in self._inboxes:
                inbox.deliver(block)

    async def _redis_restarted(self) -> None:
        for node in self.nodes:
            await node._redis_restarted()

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        for node in self.nodes:
            await node.stop()
        await self.subscriber.close()
        if self.task_subscriber is not None:
            await self.task_subscriber.close()
        await self.rest.close()
        await self.redis.aclose()
