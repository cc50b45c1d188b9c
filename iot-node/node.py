"""An IoT node: owns private data; as a participant it contributes to each round, as the
coordinator it also opens rounds and keeps them moving.

It serves one workflow (`workflow_id`) or, without one, every deployed workflow whose
federation names its key, so IoT nodes can be started before anything is deployed. Its role in a
workflow comes from the workflow itself (the coordinator_node coordinates) unless forced.

Everything it does is decided from committed chain state, re-read after every block and on a
short tick (for timeouts), so a restarted node simply picks up where the chain is:

    participant  round collecting, it is expected, it has not submitted -> seal its data for the
                 registered compute nodes, store the bundle (sha256-named), submit the digest;
                 with train_on "iot" store and submit only a commitment to its data, and train
                 its own local_train tasks itself (local_training.py)
    coordinator  no round yet -> open round 1 (once a compute node is registered)
                 collecting past round_timeout -> close_round
                 ready, not assigned -> assign
                 a task past its deadline -> reassign
                 the latest round ready (or timed out), the one before it aggregated (or timed
                 out), and rounds remain -> open the next round
    every node   a round final -> fetch the global model by its on-chain digest, verify, keep it

Rounds overlap by one: the next round collects and is assigned while this one trains, and its
training starts from this one's global model as soon as that exists, so the time a round spends
collecting and being scheduled is hidden behind the previous round's work.

Raw data leaves the node only inside envelopes (stores/data_envelope.py), or not at all.

This module is the node itself (its state, its loop, what it follows); the steps of each role are
IoTNode's two mixins, participant.py and coordinator.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib

from trustmesh.cancelling import cancel_and_wait
from trustmesh.fl.attacks import Attack
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.events import BLOCK_COMMIT, EventSubscriber, event_subscription
from trustmesh.ledger.rest_client import RestClient, refusal
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import events, schedule, workflow
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.kept_blobs import KeptBlobs
from trustmesh.stores.redis_link import TRANSIENT, RedisLink
from trustmesh.stores.blobs import BlobStore
from trustmesh.stores.heartbeats import Heartbeats
from trustmesh.stores.redis_client import client

from . import commitment
from .coordinator import REASSIGN_RETRY, Coordinator  # noqa: F401  (REASSIGN_RETRY: read here by tests)
from .participant import Participant
from .secure_upload import SecureAggregation
from .steps import claimed, planned

LOGGER = logging.getLogger(__name__)

# The blocks that can change what an IoT node does. Task progress is not among them: ten IoT
# nodes re-reading state on every task report would load the validator for nothing.
EVENTS = (events.WORKFLOW_DEPLOYED, events.WORKFLOW_UPDATED, events.PEER_REGISTERED,
          events.PEER_UPDATED, events.ROUND_OPENED, events.ROUND_READY, events.ROUND_TIMEOUT,
          events.ROUND_RESULT, events.ROUND_FINALIZED)
# Round events a node acts on straight from their attributes (IoTNode._react).
REACTIONS = (events.ROUND_OPENED, events.ROUND_READY, events.ROUND_RESULT,
             events.ROUND_FINALIZED)
TICK = 1.0  # seconds between re-checks that depend on time (timeouts, deadlines): coordinators
FULL_TICKS = 5  # every 5th tick also re-checks participation, in case an event was missed
class IoTNode(Participant, Coordinator):
    def __init__(self, name: str, data_dir: str | os.PathLike, *, workflow_id: str | None = None,
                 validator_url: str, rest_url: str, redis_url: str, coordinator: bool | None = None,
                 data_path: str | None = None, on_round=None, task_deadline: int | None = None,
                 torch_threads: int | None = None, attack: Attack | None = None, host=None):
        self.name = name
        # An IoTHost (host.py) when this node shares one process with many: its connections,
        # event stream and chain reads are the host's.
        self.host = host
        # For tests and benchmarks only (fl/attacks.py): how this node poisons the updates it trains
        # itself (train_on "iot"); said in its log and status line.
        self.attack = attack
        self.data_dir = pathlib.Path(data_dir)
        self.workflow_id = workflow_id  # None: every workflow that names this node
        self.validator_url, self.rest_url, self.redis_url = validator_url, rest_url, redis_url
        self.coordinator = coordinator  # None: as the workflow says; True/False: forced
        self.data_path = data_path
        self.task_deadline = task_deadline  # seconds a compute node gets per task before reassignment
        self.torch_threads = torch_threads  # for training on this node; None: torch's default
        self.on_round = on_round or (lambda workflow_id, number, result: None)  # progress hook for the CLI
        self.signer = load_or_create_key(self.data_dir / "keys", name)
        self.salts = commitment.SaltStore(self.data_dir / "commitment-salts")
        self.node = self.signer.public_key().as_hex()
        self.finished = asyncio.Event()  # with a workflow_id: set once its last round is over
        self.done: set[str] = set()      # workflows whose last round is over
        self.models: dict[str, dict[int, str]] = {}  # workflow -> round -> verified global model digest
        self._submitted: set[str] = set()  # rounds this node submitted to (or is submitting to right now)
        self._sent: set[tuple] = set()   # coordinator actions sent or being sent (the chain refuses repeats anyway)
        self._reassign_after: dict[tuple, float] = {}  # refused reassigns: not before this time again
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self._coordinates_any = True  # until the first look at the chain says otherwise
        self._data_cache: dict[str, tuple[bytes, int]] = {}  # npz bytes, samples
        self._definitions: dict[str, dict] = {}  # workflow -> definition, as last read from the chain
        self._recipients: dict[str, str] | None = None  # compute node -> encryption key, until a peer event
        self._reactions: set[asyncio.Task] = set()
        self._recheck = asyncio.Event()

    @property
    def global_models(self) -> dict[int, str]:
        """Round -> verified global model digest of this node's workflow (with a workflow_id)."""
        return self.models.setdefault(self.workflow_id, {})

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.host is not None:
            self.rest, self.reader, self.redis, self.link = self.host.rest, self.host.reader, self.host.redis, self.host.link
        else:
            self.rest = RestClient(self.rest_url, patience=float("inf"))  # a node waits out every outage
            self.reader = FederationReader(self.rest)
            self.redis = client(self.redis_url)
            self.link = RedisLink(self.redis, self.redis_url, self.name)
            await self.link.wait_up()
            await self.link.mark()
        self.secure = SecureAggregation(self.signer, self.reader)
        # Its sealed data goes to Redis and stays here too: a Redis that restarts without it gets
        # it back (link.watch -> restore), since the chain names exactly those bytes.
        self.blobs = KeptBlobs(BlobStore(self.redis), self.data_dir / "blobs")
        self.heartbeats = Heartbeats(self.redis)
        if self.host is not None:
            self.subscriber = self.host.inbox()
        else:
            self.subscriber = EventSubscriber(self.validator_url, [event_subscription(e) for e in EVENTS])
            await self.subscriber.start()
        self.trainer = None  # started by the first workflow that trains on IoT nodes (_act)
        loop = asyncio.get_running_loop()
        # liveness for `trustmesh status` and supervisors
        self._tasks = [loop.create_task(self._follow()), loop.create_task(self._reconcile()),
                       loop.create_task(self._tick()), loop.create_task(self._beat())]
        if self.host is None:  # a host watches Redis for all its nodes
            self._tasks.append(loop.create_task(self.link.watch(self._redis_restarted)))
        LOGGER.info("IoT node %s (%s…) ready%s", self.name, self.node[:16], " as coordinator" if self.coordinator else "")

    async def _beat(self) -> None:
        info = {"name": self.name, "role": "iot"}
        if self.attack is not None:  # never silent: `trustmesh status` shows it
            info["attack"] = f"{self.attack} on its own updates"
        # the REST API lists no pending batches: each node says which of its own it waits for
        def current() -> dict:
            return {**info, "pending_batches": self.rest.pending_summary(signer=self.node)}

        if self.host is not None:  # its first beat now; then the host's, for all its nodes in one go
            await self.link.call(lambda: self.heartbeats.beat(self.node, current()))
            self.host.beats[self.node] = current
            return
        # through Redis outages: liveness resumes with Redis
        await self.link.keep_running(lambda: self.heartbeats.keep_beating(self.node, current))

    async def _redis_restarted(self) -> None:
        await self.blobs.restore()
        self._recheck.set()  # and look at the chain again: a submission may have failed meanwhile

    async def stop(self) -> None:
        await cancel_and_wait([*self._tasks, *self._reactions])
        if self.host is not None:
            self.host.beats.pop(self.node, None)
        if self.trainer is not None:
            await self.trainer.stop()
        if self.host is not None:
            return  # the host closes what its nodes share
        await self.subscriber.close()
        await self.rest.close()
        await self.redis.aclose()

    # -- the loop ------------------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            block = await self.subscriber.next_block()
            if not self._react(block):
                self._recheck.set()

    async def _reconcile(self) -> None:
        """The full re-read of chain state after blocks, one at a time: the blocks that arrive
        meanwhile are covered by the next one."""
        while True:
            await self._recheck.wait()
            self._recheck.clear()
            await self._step()

    def _react(self, block) -> bool:
        """Act on a block's round events at once, from what the events say; True when that
        covers the whole block. Otherwise a full re-read of chain state follows (_step: several
        REST calls per node, which ten nodes doing after every block would load the validator
        with, and every step of a round would wait for). The periodic full check catches anything
        a reaction missed. Each reaction runs on its own, so waiting for one commit never holds
        up the next block."""
        covered = True
        for event in block.events:
            if event.event_type == BLOCK_COMMIT:
                continue  # in every block: the subscriber always asks for it, to resume by block id
            if event.event_type in (events.PEER_REGISTERED, events.PEER_UPDATED):
                self._recipients = None
                continue
            attrs = {a.key: a.value for a in event.attributes}
            workflow_id = attrs.get("workflow_id")
            definition = self._definitions.get(workflow_id)
            if event.event_type not in REACTIONS or definition is None:
                covered = False
                continue
            if workflow_id in self.done or not definition.get("federation"):
                continue
            reaction = asyncio.get_running_loop().create_task(self._react_to(event.event_type, attrs, definition))
            self._reactions.add(reaction)
            reaction.add_done_callback(self._reaction_done)
        return covered

    def _reaction_done(self, task: asyncio.Task) -> None:
        self._reactions.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        self._recheck.set()
        if isinstance(task.exception(), TRANSIENT):
            self.link.failed(task.exception())  # said once; the re-check retries
        else:
            LOGGER.error("%s: reacting to a block failed; the next check of the chain retries", self.name,
                         exc_info=task.exception())

    async def _react_to(self, event_type: str, attrs: dict, definition: dict) -> None:
        workflow_id, sid, number = attrs["workflow_id"], attrs["schedule_id"], int(attrs["round"])
        fed = planned(definition)
        if event_type == events.ROUND_OPENED:
            record = {"schedule_id": sid, "round": number, "status": "collecting", "submissions": {},
                      "expected_nodes": attrs["expected_nodes"].split(",")}
            await self._participate(definition, record)
        elif event_type in (events.ROUND_RESULT, events.ROUND_FINALIZED):
            # A global model on chain may let the round after the next one open (finalized covers
            # a missed result).
            if self._coordinates(definition):
                await self._open_next(workflow_id, fed)
            if event_type == events.ROUND_RESULT:
                return
            await self._collect_final(workflow_id, definition, {"rounds": {str(number): sid}})
            # Over only once the last round is final (a privacy budget, or a round that timed
            # out, may end it otherwise: the full check sees that): not ~3 reads a node a round.
            if definition.get("privacy") or fed["rounds"] in self.models.get(workflow_id, {}):
                await self._finish_if_over(workflow_id, fed)
        elif event_type == events.ROUND_READY:
            if definition.get("secure_aggregation"):  # its participants are fixed: shares go out now
                await self._share(definition, {"schedule_id": sid, "round": number, "status": "ready",
                                               "submitted_nodes": attrs["submitted_nodes"].split(",")})
            if self._coordinates(definition):
                await asyncio.gather(self._assign(workflow_id, sid, number), self._open_next(workflow_id, fed))

    async def _tick(self) -> None:
        ticks = 0
        while True:
            if ticks % FULL_TICKS == 0:
                self._recipients = None  # in case a peer event was missed
            await self._step(coordinating_only=ticks % FULL_TICKS != 0)
            ticks += 1
            await asyncio.sleep(TICK)

    async def _step(self, coordinating_only: bool = False) -> None:
        async with self._lock:  # blocks and ticks must not act on the same state twice
            try:
                await self._act(coordinating_only)
            except TRANSIENT as exc:  # said once by the link, and when Redis is back; acting resumes then
                await self.link.outlast(exc)
            except Exception:
                LOGGER.exception("%s: acting on chain state failed; trying again shortly", self.name)

    async def _workflows(self) -> list[dict]:
        """The workflow records this node acts on: its own, or every one that names its key."""
        if self.workflow_id is not None:
            record = await self.reader.workflow(self.workflow_id)
            return [record] if record is not None else []
        found = []
        for record in await self.reader.workflows():
            fed = record["definition"].get("federation") or {}
            if self.node == fed.get("coordinator_node") or self.node in (fed.get("participant_nodes") or ()):
                found.append(record)
        return found

    async def _start_trainer(self) -> None:
        """Run this node's own local_train tasks (train_on "iot") on their own event stream, so
        task events never trigger full re-reads of chain state. Only once a workflow asks: every
        subscriber costs the validator a delivery per block. (Imported here: training needs
        torch, which a node that only submits data and checks models never loads.)"""
        from .local_training import LocalTrainer

        if self.torch_threads is not None:
            from trustmesh.fl.training import use_threads

            use_threads(self.torch_threads)
        trainer = LocalTrainer(self.name, self.signer, validator_url=self.validator_url, reader=self.reader,
                               blobs=self.blobs, commit=self._commit, local_data=self._local_data,
                               workflows=self._workflows, salts=self.salts,
                               subscriber=await self.host.trainer_inbox(self.node) if self.host else None)
        trainer.context.secure = self.secure  # masks its updates where a workflow aggregates securely
        trainer.on_update_done = self._unmask_round
        if self.attack is not None:
            trainer.context.attacks = {self.node: self.attack}
            LOGGER.warning("ATTACK (test mode): %s poisons every update it trains with %s", self.name, self.attack)
        await trainer.start()  # reads the tasks it holds already, so starting late loses none
        self.trainer = trainer

    def _coordinates(self, definition: dict) -> bool:
        if self.coordinator is not None:
            return self.coordinator
        return (definition.get("federation") or {}).get("coordinator_node") == self.node

    async def _act(self, coordinating_only: bool = False) -> None:
        if coordinating_only and not self._coordinates_any:
            return  # a participant's tick: nothing time-driven to do between full checks
        records = await self._workflows()
        self._definitions = {r["workflow_id"]: r["definition"] for r in records}
        if self.trainer is None and any(workflow.train_on(r["definition"]) == "iot" for r in records):
            await self._start_trainer()
        self._coordinates_any = any(self._coordinates(r["definition"]) for r in records)
        for record in records:
            if record["workflow_id"] in self.done or (coordinating_only and not self._coordinates(record["definition"])):
                continue
            try:  # one workflow's trouble must not stall the others
                await self._act_on(record["workflow_id"], record["definition"])
            except TRANSIENT:
                raise  # Redis is down for all of them (_step)
            except Exception:
                LOGGER.exception("%s: acting on workflow %s failed; trying again shortly", self.name,
                                 record["workflow_id"])

    async def _act_on(self, workflow_id: str, definition: dict) -> None:
        if definition.get("federation") is None:
            return  # single-node workflow: no rounds, nothing for IoT nodes to do
        fed = planned(definition)
        index = await self.reader.rounds(workflow_id)
        latest = index["latest"]
        sid = index["rounds"].get(str(latest))
        record = await self.reader.round(sid) if sid else None
        if self._coordinates(definition):  # first: the next round should not wait for the rest
            await self._coordinate(workflow_id, fed, index, record)
        if record is not None:
            await self._participate(definition, record)
            await self._collect_final(workflow_id, definition, index)
            if definition.get("secure_aggregation"):  # rounds overlap: the one before may still unmask
                await self._share(definition, record)
                for number in (latest - 1, latest):
                    if str(number) in index["rounds"]:
                        await self._unmask(definition, index["rounds"][str(number)])
        if latest == fed["rounds"]:
            await self._finish_if_over(workflow_id, fed, index)

    async def _settled_uploads(self, sid: str, assignments: dict | None) -> dict[str, str] | None:
        """data owner -> the status of its local_train ("done": it uploaded, "dropped": it did not)
        once every one of the round's is settled; None while one is not, or before assignment."""
        if assignments is None:
            return None
        trains = {t: task["data_owner"] for t, task in assignments["tasks"].items() if task["kind"] == "local_train"}
        statuses = await self.reader.task_statuses(sid, trains)
        if any(s is None or s["status"] not in schedule.SETTLED for s in statuses.values()):
            return None
        return {owner: statuses[t]["status"] for t, owner in trains.items()}

    async def _round_over(self, record, *, model_only: bool = False) -> bool:
        """Timed out, or its result is final; with model_only, once its global model is on chain
        (all the next round needs: its evaluation may still be running)."""
        if record["status"] == "timeout":
            return True
        result = await self.reader.round_result(record["schedule_id"])
        return bool(result and result.get("global_model_digest" if model_only else "final"))

    async def _once(self, key, txn, what: str) -> None:
        await claimed(self._sent, key, lambda: self._commit(txn, what))

    async def _commit(self, txn, what: str) -> bool:
        # sent again while the validator does not know it (a restarted one forgot it); a list of
        # transactions goes in one batch: they commit together or not at all
        txns = txn if isinstance(txn, list) else [txn]
        [status] = await self.rest.submit_until_final([make_batch(self.signer, txns)], 60)
        if status["status"] == "COMMITTED":
            LOGGER.info("%s: %s", self.name, what)
            return True
        LOGGER.info("%s: %s not committed: %s", self.name, what, refusal(status))
        return False
