"""Mirrors committed rounds into the CouchDB history: what the chain holds, after it holds it.

A compute node records the rounds whose result it reported (so two nodes never write the same
round), from committed chain data and the content-addressed blobs, never from what a task
computed (the trainings' done statuses may be the node's copies of committed ones: final, and
one REST read each otherwise):

    round-result      workflow:{id} (definition, version, owner), round:{id}:{n} with the global
                      model attached (participants, weights, update and submission digests,
                      train metrics), participation:{id}:{node} for each participant
    round-finalized   the round's evaluation metrics and status "final"; after the last round,
                      final:{id} with the final model attached

It runs beside the tasks, not in them, so no round waits for CouchDB. It follows the events from
the last block it recorded (kept in the data dir), so a node that dies between a commit and its
CouchDB writes makes them on restart; every write is an idempotent merge, so replaying a block
changes nothing, and a history lost with its database is rebuilt by replaying from genesis.
"""

from __future__ import annotations

import asyncio
import logging

from trustmesh.fl import privacy_block
from trustmesh.ledger.block_cursor import BlockCursor
from trustmesh.ledger.events import event_subscription
from trustmesh.scheduling import events
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.couch import CouchHistory
from trustmesh.stores.redis_link import TRANSIENT
from trustmesh.stores.blobs import BlobStore

LOGGER = logging.getLogger(__name__)

EVENTS = (events.ROUND_RESULT, events.ROUND_FINALIZED)


class HistoryRecorder:
    def __init__(self, node: str, reader: FederationReader, blobs: BlobStore, history: CouchHistory, *,
                 validator_url: str, cursor: BlockCursor, task_statuses=None):
        self.node, self.reader, self.blobs, self.history = node, reader, blobs, history
        # (schedule_id, task ids) -> statuses; a done status is final, so a copy of one the
        # chain committed is as good as reading it again (the compute node passes its own).
        self.task_statuses = task_statuses or reader.task_statuses
        self.validator_url = validator_url
        self.cursor = cursor
        self.recorded: list[tuple[str, str]] = []  # (event type, schedule_id), for tests and logs

    async def run(self) -> None:
        """Follow and record until cancelled; a failed write is tried again from the same block."""
        while True:
            subscriber = await self.cursor.subscribe(self.validator_url, [event_subscription(e) for e in EVENTS],
                                                     new_from_genesis=True, who="history")
            try:
                while True:
                    block = await subscriber.next_block()
                    for event in block.events:
                        if event.event_type in EVENTS:  # not the block-commit event every block has
                            attrs = {a.key: a.value for a in event.attributes}
                            await self.record(event.event_type, attrs["schedule_id"])
                    self.cursor.save(block.block_id)
            except asyncio.CancelledError:
                raise
            except (*TRANSIENT, OSError) as exc:  # a store restarting: a pause, not a bug
                LOGGER.warning("history: a store is unreachable (%s: %s); trying again from the last block "
                               "recorded", type(exc).__name__, exc)
                await asyncio.sleep(1)
            except Exception:
                LOGGER.exception("history: recording a block failed; trying again from the last one recorded")
                await asyncio.sleep(1)
            finally:
                await subscriber.close()

    async def record(self, event_type: str, schedule_id: str) -> None:
        result = await self.reader.round_result(schedule_id)
        if result is None or result.get("reported_by") != self.node:
            return  # another node's round: it records it
        if event_type == events.ROUND_RESULT:
            await self._record_result(result)
        elif result.get("final"):
            await self._record_final(result)
        self.recorded.append((event_type, schedule_id))

    async def _model(self, result) -> bytes:
        return await self.blobs.get(result["global_model_digest"])  # verified against the chain's digest

    async def _record_result(self, result) -> None:
        sid, workflow_id, number = result["schedule_id"], result["workflow_id"], result["round"]
        workflow = await self.reader.workflow(workflow_id)
        await self.history.save_workflow(workflow_id, workflow["definition"], version=workflow.get("version"),
                                         owner=workflow.get("owner"))
        record = await self.reader.round(sid)
        assignments = await self.reader.assignments(sid)
        participants = set(result["participants"])
        trains = {t: task["data_owner"] for t, task in assignments["tasks"].items()
                  if task["kind"] == "local_train" and task["data_owner"] in participants}
        statuses = await self.task_statuses(sid, trains)
        trained = {owner: statuses[t] for t, owner in trains.items()}  # data owner -> its local_train status
        weights = result["aggregation_weights"]
        await self.history.put_round_model(
            workflow_id, number, await self._model(result), schedule_id=sid,
            expected_digest=result["global_model_digest"], status="aggregated",
            participants=result["participants"], aggregation_weights=weights,
            submissions={n: {"digest": s["digest"], "samples": s["samples"]} for n, s in record["submissions"].items()},
            update_digests={n: s["output_digest"] for n, s in trained.items()},
            metrics={"train_" + k: v for k, v in result["metrics"].items()})
        await self.history.record_participations(workflow_id, number, {
            node: dict(schedule_id=sid, included=True, weight=float(weights[node]), digest=status["output_digest"],
                       samples=int(status["metrics"]["samples"]), accuracy=float(status["metrics"]["accuracy"]))
            for node, status in trained.items()})
        LOGGER.info("history: round %d of %s recorded (%d participants)", number, workflow_id, len(trained))

    async def _record_final(self, result) -> None:
        sid, workflow_id, number = result["schedule_id"], result["workflow_id"], result["round"]
        scores = {name: value for evaluation in (result.get("evaluations") or {}).values()
                  for name, value in evaluation["metrics"].items()}
        await self.history.save_round(workflow_id, number, schedule_id=sid, status="final", metrics=scores)
        workflow = await self.reader.workflow(workflow_id)
        if number == privacy_block.planned_rounds(workflow["definition"]):  # its last round, budget permitting
            await self.history.put_final_model(workflow_id, await self._model(result), round_number=number,
                                               schedule_id=sid, metrics=scores,
                                               expected_digest=result["global_model_digest"])
            LOGGER.info("history: final model of %s recorded", workflow_id)
