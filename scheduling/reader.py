"""Reading the federation's on-chain records through the REST API (client side).

Nodes and auditors use this; processors read state through their Context instead.
"""

from __future__ import annotations

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.rest_client import RestClient

from . import layout
from .schedule import StartingModel, starting_model

_MAX_RECORD = 10 * 1024 * 1024


class FederationReader:
    def __init__(self, rest: RestClient, head: str | None = None):
        """head: read every record at this block (an auditor's consistent view); None: the chain head."""
        self.rest = rest
        self.head = head

    async def _record(self, address: str):
        data = await self.rest.get_state(address, head=self.head)
        return None if data is None else cbor.decode(data, max_bytes=_MAX_RECORD)

    async def workflow(self, workflow_id: str) -> dict | None:
        return await self._record(layout.workflow_address(workflow_id))

    async def workflows(self) -> list[dict]:
        """Every deployed workflow's record."""
        prefix = layout.WORKFLOW_NS + layout.WORKFLOW_RECORD
        return [cbor.decode(data, max_bytes=_MAX_RECORD) async for _, data in self.rest.list_state(prefix, head=self.head)]

    async def rounds(self, workflow_id: str) -> dict:
        """{"rounds": {"1": schedule_id, ...}, "latest": n}; empty before the first round."""
        return await self._record(layout.workflow_rounds_address(workflow_id)) or {"rounds": {}, "latest": 0}

    async def round(self, schedule_id: str) -> dict | None:
        return await self._record(layout.round_address(schedule_id))

    async def assignments(self, schedule_id: str) -> dict | None:
        return await self._record(layout.assignments_address(schedule_id))

    async def task_status(self, schedule_id: str, task_id: str) -> dict | None:
        return await self._record(layout.task_status_address(schedule_id, task_id))

    async def round_result(self, schedule_id: str) -> dict | None:
        return await self._record(layout.round_result_address(schedule_id))

    async def noise_seed(self, schedule_id: str) -> dict | None:
        """The DP noise seed the round's coordinator revealed: {schedule_id, noise_seed, revealed_at}."""
        return await self._record(layout.noise_seed_address(schedule_id))

    async def secagg(self, schedule_id: str, node: str) -> dict | None:
        """A participant's secure-aggregation record of a round (scheduling/secagg_rules.py)."""
        return await self._record(layout.secagg_address(schedule_id, node))

    async def escrow(self, workflow_id: str) -> dict | None:
        """A workflow's rewards escrow (scheduling/rewards.py): its owner, terms, paid, remaining."""
        return await self._record(layout.escrow_address(workflow_id))

    async def settlement(self, schedule_id: str) -> dict | None:
        """What a round paid to whom, once settled."""
        return await self._record(layout.settlement_address(schedule_id))

    async def node_load(self, node: str) -> dict | None:
        """A node's load and reputation record: queue, done, missed[, last_missed][, rejected]."""
        return await self._record(layout.node_load_address(node))

    async def peer_index(self) -> list[str]:
        return await self._record(layout.PEER_INDEX_ADDRESS) or []

    async def peer(self, node: str) -> dict | None:
        return await self._record(layout.peer_address(node))

    async def peers(self) -> dict[str, dict]:
        """Every registered compute node's record, by node key."""
        found = {}
        for node in await self.peer_index():
            record = await self.peer(node)
            if record is not None:
                found[node] = record
        return found

    async def starting_model(self, workflow_id: str, round_number: int) -> StartingModel:
        """The global model round `round_number` starts from, by the lineage rule the schedule
        processor checks (schedule.starting_model): the model of the latest earlier round that
        has one. A round's model is fixed once its aggregate result is on chain (its evaluation,
        which makes the result final, does not change it), so the next round may train while the
        previous one is still being evaluated. Rounds that timed out produced none and are
        skipped; digest None when no earlier round produced one (training starts from the seeded
        model). LookupError (schedule.LineageUnknown) while an earlier round has none yet."""
        return await starting_model(self._record, workflow_id, round_number)

    async def previous_global_model(self, workflow_id: str, round_number: int) -> str | None:
        """The digest of `starting_model`: None for the seeded initial model."""
        return (await self.starting_model(workflow_id, round_number)).digest
