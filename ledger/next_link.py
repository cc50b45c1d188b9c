"""The validator link to do per-link setup on: a processor registers on each new link, an event
subscriber subscribes on each; both wait here for the link to be up, or for their own stop."""

from __future__ import annotations

import asyncio
from typing import Callable

from .messaging import ValidatorConnection


async def next_link(conn: ValidatorConnection, stop: asyncio.Event, closed: Callable[[], bool]) -> int | None:
    """The generation of conn's link once it is connected, or None once closed().

    The wait ends on `stop` too: a stop while the validator is down must not hang the caller.
    """
    if closed():
        return None
    if not conn.connected.is_set():
        waiters = [asyncio.ensure_future(conn.connected.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
    return None if closed() else conn.generation
