"""Merkle nodes in the chain store: one-child chains folded into rows, read back exactly."""

import sqlite3
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet import node_rows
from trustmesh.ledger.devnet.merkle import (
    EMPTY_ROOT,
    InvalidNode,
    MerkleRadix,
    MissingStateNode,
    _decode_row,
    decode_node,
    storage_rows,
)
from helpers.state_data import addr
from trustmesh.ledger.devnet.node_rows import pack_new_nodes
from trustmesh.ledger.devnet.store import ChainStore


def commit(store: ChainStore, num: int, root: str, nodes: dict) -> None:
    header = pb.BlockHeader(block_num=num, state_root_hash=root).SerializeToString()
    store.commit_block(pb.Block(header=header, header_signature=f"{num:0128x}"), pack_new_nodes(nodes), [])


def rows(store: ChainStore) -> dict[str, bytes]:
    with sqlite3.connect(store.path) as db:
        return dict(db.execute("SELECT hash, data FROM merkle_nodes"))


def check_rule(store: ChainStore, root: str) -> None:
    """A root, and a child of a node with other than one child, tops a row; a one-child
    node's child tops a row or is in its parent's row."""
    stored = rows(store)
    assert root == EMPTY_ROOT or root in stored
    for key, data in stored.items():
        decoded = dict(_decode_row(key, data))
        for value, children in decoded.values():
            for child in children.values():
                in_row = len(children) == 1 and value is None and child in decoded
                assert in_row or child in stored or child == EMPTY_ROOT


def check_reads(m: MerkleRadix, root: str, model: dict, pool: list) -> None:
    ordered = sorted(model.items())
    for a in pool:
        assert m.get(root, a) == model.get(a)
    assert m.get_many(root, pool) == {a: v for a, v in model.items() if a in pool}
    assert list(m.leaves(root)) == ordered
    assert list(m.leaves(root, reverse=True)) == ordered[::-1]
    for a in pool:
        for n in (1, 4, 9, 40, 70):
            p = a[:n]
            assert list(m.leaves(root, prefix=p)) == [(k, v) for k, v in ordered if k.startswith(p)]
            assert list(m.leaves(root, start=p)) == [(k, v) for k, v in ordered if k >= p]
            assert list(m.leaves(root, start=p, reverse=True)) == [
                (k, v) for k, v in ordered[::-1] if k <= p]


# --- property test ----------------------------------------------------------------------

TOKENS = ["00", "01", "7f", "fe", "ff"]
tokens_st = st.lists(st.sampled_from(TOKENS), min_size=35, max_size=35).map("".join)
value_st = st.sampled_from([b"", b"same", b"other"]) | st.binary(max_size=20)  # equal values abound


@st.composite
def histories(draw):
    """Blocks of (sets, deletes); new addresses often copy an existing one's first k tokens,
    so they diverge inside its chain at a random depth."""
    pool: list[str] = []
    model: dict[str, bytes] = {}
    blocks = []
    for _ in range(draw(st.integers(1, 6))):
        for _ in range(draw(st.integers(0, 4))):
            fresh = draw(tokens_st)
            if pool and draw(st.booleans()):
                keep = 2 * draw(st.integers(0, 34))
                fresh = draw(st.sampled_from(pool))[:keep] + fresh[keep:]
            if fresh not in pool:
                pool.append(fresh)
        sets = draw(st.dictionaries(st.sampled_from(pool), value_st, max_size=len(pool))) if pool else {}
        present = sorted(model)
        deletes = draw(st.lists(st.sampled_from(present), unique=True, max_size=3)) if present else []
        blocks.append((sets, deletes))
        model.update(sets)
        for a in deletes:
            del model[a]
    return blocks, pool


# 3: nothing stays cached; 40: part of a chain row does, and the walk that needs the rest
# must decode the rows above it again.
@pytest.mark.parametrize("cache_size", [100_000, 40, 3])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories())
def test_committed_blocks_read_back_like_a_dict(cache_size, history):
    blocks, pool = history
    with tempfile.TemporaryDirectory() as tmp:
        store = ChainStore(tmp)
        writer = MerkleRadix(store.get_node, cache_size=cache_size)
        plain: dict[str, bytes] = {}  # every node its own row, as before chain rows
        reference = MerkleRadix(plain.get)
        root = EMPTY_ROOT
        model: dict[str, bytes] = {}
        seen = []
        for num, (sets, deletes) in enumerate(blocks, 1):
            expected, ref_nodes = reference.update(root, sets, deletes)
            plain.update(ref_nodes)
            root, nodes = writer.update(root, sets, deletes)
            assert root == expected
            commit(store, num, root, nodes)
            model.update(sets)
            for a in deletes:
                del model[a]
            seen.append((root, dict(model)))
            check_rule(store, root)
            fresh_store = ChainStore(tmp)
            try:
                check_reads(MerkleRadix(fresh_store.get_node, cache_size=cache_size), root, model, pool)
            finally:
                fresh_store.close()
        fresh_store = ChainStore(tmp)
        fresh = MerkleRadix(fresh_store.get_node, cache_size=cache_size)
        for old_root, old_model in seen:  # every earlier root still reads as it was
            assert fresh.get_many(old_root, pool) == old_model
        fresh_store.close()
        store.close()


