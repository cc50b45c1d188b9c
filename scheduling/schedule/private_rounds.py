"""trustmesh-schedule's rules for rounds whose updates stay private: the DP noise seed revealed
once every update is fixed, and secure aggregation's keys, shares and unmask step."""

from __future__ import annotations

from typing import Mapping

from trustmesh.fl import privacy
from trustmesh.ledger.processor import InvalidTransaction

from .. import events, layout, secagg_rules
from ..common import HEX64, chain_time, emit, read_record, require_match, write_records
from .checks import _schedule_id, _task_id
from .reports import RoundTasks
from .spec import SETTLED


class PrivateRoundRules:
    """A ScheduleHandler's rules for rounds that keep updates private: the DP noise seed's reveal
    and secure aggregation's messages (scheduling/secagg_rules.py)."""

    async def _trains_pending(self, context, schedule_id: str, assignments: Mapping) -> list[str]:
        """The round's local_train tasks not settled yet (done or dropped): until there are none,
        the round's uploads may change."""
        trains = [t for t, task in assignments["tasks"].items() if task["kind"] == "local_train"]
        statuses = await self._statuses(context, schedule_id, trains)
        return sorted(t for t in trains if statuses[t]["status"] not in SETTLED)

    # -- drop_update ------------------------------------------------------------------------

    async def _drop_update(self, body: dict, signer: str, context) -> None:
        """A securely aggregated round goes on without a participant whose local_train is past its
        deadline: its neighbours then reveal their shares of its mask key instead (secagg_rules)."""
        schedule_id, task_id = _schedule_id(body), _task_id(body)
        round_, _ = await secagg_rules.secure_round(context, schedule_id, whole=False)
        if signer != round_.get("coordinator"):
            raise InvalidTransaction(f"only the round's coordinator {round_.get('coordinator')} drops an update, not {signer}")
        assignments = await self._assignments(context, schedule_id)
        task = self._task(assignments, schedule_id, task_id)
        if task["kind"] != "local_train":
            raise InvalidTransaction(f"task {task_id!r} is a {task['kind']} task; only a local_train (an upload) is dropped")
        current = (await self._statuses(context, schedule_id, [task_id]))[task_id]
        now = await chain_time(context)
        if current["status"] in SETTLED:
            raise InvalidTransaction(f"task {task_id!r} is {current['status']} already")
        if await self._unsettled_inputs(context, schedule_id, task, current, {}):
            waiting = await self._waiting_for(context, schedule_id, task)
            raise InvalidTransaction(f"task {task_id!r} waits for {', '.join(waiting)}; it cannot be late yet")
        if now <= current["deadline"]:
            raise InvalidTransaction(f"task {task_id!r} is not overdue: its deadline is {current['deadline']}, chain "
                                     f"time is {now}; drop it after the deadline")
        current["status"] = "dropped"
        current["history"].append({"status": "dropped", "node": current["node"], "attempt": current["attempt"],
                                   "at": now})
        writes = {layout.task_status_address(schedule_id, task_id): current}
        await self._start_dependents(context, RoundTasks(self, context, schedule_id, assignments), schedule_id, task_id,
                                     current, now, writes)
        await write_records(context, writes)
        await emit(context, events.TASK_DROPPED, schedule_id=schedule_id, task_id=task_id, node=current["node"],
                   attempt=current["attempt"], kind=task["kind"], workflow_id=assignments["workflow_id"])

    # -- secure aggregation (secagg_rules.py) -----------------------------------------------

    async def _secagg_keys(self, body: dict, signer: str, context) -> None:
        await secagg_rules.keys(body, signer, context, _schedule_id(body))

    async def _secagg_shares(self, body: dict, signer: str, context) -> None:
        await secagg_rules.shares(body, signer, context, _schedule_id(body))

    async def _secagg_unmask(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        assignments = await self._assignments(context, schedule_id)
        trains = {t: task["data_owner"] for t, task in assignments["tasks"].items() if task["kind"] == "local_train"}
        statuses = await self._statuses(context, schedule_id, trains)
        uploads = {owner: statuses[t]["status"] for t, owner in trains.items()}
        await secagg_rules.unmask(body, signer, context, schedule_id, uploads)

    # -- reveal_noise ----------------------------------------------------------------------

    async def _reveal_noise(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        seed = require_match(body, "noise_seed", HEX64, "the round's noise seed (64 lowercase hex, 32 bytes)")
        round_ = await read_record(context, layout.round_address(schedule_id))
        if round_ is None:
            raise InvalidTransaction(f"no round with schedule id {schedule_id!r} on chain")
        commitment = round_.get("noise_commitment")
        if commitment is None:
            raise InvalidTransaction(f"round {schedule_id!r} has no noise commitment: its workflow adds no "
                                     f"server-side noise, so there is no seed to reveal")
        if signer != round_.get("coordinator"):
            raise InvalidTransaction(f"only the round's coordinator {round_.get('coordinator')}, who committed to "
                                     f"the seed, may reveal it; not {signer}")
        if privacy.commitment(bytes.fromhex(seed)) != commitment:  # the audit checks with the same function
            raise InvalidTransaction(f"noise_seed does not hash to the round's noise_commitment {commitment}; "
                                     f"reveal the seed committed when the round opened")
        if await read_record(context, layout.noise_seed_address(schedule_id)) is not None:
            raise InvalidTransaction(f"the noise seed of round {schedule_id!r} is already revealed")
        assignments = await self._assignments(context, schedule_id)
        pending = await self._trains_pending(context, schedule_id, assignments)
        if pending:
            raise InvalidTransaction(
                f"the noise seed is revealed once every update is fixed; local_train task(s) "
                f"{', '.join(pending)[:300]} of round {schedule_id!r} are not done yet")
        await write_records(context, {layout.noise_seed_address(schedule_id): {
            "schedule_id": schedule_id, "noise_seed": seed, "revealed_at": await chain_time(context)}})
        await emit(context, events.NOISE_REVEALED, schedule_id=schedule_id, workflow_id=assignments["workflow_id"],
                   round=assignments["round"])
