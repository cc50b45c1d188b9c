"""The dev validator stores block N while it executes block N+1 (ledger/devnet/chain.py).

What must not change: a batch is COMMITTED only once its block is durable, blocks are stored in
order, and a kill -9 in the middle of that pipeline leaves a chain whose head, state and
committed batches agree after the restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import time

import pytest

from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import intkey_batch, rest, run, running_processor, submit_and_wait
from trustmesh.ledger import intkey
from trustmesh.ledger import payload as cbor
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.devnet.block_info import NAMESPACE as BLOCK_INFO_NS
from trustmesh.ledger.devnet.block_info import BlockInfoHandler, read_latest_block_info
from trustmesh.ledger.devnet.store import ChainStore
from trustmesh.ledger.intkey import IntkeyHandler
from trustmesh.ledger.processor import TransactionHandler
from trustmesh.ledger.signing import PrivateKey

SIGNER = PrivateKey.generate()


@contextlib.asynccontextmanager
async def _intkey_under_kills(node: DevnetProcess):
    """An intkey processor taking 32 transactions at once, and a REST client that retries long
    enough to ride out the kills these tests deal the validator."""
    async with running_processor(node.component_url, max_occupancy=32), \
            rest(node.rest_url, retries=40, backoff=0.1) as client:
        yield client


def _five_key_batches(prefix: str, count: int) -> list:
    """Batch b sets {prefix}{b}-0 .. -4 to 0 .. 4."""
    return [intkey_batch(SIGNER, *[("set", f"{prefix}{b}-{i}", i) for i in range(5)]) for b in range(count)]


async def _intkey_state(client, head: str | None = None) -> dict:
    state = {}
    async for _, value in client.list_state(intkey.NAMESPACE, head=head):
        state.update(cbor.decode(value))
    return state


async def _head_reaches(client, block_num: int) -> None:
    while int((await client.head())["header"]["block_num"]) < block_num:
        await asyncio.sleep(0.02)


@pytest.mark.timeout(180)
async def test_kill_during_pipelined_blocks_keeps_head_state_and_statuses_consistent(start_devnet):
    node = start_devnet("--max-batches-per-block", "20")
    batches = _five_key_batches("k", 300)
    async with _intkey_under_kills(node) as client:
        for i in range(0, len(batches), 50):
            await client.submit_batches(batches[i:i + 50])
        await _head_reaches(client, 4)  # several blocks through the pipeline, then kill -9
        await asyncio.get_running_loop().run_in_executor(None, node.kill)
        await asyncio.get_running_loop().run_in_executor(None, node.start)

        head = await client.head()
        ids = [b.header_signature for b in batches]
        statuses = {s["id"]: s["status"] for s in await client.batch_statuses(ids)}
        committed = {b for b, s in statuses.items() if s == "COMMITTED"}
        assert committed and all(s in ("COMMITTED", "UNKNOWN") for s in statuses.values())
        assert len(committed) < len(batches)  # the kill did land mid-stream
        # exactly the committed batches' keys are in the head's state (nothing half-written)
        state = await _intkey_state(client, head["header_signature"])
        expected = {f"k{b}-{i}": i for b, batch in enumerate(batches)
                    if batch.header_signature in committed for i in range(5)}
        assert state == expected
        # and the chain goes on from there: resubmitting everything commits the rest once
        for i in range(0, len(batches), 50):
            await client.submit_batches(batches[i:i + 50])
        final = await client.wait_for_batches(ids, 120)
        assert all(s["status"] == "COMMITTED" for s in final)


# -- the state worker and block N+1 executing beside block N's state root --------------------

class RecordsParentBlock(TransactionHandler):
    """Writes the id of the block its transaction's block builds on, as BlockInfo tells it."""

    family_name = "parent-id"
    family_versions = ["1.0"]
    namespaces = ["9a9a9a"]

    async def apply(self, transaction, context):
        info = await read_latest_block_info(context)
        await context.set_state({_parent_address(transaction.payload): info.header_signature.encode()})


def _parent_address(tag: bytes) -> str:
    return "9a9a9a" + hashlib.sha512(tag).hexdigest()[:64]


def _parent_id_batch(tag: str):
    txn = make_transaction(SIGNER, "parent-id", "1.0", tag.encode(), [BLOCK_INFO_NS, "9a9a9a"], ["9a9a9a"])
    return make_batch(SIGNER, [txn])


