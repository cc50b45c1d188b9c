"""The dev validator's chain: pending batches, block publishing, batch statuses.

Devmode-like: one node, and a block is published as soon as batches are pending. Batches that
arrive while a block is being built go into the next one, so blocks grow with load.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from .. import protos as pb
from ..signing import PrivateKey
from .batch_checks import BatchRejected, CheckedBatch, Limits, check_batch
from .execution import BatchOutcome, BlockExecutor
from .merkle import EMPTY_ROOT, MerkleRadix, encode_node
from .store import ChainStore

LOGGER = logging.getLogger(__name__)

NULL_BLOCK_ID = "0000000000000000"
CONSENSUS = b"Devmode"


class QueueFull(Exception):
    pass


@dataclass
class ChainSettings:
    max_batches_per_block: int = 100
    max_pending_batches: int = 4096     # beyond this, submissions get QUEUE_FULL (HTTP 429)
    invalid_status_cache: int = 100_000  # how many INVALID verdicts are remembered for status queries
    limits: Limits = Limits()


@dataclass(frozen=True)
class InvalidVerdict:
    transaction_id: str
    message: str
    extended_data: bytes = b""


class Chain:
    def __init__(
        self,
        store: ChainStore,
        merkle: MerkleRadix,
        executor: BlockExecutor,
        signer: PrivateKey,
        settings: ChainSettings = ChainSettings(),
        *,
        injector: Callable[["pb.Block", int], "pb.Batch"] | None = None,
        injected_timestamp: Callable[[str], Awaitable[int | None]] | None = None,
        on_commit: Callable[["pb.Block", list], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.merkle = merkle
        self._executor = executor
        self._signer = signer
        self._public_key = signer.public_key().as_hex()
        self.settings = settings
        self._injector = injector
        self._injected_timestamp = injected_timestamp  # the last agreed block time in a state root
        self._on_commit = on_commit
        self._clock = clock
        self._pending: "collections.OrderedDict[str, CheckedBatch]" = collections.OrderedDict()
        self._pending_txns: dict[str, str] = {}  # txn id -> batch id
        self._invalid: "collections.OrderedDict[str, InvalidVerdict]" = collections.OrderedDict()
        self._waiters: set[asyncio.Future] = set()
        self._wakeup = asyncio.Event()
        self.commit_lock = asyncio.Lock()  # block commit + event fan-out vs. subscriber catch-up
        # Pipeline: block N is written to disk (a worker thread, mostly outside the GIL) while
        # block N+1 executes on N's state root, whose new nodes the store serves from memory
        # until they are durable. At most one block is being stored; N+1 is stored only after
        # N is durable, and if storing N fails, N+1 is dropped and its batches stay pending.
        self._tip: "pb.Block | None" = None          # block being stored (None: the durable head)
        self._storing: "asyncio.Task[bool] | None" = None
        self._in_flight: set[str] = set()            # batch ids of the block being stored
        if store.head is None:
            self._write_genesis()

    # -- heads and statuses -----------------------------------------------------------

    @property
    def head(self) -> "pb.Block":
        return self.store.head

    def head_header(self) -> "pb.BlockHeader":
        return pb.BlockHeader.FromString(self.store.head.header)

    def pending_count(self) -> int:
        return len(self._pending)

    def batch_status(self, batch_id: str) -> "pb.ClientBatchStatus":
        status = pb.ClientBatchStatus(batch_id=batch_id)
        if batch_id in self._pending:
            status.status = pb.ClientBatchStatus.PENDING
        elif batch_id in self._invalid:
            verdict = self._invalid[batch_id]
            status.status = pb.ClientBatchStatus.INVALID
            status.invalid_transactions.add(
                transaction_id=verdict.transaction_id, message=verdict.message, extended_data=verdict.extended_data
            )
        elif self.store.batch_location(batch_id) is not None:
            status.status = pb.ClientBatchStatus.COMMITTED
        else:
            status.status = pb.ClientBatchStatus.UNKNOWN
        return status

    async def wait_until_settled(self, batch_ids: Sequence[str], timeout: float) -> None:
        """Return when none of the batches is PENDING any more, or after timeout."""
        deadline = time.monotonic() + timeout
        while any(b in self._pending for b in batch_ids):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                return
            finally:
                self._waiters.discard(waiter)

    def _notify_waiters(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    # -- submission --------------------------------------------------------------------

    def submit(self, batches: Sequence["pb.Batch"], checks: Sequence | None = None) -> list[BatchRejected]:
        """Queue the batches, all or none: any rejection leaves the queue untouched.

        Rejections are returned and also kept as INVALID statuses, so a client that only polls
        batch_statuses still learns why. Raises QueueFull when the list does not fit.
        ``checks``: check_batches(batches) done beforehand (off the event loop), else done here.
        """
        checked_as = {} if checks is None else {id(b): c for b, c in zip(batches, checks)}
        fresh = [b for b in batches if b.header_signature not in self._pending
                 and self.store.batch_location(b.header_signature) is None]
        fresh = list({b.header_signature: b for b in fresh}.values())  # resubmitted ids count once
        if len(self._pending) + len(fresh) > self.settings.max_pending_batches:
            raise QueueFull(f"{len(self._pending)} batches are already waiting")
        accepted, rejected = [], []
        seen_txns: dict[str, str] = {}
        for batch in fresh:
            try:
                checked = checked_as.get(id(batch)) or check_batch(batch, self.settings.limits)
                if isinstance(checked, BatchRejected):
                    raise checked
                self._check_not_duplicate(checked, seen_txns)
            except BatchRejected as exc:
                LOGGER.info("rejected batch %s: %s", batch.header_signature[:16], exc)
                self._remember_invalid(batch.header_signature, InvalidVerdict(exc.transaction_id, str(exc)))
                rejected.append(exc)
                continue
            accepted.append(checked)
        if rejected:
            return rejected
        for checked in accepted:
            self._invalid.pop(checked.id, None)  # a corrected resubmission of a failed id
            self._pending[checked.id] = checked
            for txn in checked.batch.transactions:
                self._pending_txns[txn.header_signature] = checked.id
        if accepted:
            self._wakeup.set()
        return []

    def _check_not_duplicate(self, checked: CheckedBatch, seen_txns: dict[str, str]) -> None:
        ids = [t.header_signature for t in checked.batch.transactions]
        for txn_id in ids:
            other = self._pending_txns.get(txn_id) or seen_txns.get(txn_id)
            if other is not None:
                raise BatchRejected(f"transaction {txn_id[:16]} is already pending in batch {other[:16]}", txn_id)
            seen_txns[txn_id] = checked.id
        for txn_id in self.store.committed_transactions(ids):
            block_num = self.store.transaction_location(txn_id)[0]
            raise BatchRejected(f"transaction {txn_id[:16]} is already committed in block {block_num}", txn_id)

    def _remember_invalid(self, batch_id: str, verdict: InvalidVerdict) -> None:
        self._invalid[batch_id] = verdict
        self._invalid.move_to_end(batch_id)
        while len(self._invalid) > self.settings.invalid_status_cache:
            self._invalid.popitem(last=False)

    def _drop_pending(self, checked: CheckedBatch) -> None:
        self._pending.pop(checked.id, None)
        for txn in checked.batch.transactions:
            self._pending_txns.pop(txn.header_signature, None)

    # -- publishing --------------------------------------------------------------------

    async def run(self) -> None:
        """Publish blocks for as long as the validator runs."""
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._pending:
                    try:
                        await self.publish_once()
                    except Exception:
                        LOGGER.exception("building a block failed; the batches stay pending")
                        await asyncio.sleep(0.5)
        finally:
            if self._storing is not None:  # on shutdown, let the block being written finish
                await asyncio.wait([self._storing])

    async def _settle_storing(self) -> bool:
        """Wait for the block being stored; True if it is durable. On failure the chain goes
        back to the durable head, and its batches (still pending) are built again."""
        task, self._storing = self._storing, None
        if task is None:
            return True
        stored = await task
        if not stored:
            self._tip = None
            self._in_flight = set()
        return stored

    def _select(self) -> list[CheckedBatch]:
        """The next block's batches in arrival order; dependency rules decide who waits."""
        chosen: list[CheckedBatch] = []
        for checked in list(self._pending.values()):
            if len(chosen) >= self.settings.max_batches_per_block:
                break
            if checked.id in self._in_flight:  # already in the block being stored
                continue
            deps = [d for h in checked.txn_headers for d in h.dependencies]
            if deps:
                committed = self.store.committed_transactions(deps)
                missing = [d for d in deps if d not in committed]
                unknown = [d for d in missing if d not in self._pending_txns]
                if unknown:
                    self._fail_pending(checked, InvalidVerdict(
                        checked.batch.transactions[0].header_signature,
                        f"depends on transaction {unknown[0][:16]}, which is neither committed nor pending",
                    ))
                    continue
                if missing:  # its dependency is still queued: it waits for a later block
                    continue
            chosen.append(checked)
        return chosen

    def _fail_pending(self, checked: CheckedBatch, verdict: InvalidVerdict) -> None:
        self._drop_pending(checked)
        self._remember_invalid(checked.id, verdict)
        LOGGER.info("batch %s invalid: %s", checked.id[:16], verdict.message)

    async def publish_once(self) -> "pb.Block | None":
        chosen = self._select()
        if not chosen:
            if self._storing is not None:  # what is left may be in, or depend on, that block
                await self._settle_storing()
                return None
            self._notify_waiters()
            if self._pending:  # only batches waiting for dependencies that are not committable now
                await asyncio.sleep(0.05)
            return None
        parent = self._tip or self.store.head
        parent_header = pb.BlockHeader.FromString(parent.header)
        parent_root = parent_header.state_root_hash
        injected = []
        if self._injector is not None:
            # Block time never runs backwards, even if this machine's clock steps back.
            last = await self._injected_timestamp(parent_root) if self._injected_timestamp else None
            timestamp = max(int(self._clock()), last or 0)
            injected = [check_batch(self._injector(parent, timestamp), self.settings.limits)]
        started = time.perf_counter()
        outcomes = await self._executor.execute(
            injected + chosen, lambda address: self.merkle.get(parent_root, address)
        )
        injected_outcomes, user_outcomes = outcomes[: len(injected)], outcomes[len(injected):]
        for o in injected_outcomes:
            if not o.valid:
                LOGGER.warning("BlockInfo batch failed (%s); publishing without it", o.message)
        executed = time.perf_counter()
        valid = [o for o in outcomes if o.valid]
        block = None
        if any(o.valid for o in user_outcomes):
            block, new_nodes, receipts = self._build_block(parent, parent_header, valid)
        built = time.perf_counter()
        # Verdicts count only once the parent they were reached on is durable.
        if not await self._settle_storing():
            return None  # built on a block that never became durable: void, batches stay pending
        for o in user_outcomes:
            if not o.valid:
                self._fail_pending(o.checked, InvalidVerdict(o.invalid_txn_id, o.message, o.extended_data))
        if block is None:
            self._notify_waiters()
            return None
        self.store.stage_nodes(new_nodes)
        self.merkle.remember_new(new_nodes)  # the next block reads its upper nodes on every get
        self._tip = block
        committed = [o.checked for o in user_outcomes if o.valid]
        self._in_flight = {c.id for c in committed}
        self._storing = asyncio.get_running_loop().create_task(self._store_block(
            block, new_nodes, receipts, committed, (executed - started) * 1e3, (built - executed) * 1e3))
        return block

    async def _store_block(self, block, new_nodes, receipts, committed, execute_ms, state_ms) -> bool:
        """Make the block durable, then settle its batches and announce it; False if it could
        not be written."""
        try:
            async with self.commit_lock:
                writing = time.perf_counter()
                try:
                    # SQLite releases the GIL while it writes and syncs: the next block executes.
                    await asyncio.to_thread(self.store.commit_block, block, new_nodes, receipts)
                except Exception:
                    LOGGER.exception("storing block %s failed; its batches stay pending", block.header_signature[:16])
                    return False
                for checked in committed:
                    self._drop_pending(checked)
                self._in_flight = set()
                self._notify_waiters()
                LOGGER.info(
                    "committed block %d (%s) with %d batches, %d transactions "
                    "(execute %.0f ms, state %.0f ms, store %.0f ms)",
                    pb.BlockHeader.FromString(block.header).block_num, block.header_signature[:16],
                    len(block.batches), sum(len(b.transactions) for b in block.batches),
                    execute_ms, state_ms, (time.perf_counter() - writing) * 1e3,
                )
                if self._on_commit is not None:
                    try:
                        await self._on_commit(block, receipts)
                    except Exception:  # the block is durable whatever happens to its events
                        LOGGER.exception("announcing block %s failed", block.header_signature[:16])
                return True
        finally:
            self.store.unstage_nodes(new_nodes)  # durable now, or void

    def _build_block(self, parent, parent_header, valid: list[BatchOutcome]):
        final: dict[str, bytes | None] = {}
        for outcome in valid:
            final.update(outcome.writes)
        sets = {a: v for a, v in final.items() if v is not None}
        parent_root = parent_header.state_root_hash
        # Deleting an address that never existed changes nothing; the tree must not see it.
        deletes = [a for a, v in final.items() if v is None and self.merkle.get(parent_root, a) is not None]
        new_root, new_nodes = self.merkle.update(parent_root, sets, deletes)
        header = pb.BlockHeader(
            block_num=parent_header.block_num + 1,
            previous_block_id=parent.header_signature,
            signer_public_key=self._public_key,
            batch_ids=[o.checked.id for o in valid],
            consensus=CONSENSUS,
            state_root_hash=new_root,
        )
        header_bytes = header.SerializeToString()
        block = pb.Block(
            header=header_bytes,
            header_signature=self._signer.sign(header_bytes),
            batches=[o.checked.batch for o in valid],
        )
        receipts = [r for o in valid for r in o.receipts]
        return block, new_nodes, receipts

    def _write_genesis(self) -> None:
        header = pb.BlockHeader(
            block_num=0,
            previous_block_id=NULL_BLOCK_ID,
            signer_public_key=self._public_key,
            consensus=b"Genesis",
            state_root_hash=EMPTY_ROOT,
        )
        header_bytes = header.SerializeToString()
        block = pb.Block(header=header_bytes, header_signature=self._signer.sign(header_bytes))
        self.store.commit_block(block, {EMPTY_ROOT: encode_node(None, {})}, [])
        LOGGER.info("wrote genesis block %s", block.header_signature[:16])
