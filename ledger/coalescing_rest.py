"""A REST client whose batch submissions share HTTP requests.

Nodes that submit many batches (an IoT host's hundreds of nodes, a compute node's stream of task
reports) would otherwise make one POST /batches and one status long-poll per batch. Here the
single-batch submissions made within a few milliseconds of each other go out in one POST, in the
order they were handed in, and are waited on with one status request. Each batch stays its own,
signed by its own key and committed or refused on its own: only the round trips are shared.
"""

from __future__ import annotations

import asyncio
from typing import Sequence

from trustmesh.cancelling import cancel_and_wait

from .rest_client import RestClient

COALESCE_WINDOW = 0.005  # seconds a submission waits for others to share its POST (a block's reactions come together)
MAX_BATCHES_PER_POST = 100  # keeps a POST /batches well inside a REST API's request size limit


class CoalescingRest(RestClient):
    """A RestClient whose single-batch submit_until_final calls share requests (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._waiting: list[tuple[object, float, asyncio.Future]] = []
        self._flusher: asyncio.Task | None = None
        self._sending: set[asyncio.Task] = set()
        # POSTs leave one after another, in the order their batches came: a batch may name an
        # earlier one as a transaction dependency, which the validator must have seen first.
        self._posting = asyncio.Lock()
        self.posts = 0  # POST /batches made for coalesced submissions (benchmarks and tests read it)

    async def submit_until_final(self, batches: Sequence, timeout: float, **options) -> list[dict]:
        """As RestClient's; a single batch without options shares its POST and its status wait."""
        if len(batches) != 1 or options:
            return await super().submit_until_final(batches, timeout, **options)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((batches[0], timeout, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        # shield: a node that stops waiting must not fail the others' shared request
        return [await asyncio.shield(future)]

    async def _flush(self) -> None:
        await asyncio.sleep(COALESCE_WINDOW)
        while self._waiting:
            group, self._waiting = self._waiting[:MAX_BATCHES_PER_POST], self._waiting[MAX_BATCHES_PER_POST:]
            task = asyncio.get_running_loop().create_task(self._send(group))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, group) -> None:
        self.posts += 1
        batches = [batch for batch, _, _ in group]
        try:
            async with self._posting:
                await self.submit_batches(batches)
            statuses = await super().submit_until_final(batches, max(timeout for _, timeout, _ in group), sent=True)
        except BaseException as exc:  # each node then handles it as it would its own request's failure
            for _, _, future in group:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, future), status in zip(group, statuses):
            if not future.done():
                future.set_result(status)

    async def close(self) -> None:
        await cancel_and_wait([t for t in (self._flusher, *self._sending) if t is not None])
        await super().close()
