"""Saying, once, that a client waits for something that went away, and how long to wait between tries.

An `Outage` follows one dependency (what: "the REST API", where: its URL). Call `down()` on
every failed attempt and `up()` on every success. Once an outage has lasted `after` seconds
(1 s by default: a blip is not worth a word) the next `down()` or `poll()` writes exactly one
line to stderr,

    waiting for the REST API at http://127.0.0.1:8008 (down 2 s)

and, if that line was written, `up()` writes one more when it recovers,

    the REST API at http://127.0.0.1:8008 is back after 21 s

Nothing here sleeps, spawns or touches an event loop, so sync and async code use it alike; all
state is per instance (share one instance among the clients of one dependency to get one line).

`Backoff` gives the delays between attempts: exponential, capped, with "equal jitter" (at least
half of each step, so retries neither bunch at zero nor march in lockstep).
"""

from __future__ import annotations

import logging
import random
import sys
import time
from typing import Callable

LOGGER = logging.getLogger(__name__)


def _stderr(line: str) -> None:
    # sys.stderr looked up at each write: it may be replaced after the Outage was made.
    print(line, file=sys.stderr, flush=True)


class Outage:
    def __init__(self, what: str, where: str, *, after: float = 1.0, recovery: bool = True,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        """what: a name people read ("the REST API"); where: its address; after: seconds an
        outage lasts before it is announced; recovery: also say when it is back; write: where
        lines go (default stderr); clock: seconds, monotonic."""
        self.what, self.where = what, where
        self.after = after
        self.recovery = recovery
        self._write = write or _stderr
        self._clock = clock
        self.since: float | None = None   # when the current outage began; None while up
        self.reason = ""                  # the last failure's description
        self.announced = False            # the waiting line of the current outage is written
        self.reached = False              # up() was called at least once: it answered before
        self.outages = 0                  # outages so far (the current one included)

    @property
    def is_down(self) -> bool:
        return self.since is not None

    def downtime(self) -> float:
        """Seconds the current outage has lasted; 0 while up."""
        return 0.0 if self.since is None else max(0.0, self._clock() - self.since)

    def waiting_line(self) -> str:
        return f"waiting for {self.what} at {self.where} (down {self.downtime():.0f} s)"

    def down(self, reason: str = "") -> bool:
        """A failed attempt. Starts an outage if none is on; True if this call wrote the line."""
        if self.since is None:
            self.since = self._clock()
            self.announced = False
            self.outages += 1
            LOGGER.debug("%s at %s is down: %s", self.what, self.where, reason or "no reason given")
        if reason:
            self.reason = reason
        return self.poll()

    def poll(self) -> bool:
        """Write the waiting line if an outage is on, has lasted `after` and was not announced
        yet; True if this call wrote it. Safe to call at any time, e.g. from a timer."""
        if self.since is None or self.announced or self.downtime() < self.after:
            return False
        self.announced = True
        self._write(self.waiting_line())
        return True

    def up(self) -> float:
        """A successful attempt. Ends the outage (if one is on) and returns how long it lasted."""
        lasted = self.downtime()
        if self.since is not None and self.announced and self.recovery:
            self._write(f"{self.what} at {self.where} is back after {lasted:.0f} s" if self.reached
                        else f"reached {self.what} at {self.where} after {lasted:.0f} s")
        self.since = None
        self.announced = False
        self.reached = True
        return lasted


def backoff_delay(attempt: int, *, first: float = 0.1, cap: float = 5.0, factor: float = 2.0,
                  rng: random.Random | None = None) -> float:
    """The delay before retry number attempt + 1 (attempt counts from 0): the step
    first * factor**attempt capped at `cap`, then a uniform pick from its upper half."""
    step = min(cap, first * factor ** min(attempt, 64))
    return step / 2 + (rng or random).uniform(0, step / 2)


class Backoff:
    """Successive delays: `next()` for each failed attempt, `reset()` after a success."""

    def __init__(self, first: float = 0.1, cap: float = 5.0, *, factor: float = 2.0,
                 rng: random.Random | None = None):
        self.first, self.cap, self.factor = first, cap, factor
        self._rng = rng
        self.attempt = 0

    def next(self) -> float:
        delay = backoff_delay(self.attempt, first=self.first, cap=self.cap, factor=self.factor, rng=self._rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


__all__ = ["Outage", "Backoff", "backoff_delay"]
