"""An IoT node as its workflow's coordinator (IoTNode's mixin): opens rounds (committing to the DP
noise seed where the aggregator adds noise, within the privacy budget), closes them at their
timeout, assigns them, moves or drops late tasks, reveals the noise seed once every update is in,
ends a secure round whose unmask step stalled, settles each final round's rewards, and knows
when the workflow is over."""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import time

from trustmesh.fl import privacy
from trustmesh.scheduling import federation, layout, rewards, schedule

from .steps import rounds_to_run


LOGGER = logging.getLogger("trustmesh.iot_node.node")  # one log for the node, whichever part speaks
REASSIGN_RETRY = 10.0  # seconds before a refused reassign (no live node to take it) is tried again
NOISE_SEED_CONTEXT = b"trustmesh-dp-noise-seed/"


class Coordinator:
    """The coordinator half of IoTNode: methods only; the node's state lives in IoTNode."""

    async def _finish_if_over(self, workflow_id: str, fed, index=None) -> None:
        """Finished once every round is final or timed out: with rounds overlapping, the last
        round's result is not the last word."""
        if workflow_id in self.done:
            return
        index = index or await self.reader.rounds(workflow_id)
        models = self.models.get(workflow_id, {})
        rounds = fed["rounds"]
        definition = self._definitions.get(workflow_id)
        if definition and definition.get("privacy"):  # the recorded epsilon may end it sooner
            rounds = min(rounds, await rounds_to_run(self.reader, workflow_id, definition, index))
        for number in range(1, rounds + 1):
            if number in models:
                continue
            sid = index["rounds"].get(str(number))
            record = await self.reader.round_core(sid) if sid else None
            if record is None or record["status"] != "timeout":
                return
        self.done.add(workflow_id)
        if workflow_id == self.workflow_id:
            self.finished.set()

    async def _coordinate(self, workflow_id: str, fed, index, record) -> None:
        if record is None:
            if await self.reader.peer_index():  # else no compute node yet: nobody could open the data
                await self._open_round(workflow_id, 1, None)
            return
        latest = index["latest"]
        if latest > 1:  # rounds overlap: the one before the latest may still be working
            previous = await self.reader.round_core(index["rounds"][str(latest - 1)])
            if previous is not None and not await self._round_over(previous):
                await self._keep_moving(workflow_id, previous)
        await self._keep_moving(workflow_id, record)
        await self._open_next(workflow_id, fed, index, record)

    async def _keep_moving(self, workflow_id: str, record) -> None:
        """Close a collecting round past its timeout, assign a ready one, move late tasks."""
        sid = record["schedule_id"]
        if record["status"] == "collecting":
            if time.time() >= record["round_start"] + record["round_timeout"]:
                await self._once(("close", sid, int(time.time())), federation.make_close_round_transaction(
                    self.signer, sid), f"close round {record['round']}")
            return
        if record["status"] != "ready":
            return
        assignments = await self.reader.assignments(sid)
        if assignments is None:
            await self._assign(workflow_id, sid, record["round"])
            return
        if record.get("noise_commitment"):
            await self._reveal_noise(sid, record["round"], assignments)
        secure = bool((self._definitions.get(workflow_id) or {}).get("secure_aggregation"))
        if secure:
            await self._close_if_unmask_stalled(workflow_id, record, assignments)
        now = time.time()
        deadline_seconds = assignments.get("deadline_seconds") or 300
        grace = 2 * deadline_seconds
        model_since = None  # when the global model these local_train tasks start from appeared
        for task_id, task in assignments["tasks"].items():
            deadline = task["deadline"]
            if task["kind"] == "local_train" and deadline < now:
                # Assigned while the previous round trained: its clock starts with that round's
                # model, not with the preprocess it also waited for.
                if model_since is None:
                    model_since = await self._model_since(workflow_id, record["round"])
                deadline = max(deadline, model_since + deadline_seconds)
            # Past its deadline a task moves, unless its node is alive and merely slow: then it gets
            # a grace period, so busy nodes are not made to bounce work between them.
            if deadline < now and (now > deadline + grace or not await self.heartbeats.is_alive(task["node"])):
                key = ("reassign", sid, task_id, task["attempt"])
                if self._reassign_after.get(key, 0) > now:
                    continue  # refused a moment ago (no live node to take it): no batch every tick
                status = await self.reader.task_status(sid, task_id)
                if status and status["status"] not in schedule.SETTLED and status["attempt"] == task["attempt"]:
                    if task["kind"] == "local_train" and secure:  # the round goes on without that upload
                        await self._once(key, schedule.make_drop_update_transaction(self.signer, sid, task_id,
                                                                                    workflow_id),
                                         f"drop the late upload {task_id}")
                        continue
                    await self._once(key, schedule.make_reassign_transaction(self.signer, sid, task_id),
                                     f"reassign late task {task_id}")
                    if key not in self._sent:
                        self._reassign_after = {k: t for k, t in self._reassign_after.items() if t > now}
                        self._reassign_after[key] = now + REASSIGN_RETRY

    async def _model_since(self, workflow_id: str, number: int) -> float:
        """Chain time at which round `number`'s starting model was recorded: the previous round's
        result (infinity while it has none: training cannot start, so it cannot be late)."""
        if number <= 1:
            return 0.0
        index = await self.reader.rounds(workflow_id)
        sid = index["rounds"].get(str(number - 1))
        result = await self.reader.round_result(sid) if sid else None
        if result is not None and result.get("global_model_digest"):
            return float(result["recorded_at"])
        record = await self.reader.round_core(sid) if sid else None
        return 0.0 if record is not None and record["status"] == "timeout" else math.inf

    async def _open_next(self, workflow_id: str, fed, index=None, record=None) -> None:
        """Open the round after the latest once the latest is ready (or timed out) and the one
        before it has its global model (or timed out): one round collects and is scheduled while
        another trains, never more."""
        index = index or await self.reader.rounds(workflow_id)
        latest = index["latest"]
        if not latest or latest >= fed["rounds"]:
            return
        record = record or await self.reader.round_core(index["rounds"][str(latest)])
        if record is None or record["status"] not in ("ready", "timeout"):
            return
        definition = self._definitions.get(workflow_id) or {}
        if definition.get("privacy"):
            if definition["privacy"]["where"] == "client" and not await self._round_over(record, model_only=True):
                return  # no overlap: the latest round's recorded epsilon (it may have averaged fewer noised updates) first
            if latest >= await rounds_to_run(self.reader, workflow_id, definition, index):
                LOGGER.info("%s: workflow %s stops after round %d: one more round would pass its privacy budget "
                            "(budget exhausted)", self.name, workflow_id, latest)
                return
        if latest > 1:
            previous = await self.reader.round_core(index["rounds"][str(latest - 1)])
            if previous is None or not await self._round_over(previous, model_only=True):
                return
        await self._open_round(workflow_id, latest + 1, record["schedule_id"])

    async def _open_round(self, workflow_id: str, number: int, previous: str | None) -> None:
        definition = self._definitions.get(workflow_id) or (await self.reader.workflow(workflow_id) or {}).get(
            "definition") or {}
        commitment = None
        if (definition.get("privacy") or {}).get("where") == "server":  # the aggregator's noise, fixed now
            commitment = privacy.commitment(self._noise_seed(layout.schedule_id_for(workflow_id, number, self.node)))
        await self._once(("open", workflow_id, number), federation.make_open_round_transaction(
            self.signer, workflow_id, number, previous_schedule_id=previous, noise_commitment=commitment),
            f"open round {number}")

    def _noise_seed(self, schedule_id: str) -> bytes:
        """A round's DP noise seed: from this coordinator's key and the round, so a restarted
        coordinator reveals the seed it committed to, and nobody else can work it out before."""
        return hmac.new(bytes.fromhex(self.signer.as_hex()), NOISE_SEED_CONTEXT + schedule_id.encode(),
                        hashlib.sha256).digest()

    async def _reveal_noise(self, sid: str, number: int, assignments: dict) -> None:
        """Reveal the round's noise seed once every update is fixed (every local_train settled)."""
        if ("reveal", sid) in self._sent or await self._settled_uploads(sid, assignments) is None:
            return
        if await self.reader.noise_seed(sid) is not None:
            return
        await self._once(("reveal", sid), schedule.make_reveal_noise_transaction(
            self.signer, sid, self._noise_seed(sid).hex()), f"reveal the noise seed of round {number}")

    async def _assign(self, workflow_id: str, sid: str, number: int) -> None:
        await self._once(("assign", sid), schedule.make_assign_transaction(
            self.signer, sid, workflow_id, deadline_seconds=self.task_deadline), f"assign round {number}")

    async def _close_if_unmask_stalled(self, workflow_id: str, record: dict, assignments: dict) -> None:
        """A securely aggregated round whose uploads are all in but whose unmask step has stayed
        below the threshold for round_timeout seconds ends as timeout (the rule says why)."""
        sid, last = record["schedule_id"], 0.0
        for task_id, task in assignments["tasks"].items():
            if task["kind"] not in ("local_train", "aggregate"):
                continue
            status = await self.reader.task_status(sid, task_id)
            settled = status is not None and status["status"] in schedule.SETTLED
            if task["kind"] == "aggregate" and settled:
                return  # aggregated: nothing stalled
            if task["kind"] == "local_train":
                if not settled:
                    return  # still waiting for uploads, which the deadlines take care of
                last = max(last, max(e["at"] for e in status["history"] if e["status"] in schedule.SETTLED))
        if time.time() >= last + record["round_timeout"]:
            await self._once(("close-stalled", sid, int(time.time()) // 10), federation.make_close_round_transaction(
                self.signer, sid, secure_workflow=workflow_id), f"end round {record['round']}: its unmask step stalled")

    async def _settle(self, workflow_id: str, sid: str, number: int) -> None:
        """Pay a final round from the workflow's escrow (trustmesh-rewards settle; anyone may send
        it, the rule decides who gets what), once, when there is an escrow not yet paid for it."""
        if await self.reader.escrow(workflow_id) is None or await self.reader.settlement(sid) is not None:
            return
        await self._once(("settle", sid), rewards.make_settle_transaction(self.signer, sid, workflow_id),
                         f"settle round {number}'s rewards")
