"""trustmesh-schedule's rules for rounds whose updates stay private: the DP noise seed revealed
once every update is fixed, and secure aggregation's keys, shares and unmask step."""

from __future__ import annotations

import hashlib
from typing import Mapping

from trustmesh.ledger.processor import InvalidTransaction

from .. import events, layout, secagg_rules
from ..common import HEX64, chain_time, emit, read_record, require_match, write_records
from .checks import _schedule_id


class PrivateRoundRules:
    """A ScheduleHandler's rules for rounds that keep updates private: the DP noise seed's reveal
    and secure aggregation's messages (scheduling/secagg_rules.py)."""

    async def _trains_pending(self, context, schedule_id: str, assignments: Mapping) -> list[str]:
        """The round's local_train tasks not done yet: until there are none, updates may change."""
        trains = [t for t, task in assignments["tasks"].items() if task["kind"] == "local_train"]
        statuses = await self._statuses(context, schedule_id, trains)
        return sorted(t for t in trains if statuses[t]["status"] != "done")

    # -- secure aggregation (secagg_rules.py) -----------------------------------------------

    async def _secagg_keys(self, body: dict, signer: str, context) -> None:
        await secagg_rules.keys(body, signer, context, _schedule_id(body))

    async def _secagg_shares(self, body: dict, signer: str, context) -> None:
        await secagg_rules.shares(body, signer, context, _schedule_id(body))

    async def _secagg_unmask(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        assignments = await self._assignments(context, schedule_id)
        done = not await self._trains_pending(context, schedule_id, assignments)
        await secagg_rules.unmask(body, signer, context, schedule_id, done)

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
        if hashlib.sha256(bytes.fromhex(seed)).hexdigest() != commitment:
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