def test_pipelined_blocks_replay_to_the_same_state_roots(tmp_path):
    """Block N+1 executes on block N's writes before N's root exists, and batches that do not
    read BlockInfo execute before the parent's id is known. A validator replaying the blocks
    one at a time, serially, must reach the same root at every block, including for batches
    that read BlockInfo, increment keys set a block earlier, or fail."""
    a = DevnetProcess(tmp_path / "a", "--max-batches-per-block", "8").start()
    batches = []
    for i in range(120):
        batches.append(intkey_batch(SIGNER, ("set", f"p{i}", i), ("set", f"q{i}", 1)))
        if i >= 10:
            batches.append(intkey_batch(SIGNER, ("inc", f"p{i - 10}", 5)))  # written blocks earlier
        if i % 15 == 0:
            batches.append(intkey_batch(SIGNER, ("inc", f"missing{i}", 1)))  # INVALID
            batches.append(_parent_id_batch(f"t{i}"))
    try:
        async def record():
            async with running_processor(a.component_url, IntkeyHandler(), RecordsParentBlock(),
                                         max_occupancy=32), rest(a.rest_url) as client:
                await client.submit_batches(batches)
                statuses = await client.wait_for_batches([b.header_signature for b in batches], 120,
                                                         raise_invalid=False)
                return {s["id"]: s["status"] for s in statuses}

        statuses = run(record(), timeout=180)
    finally:
        a.stop()
    assert list(statuses.values()).count("INVALID") == 8
    assert set(statuses.values()) == {"COMMITTED", "INVALID"}
    store = ChainStore(tmp_path / "a")
    blocks = list(store.blocks_ascending(1))
    ids = [b.header_signature for b in store.blocks_ascending(0)]
    roots_a = [pb.BlockHeader.FromString(b.header).state_root_hash for b in blocks]
    store.close()
    readers = {txn.payload: num for num, block in enumerate(blocks, 1) for batch in block.batches
               for txn in batch.transactions if pb.TransactionHeader.FromString(txn.header).family_name == "parent-id"}
    assert len(readers) == 8
    assert len(blocks) >= 15  # many blocks, so many went through the pipeline

    b = DevnetProcess(tmp_path / "b", "--no-block-info").start()
    try:
        async def replay():
            async with running_processor(b.component_url, IntkeyHandler(), RecordsParentBlock(), BlockInfoHandler()), \
                    rest(b.rest_url) as client:
                roots = []
                for block in blocks:
                    statuses = await submit_and_wait(client, list(block.batches), timeout=60)
                    assert {s["status"] for s in statuses} == {"COMMITTED"}, statuses
                    roots.append((await client.head())["header"]["state_root_hash"])
                # each BlockInfo reader saw the block before its own
                for tag, num in readers.items():
                    assert (await client.get_state(_parent_address(tag))).decode() == ids[num - 1]
                return roots

        roots_b = run(replay(), timeout=180)
    finally:
        b.stop()
    assert roots_b == roots_a


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                found.append(int(entry))
    return found


def _state_worker_of(node: DevnetProcess) -> int:
    for child in _children(node.proc.pid):
        if b"state_process" in open(f"/proc/{child}/cmdline", "rb").read():
            return child
    raise AssertionError("the validator has no state worker process")


@pytest.mark.timeout(180)
async def test_killed_state_worker_is_replaced_and_nothing_is_lost_or_repeated(start_devnet):
    node = start_devnet("--max-batches-per-block", "10")
    batches = _five_key_batches("w", 200)
    async with _intkey_under_kills(node) as client:
        first = _state_worker_of(node)
        await client.submit_batches(batches)
        await _head_reaches(client, 3)
        os.kill(first, signal.SIGKILL)  # mid-stream: blocks are being rooted and stored
        final = await client.wait_for_batches([b.header_signature for b in batches], 120)
        assert all(s["status"] == "COMMITTED" for s in final)
        assert _state_worker_of(node) != first
        state = await _intkey_state(client)
        assert state == {f"w{b}-{i}": i for b in range(200) for i in range(5)}
        txns = 0
        async for block in client.list_blocks():
            txns += sum(len(b["transactions"]) for b in block["batches"]
                        if b["header"]["signer_public_key"] == SIGNER.public_key().as_hex())
        assert txns == 1000  # every transaction exactly once
    assert "state worker is not running; starting a new one" in node.log()


def test_state_worker_exits_with_a_killed_validator(tmp_path):
    node = DevnetProcess(tmp_path / "d").start()
    worker = _state_worker_of(node)
    node.kill()
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # exited; reaping it is its new parent's business
