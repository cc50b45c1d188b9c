"""Reading the federation's on-chain records through the REST API (client side).

Nodes and auditors use this; processors read state through their Context instead.
"""

from __future__ import annotations

import asyncio

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.rest_client import RestClient

from . import federation_records, layout
from .common import MAX_RECORD_BYTES
from .schedule import StartingModel, starting_model


def _decoded(data: bytes):
    """A state record (written by a processor through cbor.encode): decoded without re-encoding
    it to check it is canonical, a check for what signers send. A round's task assignments are
    ~400 KB at 1,000 participants, read by every IoT host and compute node at each block."""
    return cbor.decode_record(data, max_bytes=MAX_RECORD_BYTES)


class FederationReader:
    def __init__(self, rest: RestClient, head: str | None = None):
        """head: read every record at this block (an auditor's consistent view); None: the chain head."""
        self.rest = rest
        self.head = head

    async def _record(self, address: str):
        data = await self.rest.get_state(address, head=self.head)
        return None if data is None else _decoded(data)

    async def workflow(self, workflow_id: str, *, expanded: bool = True) -> dict | None:
        """A workflow's record. Expanded (the default): a definition that names a participant group
        (federation.participant_group) comes with federation.participant_nodes filled in with the
        group's members, in order, as deploy copied them into the record ("participants"), so
        whoever reads participant_nodes through this reader (IoT and compute nodes, the audit, `run`)
        reads every workflow alike; participant_group stays in it, saying where they came from.
        This view is not a definition to deploy (it holds both); expanded=False gives the record
        exactly as stored."""
        record = await self._record(layout.workflow_address(workflow_id))
        return expand(record) if expanded else record

    async def workflows(self, *, expanded: bool = True) -> list[dict]:
        """Every deployed workflow's record (expanded as `workflow` says, unless expanded=False)."""
        prefix = layout.WORKFLOW_NS + layout.WORKFLOW_RECORD
        records = [_decoded(data) async for _, data in self.rest.list_state(prefix, head=self.head)]
        return [expand(r) for r in records] if expanded else records

    async def participant_group(self, owner: str, group_id: str) -> dict | None:
        """A participant group (workflow_groups.py): {group_id, owner, parts, received, members}."""
        return await self._record(layout.participant_group_address(owner, group_id))

    async def rounds(self, workflow_id: str) -> dict:
        """{"rounds": {"1": schedule_id, ...}, "latest": n}; empty before the first round."""
        return await self._record(layout.workflow_rounds_address(workflow_id)) or {"rounds": {}, "latest": 0}

    async def round(self, schedule_id: str) -> dict | None:
        """The round with its lists (federation_records.assemble): its core, its roster and its
        member records, these listed under the round's prefix (one paged state query). Read at
        the core's block or later, members are cut to the core's count: the round as of one block."""
        core = await self.round_core(schedule_id)
        if core is None:
            return None
        roster = await self._record(layout.round_roster_address(schedule_id))
        return federation_records.assemble(core, roster, await self._members(schedule_id, roster))

    async def round_core(self, schedule_id: str) -> dict | None:
        """The round's core alone: status, counts, clock (federation.py), without its lists."""
        return await self._record(layout.round_address(schedule_id))

    async def _members(self, schedule_id: str, roster: dict | None) -> dict[str, dict]:
        # pages of the REST API's largest size (1,000): a round of a thousand in one request
        found = {address: _decoded(data) async for address, data
                 in self.rest.list_state(layout.round_members_prefix(schedule_id), head=self.head, page_size=1000)}
        return federation_records.members_of(schedule_id, roster, found)

    async def assignments(self, schedule_id: str) -> dict | None:
        return await self._record(layout.assignments_address(schedule_id))

    async def task_status(self, schedule_id: str, task_id: str) -> dict | None:
        return await self._record(layout.task_status_address(schedule_id, task_id))

    async def task_statuses(self, schedule_id: str, task_ids) -> dict[str, dict | None]:
        """task_id -> its status record (None if absent), read side by side: a round of a thousand
        participants has a thousand tasks, and one read after another takes seconds."""
        ids = list(task_ids)
        found = await asyncio.gather(*(self.task_status(schedule_id, t) for t in ids))
        return dict(zip(ids, found))

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


def expand(record: dict | None) -> dict | None:
    """A workflow record whose definition names a participant group, with the group's members (the
    record's "participants") as federation.participant_nodes; any other record as it is."""
    if not isinstance(record, dict) or not isinstance(record.get("participants"), list):
        return record
    definition = record.get("definition")
    fed = definition.get("federation") if isinstance(definition, dict) else None
    if not isinstance(fed, dict) or "participant_group" not in fed:
        return record
    return {**record, "definition": {**definition, "federation": {**fed, "participant_nodes": list(record["participants"])}}}
