"""A compute node: registers itself, learns its tasks from committed events, runs them, reports.

Task delivery survives a crash at every step:
- the chain is the source of truth: after each block touching a round, the node recomputes which
  of its tasks are runnable (assigned to it, not done, every dependency done) from chain state;
- a runnable task goes once (per attempt) into this node's Redis stream, and the worker acks it
  only after its report is committed; a worker killed mid-task finds it again on restart
  (its own pending messages), and a node that never comes back is replaced on chain by
  `reassign` once the task's deadline passes;
- the last block handled is kept in the data dir, so a restarted node replays what it missed.

A task whose dependencies this node ran itself does not wait for their reports to be committed:
it starts as soon as they are submitted, and its own report names theirs as transaction
dependencies, so the chain still records every report after the ones it builds on. The same holds
across rounds: the next round is assigned while this one trains, and its local_train tasks start
from this node's aggregate report. Reports are submitted in order by a background task, so the
next task starts while the last one's report travels. With one compute node rounds run back to
back, without a block between their tasks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import time
from typing import Mapping

import torch

from trustmesh.cancelling import cancel_and_wait
from trustmesh.fl.attacks import Attack
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.block_cursor import BlockCursor
from trustmesh.ledger.events import UnknownBlockError, event_subscription
from trustmesh.ledger.coalescing_rest import CoalescingRest
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.machine import usable_cores
from trustmesh.scheduling import events, layout, peers, schedule
from trustmesh.scheduling.schedule import MAX_REPORTS_PER_TRANSACTION, SETTLED
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.couch import CouchClient, CouchHistory
from trustmesh.stores.data_envelope import load_or_create_keypair
from trustmesh.stores.kept_blobs import KeptBlobs
from trustmesh.stores.redis_link import TRANSIENT, RedisLink
from trustmesh.stores.blobs import BlobStore
from trustmesh.stores.federation_cache import CURSOR_KEY, KEEPER_KEY, FederationCache
from trustmesh.stores.lease import Lease
from trustmesh.stores.heartbeats import Heartbeats
from trustmesh.stores.redis_client import client
from trustmesh.stores.task_queue import DeliveriesLost, TaskQueue, task_stream

from .history_recorder import HistoryRecorder
from .tasks import (InputNotReady, Recent, TaskContext, TaskInputError, TaskOutcome, aggregate_inputs_known,
                    report_metrics, run_local_trains, run_task, starting_model_known)

LOGGER = logging.getLogger(__name__)

REPORT_PATIENCE = 600.0  # seconds a report is sent again while the validator does not know it
LOST_DEPENDENCY = "which is neither committed nor pending"  # the validator's word for a dependency it never saw
UNEXPECTED_RETRIES = 3  # tries of a task that fails with something other than bad input
# Messages taken from the stream at once: the local_train tasks of one round among them train
# together (fl/batched_training.py; ~2x faster than one by one for 10-100 digits clients).
READ_AT_ONCE = 64
CACHE_LEASE_SECONDS = 10.0  # the federation cache's keeper renews its lease every third of this

SCHEDULE_EVENTS = (events.TASK_ASSIGNED, events.TASK_DONE, events.TASK_REASSIGNED,
                   events.TASK_FAILED, events.TASK_DROPPED)
# The status a task event leaves its task in (a reassigned task waits for its new node).
EVENT_STATUS = {events.TASK_ASSIGNED: "assigned", events.TASK_REASSIGNED: "assigned", events.TASK_DONE: "done",
                events.TASK_FAILED: "failed", events.TASK_DROPPED: "dropped"}


def measured_resources() -> dict:
    """What this node has, read from the OS rather than typed in: its cores are the ones it
    trains with (training.use_threads may give it a share of the machine)."""
    cpu = min(usable_cores(), torch.get_num_threads())
    memory_mb = 1024
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    memory_mb = int(line.split()[1]) // 1024
                    break
    except OSError:
        pass
    return {"cpu_cores": max(1, cpu), "memory_mb": max(1, memory_mb)}


RECENT_KEPT = 10_000


async def _all_done(task_ids, status) -> bool:
    for task_id in task_ids:  # stops at the first that is not: each look may be a REST call
        found = await status(task_id)
        if found is None or found["status"] not in SETTLED:  # dropped: a secure round went on without it
            return False
    return True


class ComputeNode:
    def __init__(self, name: str, data_dir: str | os.PathLike, *, validator_url: str, rest_url: str,
                 redis_url: str, couch_url: str | None = None, couch_user: str | None = None,
                 couch_password: str | None = None, chain_heartbeat: float = peers.HEARTBEAT_SECONDS,
                 attacks: Mapping[str, Attack] | None = None):
        """chain_heartbeat: seconds between two on-chain heartbeats (the liveness the schedule
        family trusts when it moves a late task; peers.LIVENESS_SECONDS must cover a few).
        attacks: for tests and benchmarks only, data owner -> how this node poisons the updates
        it trains on that owner's data (fl/attacks.py); said in its log and status line."""
        self.name = name
        self.attacks = dict(attacks or {})
        self.chain_heartbeat = chain_heartbeat
        self.data_dir = pathlib.Path(data_dir)
        self.validator_url, self.rest_url = validator_url, rest_url
        self.redis_url, self.couch_url = redis_url, couch_url
        self.couch_auth = (couch_user, couch_password)
        self.signer = load_or_create_key(self.data_dir / "keys", name)
        self.node = self.signer.public_key().as_hex()
        self.encryption_key, self.encryption_public = load_or_create_keypair(self.data_dir / "keys" / f"{name}.x25519")
        self._cursor = BlockCursor(self.data_dir / f"{name}.last-block")
        self._tasks: list[asyncio.Task] = []
        self._confirming: set[asyncio.Task] = set()  # reports submitted, not yet seen committed
        self._awaiting_commit: set[str] = set()  # their task messages, acked once the report commits
        self._uncommitted: dict[tuple[str, str], str] = {}  # own reports in flight: report txn id
        # (schedule_id, task_id) of own reports the chain refused (until one of that task commits),
        # and what each task's report rests on: its inputs and the model it started from.
        self._refused = Recent(RECENT_KEPT)
        self._rests_on = Recent(RECENT_KEPT)
        self._queued = Recent(RECENT_KEPT)  # (schedule_id, task_id, attempt) put in the stream
        self._reassigned = Recent(RECENT_KEPT)  # (schedule_id, task_id) moved since this node started
        self._waiting: set[str] = set()  # rounds whose local_train tasks wait for the previous round's model
        # What enqueue_runnable looks up, kept for the chain as this node has seen it: state only
        # changes in a block, every block comes through _follow in order, and every change of a
        # task's status (but to running) comes with a task event. So a round whose assignment
        # _follow saw has its statuses in those events; in any other round, a status that was not
        # settled is read at most once per block, and so is a missing starting model (unless this
        # node made it). At ten participants that took the compute nodes from ~128 state reads a round
        # (each a REST request the validator answers) to ~46.
        self._view = -1  # number of the last block _follow took up
        self._watched = Recent(RECENT_KEPT)  # rounds whose assignment _follow saw
        self._event_status = Recent(RECENT_KEPT)  # (schedule_id, task_id) -> {"status", "attempt"} of its last event
        self._unsettled = Recent(RECENT_KEPT)  # (schedule_id, task_id) -> (view, status read then)
        self._no_model = Recent(RECENT_KEPT)   # schedule_id -> (view, models made) it was missing at
        self._models_made = 0  # round results this node aggregated itself
        self.completed: list[tuple[str, str]] = []  # (schedule_id, task_id), for tests and logs

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A node waits out every outage; its task reports share POSTs and status waits.
        self.rest = CoalescingRest(self.rest_url, patience=float("inf"))
        self.reader = FederationReader(self.rest)
        self.redis = client(self.redis_url)
        self.link = RedisLink(self.redis, self.redis_url, self.name)
        await self.link.wait_up()
        # What this node writes it also keeps, to put back if Redis loses it (see _redis_restarted).
        self.blobs = KeptBlobs(BlobStore(self.redis), self.data_dir / "blobs")
        self.queue = TaskQueue(self.redis, task_stream(self.node))
        self.heartbeats = Heartbeats(self.redis)
        self.context = TaskContext(self.node, self.encryption_key, self.reader, self.blobs,
                                   progress=lambda text: LOGGER.debug("%s: %s", self.name, text),
                                   attacks=self.attacks)
        self.recorder = None
        if self.couch_url:
            self.couch = CouchClient(self.couch_url, user=self.couch_auth[0], password=self.couch_auth[1])
            history = CouchHistory(self.couch)
            await history.ensure()
            # The trainings' statuses through the tasks' memory of done ones: the node that records a
            # round aggregated it, and its aggregate read them all (a REST read each, per round).
            self.recorder = HistoryRecorder(self.node, self.reader, self.blobs, history, validator_url=self.validator_url,
                                            cursor=BlockCursor(self.data_dir / f"{self.name}.history-block"),
                                            task_statuses=self.context.task_statuses)
        await self._register()
        # The schedule events from the last block this node handled, replaying what it missed.
        self.subscriber = await self._cursor.subscribe(self.validator_url, [event_subscription(e) for e in SCHEDULE_EVENTS],
                                                       new_from_genesis=False, who=self.name)
        loop = asyncio.get_running_loop()
        # The Redis federation cache, filled idempotently from committed events: any node may keep
        # it, one at a time does (_keep_cache).
        self.cache = FederationCache(self.redis, rest_client=self.rest)
        await self.link.mark()
        beats = lambda: self.heartbeats.keep_beating(self.node, self._status_info)  # noqa: E731  (read each beat)
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._work()),
                       loop.create_task(self.link.keep_running(beats)), loop.create_task(self._keep_cache()),
                       loop.create_task(self.link.watch(self._redis_restarted)),
                       loop.create_task(peers.keep_heartbeating(self.rest, self.signer, self.chain_heartbeat))]
        if self.recorder is not None:
            self._tasks.append(loop.create_task(self.recorder.run()))
        LOGGER.info("compute node %s (%s…) ready", self.name, self.node[:16])
        for owner, attack in sorted(self.attacks.items()):
            LOGGER.warning("ATTACK (test mode): %s poisons every update it trains on %s…'s data with %s", self.name,
                           owner[:16], attack)

    def _status_info(self) -> dict:
        info = {"name": self.name}
        # the REST API lists no pending batches: each node says which of its own it waits for
        info["pending_batches"] = self.rest.pending_summary(signer=self.node)
        if self.attacks:  # never silent: `trustmesh status` shows it
            info["attack"] = ", ".join(f"{attack} on {owner[:16]}…" for owner, attack in sorted(self.attacks.items()))
        return info

    async def _register(self) -> None:
        record = await self.reader.peer(self.node)
        resources = measured_resources()
        fields = dict(name=self.name, encryption_public_key=self.encryption_public, **resources)
        if record is None:
            txn = peers.make_register_transaction(self.signer, **fields)
        elif record["encryption_public_key"] != self.encryption_public or record["resources"] != resources:
            txn = peers.make_update_transaction(self.signer, **fields)
        else:
            return
        await self.rest.wait_for_batches(await self.rest.submit_batches([make_batch(self.signer, [txn])]), 60)
        LOGGER.info("compute node %s registered: %s", self.name, resources)

    async def _redis_restarted(self) -> None:
        """Redis came back as another server or without its data: put back the blobs this node
        wrote and re-derive its task deliveries from the chain (a lost message, its marker and
        this node's memory of having queued it must not leave a task that nobody runs)."""
        self.queue.forget_group()
        await self.blobs.restore()
        await self._redeliver()

    async def _redeliver(self) -> None:
        """Queue again every runnable task assigned to this node in a round that is not final,
        as the chain has it (publish_once skips what the stream still holds)."""
        self._queued.clear()
        rounds = []
        async for _address, data in self.rest.list_state(layout.SCHEDULE_NS + layout.ASSIGNMENTS):
            assignments = schedule.decode_record(data)
            if schedule.tasks_of_node(assignments, self.node):
                rounds.append(assignments["schedule_id"])
        for schedule_id in rounds:
            result = await self.reader.round_result(schedule_id)
            if result is None or not result.get("final"):
                self.context.rounds.pop(schedule_id, None)  # read its assignments afresh
                await self.enqueue_runnable(schedule_id)
        LOGGER.info("%s: deliveries re-derived from the chain (%d round(s) with tasks here)", self.name, len(rounds))

    async def _keep_cache(self) -> None:
        """Keep the federation cache filled while this node holds its lease; else look again now
        and then, to take over once the keeper is gone."""
        lease = Lease(self.redis, KEEPER_KEY, self.node, ttl=CACHE_LEASE_SECONDS)
        while True:
            try:
                await self.cache.follow_while(self.validator_url, lease, renew_every=CACHE_LEASE_SECONDS / 3)
                await asyncio.sleep(CACHE_LEASE_SECONDS / 3)
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:
                await self.link.outlast(exc)
            except UnknownBlockError:
                # Redis outlived the chain it cached (a fresh dev network): start over from genesis.
                LOGGER.warning("%s: the federation cache's last block is not on this chain; rebuilding", self.name)
                await self.redis.delete(CURSOR_KEY)
            except Exception:
                LOGGER.exception("%s: federation cache stopped; resuming", self.name)
                await asyncio.sleep(1)

    async def _follow(self) -> None:
        while True:
            block = await self.subscriber.next_block()
            for schedule_id, changed in sorted(self._take_up(block).items()):
                if changed:
                    self.context.rounds.pop(schedule_id, None)  # nodes or attempts moved: read it again
                await self._enqueue_through_outages(schedule_id)
            self._cursor.save(block.block_id)

    def _take_up(self, block) -> dict[str, bool]:
        """What a block's task events say: the rounds to look at again (schedule_id -> whether its
        assignments moved: they change only by assign and reassign; after a block of reports alone,
        the copy the tasks read is still good), each task's status in the rounds watched, and every
        done status whole (an aggregate and the history need a round's trainings' digests and metrics:
        a REST read each otherwise)."""
        rounds: dict[str, bool] = {sid: False for sid in self._waiting}
        self._view = block.block_num
        for event in block.events:
            attrs = {a.key: a.value for a in event.attributes}
            sid = attrs.get("schedule_id")
            if sid is None:
                continue
            if event.event_type in EVENT_STATUS:
                if event.event_type == events.TASK_ASSIGNED:
                    self._watched.add(sid)
                self._event_status.put((sid, attrs.get("task_id")),
                                       {"status": EVENT_STATUS[event.event_type], "attempt": int(attrs["attempt"])})
            if event.event_type == events.TASK_DONE and "metrics" in attrs:  # the whole done status, as committed
                self.context.remember_done(sid, attrs["task_id"], {
                    "status": "done", "node": attrs["node"], "attempt": int(attrs["attempt"]),
                    "output_digest": attrs["output_digest"], "metrics": json.loads(attrs["metrics"])})
            changed = event.event_type in (events.TASK_ASSIGNED, events.TASK_REASSIGNED)
            rounds[sid] = rounds.get(sid, False) or changed
            if event.event_type == events.TASK_REASSIGNED:
                self._reassigned.add((sid, attrs.get("task_id")))
        return rounds

    async def _enqueue_through_outages(self, schedule_id: str) -> None:
        """enqueue_runnable, waiting out Redis; another failure is tried a few times, then left
        to the next block of the round (the task's deadline moves it if none comes)."""
        for attempt in range(1, UNEXPECTED_RETRIES + 1):
            try:
                await self.link.call(lambda: self.enqueue_runnable(schedule_id))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                LOGGER.warning("%s: could not queue the tasks of round %s… (try %d of %d)", self.name,
                               schedule_id[:16], attempt, UNEXPECTED_RETRIES, exc_info=True)
                await asyncio.sleep(attempt)

    async def enqueue_runnable(self, schedule_id: str) -> None:
        """Queue this node's tasks of the round that can run now. Its assignments are the copy the
        round's tasks read (dropped by _follow when a block moves nodes or attempts), else read
        from the chain."""
        cached = self.context.rounds.get(schedule_id)
        assignments = cached["assignments"] if cached is not None else await self.reader.assignments(schedule_id)
        if assignments is None:
            return
        tasks = assignments["tasks"]
        known: dict[str, dict | None] = {}  # this call's statuses: ten trains share one preprocess

        async def status(task_id: str) -> dict | None:
            if task_id not in known:
                known[task_id] = await self._status_in_view(schedule_id, task_id)
            return known[task_id]

        model_known = None  # whether local_train tasks can start, looked up once when needed
        seed_known = None   # whether the aggregate can (server-side DP waits for the noise seed)
        runnable = []
        for task_id in assignments["order"]:
            task = tasks[task_id]
            queued = (schedule_id, task_id, task["attempt"])
            # Cheapest checks first: this runs after every block and every task, and each status
            # read is a REST call.
            if task["node"] != self.node or queued in self._queued or (schedule_id, task_id) in self.context.reported:
                continue
            if not await _all_done(task["fetch_dependency_outputs"], status):
                continue
            if task["kind"] == "local_train":
                if model_known is None:
                    model_known = await self._model_known(schedule_id)
                if not model_known:
                    continue
            if task["kind"] == "aggregate":
                if seed_known is None:
                    seed_known = await aggregate_inputs_known(self.context, schedule_id)
                if not seed_known:
                    continue
            runnable.append(task_id)
        # Their own statuses side by side: a round's ten trainings become runnable together.
        publish = []
        for task_id, own in zip(runnable, await asyncio.gather(*(status(t) for t in runnable))):
            task = tasks[task_id]
            if own is None or own["status"] in ("done", "failed") or own["attempt"] != task["attempt"]:
                continue
            marker = f"enqueued_{self.node}_{schedule_id}_{task_id}_{task['attempt']}"
            publish.append(({"schedule_id": schedule_id, "task_id": task_id, "attempt": task["attempt"]}, marker))
        await self.queue.publish_once_many(publish)  # in one round trip
        for task, _ in publish:
            self._queued.add((schedule_id, task["task_id"], task["attempt"]))
        if model_known is False or seed_known is False:
            self._waiting.add(schedule_id)  # every block looks again, and so does this node's next aggregate
        else:
            self._waiting.discard(schedule_id)

    async def _model_known(self, schedule_id: str) -> bool:
        """starting_model_known, looked up once per block while the model is missing, and at once
        when this node has made a round's model itself."""
        stamp = (self._view, self._models_made)
        if self._no_model.get(schedule_id) == stamp:
            return False
        known = await starting_model_known(self.context, schedule_id)
        if not known:
            self._no_model.put(schedule_id, stamp)
        return known

    async def _status_in_view(self, schedule_id: str, task_id: str) -> dict | None:
        """A task's status for enqueue_runnable: this node's own report, what the task events of a
        round seen from its assignment say, or read from the chain at most once per block while it
        is not settled."""
        key = (schedule_id, task_id)
        found = self.context.reported.get(key) or self.context.done.get(key)
        if found is None and schedule_id in self._watched:
            found = self._event_status.get(key)
        if found is not None:
            return found
        memo = self._unsettled.get(key)
        if memo is not None and memo[0] == self._view:
            return memo[1]
        found = await self.context.task_status(schedule_id, task_id)
        if found is None or found["status"] not in SETTLED:
            self._unsettled.put(key, (self._view, found))
        return found

    async def _work(self) -> None:
        redeliver = True  # Redis may have lost this node's stream while the node was down
        recovered = False
        while True:
            try:
                if redeliver:
                    await self._redeliver()
                    redeliver = False
                if not recovered:  # what this node took before it died, or before Redis went away
                    await self._handle_all(await self.queue.recover(self.name))
                    recovered = True
                await self._handle_all(await self.queue.read(self.name, count=READ_AT_ONCE, block_ms=1000))
            except DeliveriesLost:
                redeliver = True
            except TRANSIENT as exc:
                await self.link.outlast(exc)
                recovered = False
            except asyncio.CancelledError:
                raise
            except Exception:  # the worker must outlive anything: log it, look again shortly
                LOGGER.exception("%s: the task worker stumbled; going on", self.name)
                await asyncio.sleep(1)

    async def _handle_all(self, messages) -> None:
        """Handle messages in the order read, except that the local_train tasks of one round
        among them train together, at the first one's turn (each still reported on its own)."""
        groups: dict[str, list] = {}  # schedule_id -> its local_train messages
        for message in messages:
            if await self._kind(message) == "local_train":
                groups.setdefault(message.task["schedule_id"], []).append(message)
        handled = set()
        for message in messages:
            if message.message_id in handled:
                continue
            group = groups.get(message.task["schedule_id"], [])
            if len(group) > 1 and message in group:
                handled.update(m.message_id for m in group)
                await self._handle_trains(group)
            else:
                await self._handle_safely(message)

    async def _kind(self, message) -> str | None:
        """The kind of a message's task as its round's assignments say; None if unknown now
        (the message then takes the plain path, which finds out)."""
        try:
            inputs = await self.context.round_inputs(message.task["schedule_id"])
            return inputs["assignments"]["tasks"][message.task["task_id"]]["kind"]
        except asyncio.CancelledError:
            raise
        except Exception:
            return None

    async def _handle_trains(self, messages) -> None:
        """local_train tasks of one round trained together; a task whose own input fails is
        reported failed alone, and one that could not run this way takes the plain path."""
        try:
            live = [m for m in messages if await self._still_mine(m)]
        except asyncio.CancelledError:
            raise
        except Exception:
            live = []
            for message in messages:  # a store or the REST API failing: the plain path retries
                await self._handle_safely(message)
        if len(live) == 1:
            await self._handle_safely(live[0])
        if len(live) < 2:
            return
        started = time.perf_counter()
        try:
            outcomes = await run_local_trains(self.context, live[0].task["schedule_id"],
                                              [m.task["task_id"] for m in live])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the starting model not there yet, an outage: one by one, with their waits
            LOGGER.info("%s: %d local_train tasks go one by one: %s", self.name, len(live), exc)
            outcomes = {}
        if outcomes:
            LOGGER.info("%s: %d local_train tasks of round %s… trained together", self.name, len(live),
                        live[0].task["schedule_id"][:16])
        self._done_together([(m, outcomes[m.task["task_id"]]) for m in live
                             if isinstance(outcomes.get(m.task["task_id"]), TaskOutcome)], started)
        for message in live:
            outcome = outcomes.get(message.task["task_id"])
            if isinstance(outcome, TaskInputError):
                self._failed(message, outcome)
            elif not isinstance(outcome, TaskOutcome):
                await self._handle_safely(message)
        # What these trainings let run, looked for once: after each of a round's 500, that look
        # walked the round's 1,000 tasks (a fifth of a compute node's CPU at 1,000 participants).
        await self._queue_next(live[0].task["schedule_id"], f"{len(live)} trainings")

    async def _handle_safely(self, message) -> None:
        # A store or the REST API failing for a moment must not end the worker: try again a few
        # times, then leave the message pending (a restart recovers it; past its deadline the
        # coordinator moves the task to another node).
        attempt = 0
        while attempt < UNEXPECTED_RETRIES:
            attempt += 1
            try:
                await self._handle(message)
                return
            except asyncio.CancelledError:
                raise
            except TRANSIENT as exc:  # Redis went away: not the task's fault, not a try
                await self.link.outlast(exc)
                attempt -= 1
            except InputNotReady as exc:  # a redelivered task of a round whose predecessor still trains
                LOGGER.info("%s: task %s waits: %s", self.name, message.task.get("task_id"), exc)
                await asyncio.sleep(min(30, 0.5 * 4 ** (attempt - 1)))  # 0.5, 2, 8 s: a lost blob is soon back
            except Exception:
                LOGGER.exception("%s: task %s failed unexpectedly (try %d of %d)", self.name,
                                 message.task.get("task_id"), attempt, UNEXPECTED_RETRIES)
                await asyncio.sleep(min(30, 2 ** attempt))

    async def _handle(self, message) -> None:
        if not await self._still_mine(message):
            return
        started = time.perf_counter()
        try:
            outcome = await run_task(self.context, message.task["schedule_id"], message.task["task_id"])
        except TaskInputError as exc:
            self._failed(message, exc)
            return
        await self._done(message, outcome, started)

    async def _still_mine(self, message) -> bool:
        """Whether the message's task is still this node's to run (acked when it is not)."""
        if message.message_id in self._awaiting_commit:
            # Reported already: a long task's message can look stale to the stream (pending past
            # claim_idle_ms) and come back before its report commits; running it again would
            # hold this worker up for nothing.
            return False
        sid, task_id, attempt = message.task["schedule_id"], message.task["task_id"], message.task["attempt"]
        # A task this node queued itself, after reading its status, delivered for the first time
        # and not moved since, needs no second read (the chain would refuse a stale report anyway).
        fresh = ((sid, task_id, attempt) in self._queued and message.deliveries == 1
                 and (sid, task_id) not in self._reassigned)
        status = None if fresh else await self.reader.task_status(sid, task_id)
        if not fresh and (status is None or status["node"] != self.node or status["attempt"] != attempt
                          or status["status"] in ("done", "failed")):
            await self.queue.ack(message.message_id)  # reassigned or already reported: nothing to do
            return False
        return True

    def _failed(self, message, exc: TaskInputError) -> None:
        sid, task_id, attempt = message.task["schedule_id"], message.task["task_id"], message.task["attempt"]
        LOGGER.warning("%s: task %s failed: %s", self.name, task_id, exc)
        txn = schedule.make_report_transaction(self.signer, sid, task_id, "failed", attempt=attempt,
                                               reason=str(exc)[:500])
        self._report([txn], [message.message_id])

    def _done_fields(self, message, outcome: TaskOutcome, started: float) -> tuple[dict, list[str]]:
        """A done report's fields (make_report_transaction's from task_id on; a local_train's
        starting_model is its lineage), and this node's uncommitted report transactions it must
        come after."""
        sid, task_id, attempt = message.task["schedule_id"], message.task["task_id"], message.task["attempt"]
        metrics = report_metrics(outcome, started)
        built_on = [(sid, d) for d in outcome.dependencies] + list(outcome.built_on)
        self._rests_on.put((sid, task_id), built_on)
        waits_for = list(dict.fromkeys(self._uncommitted[key] for key in built_on if key in self._uncommitted))
        return {"task_id": task_id, "status": "done", "output_digest": outcome.output_digest, "metrics": metrics,
                "attempt": attempt, "starting_model": outcome.starting_model}, waits_for

    def _reporting(self, schedule_id: str, fields: dict, txn_id: str) -> None:
        """A done report is on its way in transaction txn_id: until it is committed (or refused),
        this node's own tasks count it done and name that transaction as their dependency."""
        self._uncommitted[schedule_id, fields["task_id"]] = txn_id
        self.context.reported[schedule_id, fields["task_id"]] = {
            "status": "done", "node": self.node, "attempt": fields["attempt"],
            "output_digest": fields["output_digest"], "metrics": fields["metrics"]}

    def _done_alone(self, message, fields: dict, waits_for: list[str]) -> None:
        sid = message.task["schedule_id"]
        txn = schedule.make_report_transaction(self.signer, sid, **fields, dependencies=waits_for)
        self._reporting(sid, fields, txn.header_signature)
        self._report([txn], [message.message_id], [(sid, fields["task_id"])], waits_for=waits_for)

    def _done_together(self, done: list[tuple], started: float) -> None:
        """Done reports of one round's trainings made together: one report_many transaction per
        MAX_REPORTS_PER_TRANSACTION of them, instead of one transaction each (a lone one goes as a
        plain report). Should the chain refuse one, its reports go again one by one, so that one
        report the chain refuses does not hold up the others."""
        for first in range(0, len(done), MAX_REPORTS_PER_TRANSACTION):
            part = done[first:first + MAX_REPORTS_PER_TRANSACTION]
            made = [(message, *self._done_fields(message, outcome, started)) for message, outcome in part]
            if len(made) == 1:
                self._done_alone(*made[0])
                continue
            sid = part[0][0].task["schedule_id"]
            waits_for = list(dict.fromkeys(txn_id for _, _, waits in made for txn_id in waits))
            txn = schedule.make_report_many_transaction(self.signer, sid, [fields for _, fields, _ in made],
                                                        dependencies=waits_for)
            for _, fields, _ in made:
                self._reporting(sid, fields, txn.header_signature)
            self._report([txn], [m.message_id for m, _, _ in made], [(sid, f["task_id"]) for _, f, _ in made],
                         one_by_one=made, waits_for=waits_for)
            LOGGER.info("%s: %d local_train tasks of round %s… reported in one transaction", self.name, len(made),
                        sid[:16])

    async def _done(self, message, outcome: TaskOutcome, started: float) -> None:
        sid, task_id = message.task["schedule_id"], message.task["task_id"]
        fields, waits_for = self._done_fields(message, outcome, started)
        txns = [schedule.make_report_transaction(self.signer, sid, **fields, dependencies=waits_for)]
        if outcome.round_result is not None:  # same batch: the result stands or falls with the report
            r = outcome.round_result
            txns.append(schedule.make_round_result_transaction(
                self.signer, sid, outcome.output_digest, r["participants"], r["aggregation_weights"], r["metrics"],
                task_id=task_id, rejected=r.get("rejected"), server_state_digest=r.get("server_state_digest"),
                privacy=r.get("privacy"), contributions=r.get("contributions"), submitted=r.get("submitted")))
        self._reporting(sid, fields, txns[0].header_signature)
        if outcome.round_result is not None:
            assignments = (await self.context.round_inputs(sid))["assignments"]
            self.context.global_models[assignments["workflow_id"], assignments["round"]] = {
                "digest": outcome.output_digest, "schedule_id": sid, "task_id": task_id,
                "server_state_digest": outcome.round_result.get("server_state_digest"),
                "next_clipping_norm": (outcome.round_result.get("privacy") or {}).get("next_clipping_norm")}
            self._models_made += 1  # the next round's trainings may start from it now, not a block later
        self._report(txns, [message.message_id], [(sid, task_id)], waits_for=waits_for)
        await self._queue_next(sid, task_id)
        LOGGER.info("%s: %s done (%s…) %s", self.name, task_id, outcome.output_digest[:12],
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in outcome.metrics.items()})

    async def _queue_next(self, schedule_id: str, after: str) -> None:
        """Dependents on this node go on now, not a block later; so do the next round's trainings."""
        try:
            for sid in [schedule_id, *sorted(self._waiting)]:
                await self.enqueue_runnable(sid)
        except Exception:  # the task is reported: a hiccup here must not run it again
            LOGGER.warning("%s: could not queue the tasks after %s now; the next block will", self.name, after,
                           exc_info=True)

    def _report(self, txns, message_ids: list[str], completed: list[tuple[str, str]] = (), *,
                one_by_one: list[tuple] = (), waits_for: list[str] = ()) -> None:
        """Send a report in the background and go on with the next task at once. Reports go out
        in the order they were made, those made together in one POST (a report may name an
        earlier one as a transaction dependency, which the validator must have seen first). The
        messages are acked when the report is committed: a node that dies before that finds them
        again on restart. one_by_one: a report_many's (message, fields, waits_for), sent again
        as plain reports should the chain refuse it. waits_for: this node's uncommitted report
        transactions these reports name as dependencies (their tasks ran on those outputs)."""
        self._awaiting_commit.update(message_ids)
        confirm = asyncio.get_running_loop().create_task(self._send(txns, message_ids, completed, one_by_one,
                                                                    waits_for))
        self._confirming.add(confirm)
        confirm.add_done_callback(self._confirming.discard)

    async def _send(self, txns, message_ids: list[str], completed: list[tuple[str, str]], one_by_one,
                    waits_for) -> None:
        status = None
        try:
            # Reports made together go out together, in the order made (ledger/coalescing_rest.py),
            # and are sent again while the validator does not know them (a restarted one forgot).
            [status] = await self.rest.submit_until_final([make_batch(self.signer, txns)], REPORT_PATIENCE)
        except asyncio.CancelledError:
            raise
        except Exception:
            LOGGER.exception("%s: report %s… not sent or not answered; the task stays pending", self.name,
                             txns[0].header_signature[:16])
        finally:  # the chain answers for these tasks from now on (a claim of a message asks it)
            self._awaiting_commit.difference_update(message_ids)
            committed = status is not None and status["status"] == "COMMITTED"
            for key in completed:
                self._uncommitted.pop(key, None)
                if committed:
                    self._refused.pop(key, None)
                elif status is not None:
                    self._refused.add(key)
                reported = self.context.reported.pop(key, None)
                if committed and reported is not None:
                    self.context.remember_done(*key, reported)  # as the chain now has it
                for model_key, model in list(self.context.global_models.items()):
                    if (model["schedule_id"], model["task_id"]) == key:
                        del self.context.global_models[model_key]
        if status is None:
            return
        if not committed:
            problems = status.get("invalid_transactions") or []
            LOGGER.warning("%s: report not committed: %s", self.name, problems)
            if any(LOST_DEPENDENCY in (p.get("message") or "") for p in problems):
                # An earlier report it named was lost with a validator restart (and is being sent
                # again): leave the messages pending; the stream hands them out again and the
                # tasks run once more with reports the chain can take.
                return
            if one_by_one:
                LOGGER.warning("%s: sending its %d reports one by one", self.name, len(one_by_one))
                for message, fields, waits_for in one_by_one:
                    self._done_alone(message, fields, waits_for)
                return
            if waits_for or any(base in self._refused for key in completed for base in self._rests_on.get(key, ())):
                # Built on a report of this node's that was not committed, and that the chain may
                # have refused (a round's training on the aggregate it had just made): what the
                # chain says lacking may be that report's doing. Acked, the task would wait for its
                # deadline (five minutes) to move; left pending, the stream hands it out again and
                # it runs once more from what the chain then holds (at most max_deliveries times).
                return
        await self.link.call(lambda: self.queue.ack(*message_ids))
        if committed:
            self.completed.extend(completed)

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *self._confirming])
        await self.subscriber.close()
        await self.rest.close()
        if self.couch_url:
            await self.couch.close()
        await self.redis.aclose()
