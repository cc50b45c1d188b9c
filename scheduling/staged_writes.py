"""A transaction context whose writes wait until a rule applied several times is all through."""

from __future__ import annotations

from typing import Iterable, Mapping

from .common import prefetch


class StagedWrites:
    """What one transaction that applies a rule several times (a report_many's reports) runs each
    application on: an application reads what the earlier ones wrote, and the writes reach the
    transaction's context once, in one request, by commit(). One that fails fails the whole
    transaction, whose writes were never sent. Events pass straight through (a transaction that
    fails keeps none). No rule applied this way deletes state."""

    def __init__(self, context):
        self._context = context
        self._writes: dict[str, bytes] = {}

    async def get_state(self, addresses: Iterable[str], timeout: float | None = None) -> dict[str, bytes]:
        addresses = list(addresses)
        found = {a: self._writes[a] for a in addresses if a in self._writes}
        unwritten = [a for a in addresses if a not in self._writes]
        if unwritten:
            found.update(await self._context.get_state(unwritten, timeout))
        return found

    async def prefetch(self, addresses: Iterable[str], timeout: float | None = None) -> None:
        await prefetch(self._context, [a for a in addresses if a not in self._writes])

    async def set_state(self, entries: Mapping[str, bytes], timeout: float | None = None) -> list[str]:
        self._writes.update(entries)
        return list(entries)

    async def add_event(self, *args, **kwargs) -> None:
        await self._context.add_event(*args, **kwargs)

    async def commit(self) -> None:
        if self._writes:
            await self._context.set_state(self._writes)
