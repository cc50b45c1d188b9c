"""Registered transaction processors and the requests in flight to each.

Processors register per (family, version) with a max_occupancy; a request goes to the least
busy one with room. A processor that disconnects or stops answering pings is dropped and its
in-flight requests fail with ProcessorGone, so the executor retries them elsewhere.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field

from .. import protos as pb

LOGGER = logging.getLogger(__name__)

PROTOCOL_VERSION = 1  # highest TpRegisterRequest feature level Sawtooth 1.2 validators accept
DEFAULT_MAX_OCCUPANCY = 10  # what a registration that leaves max_occupancy at 0 gets


class ProcessorGone(ConnectionError):
    pass


class NoProcessor(LookupError):
    """Nobody registered the family/version within the grace period."""


@dataclass
class Processor:
    identity: bytes
    family: str
    version: str
    namespaces: tuple[str, ...]
    max_occupancy: int
    header_style: int
    in_flight: dict[str, asyncio.Future] = field(default_factory=dict)
    sent_at: dict[str, float] = field(default_factory=dict)  # correlation_id -> time.monotonic()
    last_seen: float = field(default_factory=time.monotonic)


class ProcessorRegistry:
    def __init__(self):
        self._by_type: dict[tuple[str, str], list[Processor]] = {}
        # acquire() calls waiting for room, first come first served per (family, version)
        self._waiters: dict[tuple[str, str], collections.deque[asyncio.Future]] = {}
        self._waiting_since: dict[tuple[str, str], float] = {}

    def register(self, identity: bytes, request: "pb.TpRegisterRequest") -> Processor:
        key = (request.family, request.version)
        processors = self._by_type.setdefault(key, [])
        # A processor that reconnects with the same identity replaces its old entry.
        for old in [p for p in processors if p.identity == identity]:
            processors.remove(old)
            self._fail(old, "re-registered")
        proc = Processor(
            identity=identity,
            family=request.family,
            version=request.version,
            namespaces=tuple(request.namespaces),
            max_occupancy=request.max_occupancy or DEFAULT_MAX_OCCUPANCY,
            header_style=request.request_header_style,
        )
        processors.append(proc)
        LOGGER.info(
            "processor registered: %s %s namespaces=%s max_occupancy=%d",
            proc.family, proc.version, list(proc.namespaces), proc.max_occupancy,
        )
        self._waiting_since.pop(key, None)
        self._notify()
        return proc

    def unregister(self, identity: bytes, reason: str = "unregistered") -> int:
        """Drop every registration of this connection; returns how many there were."""
        dropped = 0
        for key, processors in self._by_type.items():
            for proc in [p for p in processors if p.identity == identity]:
                processors.remove(proc)
                self._fail(proc, reason)
                dropped += 1
                LOGGER.info("processor %s %s %s", proc.family, proc.version, reason)
        if dropped:
            self._notify()
        return dropped

    def identities(self) -> set[bytes]:
        return {p.identity for ps in self._by_type.values() for p in ps}

    def families(self) -> list[tuple[str, str]]:
        return sorted(k for k, ps in self._by_type.items() if ps)

    def seen(self, identity: bytes) -> None:
        now = time.monotonic()
        for ps in self._by_type.values():
            for p in ps:
                if p.identity == identity:
                    p.last_seen = now

    def is_registered(self, family: str, version: str) -> bool:
        return bool(self._by_type.get((family, version)))

    def _fail(self, proc: Processor, reason: str) -> None:
        for future in proc.in_flight.values():
            if not future.done():
                future.set_exception(ProcessorGone(f"processor {proc.family} {proc.version} {reason}"))
        proc.in_flight.clear()
        proc.sent_at.clear()

    def _notify(self) -> None:
        """Registrations changed: every waiter looks again."""
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_result(None)
        self._waiters.clear()

    def _wake_one(self, key: tuple[str, str]) -> None:
        """One request's worth of room came free: wake the longest waiter only. Waking them all
        would have every waiter of a 100-batch block look (and go back to sleep) per answer."""
        queue = self._waiters.get(key)
        while queue:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def try_acquire(self, family: str, version: str, correlation_id: str) -> "tuple[Processor, asyncio.Future] | None":
        """acquire() without waiting: None when no processor has room right now, or when earlier
        callers already wait for room (they go first)."""
        key = (family, version)
        if self._waiters.get(key):
            return None
        return self._take(key, correlation_id)

    def _take(self, key: tuple[str, str], correlation_id: str) -> "tuple[Processor, asyncio.Future] | None":
        best = None
        for p in self._by_type.get(key, ()):
            if len(p.in_flight) < p.max_occupancy and (best is None or len(p.in_flight) < len(best.in_flight)):
                best = p
        if best is None:
            return None
        future = asyncio.get_running_loop().create_future()
        best.in_flight[correlation_id] = future
        best.sent_at[correlation_id] = time.monotonic()
        return best, future

    async def acquire(self, family: str, version: str, correlation_id: str, grace: float) -> tuple[Processor, asyncio.Future]:
        """A processor with room, and the future its TP_PROCESS_RESPONSE will resolve."""
        key = (family, version)
        deadline = time.monotonic() + grace
        woken = False
        while True:
            if woken or not self._waiters.get(key):  # earlier waiters go first
                acquired = self._take(key, correlation_id)
                if acquired is not None:
                    return acquired
            registered = bool(self._by_type.get(key))
            if registered:
                deadline = time.monotonic() + grace  # registered but busy: wait for room, not for grace
            elif key not in self._waiting_since:
                self._waiting_since[key] = time.monotonic()
                LOGGER.warning(
                    "no transaction processor registered for family %r version %r; "
                    "waiting up to %.0f s for one", family, version, grace,
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoProcessor(
                    f"no transaction processor is registered for family {family!r} "
                    f"version {version!r} (waited {grace:.0f} s); start one and resubmit"
                )
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, collections.deque()).append(waiter)
            try:
                if registered:
                    await waiter  # release() or a (un)registration wakes us: no timer needed
                else:
                    await asyncio.wait_for(waiter, remaining)
                woken = True
            except asyncio.TimeoutError:
                self._drop_waiter(key, waiter)
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one(key)  # cancelled after being woken: pass the room on
                else:
                    self._drop_waiter(key, waiter)
                raise

    def _drop_waiter(self, key: tuple[str, str], waiter: asyncio.Future) -> None:
        # A dead waiter left queued would make newcomers queue behind it.
        queue = self._waiters.get(key)
        if queue is not None and waiter in queue:
            queue.remove(waiter)

    def release(self, proc: Processor, correlation_id: str) -> None:
        proc.sent_at.pop(correlation_id, None)
        if proc.in_flight.pop(correlation_id, None) is not None:
            self._wake_one((proc.family, proc.version))

    def expire(self, older_than: float) -> int:
        """Fail requests sent more than `older_than` s ago with TimeoutError; returns how many.
        One sweep for all requests instead of a timer each."""
        cutoff = time.monotonic() - older_than
        expired = 0
        for ps in self._by_type.values():
            for p in ps:
                for correlation_id, sent in p.sent_at.items():
                    if sent > cutoff:
                        break  # sent_at is in acquire order
                    future = p.in_flight.get(correlation_id)
                    if future is not None and not future.done():
                        future.set_exception(asyncio.TimeoutError(f"no answer within {older_than:g} s"))
                        expired += 1
        return expired

    def resolve(self, identity: bytes, correlation_id: str, response: "pb.Message") -> bool:
        for ps in self._by_type.values():
            for p in ps:
                if p.identity == identity:
                    p.last_seen = time.monotonic()
                    future = p.in_flight.get(correlation_id)
                    if future is not None and not future.done():
                        future.set_result(response)
                        return True
        return False

    def stale(self, older_than: float) -> set[bytes]:
        cutoff = time.monotonic() - older_than
        return {p.identity for ps in self._by_type.values() for p in ps if p.last_seen < cutoff}
