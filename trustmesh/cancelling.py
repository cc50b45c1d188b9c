"""Stopping a service's asyncio tasks for sure (IoT nodes, compute nodes)."""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable

LOGGER = logging.getLogger(__name__)

RECANCEL_SECONDS = 1.0


async def cancel_and_wait(tasks: Iterable[asyncio.Task]) -> None:
    """Cancel `tasks` and wait until every one has ended.

    A cancellation can be lost inside a library call that completes at the same moment (seen in
    the tests, about one stop in three right after a round finished: IoTNode._reconcile went back
    to waiting for its next block instead of ending, and stop() never returned; Python 3.11's
    asyncio.wait_for does this). A task still running after a moment is cancelled again, so a stop
    always ends.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=RECANCEL_SECONDS)
        for task in pending:
            LOGGER.debug("%s kept running after it was cancelled; cancelling it again", task.get_name())
