"""The state worker process (ledger/devnet/state_worker.py): roots equal the in-process Merkle
tree's, and a worker that dies or stops answering is replaced without wedging the chain."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet.merkle import EMPTY_ROOT, MerkleRadix, encode_node
from trustmesh.ledger.devnet.node_rows import pack_new_nodes
from trustmesh.ledger.devnet.state_worker import StateWorker, StateWorkerError
from trustmesh.ledger.devnet.store import ChainStore

from ledger_helpers import run
from test_merkle import addr


def _store(tmp_path) -> ChainStore:
    store = ChainStore(tmp_path)
    genesis = pb.BlockHeader(block_num=0, state_root_hash=EMPTY_ROOT).SerializeToString()
    store.commit_block(pb.Block(header=genesis, header_signature="0" * 128),
                       pack_new_nodes({EMPTY_ROOT: encode_node(None, {})}), [])
    return store


def test_roots_and_rows_match_the_in_process_tree_and_chain_on_unstored_parents(tmp_path):
    store = _store(tmp_path)
    local_nodes: dict[str, bytes] = {}
    local = MerkleRadix(lambda h: local_nodes.get(h) if h != EMPTY_ROOT else encode_node(None, {}))

    async def scenario():
        worker = StateWorker(store.path)
        worker.start()
        await worker.ready()
        try:
            root, expected = EMPTY_ROOT, EMPTY_ROOT
            for block in range(3):  # each builds on the last, which is never stored: the worker keeps it
                sets = {addr(f"b{block}-{i}"): f"{block}/{i}".encode() for i in range(50)}
                deletes = [addr(f"b{block - 1}-0")] if block else []
                root, rows = await worker.update(root, sets, deletes)
                expected, nodes = local.update(expected, sets, deletes)
                local_nodes.update(nodes)
                assert root == expected
                assert await rows == pack_new_nodes(nodes)
        finally:
            await worker.close()

    run(scenario(), timeout=60)
    store.close()


def test_a_stopped_worker_is_killed_after_the_timeout_and_a_fresh_one_answers(tmp_path):
    store = _store(tmp_path)

    async def scenario():
        worker = StateWorker(store.path, timeout=1.0)
        worker.start()
        await worker.ready()
        try:
            stuck = worker._process.pid
            os.kill(stuck, signal.SIGSTOP)  # alive, silent: a deadlock looks the same from here
            with pytest.raises(StateWorkerError, match="no answer for a state root within 1 s"):
                await worker.update(EMPTY_ROOT, {addr("x"): b"1"}, [])
            root, rows = await worker.update(EMPTY_ROOT, {addr("x"): b"1"}, [])
            assert worker._process.pid != stuck and len(await rows) > 0
            assert root == MerkleRadix(lambda h: encode_node(None, {}) if h == EMPTY_ROOT else None).update(
                EMPTY_ROOT, {addr("x"): b"1"})[0]
        finally:
            await worker.close()

    run(scenario(), timeout=60)
    store.close()


def test_a_failed_update_is_reported_and_the_worker_goes_on(tmp_path):
    store = _store(tmp_path)

    async def scenario():
        worker = StateWorker(store.path)
        worker.start()
        try:
            with pytest.raises(StateWorkerError, match="UnknownStateRoot"):
                await worker.update("ab" * 32, {addr("x"): b"1"}, [])
            root, rows = await worker.update(EMPTY_ROOT, {addr("x"): b"1"}, [])
            assert root != EMPTY_ROOT and await rows
        finally:
            await worker.close()

    run(scenario(), timeout=60)
    store.close()
