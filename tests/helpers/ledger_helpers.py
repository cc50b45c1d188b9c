"""Small helpers shared by the ledger integration tests."""

from __future__ import annotations

import asyncio
import contextlib

from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.intkey import IntkeyHandler, make_intkey_transaction
from trustmesh.ledger.processor import TransactionProcessor
from trustmesh.ledger.rest_client import RestClient


@contextlib.asynccontextmanager
async def running_processor(url: str, *handlers, **kwargs):
    processor = TransactionProcessor(url, **kwargs)
    for handler in handlers or (IntkeyHandler(),):
        processor.add_handler(handler)
    await processor.start()
    try:
        yield processor
    finally:
        await processor.stop()


@contextlib.asynccontextmanager
async def rest(url: str, **kwargs):
    async with RestClient(url, **kwargs) as client:
        yield client


def intkey_batch(signer, *ops, **kwargs):
    """One batch of intkey transactions; ops are (verb, name, value) tuples."""
    return make_batch(signer, [make_intkey_transaction(signer, *op, **kwargs) for op in ops])


async def submit_and_wait(client: RestClient, batches, timeout: float = 30, raise_invalid: bool = False):
    ids = await client.submit_batches(batches)
    return await client.wait_for_batches(ids, timeout, raise_invalid=raise_invalid)


def run(coro, timeout: float = 120):
    """Run a scenario coroutine with an overall bound, so a hang fails instead of stalling CI."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
