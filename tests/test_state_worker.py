"""The state worker process (ledger/devnet/state_worker.py): roots equal the in-process Merkle
tree's, and a worker that dies or stops answering is replaced without wedging the chain."""

from __future__ import annotations

import contextlib
import os
import signal

import pytest

from helpers.state_data import addr
from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet.merkle import EMPTY_ROOT, MerkleRadix, encode_node
from trustmesh.ledger.devnet.node_rows import pack_new_nodes
from trustmesh.ledger.devnet.state_worker import StateWorker, StateWorkerError
from trustmesh.ledger.devnet.store import ChainStore


@pytest.fixture
def store(tmp_path):
    """A chain store holding genesis (the empty root), as the validator leaves it."""
    store = ChainStore(tmp_path)
    genesis = pb.BlockHeader(block_num=0, state_root_hash=EMPTY_ROOT).SerializeToString()
    store.commit_block(pb.Block(header=genesis, header_signature="0" * 128),
                       pack_new_nodes({EMPTY_ROOT: encode_node(None, {})}), [])
    yield store
    store.close()


@contextlib.asynccontextmanager
async def running_worker(store, **options):
    worker = StateWorker(store.path, **options)
    worker.start()
    await worker.ready()
    try:
        yield worker
    finally:
        await worker.close()


def _in_memory_tree(nodes: dict[str, bytes]) -> MerkleRadix:
    return MerkleRadix(lambda h: encode_node(None, {}) if h == EMPTY_ROOT else nodes.get(h))


@pytest.mark.timeout(60)
async def test_roots_and_rows_match_the_in_process_tree_and_chain_on_unstored_parents(store):
    local_nodes: dict[str, bytes] = {}
    local = _in_memory_tree(local_nodes)

    async with running_worker(store) as worker:
        root, expected = EMPTY_ROOT, EMPTY_ROOT
        for block in range(3):  # each builds on the last, which is never stored: the worker keeps it
            sets = {addr(f"b{block}-{i}"): f"{block}/{i}".encode() for i in range(50)}
            deletes = [addr(f"b{block - 1}-0")] if block else []
            root, rows = await worker.update(root, sets, deletes)
            expected, nodes = local.update(expected, sets, deletes)
            local_nodes.update(nodes)
            assert root == expected
            assert await rows == pack_new_nodes(nodes)


@pytest.mark.timeout(60)
async def test_a_stopped_worker_is_killed_after_the_timeout_and_a_fresh_one_answers(store):
    async with running_worker(store, timeout=1.0) as worker:
        stuck = worker._process.pid
        os.kill(stuck, signal.SIGSTOP)  # alive, silent: a deadlock looks the same from here
        with pytest.raises(StateWorkerError, match="no answer for a state root within 1 s"):
            await worker.update(EMPTY_ROOT, {addr("x"): b"1"}, [])
        root, rows = await worker.update(EMPTY_ROOT, {addr("x"): b"1"}, [])
        assert worker._process.pid != stuck and len(await rows) > 0
        assert root == _in_memory_tree({}).update(EMPTY_ROOT, {addr("x"): b"1"})[0]


@pytest.mark.timeout(60)
async def test_a_failed_update_is_reported_and_the_worker_goes_on(store):
    async with running_worker(store) as worker:
        with pytest.raises(StateWorkerError, match="UnknownStateRoot"):
            await worker.update("ab" * 32, {addr("x"): b"1"}, [])
        root, rows = await worker.update(EMPTY_ROOT, {addr("x"): b"1"}, [])
        assert root != EMPTY_ROOT and await rows
