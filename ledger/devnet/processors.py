"""Registered transaction processors and the requests in flight to each.

Processors register per (family, version) with a max_occupancy; a request goes to the least
busy one with room. A processor that disconnects or stops answering pings is dropped and its
in-flight requests fail with ProcessorGone, so the executor retries them elsewhere.
"""

from __future__ import annotations

import asyncio
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
    last_seen: float = field(default_factory=time.monotonic)


class ProcessorRegistry:
    def __init__(self):
        self._by_type: dict[tuple[str, str], list[Processor]] = {}
        self._waiters: set[asyncio.Future] = set()  # acquire() calls waiting for room
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

    def _notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def acquire(self, family: str, version: str, correlation_id: str, grace: float) -> tuple[Processor, asyncio.Future]:
        """A processor with room, and the future its TP_PROCESS_RESPONSE will resolve."""
        key = (family, version)
        deadline = time.monotonic() + grace
        while True:
            candidates = [p for p in self._by_type.get(key, []) if len(p.in_flight) < p.max_occupancy]
            if candidates:
                proc = min(candidates, key=lambda p: len(p.in_flight))
                future = asyncio.get_running_loop().create_future()
                proc.in_flight[correlation_id] = future
                return proc, future
            if self._by_type.get(key):
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
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)

    def release(self, proc: Processor, correlation_id: str) -> None:
        if proc.in_flight.pop(correlation_id, None) is not None:
            self._notify()

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
