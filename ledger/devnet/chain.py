"""The dev validator's chain: pending batches, block publishing, batch statuses.

Devmode-like: one node, and a block is published as soon as batches are pending. Batches that
arrive while a block is being built go into the next one, so blocks grow with load.

Blocks are pipelined: block N+1 executes while block N's state root is computed (state
worker process) and N is written to disk. Executing on N's writes, before N's root exists,
gives what executing on that root would: tests/test_ledger_pipeline.py replays the blocks
serially and compares every root.
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
from .merkle import EMPTY_ROOT, InvalidAddress, MerkleRadix, encode_node
from .state_worker import StateWorker
from .node_rows import pack_new_nodes
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
    blocks_in_flight: int = 2           # executed blocks not yet on disk before the next executes
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
        injected_timestamp: Callable[[Callable[[str], bytes | None]], Awaitable[int | None]] | None = None,
        injected_outputs: Sequence[str] | None = None,
        on_commit: Callable[["pb.Block", list], Awaitable[None]] | None = None,
        state: "StateWorker | None" = None,
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.merkle = merkle
        self._executor = executor
        self._signer = signer
        self._public_key = signer.public_key().as_hex()
        self.settings = settings
        self._injector = injector
        self._injected_timestamp = injected_timestamp  # the last agreed block time, given a state reader
        self._injected_outputs = injected_outputs      # what the injected batch may write (None: anything)
        self._on_commit = on_commit
        self._clock = clock
        self._pending: "collections.OrderedDict[str, CheckedBatch]" = collections.OrderedDict()
        self._pending_txns: dict[str, str] = {}  # txn id -> batch id
        self._invalid: "collections.OrderedDict[str, InvalidVerdict]" = collections.OrderedDict()
        self._waiters: set[asyncio.Future] = set()
        self._wakeup = asyncio.Event()
        self.commit_lock = asyncio.Lock()  # block commit + event fan-out vs. subscriber catch-up
        # Pipeline: block N+1 executes on block N's writes while N's state root is computed
        # (state worker process) and N is written to disk (a worker thread, mostly outside the
        # GIL). Blocks are stored in chain order; if one is never stored (its root or its write
        # failed), the blocks built on it are dropped too, and all their batches stay pending.
        self._state = state
        self._tip: "_BlockInProgress | None" = None  # newest block executed (None: the store's head)
        self._building: list[_BlockInProgress] = []  # executed, not yet on disk, oldest first
        self._settling: set[asyncio.Task] = set()    # verdicts of block-less executions
        self._in_flight: set[str] = set()            # batch ids executed but not settled yet
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
            # On shutdown, let the blocks on their way to disk get there (or fail).
            tasks = [b.task for b in self._building] + list(self._settling)
            if tasks:
                await asyncio.wait(tasks)

    def _select(self) -> list[CheckedBatch]:
        """The next block's batches in arrival order; dependency rules decide who waits."""
        chosen: list[CheckedBatch] = []
        for checked in list(self._pending.values()):
            if len(chosen) >= self.settings.max_batches_per_block:
                break
            if checked.id in self._in_flight:  # executed already, in a block on its way to disk
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

    async def publish_once(self) -> "_BlockInProgress | None":
        """Execute the next batches on the tip; their block goes on to disk in the background."""
        while len(self._building) >= self.settings.blocks_in_flight:
            await self._first_settled()
        chosen = self._select()
        if not chosen:
            if self._building or self._settling:  # what is left may be in, or depend on, those
                await self._first_settled()
                return None
            self._notify_waiters()
            if self._pending:  # only batches waiting for dependencies that are not committable now
                await asyncio.sleep(0.05)
            return None
        parent = self._tip or self.store.head
        read = self._state_reader(parent, [x for c in chosen for h in c.txn_headers for x in h.inputs])
        ids = {c.id for c in chosen}
        self._in_flight |= ids
        started = time.perf_counter()
        try:
            if self._injector is None:
                outcomes = await self._executor.execute(chosen, read)
            else:
                outcomes = await self._execute_with_injected(parent, chosen, read)
        except BaseException:
            self._in_flight -= ids
            raise
        execute_ms = (time.perf_counter() - started) * 1e3
        if outcomes is None or (isinstance(parent, _BlockInProgress) and parent.void):
            self._in_flight -= ids  # executed on a block that will never be: all stay pending
            return None
        injected_outcomes, user_outcomes = outcomes[: len(outcomes) - len(chosen)], outcomes[-len(chosen):]
        for o in injected_outcomes:
            if not o.valid:
                LOGGER.warning("BlockInfo batch failed (%s); publishing without it", o.message)
        invalid = [o for o in user_outcomes if not o.valid]
        if not any(o.valid for o in user_outcomes):
            # No block; the verdicts count once the state they were reached on is durable.
            self._in_flight -= ids - {o.checked.id for o in invalid}
            task = asyncio.get_running_loop().create_task(self._settle_verdicts(parent, invalid))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)
            return None
        valid = [o for o in outcomes if o.valid]
        writes: dict[str, bytes | None] = {}
        for outcome in valid:
            writes.update(outcome.writes)
        building = _BlockInProgress(parent, writes, ids)
        # Deleting an address that never existed changes nothing; the tree must not see it.
        sets = {a: v for a, v in writes.items() if v is not None}
        deletes = [a for a, v in writes.items() if v is None and read(a) is not None]
        building.task = asyncio.get_running_loop().create_task(
            self._finish(building, sets, deletes, valid, invalid, execute_ms))
        self._building.append(building)
        self._tip = building
        return building

    async def _execute_with_injected(self, parent, chosen, read) -> list[BatchOutcome] | None:
        """The injected batch (BlockInfo) first, then ``chosen``; None if the parent turns out
        void. BlockInfo names the parent block by id, known only once the parent's state root
        is: batches that cannot read what it writes (no input overlaps its outputs) execute
        meanwhile, which is the same as after it, and the block's state root is computed
        beside the next block's execution, not before it."""
        outputs = self._injected_outputs
        independent = outputs is not None and not any(
            x.startswith(y) or y.startswith(x) for c in chosen for h in c.txn_headers for x in h.inputs for y in outputs)
        early = asyncio.ensure_future(self._executor.execute(chosen, read)) if independent else None
        try:
            if isinstance(parent, _BlockInProgress) and not await parent.signed:
                return None  # void: the tip moved back; start over there
            parent_block = parent.block if isinstance(parent, _BlockInProgress) else parent
            # Block time never runs backwards, even if this machine's clock steps back.
            last = await self._injected_timestamp(read) if self._injected_timestamp else None
            timestamp = max(int(self._clock()), last or 0)
            injected = check_batch(self._injector(parent_block, timestamp), self.settings.limits)
            if early is None:
                return await self._executor.execute([injected, *chosen], read)
            return [*await self._executor.execute([injected], read), *await early]
        finally:
            if early is not None and not early.done():
                await asyncio.wait([early])  # its contexts are this block's: let it end

    def _state_reader(self, tip: "_BlockInProgress | pb.Block", inputs: Sequence[str] = ()) -> Callable[[str], bytes | None]:
        """Reads of the state after ``tip``: the writes of its blocks not on disk yet, newest
        first, over the newest durable state root (the only nodes this process reads).
        The full addresses among ``inputs`` are read from that root at once, in one descent:
        reading each one from the root down cost ~15% of the validator."""
        overlays = []
        while isinstance(tip, _BlockInProgress) and not tip.is_durable:
            overlays.append(tip.writes)
            tip = tip.parent
        base = tip.block if isinstance(tip, _BlockInProgress) else tip
        root = pb.BlockHeader.FromString(base.header).state_root_hash
        get = self.merkle.get
        known = {x for x in inputs if len(x) == 70 and not any(x in w for w in overlays)}
        try:
            found = self.merkle.get_many(root, known) if known else {}
        except InvalidAddress:  # not hex: the execution context refuses it, with its message
            known, found = set(), {}

        def read(address: str) -> bytes | None:
            for writes in overlays:
                if address in writes:
                    return writes[address]
            if address in known:
                return found.get(address)
            return get(root, address)
        return read

    async def _first_settled(self) -> None:
        waits = [b.task for b in self._building] + list(self._settling)
        if waits:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)

    async def _settle_verdicts(self, parent: "_BlockInProgress | pb.Block", invalid: list[BatchOutcome]) -> None:
        try:
            if not isinstance(parent, _BlockInProgress) or await parent.durable:
                for o in invalid:
                    self._fail_pending(o.checked, InvalidVerdict(o.invalid_txn_id, o.message, o.extended_data))
                self._notify_waiters()
        finally:
            self._in_flight -= {o.checked.id for o in invalid}

    async def _finish(self, building: "_BlockInProgress", sets, deletes, valid, invalid, execute_ms) -> None:
        """State root (state worker), signature, then disk once the parent is there."""
        parent = building.parent
        try:
            if isinstance(parent, _BlockInProgress):
                if not await parent.signed:
                    return
                parent_block = parent.block
            else:
                parent_block = parent
            parent_header = pb.BlockHeader.FromString(parent_block.header)
            rooting = time.perf_counter()
            try:
                new_root, rows = await self._state.update(parent_header.state_root_hash, sets, deletes)
            except Exception:
                LOGGER.exception("computing the state root of a block failed; its batches stay pending")
                return
            state_ms = (time.perf_counter() - rooting) * 1e3
            building.block = self._sign_block(parent_block, parent_header, valid, new_root)
            building.signed.set_result(True)
            if isinstance(parent, _BlockInProgress) and not await parent.durable:
                return
            try:
                rows = await rows
            except Exception:
                LOGGER.exception("the state worker could not fold block %s's nodes; its batches stay pending",
                                 building.block.header_signature[:16])
                return
            for o in invalid:  # reached on a durable state now
                self._fail_pending(o.checked, InvalidVerdict(o.invalid_txn_id, o.message, o.extended_data))
            receipts = [r for o in valid for r in o.receipts]
            committed = [o.checked for o in valid if o.checked.id in building.batch_ids]
            if await self._store_block(building.block, rows, receipts, committed, execute_ms, state_ms):
                # Reads at the new root of what this block left alone are then the parent's.
                self.merkle.learn_child(new_root, parent_header.state_root_hash, sets, deletes)
                building.durable.set_result(True)
        finally:
            if not building.durable.done():
                self._void(building)
            self._building.remove(building)
            self._in_flight -= building.batch_ids
            if building.is_durable:
                building.settled()
                if self._tip is building:
                    self._tip = None  # the store's head now

    def _void(self, building: "_BlockInProgress") -> None:
        """This block will never be: the blocks built on it go too, and the tip moves back to
        its parent. Its batches stay pending and are executed again."""
        building.void = True
        for future in (building.signed, building.durable):
            if not future.done():
                future.set_result(False)
        tip = self._tip
        while isinstance(tip, _BlockInProgress) and tip is not building:
            tip = tip.parent
        if tip is building:
            self._tip = building.parent if isinstance(building.parent, _BlockInProgress) else None

    def _sign_block(self, parent: "pb.Block", parent_header, valid: list[BatchOutcome], state_root: str) -> "pb.Block":
        header = pb.BlockHeader(
            block_num=parent_header.block_num + 1,
            previous_block_id=parent.header_signature,
            signer_public_key=self._public_key,
            batch_ids=[o.checked.id for o in valid],
            consensus=CONSENSUS,
            state_root_hash=state_root,
        )
        header_bytes = header.SerializeToString()
        return pb.Block(
            header=header_bytes,
            header_signature=self._signer.sign(header_bytes),
            batches=[o.checked.batch for o in valid],
        )

    async def _store_block(self, block, rows, receipts, committed, execute_ms, state_ms) -> bool:
        """Make the block durable, then settle its batches and announce it; False if it could
        not be written."""
        async with self.commit_lock:
            writing = time.perf_counter()
            try:
                # SQLite releases the GIL while it writes and syncs: the next block executes.
                await asyncio.to_thread(self.store.commit_block, block, rows, receipts)
            except Exception:
                LOGGER.exception("storing block %s failed; its batches stay pending", block.header_signature[:16])
                return False
            for checked in committed:
                self._drop_pending(checked)
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
        self.store.commit_block(block, pack_new_nodes({EMPTY_ROOT: encode_node(None, {})}), [])
        LOGGER.info("wrote genesis block %s", block.header_signature[:16])


class _BlockInProgress:
    """A block executed on the tip, on its way to disk: state root (state worker), signature,
    then the store, in the order of the chain."""

    def __init__(self, parent: "_BlockInProgress | pb.Block", writes: dict, batch_ids: set[str]):
        loop = asyncio.get_running_loop()
        self.parent = parent        # the block it builds on: in progress, or durable
        self.writes = writes        # its state is the parent's with these (None: deleted)
        self.batch_ids = batch_ids  # its user batches, valid or not: in flight until settled
        self.block: "pb.Block | None" = None
        self.signed = loop.create_future()   # True once block is set; False if void
        self.durable = loop.create_future()  # True once on disk; False if void
        self.void = False
        self.task: "asyncio.Task | None" = None

    @property
    def is_durable(self) -> bool:
        return self.durable.done() and self.durable.result()

    def settled(self) -> None:
        """On disk: children read its state there; drop what only mattered before."""
        self.parent, self.writes = self.block, {}