# --- rows, damage, old data dirs --------------------------------------------------------


def test_rows_per_address_drop(tmp_path):
    store = ChainStore(tmp_path)
    m = MerkleRadix(store.get_node)
    root = EMPTY_ROOT
    addresses = [addr(f"row-{i}") for i in range(1000)]
    nodes_written = 0
    for num in range(4):
        root, nodes = m.update(root, {a: a.encode() for a in addresses[num::4]})
        nodes_written += len(nodes)
        commit(store, num + 1, root, nodes)
    assert nodes_written > 25 * len(addresses)  # what a row per node used to cost
    assert len(rows(store)) < 5 * len(addresses)
    fresh_store = ChainStore(tmp_path)
    fresh = MerkleRadix(fresh_store.get_node)
    assert fresh.get_many(root, addresses) == {a: a.encode() for a in addresses}


@pytest.mark.parametrize("parting", [
    ["00" * 10 + "01" + "00" * 24],                            # one change: _apply_one
    ["00" * 10 + "01" + "00" * 24, "00" * 10 + "02" + "00" * 24],  # two under one node: _apply
])
def test_addresses_parting_inside_a_stored_chain(tmp_path, parting):
    store = ChainStore(tmp_path)
    old = "00" * 35
    root, nodes = MerkleRadix(store.get_node).update(EMPTY_ROOT, {old: b"old"})
    commit(store, 1, root, nodes)
    root, nodes = MerkleRadix(store.get_node).update(root, {a: b"new" for a in parting})
    commit(store, 2, root, nodes)
    check_rule(store, root)
    fresh_store = ChainStore(tmp_path)
    assert MerkleRadix(fresh_store.get_node).get_many(root, [old, *parting]) == {
        old: b"old", **{a: b"new" for a in parting}}


def test_one_address_is_one_row():
    m = MerkleRadix({}.get)
    root, nodes = m.update(EMPTY_ROOT, {addr("alone"): b"v"})
    assert len(nodes) == 36
    stored = storage_rows(nodes)
    assert list(stored) == [root] and stored[root][:2] == b"\x00\x23"  # 35 folded levels
    assert MerkleRadix(stored.get).get(root, addr("alone")) == b"v"


def test_scan_reads_each_row_once(tmp_path):
    store = ChainStore(tmp_path)
    # Rows topped below depth 2, whose nodes a scan does not cache.
    items = {"abcdef" + addr(f"scan-{i}")[6:]: f"v{i}".encode() for i in range(300)}
    root, nodes = MerkleRadix(store.get_node).update(EMPTY_ROOT, items)
    commit(store, 1, root, nodes)
    reads = []
    fresh = MerkleRadix(lambda h: reads.append(h) or store.get_node(h))
    assert list(fresh.leaves(root)) == sorted(items.items())
    assert len(reads) == len(set(reads)) == len(rows(store))


def test_folded_node_evicted_from_the_cache_is_found_again(tmp_path):
    store = ChainStore(tmp_path)
    a, b = "1" * 70, "2" * 70
    root, nodes = MerkleRadix(store.get_node).update(EMPTY_ROOT, {a: b"A", b: b"B"})
    commit(store, 1, root, nodes)
    path = [root]  # node hashes from the root down a's path
    for i in range(0, 70, 2):
        path.append(decode_node(nodes[path[-1]])[1][a[i:i + 2]])
    reader = MerkleRadix(store.get_node)
    assert reader.get(root, a) == b"A"
    for h in path[10:]:  # folded into the row of path[1]; gone while their parents stay cached
        del reader._cache[h]
    assert reader.get(root, a) == b"A"
    assert list(reader.leaves(root, prefix=a[:30])) == [(a, b"A")]


def _two_branch_tree(tmp_path):
    """Two addresses parting at the root: a plain root row and two chain rows."""
    store = ChainStore(tmp_path)
    a, b = "1" * 70, "2" * 70
    root, nodes = MerkleRadix(store.get_node).update(EMPTY_ROOT, {a: b"A", b: b"B"})
    commit(store, 1, root, nodes)
    chain_rows = [h for h, data in rows(store).items() if data[:1] == b"\x00"]
    assert len(chain_rows) == 2
    return store, root, a, b, chain_rows


