"""The families' rules on dict state, driven like the dev validator: batches in, statuses out.

apply() is a pure function of (payload, state, block time), so the rule tests need no validator
process: `DictLedger` applies each batch's transactions through the real handlers on a dict, with
the transaction's declared inputs and outputs enforced (helpers.family_scenario.DictContext), a
batch's writes kept only when every transaction in it is valid (as a validator does), and the
events kept per transaction like receipts. Block time is explicit: `advance(seconds)` stands for
waiting on a real chain. The same rules through the dev validator stay in each family's
end-to-end tests; this is for the many one-rule cases.

Its surface mirrors what the tests use of the REST client (`submit_batches`, `wait_for_batches`,
`get_state`, `get_receipts`), so helpers.ledger_helpers.submit_and_wait and a FederationReader work
over it, and a scenario reads the same on both.
"""

from __future__ import annotations

import asyncio
import copy

from trustmesh.ledger import protos as pb
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.rest_client import BatchInvalidError

from helpers.family_scenario import HANDLERS, DictContext, set_chain_time

START = 1_700_000_000


class DictLedger:
    def __init__(self, state: dict[str, bytes] | None = None, *, now: int = START, block: int = 1):
        self.state: dict[str, bytes] = {} if state is None else state
        self.now, self.block = now, block
        self.receipts: dict[str, list] = {}
        self.statuses: dict[str, dict] = {}
        set_chain_time(self.state, self.now, self.block)

    # -- block time
    def advance(self, seconds: int) -> None:
        """Chain time moves on (a later block), as `asyncio.sleep` would on a real validator."""
        self.now += seconds
        self.block += 1
        set_chain_time(self.state, self.now, self.block)

    # -- transactions
    async def apply_transaction(self, txn, state: dict[str, bytes]) -> list:
        header = pb.TransactionHeader.FromString(txn.header)
        request = pb.TpProcessRequest(header=header, payload=txn.payload, signature=txn.header_signature,
                                      context_id="dict")
        context = DictContext(state, header.inputs, header.outputs)
        await HANDLERS[header.family_name].apply(request, context)
        return context.events

    async def submit(self, batch) -> dict:
        """One batch: every transaction applied, or none (status INVALID with the first message).
        A batch already committed is not applied again (the validator drops duplicates)."""
        if self.statuses.get(batch.header_signature, {}).get("status") == "COMMITTED":
            return self.statuses[batch.header_signature]
        status = await self._apply_batch(batch)
        self.statuses[batch.header_signature] = status
        return status

    async def _apply_batch(self, batch) -> dict:
        state = copy.copy(self.state)
        events = {}
        for txn in batch.transactions:
            try:
                events[txn.header_signature] = await self.apply_transaction(txn, state)
            except InvalidTransaction as exc:
                return {"id": batch.header_signature, "status": "INVALID",
                        "invalid_transactions": [{"id": txn.header_signature, "message": str(exc)}]}
        self.state.clear()
        self.state.update(state)
        self.receipts.update(events)
        return {"id": batch.header_signature, "status": "COMMITTED"}

    def submit_now(self, *batches) -> list[dict]:
        """submit_and_wait outside a coroutine."""
        return asyncio.run(self.submit_and_wait(batches))

    # -- the REST client's surface, async like it
    async def submit_and_wait(self, batches, *_args, raise_invalid: bool = False, **_kwargs) -> list[dict]:
        return await self.wait_for_batches(await self.submit_batches(batches), 0, raise_invalid=raise_invalid)

    async def submit_batches(self, batches) -> list[str]:
        for b in batches:
            await self.submit(b)
        return [b.header_signature for b in batches]

    async def wait_for_batches(self, ids, timeout: float = 0, *, raise_invalid: bool = True) -> list[dict]:
        statuses = [self.statuses[i] for i in ids]
        if raise_invalid and any(s["status"] == "INVALID" for s in statuses):
            raise BatchInvalidError(statuses)
        return statuses

    async def get_state(self, address: str, *_args, **_kwargs) -> bytes | None:
        return self.state.get(address)

    async def list_state(self, prefix: str = "", *_args, **_kwargs):
        """(address, value) under prefix, in address order (FederationReader.round lists a round's members)."""
        for address in sorted(a for a in self.state if a.startswith(prefix)):
            yield address, self.state[address]

    async def get_receipts(self, ids) -> list[dict]:
        return [{"id": i, "events": [{"event_type": kind, "attributes": [{"key": k, "value": v} for k, v in attrs]}
                                     for kind, attrs in self.receipts[i]]} for i in ids]


