"""An IoT node's own local_train tasks (federation.train_on "iot"): the data never leaves it.

The schedule family gives every local_train instance of such a workflow to its data owner (and a
reassignment keeps it there). This runner follows committed events, not chain state on every
block (ten IoT nodes re-reading state per block would load the validator):

    task-assigned / task-reassigned (node = this node, kind local_train)
                 track the task at that attempt; one assignments read per round (TaskContext)
    task-done    a dependency of a tracked task is done (from the event alone)
    round-result / round-timeout
                 an earlier round of a tracked task's workflow is over: its starting model may
                 be on chain now (rounds are pipelined: a round may be assigned before the
                 previous round's global model exists)

A tracked task starts once every fetch_dependency_output is done on chain AND
`reader.starting_model` names its starting model (no LookupError). It trains on this
node's plaintext data with compute-node/tasks.py `train_update` (the same seed, start model,
format and metrics as a compute node would use), stores the update blob and reports done (naming
the model it trained from, which the schedule processor checks), or failed with the reason,
signed by this node.

On start, before any event, it reads chain state for its unfinished tasks (status assigned or
running, its node, its attempt), so a restarted node finishes what it was given while down. A
slow re-check of the tasks still waiting is the safety net for anything an event did not settle
(a REST error while handling it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from trustmesh.cancelling import cancel_and_wait
from trustmesh.fl.datasets import load_npz
from trustmesh.compute_node.tasks import (InputNotReady, TaskContext, TaskInputError, report_metrics,
                                          starting_model_known, train_update)
from trustmesh.ledger.events import EventSubscriber
from trustmesh.scheduling import events, schedule, workflow
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.blobs import BlobError, BlobStore

from .commitment import SaltStore, check_commitment
from .trainer_events import subscriptions

LOGGER = logging.getLogger(__name__)

RECHECK_SECONDS = 30.0  # the safety net only: events start tasks on time
UNEXPECTED_RETRIES = 3  # tries of a task that fails with something other than bad input
REPORT_TRIES = 3        # a report refused because the attempt moved on meanwhile is sent again
UNFINISHED = ("assigned", "running")


@dataclass
class _Pending:
    """One local_train instance this node holds, until its report is committed."""

    schedule_id: str
    task_id: str
    attempt: int
    workflow_id: str = ""
    round: int = 0
    resolved: bool = False            # its round's assignments have been read
    waiting_for: set[str] = field(default_factory=set)  # dependencies not known to be done
    model_ready: bool = False
    said_waiting: bool = False        # logged once that it waits for the previous global model
    runner: asyncio.Task | None = None


class LocalTrainer:
    def __init__(self, name: str, signer, *, validator_url: str, reader: FederationReader, blobs: BlobStore,
                 commit: Callable[..., Awaitable[bool]], local_data: Callable[[dict], tuple[bytes, int]],
                 workflows: Callable[[], Awaitable[list[dict]]], salts: SaltStore, subscriber=None):
        """commit(txn, what) -> committed?; local_data(definition) -> (npz bytes, samples) of this
        node; workflows() -> the workflow records this node serves; salts: its commitment salts;
        subscriber: its share of an IoT host's task events (host.py), else its own subscription."""
        self.name = name
        self.signer = signer
        self.node = signer.public_key().as_hex()
        self.validator_url = validator_url
        self.reader = reader
        self._commit = commit
        self._local_data = local_data
        self._workflows = workflows
        self._salts = salts
        # Same context a compute node trains with: it caches a round's assignments, definition and
        # starting model. No encryption key: nothing here is sealed.
        self.context = TaskContext(node=self.node, encryption_key=None, reader=reader, blobs=blobs,
                                   progress=lambda text: LOGGER.debug("%s: %s", name, text))
        self.pending: dict[tuple[str, str], _Pending] = {}
        self.completed: list[tuple[str, str]] = []  # (schedule_id, task_id) reported done, for tests and logs
        self._state = asyncio.Lock()     # events and re-checks change `pending` one at a time
        self._training = asyncio.Lock()  # one training at a time: an IoT node is small
        self._tasks: list[asyncio.Task] = []
        # called (in the background) with the schedule id whenever any local_train of a round is done
        self.on_update_done: Callable[[str], Awaitable[None]] | None = None
        self._background: set[asyncio.Task] = set()
        self.subscriber = subscriber
        self._own_subscriber = subscriber is None

    async def start(self) -> None:
        # Subscribed before chain state is read: whatever commits after the read is in the queue.
        if self._own_subscriber:
            self.subscriber = EventSubscriber(self.validator_url, subscriptions(self.node))
            await self.subscriber.start()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._recheck())]

    async def stop(self) -> None:
        runners = [p.runner for p in self.pending.values() if p.runner is not None]
        await cancel_and_wait([*self._tasks, *runners, *self._background])
        if self._own_subscriber:
            await self.subscriber.close()

    # -- following the chain ---------------------------------------------------------------------

    async def _follow(self) -> None:
        pause = 1.0
        while True:  # the blocks wait in the subscriber's queue meanwhile
            try:
                async with self._state:
                    await self._pick_up()
                break
            except Exception:
                LOGGER.exception("%s: reading its unfinished tasks from the chain failed; retrying", self.name)
                await asyncio.sleep(pause)
                pause = min(30.0, pause * 2)
        while True:
            block = await self.subscriber.next_block()
            async with self._state:
                for event in block.events:
                    attrs = {a.key: a.value for a in event.attributes}
                    try:
                        await self._on_event(event.event_type, attrs)
                    except Exception:
                        LOGGER.exception("%s: handling %s failed; the re-check retries", self.name, event.event_type)

    async def _pick_up(self) -> None:
        """Track this node's unfinished local_train tasks as chain state has them."""
        for record in await self._workflows():
            definition = record["definition"]
            fed = definition.get("federation") or {}
            if workflow.train_on(definition) != "iot" or self.node not in fed.get("participant_nodes", ()):
                continue
            index = await self.reader.rounds(record["workflow_id"])
            for number in range(index["latest"], 0, -1):
                sid = index["rounds"].get(str(number))
                if sid is None:
                    continue
                # A round with a result had all its local_trains done (its aggregate needed them),
                # and the next round opens only after that result: so had every earlier round.
                if await self.reader.round_result(sid) is not None:
                    break
                assignments = await self.reader.assignments(sid)
                if assignments is None:
                    continue  # collecting, or timed out: nothing assigned
                for task_id in schedule.tasks_of_node(assignments, self.node):
                    if assignments["tasks"][task_id]["kind"] != "local_train":
                        continue
                    status = await self.reader.task_status(sid, task_id)
                    if status and status["node"] == self.node and status["status"] in UNFINISHED:
                        LOGGER.info("%s: picking up %s of round %d (attempt %d) from the chain", self.name,
                                    task_id, number, status["attempt"])
                        await self._track(sid, task_id, int(status["attempt"]), fresh=False)

    async def _on_event(self, event_type: str, attrs: dict) -> None:
        if event_type in (events.TASK_ASSIGNED, events.TASK_REASSIGNED):
            if attrs.get("node") == self.node and attrs.get("kind") == "local_train":
                # task-assigned: the whole round was assigned in that transaction, so none of
                # its dependencies can be done yet; a reassignment may come at any point.
                await self._track(attrs["schedule_id"], attrs["task_id"], int(attrs["attempt"]),
                                  fresh=event_type == events.TASK_ASSIGNED)
        elif event_type == events.TASK_DROPPED:
            if self.on_update_done is not None:  # a secure round goes on without that upload
                self._spawn(self.on_update_done(attrs["schedule_id"]))
        elif event_type == events.TASK_DONE:
            if attrs.get("kind") == "local_train" and self.on_update_done is not None:
                # a round's last upload may have come: secure aggregation's unmask step looks now
                self._spawn(self.on_update_done(attrs["schedule_id"]))
            for pending in list(self.pending.values()):
                if pending.schedule_id == attrs["schedule_id"] and attrs["task_id"] in pending.waiting_for:
                    pending.waiting_for.discard(attrs["task_id"])
                    await self._maybe_start(pending)
        elif event_type in (events.ROUND_RESULT, events.ROUND_TIMEOUT):
            for pending in list(self.pending.values()):
                if (pending.workflow_id == attrs["workflow_id"] and pending.round > int(attrs["round"])
                        and not pending.model_ready):
                    await self._maybe_start(pending)

    def _spawn(self, work) -> None:
        """Run `work` beside the event loop of this runner; a failure is logged, not raised."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)

        def done(finished: asyncio.Task) -> None:
            self._background.discard(finished)
            if not finished.cancelled() and finished.exception() is not None:
                LOGGER.warning("%s: %s", self.name, finished.exception())

        task.add_done_callback(done)

    async def _recheck(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_SECONDS)
            async with self._state:
                for pending in list(self.pending.values()):
                    if pending.runner is not None:
                        continue
                    try:
                        if not pending.resolved:
                            await self._resolve(pending, fresh=False)
                        else:
                            pending.waiting_for = {d for d in pending.waiting_for
                                                   if not await self._is_done(pending.schedule_id, d)}
                        await self._maybe_start(pending)
                    except Exception:
                        LOGGER.exception("%s: re-checking %s failed; trying again later", self.name, pending.task_id)

    # -- tracking --------------------------------------------------------------------------------

    async def _track(self, schedule_id: str, task_id: str, attempt: int, *, fresh: bool) -> None:
        key = (schedule_id, task_id)
        pending = self.pending.get(key)
        if pending is not None:  # known: a later attempt replaces the one it holds
            pending.attempt = max(pending.attempt, attempt)
            if not fresh and pending.runner is None:
                await self._resolve(pending, fresh=False)
        else:
            pending = self.pending[key] = _Pending(schedule_id, task_id, attempt)
            await self._resolve(pending, fresh=fresh)
        await self._maybe_start(pending)

    async def _resolve(self, pending: _Pending, *, fresh: bool) -> None:
        assignments = (await self.context.round_inputs(pending.schedule_id))["assignments"]
        task = assignments["tasks"].get(pending.task_id)
        if task is None:
            raise LookupError(f"round {pending.schedule_id[:16]}… has no task {pending.task_id!r}")
        pending.workflow_id, pending.round = assignments["workflow_id"], int(assignments["round"])
        deps = task["fetch_dependency_outputs"]
        pending.waiting_for = set(deps) if fresh else {d for d in deps if not await self._is_done(pending.schedule_id, d)}
        pending.resolved = True

    async def _is_done(self, schedule_id: str, task_id: str) -> bool:
        status = await self.context.task_status(schedule_id, task_id)  # "done" is final: read once
        return status is not None and status["status"] == "done"

    async def _maybe_start(self, pending: _Pending) -> None:
        if pending.runner is not None or not pending.resolved or pending.waiting_for:
            return
        if not pending.model_ready:
            # As a compute node decides it: reader.starting_model names the model, or
            # raises LookupError while round n-1 has none on chain yet (and has not timed out).
            if not await starting_model_known(self.context, pending.schedule_id):
                if not pending.said_waiting:
                    LOGGER.info("%s: %s waits for round %d's global model", self.name, pending.task_id,
                                pending.round - 1)
                    pending.said_waiting = True
                return
            pending.model_ready = True
        pending.runner = asyncio.get_running_loop().create_task(self._run(pending))

    # -- running ---------------------------------------------------------------------------------

    async def _run(self, pending: _Pending) -> None:
        for attempt in range(1, UNEXPECTED_RETRIES + 1):
            try:
                trained = await self._train(pending)
                if trained is None:  # its starting model is not there after all: wait for it again
                    pending.model_ready, pending.runner = False, None
                    return
                status, fields = trained
                if await self._report(pending, status, fields):
                    self.pending.pop((pending.schedule_id, pending.task_id), None)
                    if status == "done":
                        self.completed.append((pending.schedule_id, pending.task_id))
                else:
                    pending.runner = None  # the re-check looks again
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                LOGGER.exception("%s: %s failed unexpectedly (try %d of %d)", self.name, pending.task_id, attempt,
                                 UNEXPECTED_RETRIES)
                await asyncio.sleep(min(30, 2 ** attempt))
        pending.runner = None  # unreported: the re-check tries again; past its deadline it is reassigned

    async def _train(self, pending: _Pending) -> tuple[str, dict] | None:
        """("done", report fields), ("failed", {"reason"}) for input that fails on every try, or
        None when the starting model is not on chain yet."""
        inputs = await self.context.round_inputs(pending.schedule_id)
        assignments, definition = inputs["assignments"], inputs["definition"]
        task = assignments["tasks"][pending.task_id]
        started = time.perf_counter()
        try:
            if task["data_owner"] != self.node:
                raise ValueError(f"{pending.task_id} trains on node {task['data_owner'][:16]}…'s data, not this node's")
            data, samples = self._local_data(definition)
            commitment = await self.context.blobs.get(task["inputs"][0])  # verified against its digest
            check_commitment(commitment, data, samples, schedule_id=pending.schedule_id, node=self.node,
                             salt=self._salts.of_round(pending.schedule_id))
            model = definition["model"]
            dataset = load_npz(data, input_dim=model["input_dim"], num_classes=model["num_classes"])
            async with self._training:
                LOGGER.info("%s: training %s on its own %d samples (round %d, attempt %d)", self.name,
                            pending.task_id, samples, pending.round, pending.attempt)
                outcome = await train_update(self.context, assignments, pending.task_id, self.node, dataset,
                                             definition)
        except InputNotReady:
            return None
        except (ValueError, LookupError, BlobError, TaskInputError) as exc:
            LOGGER.warning("%s: %s failed: %s", self.name, pending.task_id, exc)
            return "failed", {"reason": f"local_train {pending.task_id}: {exc}"[:500]}
        # starting_model: the lineage its done report carries (base_model_digest and the records naming it)
        return "done", {"output_digest": outcome.output_digest, "metrics": report_metrics(outcome, started),
                        "starting_model": outcome.starting_model}

    async def _report(self, pending: _Pending, status: str, fields: dict) -> bool:
        """True once the report is committed, or the chain no longer wants it from this node."""
        for _ in range(REPORT_TRIES):
            attempt = pending.attempt
            txn = schedule.make_report_transaction(self.signer, pending.schedule_id, pending.task_id, status,
                                                   attempt=attempt, **fields)
            if await self._commit(txn, f"{pending.task_id} {status} (round {pending.round}, attempt {attempt})"):
                if status == "done":
                    LOGGER.info("%s: %s done (%s…) %s", self.name, pending.task_id, fields["output_digest"][:12],
                                {k: round(v, 4) if isinstance(v, float) else v for k, v in fields["metrics"].items()})
                return True
            current = await self.reader.task_status(pending.schedule_id, pending.task_id)
            if current is None or current["node"] != self.node or current["status"] not in UNFINISHED:
                return True  # done already, failed or moved on: nothing left to report here
            pending.attempt = int(current["attempt"])  # reassigned to this node meanwhile: same result
        return False