@pytest.mark.parametrize("damage", [
    lambda data: data[:2] + b"3" + data[3:],   # another token
    lambda data: data[:-1] + b"C",             # another leaf value
    lambda data: data[:1] + b"\x40" + data[2:],  # more tokens than the row holds
    lambda data: data[:1],                     # truncated
    lambda data: data[:2],                     # tokens and bottom cut off
])
def test_damaged_chain_row_raises(tmp_path, damage):
    store, root, a, b, chain_rows = _two_branch_tree(tmp_path)
    with sqlite3.connect(store.path) as db:
        for h in chain_rows:
            (data,) = db.execute("SELECT data FROM merkle_nodes WHERE hash = ?", (h,)).fetchone()
            db.execute("UPDATE merkle_nodes SET data = ? WHERE hash = ?", (damage(data), h))
    fresh_store = ChainStore(tmp_path)
    with pytest.raises(InvalidNode, match="damaged"):
        MerkleRadix(fresh_store.get_node).get(root, a)


def test_missing_chain_row_raises(tmp_path):
    store, root, a, b, chain_rows = _two_branch_tree(tmp_path)
    with sqlite3.connect(store.path) as db:
        db.execute("DELETE FROM merkle_nodes WHERE hash IN (?, ?)", chain_rows)
    fresh_store = ChainStore(tmp_path)
    with pytest.raises(MissingStateNode):
        MerkleRadix(fresh_store.get_node, cache_size=3).get(root, b)


def test_old_format_data_dir_reads_and_takes_new_blocks(tmp_path, monkeypatch):
    old = [addr(f"old-{i}") for i in range(40)]
    model = {a: a[:8].encode() for a in old}
    with monkeypatch.context() as patch:
        patch.setattr(node_rows, "storage_rows", dict)  # every node its own plain row
        store = ChainStore(tmp_path)
        root, nodes = MerkleRadix(store.get_node).update(EMPTY_ROOT, model)
        commit(store, 1, root, nodes)
        store.close()
    assert len(rows(store)) == len(nodes) and not any(d[:1] == b"\x00" for d in rows(store).values())
    old_root = root

    store = ChainStore(tmp_path)
    m = MerkleRadix(store.get_node, cache_size=3)
    check_reads(m, root, model, old[:5])
    # New addresses part from old chains at several depths; old ones change or go.
    sets = {a[:2 * k] + ("0" if a[2 * k] != "0" else "1") + a[2 * k + 1:]: b"new"
            for k, a in zip(range(2, 35, 4), old)}
    sets[old[20]] = b"changed"
    root, nodes = m.update(root, sets, old[30:33])
    commit(store, 2, root, nodes)
    model.update(sets)
    for a in old[30:33]:
        del model[a]
    check_rule(store, root)
    fresh_store = ChainStore(tmp_path)
    fresh = MerkleRadix(fresh_store.get_node)
    check_reads(fresh, root, model, list(sets)[:5] + old[28:34])
    assert fresh.get(old_root, old[30]) == old[30][:8].encode()


# --- what update hands the store --------------------------------------------------------


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories())
def test_update_notes_the_structure_storage_rows_would_parse(history):
    """update() notes one-child links and the children of the other nodes as it builds them;
    storage_rows trusts that instead of parsing every node, so it must be exact."""
    blocks, _ = history
    store: dict[str, bytes] = {}
    m = MerkleRadix(store.get)
    root = EMPTY_ROOT
    for sets, deletes in blocks:
        root, nodes = m.update(root, sets, deletes)
        links, pins = {}, set()
        for h, data in nodes.items():
            value, children = decode_node(data)
            if value is None and len(children) == 1 and len(data) == 76:
                links[h] = next(iter(children.values()))
            else:
                pins.update(children.values())
        assert nodes.links == links
        assert nodes.pins == pins
        assert storage_rows(nodes) == storage_rows(dict(nodes))  # the parsing path agrees
        store.update(storage_rows(nodes))


def test_served_block_upper_nodes_are_cached_without_a_read():
    reads = []
    store: dict[str, bytes] = {}
    m = MerkleRadix(lambda h: reads.append(h) or store.get(h))
    root, nodes = m.update(EMPTY_ROOT, {addr(f"up-{i}"): b"v" for i in range(50)})
    store.update(nodes)
    m.remember_new(nodes)
    assert m.get(root, addr("up-0")) == b"v"
    assert root not in reads  # the root (50 children) came from the cache, not decoded again
    assert 0 < len(nodes.decoded) < 60  # only where the changes part ways, not the chains
