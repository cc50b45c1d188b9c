"""Executing a block's batches through the registered transaction processors.

Batches run in parallel where they cannot see each other's writes: batch B waits only for
earlier batches whose outputs overlap B's inputs. A batch's transactions run one after the other
in a private write buffer; a batch's writes become visible to later batches only when all its
transactions succeed, which keeps batches atomic. Reads see (own buffer) → (earlier valid
batches of this block, newest first) → (the parent block's state root), so the result equals
running the batches serially in block order — what every Sawtooth validator must agree on.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .. import protos as pb
from ..addressing import is_address
from .batch_checks import CheckedBatch
from .processors import NoProcessor, ProcessorGone, ProcessorRegistry

LOGGER = logging.getLogger(__name__)

_DELETED = None  # a buffered delete
_SET, _DELETE = pb.StateChange.SET, pb.StateChange.DELETE


class AuthorizationError(Exception):
    pass


class ExecutionContext:
    """State view of one transaction, limited to its declared inputs and outputs."""

    def __init__(self, context_id: str, header: "pb.TransactionHeader", read: Callable[[str], bytes | None]):
        self.context_id = context_id
        self._inputs = tuple(header.inputs)
        self._outputs = tuple(header.outputs)
        self._read = read
        self.changes: dict[str, bytes | None] = {}
        self.events: list[pb.Event] = []
        self.data: list[bytes] = []

    def _check(self, addresses, allowed, what):
        for address in addresses:
            if len(address) == 70 and address in allowed:  # named in full in the header: checked already
                continue
            if not is_address(address) or not address.startswith(allowed):
                raise AuthorizationError(f"{what} of {address!r} is outside the transaction's declared {what}s")

    def get(self, addresses: Sequence[str]) -> list[tuple[str, bytes]]:
        self._check(addresses, self._inputs, "input")
        found = []
        for address in addresses:
            value = self.changes[address] if address in self.changes else self._read(address)
            if value is not None:
                found.append((address, value))
        return found

    def set(self, entries: Sequence[tuple[str, bytes]]) -> None:
        self._check([a for a, _ in entries], self._outputs, "output")
        for address, value in entries:
            self.changes[address] = value

    def delete(self, addresses: Sequence[str]) -> None:
        self._check(addresses, self._outputs, "output")
        for address in addresses:
            self.changes[address] = _DELETED

    def receipt(self, transaction_id: str) -> "pb.TransactionReceipt":
        """Sets first, then deletes. Filled in place: building StateChange objects to copy in
        costs about twice as much."""
        receipt = pb.TransactionReceipt(transaction_id=transaction_id, events=self.events, data=self.data)
        add = receipt.state_changes.add
        for address, value in self.changes.items():
            if value is not None:
                add(address=address, value=value, type=_SET)
        for address, value in self.changes.items():
            if value is None:
                add(address=address, type=_DELETE)
        return receipt


@dataclass
class BatchOutcome:
    checked: CheckedBatch
    valid: bool = False
    writes: dict[str, bytes | None] = field(default_factory=dict)
    receipts: list = field(default_factory=list)
    invalid_txn_id: str = ""
    message: str = ""
    extended_data: bytes = b""


@dataclass
class ExecutorSettings:
    missing_processor_grace: float = 10.0  # how long a family may stay unregistered before INVALID
    internal_error_retries: int = 8        # INTERNAL_ERROR is retried this often, with backoff
    internal_error_backoff: float = 0.05
    request_timeout: float = 60.0          # a processor that never answers is treated as gone


def _earlier_writers(io: Sequence[tuple[list[str], list[str]]]) -> list[list[int]]:
    """For each batch, the earlier batches whose outputs overlap its inputs (one is a prefix of
    the other). Testing every pair of batches cost ~5% of the validator at 100 batches per
    block; full 70-char addresses (the usual case) are matched in a dict instead
    (tests/test_execution_order.py checks the answer against the pairwise rule)."""
    exact: dict[str, list[int]] = {}       # full output address -> batches writing it
    prefixes: list[tuple[str, int]] = []   # shorter output prefixes
    result = []
    for index, (inputs, outputs) in enumerate(io):
        found: set[int] = set()
        for x in inputs:
            if len(x) == 70:
                found.update(exact.get(x, ()))
                found.update(j for y, j in prefixes if x.startswith(y))
            else:
                found.update(j for y, js in exact.items() if y.startswith(x) for j in js)
                found.update(j for y, j in prefixes if x.startswith(y) or y.startswith(x))
        result.append(sorted(found))
        for y in outputs:
            if len(y) == 70:
                exact.setdefault(y, []).append(index)
            else:
                prefixes.append((y, index))
    return result


class BlockExecutor:
    def __init__(self, registry: ProcessorRegistry, send_request, settings: ExecutorSettings = ExecutorSettings()):
        self._registry = registry
        self._send = send_request  # async (identity, correlation_id, TpProcessRequest) -> None
        self._settings = settings
        self.contexts: dict[str, ExecutionContext] = {}
        # Context and correlation ids: unique for this validator run (a random prefix, then a
        # counter) and much cheaper than a uuid4 each.
        prefix, counter = uuid.uuid4().hex[:16], itertools.count()
        self._new_id = lambda: f"{prefix}{next(counter):016x}"

    async def execute(self, batches: Sequence[CheckedBatch], read_base: Callable[[str], bytes | None]) -> list[BatchOutcome]:
        outcomes = [BatchOutcome(b) for b in batches]
        done = [asyncio.get_running_loop().create_future() for _ in batches]
        io = [self._io_sets(b) for b in batches]

        writers = _earlier_writers(io)

        def read_through(index: int) -> Callable[[str], bytes | None]:
            # A batch may only read its inputs, so only the earlier batches whose outputs overlap
            # them (the ones it waits for) can hold a write it sees: look there, newest first.
            sources = [outcomes[j] for j in reversed(writers[index])]

            def read(address: str) -> bytes | None:
                for o in sources:
                    if o.valid and address in o.writes:
                        return o.writes[address]
                return read_base(address)
            return read

        async def run(index: int) -> None:
            waits = [done[j] for j in writers[index]]
            try:
                if waits:
                    await asyncio.gather(*waits)
                await self._run_batch(outcomes[index], read_through(index))
            except Exception as exc:  # a bug here must fail one batch, not the validator
                LOGGER.exception("executing batch %s failed", batches[index].id[:16])
                outcomes[index].valid = False
                outcomes[index].message = f"validator error while executing the batch: {exc}"
            finally:
                done[index].set_result(None)

        watchdog = asyncio.get_running_loop().create_task(self._expire_overdue())
        try:
            await asyncio.gather(*(run(i) for i in range(len(batches))))
        finally:
            watchdog.cancel()
        return outcomes

    async def _expire_overdue(self) -> None:
        """Fail requests a processor sits on for longer than request_timeout: one periodic sweep
        instead of a wait_for timer per request."""
        timeout = self._settings.request_timeout
        while True:
            await asyncio.sleep(min(1.0, timeout / 4))
            self._registry.expire(timeout)

    @staticmethod
    def _io_sets(batch: CheckedBatch) -> tuple[list[str], list[str]]:
        inputs = [p for h in batch.txn_headers for p in h.inputs]
        outputs = [p for h in batch.txn_headers for p in h.outputs]
        return inputs, outputs

    async def _run_batch(self, outcome: BatchOutcome, read_before: Callable[[str], bytes | None]) -> None:
        writes: dict[str, bytes | None] = {}

        def read(address: str) -> bytes | None:
            return writes[address] if address in writes else read_before(address)

        receipts = []
        for txn, header in zip(outcome.checked.batch.transactions, outcome.checked.txn_headers):
            ok, receipt_or_reason, changes = await self._run_transaction(txn, header, read)
            if not ok:
                message, extended = receipt_or_reason
                outcome.invalid_txn_id, outcome.message, outcome.extended_data = txn.header_signature, message, extended
                return
            writes.update(changes)  # the receipt's state changes, without reading them back out of it
            receipts.append(receipt_or_reason)
        outcome.valid, outcome.writes, outcome.receipts = True, writes, receipts

    async def _run_transaction(self, txn, header, read):
        """(True, receipt, changes) or (False, (message, extended_data), None)."""
        settings = self._settings
        for attempt in range(settings.internal_error_retries + 1):
            context = ExecutionContext(self._new_id(), header, read)
            self.contexts[context.context_id] = context
            try:
                status, message, extended = await self._process(txn, header, context)
            finally:
                del self.contexts[context.context_id]
            if status == pb.TpProcessResponse.OK:
                return True, context.receipt(txn.header_signature), context.changes
            if status == pb.TpProcessResponse.INVALID_TRANSACTION:
                return False, (message or "transaction processor rejected the transaction", extended), None
            if status is None:  # no processor: already a clear message
                return False, (message, b""), None
            delay = settings.internal_error_backoff * (2 ** attempt)
            LOGGER.warning(
                "processor %s %s reported an internal error for %s (attempt %d): %s; retrying in %.2f s",
                header.family_name, header.family_version, txn.header_signature[:16], attempt + 1, message, delay,
            )
            await asyncio.sleep(delay)
        return False, (
            f"transaction processor for {header.family_name} {header.family_version} kept failing "
            f"with an internal error after {settings.internal_error_retries + 1} attempts: {message}",
            b"",
        ), None

    async def _process(self, txn, header, context) -> tuple[int | None, str, bytes]:
        """Send one TpProcessRequest; (status, message, extended_data). Gone processors are retried."""
        registry = self._registry
        while True:
            correlation_id = self._new_id()
            acquired = registry.try_acquire(header.family_name, header.family_version, correlation_id)
            if acquired is None:
                try:
                    acquired = await registry.acquire(
                        header.family_name, header.family_version, correlation_id,
                        self._settings.missing_processor_grace,
                    )
                except NoProcessor as exc:
                    return None, str(exc), b""
            proc, future = acquired
            request = pb.TpProcessRequest(signature=txn.header_signature, payload=txn.payload, context_id=context.context_id)
            if proc.header_style == pb.TpRegisterRequest.RAW:
                request.header_bytes = txn.header
            else:
                request.header.CopyFrom(header)
            try:
                await self._send(proc.identity, correlation_id, request)
                reply = await future  # _expire_overdue fails it after request_timeout
            except (ProcessorGone, asyncio.TimeoutError, ConnectionError) as exc:
                LOGGER.warning("processor for %s %s went away mid-request (%s); sending again",
                               header.family_name, header.family_version, exc or "timeout")
                context.changes.clear(), context.events.clear(), context.data.clear()
                continue
            finally:
                registry.release(proc, correlation_id)
            try:
                response = pb.TpProcessResponse.FromString(reply.content)
            except Exception:
                return pb.TpProcessResponse.INTERNAL_ERROR, "processor sent a malformed TpProcessResponse", b""
            return response.status, response.message, response.extended_data
