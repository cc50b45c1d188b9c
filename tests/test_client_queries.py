"""Read-only CLIENT_* requests answered like a Sawtooth 1.2 validator (client_queries.py),
against a real SQLite chain of signed blocks with real Merkle state and receipts."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field

import pytest

from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.devnet.client_queries import ClientQueries
from trustmesh.ledger.devnet.merkle import EMPTY_ROOT, MerkleRadix, encode_node
from trustmesh.ledger.devnet.node_rows import pack_new_nodes
from trustmesh.ledger.devnet.store import ChainStore
from trustmesh.ledger.signing import PrivateKey

M = pb.Message

# request type -> (request class, response class, response type): written out independently of
# the module so a wrong pairing there shows up here.
ROUTES = {
    M.CLIENT_STATE_LIST_REQUEST: (pb.ClientStateListRequest, pb.ClientStateListResponse, M.CLIENT_STATE_LIST_RESPONSE),
    M.CLIENT_STATE_GET_REQUEST: (pb.ClientStateGetRequest, pb.ClientStateGetResponse, M.CLIENT_STATE_GET_RESPONSE),
    M.CLIENT_BLOCK_LIST_REQUEST: (pb.ClientBlockListRequest, pb.ClientBlockListResponse, M.CLIENT_BLOCK_LIST_RESPONSE),
    M.CLIENT_BLOCK_GET_BY_ID_REQUEST: (pb.ClientBlockGetByIdRequest, pb.ClientBlockGetResponse, M.CLIENT_BLOCK_GET_RESPONSE),
    M.CLIENT_BLOCK_GET_BY_NUM_REQUEST: (pb.ClientBlockGetByNumRequest, pb.ClientBlockGetResponse, M.CLIENT_BLOCK_GET_RESPONSE),
    M.CLIENT_BLOCK_GET_BY_TRANSACTION_ID_REQUEST: (
        pb.ClientBlockGetByTransactionIdRequest, pb.ClientBlockGetResponse, M.CLIENT_BLOCK_GET_RESPONSE),
    M.CLIENT_BLOCK_GET_BY_BATCH_ID_REQUEST: (
        pb.ClientBlockGetByBatchIdRequest, pb.ClientBlockGetResponse, M.CLIENT_BLOCK_GET_RESPONSE),
    M.CLIENT_BATCH_LIST_REQUEST: (pb.ClientBatchListRequest, pb.ClientBatchListResponse, M.CLIENT_BATCH_LIST_RESPONSE),
    M.CLIENT_BATCH_GET_REQUEST: (pb.ClientBatchGetRequest, pb.ClientBatchGetResponse, M.CLIENT_BATCH_GET_RESPONSE),
    M.CLIENT_TRANSACTION_LIST_REQUEST: (
        pb.ClientTransactionListRequest, pb.ClientTransactionListResponse, M.CLIENT_TRANSACTION_LIST_RESPONSE),
    M.CLIENT_TRANSACTION_GET_REQUEST: (
        pb.ClientTransactionGetRequest, pb.ClientTransactionGetResponse, M.CLIENT_TRANSACTION_GET_RESPONSE),
    M.CLIENT_RECEIPT_GET_REQUEST: (pb.ClientReceiptGetRequest, pb.ClientReceiptGetResponse, M.CLIENT_RECEIPT_GET_RESPONSE),
    M.CLIENT_PEERS_GET_REQUEST: (pb.ClientPeersGetRequest, pb.ClientPeersGetResponse, M.CLIENT_PEERS_GET_RESPONSE),
    M.CLIENT_STATUS_GET_REQUEST: (pb.ClientStatusGetRequest, pb.ClientStatusGetResponse, M.CLIENT_STATUS_GET_RESPONSE),
}
REQUEST_TYPE = {req: t for t, (req, _, _) in ROUTES.items()}


def ask(queries: ClientQueries, request):
    """Send one request message through handle() and parse the reply with the expected class."""
    message_type = REQUEST_TYPE[type(request)]
    _, response_cls, response_type = ROUTES[message_type]
    got_type, body = queries.handle(message_type, request.SerializeToString())
    assert got_type == response_type
    return response_cls.FromString(body)


def addr(tag: str, prefix: str = "") -> str:
    return (prefix + hashlib.sha512(tag.encode()).hexdigest())[:70]


PREFIX = "1cf126"
UNKNOWN_ID = "ab" * 64


@dataclass
class Chain:
    store: ChainStore
    merkle: MerkleRadix
    blocks: list = field(default_factory=list)   # pb.Block, index == block_num
    roots: list = field(default_factory=list)    # state root per block
    state: list = field(default_factory=list)    # dict address -> value per block
    receipts: dict = field(default_factory=dict)  # txn id -> pb.TransactionReceipt

    def queries(self, **kwargs) -> ClientQueries:
        return ClientQueries(self.store, self.merkle, **kwargs)

    def batches_newest_first(self, head: int | None = None):
        head = len(self.blocks) - 1 if head is None else head
        return [b for blk in reversed(self.blocks[: head + 1]) for b in blk.batches]

    def txns_newest_first(self, head: int | None = None):
        return [t for b in self.batches_newest_first(head) for t in b.transactions]


def _commit(chain: Chain, signer: PrivateKey, batches, sets=None, deletes=()):
    num = len(chain.blocks)
    parent_root = chain.roots[-1] if chain.roots else EMPTY_ROOT
    if num == 0:
        root, nodes = EMPTY_ROOT, {EMPTY_ROOT: encode_node(None, {})}
    else:
        root, nodes = chain.merkle.update(parent_root, sets or {}, deletes)
    header = pb.BlockHeader(
        block_num=num,
        previous_block_id=chain.blocks[-1].header_signature if chain.blocks else "0000000000000000",
        signer_public_key=signer.public_key().as_hex(),
        batch_ids=[b.header_signature for b in batches],
        consensus=b"Devmode" if num else b"Genesis",
        state_root_hash=root,
    )
    header_bytes = header.SerializeToString()
    block = pb.Block(header=header_bytes, header_signature=signer.sign(header_bytes), batches=batches)
    receipts = []
    for batch in batches:
        for txn in batch.transactions:
            receipts.append(pb.TransactionReceipt(
                transaction_id=txn.header_signature,
                state_changes=[pb.StateChange(address=a, value=v, type=pb.StateChange.SET)
                               for a, v in sorted((sets or {}).items())],
                data=[txn.header_signature[:8].encode()],
            ))
    chain.store.commit_block(block, pack_new_nodes(nodes), receipts)
    state = dict(chain.state[-1]) if chain.state else {}
    state.update(sets or {})
    for a in deletes:
        state.pop(a)
    chain.blocks.append(block)
    chain.roots.append(root)
    chain.state.append(state)
    chain.receipts.update({r.transaction_id: r for r in receipts})


def _batch(signer, n_txns: int, tag: str):
    txns = [
        make_transaction(signer, "intkey", "1.0", f"{tag}-{i}".encode(), [PREFIX], [PREFIX])
        for i in range(n_txns)
    ]
    return make_batch(signer, txns)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Blocks 0..4: genesis, then 2, 1, 3 and 1 batches (txns per batch vary); state grows
    under two prefixes and block 4 deletes one address."""
    store = ChainStore(tmp_path_factory.mktemp("chain"))
    c = Chain(store, MerkleRadix(store.get_node))
    signer = PrivateKey.generate()
    _commit(c, signer, [])
    _commit(c, signer, [_batch(signer, 2, "1a"), _batch(signer, 1, "1b")],
            {addr(f"k{i}", PREFIX): f"v{i}".encode() for i in range(5)})
    _commit(c, signer, [_batch(signer, 1, "2a")], {addr("other"): b"other"})
    _commit(c, signer, [_batch(signer, 1, "3a"), _batch(signer, 2, "3b"), _batch(signer, 1, "3c")],
            {addr(f"k{i}", PREFIX): f"w{i}".encode() for i in range(3, 8)})
    _commit(c, signer, [_batch(signer, 2, "4a")], {}, deletes=[addr("k0", PREFIX)])
    yield c
    store.close()


@pytest.fixture
def q(chain):
    return chain.queries()


@pytest.fixture
def empty_store(tmp_path):
    store = ChainStore(tmp_path)
    yield store
    store.close()


def paging(start="", limit=0):
    return pb.ClientPagingControls(start=start, limit=limit)


def sort(*keys, reverse=True):
    return [pb.ClientSortControls(keys=list(keys), reverse=reverse)]


def ids(resources):
    return [r.header_signature for r in resources]


def hexnum(n: int) -> str:
    return "0x" + format(n, "016x")


# --- dispatch -----------------------------------------------------------------------------


def test_handled_types_are_exactly_the_reference_read_queries(q):
    assert q.HANDLED_TYPES == frozenset(ROUTES)
    assert ClientQueries.HANDLED_TYPES == frozenset(ROUTES)
    for not_ours in (M.CLIENT_BATCH_SUBMIT_REQUEST, M.CLIENT_BATCH_STATUS_REQUEST,
                     M.CLIENT_EVENTS_SUBSCRIBE_REQUEST, M.CLIENT_STATE_CURRENT_REQUEST):
        assert not_ours not in q.HANDLED_TYPES
        with pytest.raises(ValueError):
            q.handle(not_ours, b"")


@pytest.mark.parametrize("message_type", sorted(ROUTES))
@pytest.mark.parametrize("content", [b"\x0a\x05ab", b"\xff\xff\xff", b"\x0a\x02\xff\xfe"])
def test_malformed_content_gets_the_error_status(q, message_type, content):
    _, response_cls, response_type = ROUTES[message_type]
    got_type, body = q.handle(message_type, content)
    assert got_type == response_type
    response = response_cls.FromString(body)
    # Field 1 with a length-delimited wire type is just an unknown field to requests whose
    # field 1 is not a string (or that have no fields): those parse, and are answered.
    parses = content == b"\x0a\x02\xff\xfe" and message_type in (
        M.CLIENT_PEERS_GET_REQUEST, M.CLIENT_STATUS_GET_REQUEST, M.CLIENT_BLOCK_GET_BY_NUM_REQUEST)
    if parses:
        assert response.status == response_cls.OK
    elif message_type in (M.CLIENT_PEERS_GET_REQUEST, M.CLIENT_STATUS_GET_REQUEST):
        assert response.status == response_cls.ERROR  # these enums have no INTERNAL_ERROR
    else:
        assert response.status == response_cls.INTERNAL_ERROR


def test_unexpected_store_failure_is_internal_error_not_an_exception(chain, monkeypatch):
    q = chain.queries()

    def broken(*_):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(chain.store, "block_by_id", broken)
    r = ask(q, pb.ClientBlockGetByIdRequest(block_id=chain.blocks[1].header_signature))
    assert r.status == r.INTERNAL_ERROR


# --- before genesis -----------------------------------------------------------------------


def test_not_ready_before_genesis(empty_store):
    q = ClientQueries(empty_store, MerkleRadix(empty_store.get_node))
    for request in (pb.ClientBlockListRequest(), pb.ClientBatchListRequest(), pb.ClientTransactionListRequest(),
                    pb.ClientStateListRequest(), pb.ClientStateGetRequest(address=addr("x"))):
        r = ask(q, request)
        assert r.status == r.NOT_READY, type(request).__name__
    # An explicit head cannot exist yet, and the get requests simply find nothing.
    r = ask(q, pb.ClientBlockListRequest(head_id=UNKNOWN_ID))
    assert r.status == r.NO_ROOT
    r = ask(q, pb.ClientBlockGetByNumRequest(block_num=0))
    assert r.status == r.NO_RESOURCE
    r = ask(q, pb.ClientBatchGetRequest(batch_id=UNKNOWN_ID))
    assert r.status == r.NO_RESOURCE
    # An explicit state root needs no chain: the empty tree is known, and empty.
    r = ask(q, pb.ClientStateListRequest(state_root=EMPTY_ROOT))
    assert r.status == r.NO_RESOURCE and r.state_root == EMPTY_ROOT


def test_genesis_only_chain_has_blocks_but_no_batches(empty_store):
    signer = PrivateKey.generate()
    c = Chain(empty_store, MerkleRadix(empty_store.get_node))
    _commit(c, signer, [])
    q = c.queries()
    r = ask(q, pb.ClientBlockListRequest())
    assert r.status == r.OK and ids(r.blocks) == [c.blocks[0].header_signature]
    for request in (pb.ClientBatchListRequest(), pb.ClientTransactionListRequest(),
                    pb.ClientBatchListRequest(paging=paging(start=UNKNOWN_ID))):
        r = ask(q, request)
        # An empty list is NO_RESOURCE even with a start that matches nothing (as the reference).
        assert r.status == r.NO_RESOURCE and r.head_id == c.blocks[0].header_signature
    r = ask(q, pb.ClientStateListRequest())
    assert r.status == r.NO_RESOURCE and r.state_root == EMPTY_ROOT


# --- blocks -------------------------------------------------------------------------------


def test_block_list_default_is_newest_first_from_chain_head(chain, q):
    r = ask(q, pb.ClientBlockListRequest())
    assert r.status == r.OK
    assert ids(r.blocks) == ids(reversed(chain.blocks))
    assert r.blocks[0] == chain.blocks[-1]  # whole blocks, batches included
    assert r.head_id == chain.blocks[-1].header_signature
    assert (r.paging.start, r.paging.next, r.paging.limit) == (hexnum(4), "", 100)


def test_block_list_pages_by_hex_block_number(chain, q):
    seen, start, pages = [], "", 0
    while True:
        r = ask(q, pb.ClientBlockListRequest(paging=paging(start, 2)))
        assert r.status == r.OK and r.paging.limit == 2
        assert r.paging.start == (start or hexnum(4))
        seen += ids(r.blocks)
        pages += 1
        if not r.paging.next:
            break
        start = r.paging.next
    assert pages == 3 and seen == ids(reversed(chain.blocks))
    r = ask(q, pb.ClientBlockListRequest(paging=paging(hexnum(2), 2)))
    assert ids(r.blocks) == ids([chain.blocks[2], chain.blocks[1]]) and r.paging.next == hexnum(0)
    # Any hex spelling of a number is a valid start.
    r = ask(q, pb.ClientBlockListRequest(paging=paging("0x3", 1)))
    assert ids(r.blocks) == [chain.blocks[3].header_signature] and r.paging.start == hexnum(3)


def test_block_list_reverse_is_oldest_first(chain, q):
    r = ask(q, pb.ClientBlockListRequest(sorting=sort("block_num")))
    assert ids(r.blocks) == ids(chain.blocks)
    r = ask(q, pb.ClientBlockListRequest(sorting=sort("block_num"), paging=paging(hexnum(2), 2)))
    assert ids(r.blocks) == ids(chain.blocks[2:4])
    assert (r.paging.start, r.paging.next) == (hexnum(2), hexnum(4))
    # reverse=False with the right key is just the default order.
    r = ask(q, pb.ClientBlockListRequest(sorting=sort("block_num", reverse=False)))
    assert ids(r.blocks) == ids(reversed(chain.blocks))


def test_block_list_with_older_head(chain, q):
    head = chain.blocks[2].header_signature
    r = ask(q, pb.ClientBlockListRequest(head_id=head))
    assert r.head_id == head and ids(r.blocks) == ids(reversed(chain.blocks[:3]))
    r = ask(q, pb.ClientBlockListRequest(head_id=head, sorting=sort("block_num"), paging=paging(hexnum(1), 2)))
    assert ids(r.blocks) == ids(chain.blocks[1:3]) and r.paging.next == ""  # nothing past the head
    r = ask(q, pb.ClientBlockListRequest(head_id=head, paging=paging(hexnum(3))))
    assert r.status == r.INVALID_PAGING


def test_block_list_filtered_by_ids_keeps_request_order_and_head(chain, q):
    wanted = [chain.blocks[3].header_signature, chain.blocks[1].header_signature, UNKNOWN_ID]
    r = ask(q, pb.ClientBlockListRequest(block_ids=wanted))
    assert r.status == r.OK and ids(r.blocks) == wanted[:2]
    assert r.paging == pb.ClientPagingResponse()
    r = ask(q, pb.ClientBlockListRequest(block_ids=wanted, head_id=chain.blocks[2].header_signature))
    assert ids(r.blocks) == wanted[1:2]
    r = ask(q, pb.ClientBlockListRequest(block_ids=[UNKNOWN_ID]))
    assert r.status == r.NO_RESOURCE and r.head_id == chain.blocks[-1].header_signature
    r = ask(q, pb.ClientBlockListRequest(block_ids=[wanted[0], "abc"]))
    assert r.status == r.INVALID_ID


@pytest.mark.parametrize("head_id", ["abc", "AB" * 64, UNKNOWN_ID])
def test_block_list_bad_head_is_no_root(q, head_id):
    r = ask(q, pb.ClientBlockListRequest(head_id=head_id))
    assert r.status == r.NO_ROOT


@pytest.mark.parametrize("keys", [["default"], ["block_num", "x"], ["header_signature"], []])
def test_block_list_invalid_sort(q, keys):
    r = ask(q, pb.ClientBlockListRequest(sorting=[pb.ClientSortControls(keys=keys, reverse=True)]))
    assert r.status == r.INVALID_SORT


@pytest.mark.parametrize("start,limit", [("5", 0), ("0x", 0), ("0xzz", 0), (hexnum(5), 0), ("", -1),
                                         ("0x" + "f" * 17, 0)])
def test_block_list_invalid_paging(q, start, limit):
    r = ask(q, pb.ClientBlockListRequest(paging=paging(start, limit)))
    assert r.status == r.INVALID_PAGING


def test_limit_is_capped_at_1000(q):
    r = ask(q, pb.ClientBlockListRequest(paging=paging(limit=5000)))
    assert r.status == r.OK and r.paging.limit == 1000


def test_block_gets(chain, q):
    block = chain.blocks[3]
    batch = block.batches[1]
    txn = batch.transactions[1]
    for request in (pb.ClientBlockGetByIdRequest(block_id=block.header_signature),
                    pb.ClientBlockGetByNumRequest(block_num=3),
                    pb.ClientBlockGetByTransactionIdRequest(transaction_id=txn.header_signature),
                    pb.ClientBlockGetByBatchIdRequest(batch_id=batch.header_signature)):
        r = ask(q, request)
        assert r.status == r.OK and r.block == block, type(request).__name__
    r = ask(q, pb.ClientBlockGetByNumRequest(block_num=0))
    assert r.block == chain.blocks[0]
    for request in (pb.ClientBlockGetByIdRequest(block_id=UNKNOWN_ID),
                    pb.ClientBlockGetByNumRequest(block_num=5),
                    pb.ClientBlockGetByNumRequest(block_num=2**64 - 1),
                    pb.ClientBlockGetByTransactionIdRequest(transaction_id=UNKNOWN_ID),
                    pb.ClientBlockGetByBatchIdRequest(batch_id=UNKNOWN_ID)):
        r = ask(q, request)
        assert r.status == r.NO_RESOURCE and not r.HasField("block"), type(request).__name__
    for request in (pb.ClientBlockGetByIdRequest(block_id=""),
                    pb.ClientBlockGetByIdRequest(block_id=block.header_signature.upper()),
                    pb.ClientBlockGetByTransactionIdRequest(transaction_id="12"),
                    pb.ClientBlockGetByBatchIdRequest(batch_id=batch.header_signature + "0")):
        r = ask(q, request)
        assert r.status == r.INVALID_ID, type(request).__name__


# --- batches and transactions -------------------------------------------------------------


def test_batch_list_default_and_reverse_order(chain, q):
    expected = chain.batches_newest_first()
    assert len(expected) == 7
    r = ask(q, pb.ClientBatchListRequest())
    assert r.status == r.OK and ids(r.batches) == ids(expected)
    assert r.head_id == chain.blocks[-1].header_signature
    assert (r.paging.start, r.paging.next, r.paging.limit) == (expected[0].header_signature, "", 100)
    r = ask(q, pb.ClientBatchListRequest(sorting=sort("default")))
    assert ids(r.batches) == ids(reversed(expected))  # the exact reverse, within blocks too


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("limit", [1, 2, 3, 7])
def test_batch_list_paging_walks_the_whole_list(chain, q, reverse, limit):
    expected = ids(chain.batches_newest_first())
    if reverse:
        expected.reverse()
    sorting = sort("default") if reverse else []
    seen, start = [], ""
    while True:
        r = ask(q, pb.ClientBatchListRequest(paging=paging(start, limit), sorting=sorting))
        assert r.status == r.OK and r.paging.limit == limit
        assert r.paging.start == r.batches[0].header_signature
        assert len(r.batches) == min(limit, len(expected) - len(seen))
        seen += ids(r.batches)
        if not r.paging.next:
            break
        assert r.paging.next == expected[len(seen)]
        start = r.paging.next
    assert seen == expected


def test_batch_list_with_older_head_and_starts(chain, q):
    head = chain.blocks[2].header_signature
    expected = chain.batches_newest_first(2)
    r = ask(q, pb.ClientBatchListRequest(head_id=head))
    assert r.head_id == head and ids(r.batches) == ids(expected)
    r = ask(q, pb.ClientBatchListRequest(head_id=head, sorting=sort("default")))
    assert ids(r.batches) == ids(reversed(expected))
    # A start above the head, or unknown, is not in the list.
    above = chain.blocks[3].batches[0].header_signature
    for start in (above, UNKNOWN_ID, "nonsense"):
        r = ask(q, pb.ClientBatchListRequest(head_id=head, paging=paging(start)))
        assert r.status == r.INVALID_PAGING, start
    # Starting in the middle of a block, both orders.
    mid = chain.blocks[3].batches[1].header_signature
    r = ask(q, pb.ClientBatchListRequest(paging=paging(mid, 2)))
    assert ids(r.batches) == ids(chain.blocks[3].batches[1:3])
    assert r.paging.next == chain.blocks[2].batches[0].header_signature
    r = ask(q, pb.ClientBatchListRequest(paging=paging(mid, 2), sorting=sort("default")))
    assert ids(r.batches) == [mid, chain.blocks[3].batches[0].header_signature]
    assert r.paging.next == chain.blocks[4].batches[0].header_signature


def test_batch_list_filtered_by_ids(chain, q):
    b = chain.blocks
    wanted = [b[1].batches[1].header_signature, b[4].batches[0].header_signature,
              UNKNOWN_ID, b[3].batches[2].header_signature]
    r = ask(q, pb.ClientBatchListRequest(batch_ids=wanted))
    assert r.status == r.OK and ids(r.batches) == [wanted[0], wanted[1], wanted[3]]
    r = ask(q, pb.ClientBatchListRequest(batch_ids=wanted, sorting=sort("default")))
    assert ids(r.batches) == [wanted[3], wanted[1], wanted[0]]
    r = ask(q, pb.ClientBatchListRequest(batch_ids=wanted, head_id=b[3].header_signature))
    assert ids(r.batches) == [wanted[0], wanted[3]]
    r = ask(q, pb.ClientBatchListRequest(batch_ids=wanted, paging=paging(wanted[1], 1)))
    assert ids(r.batches) == [wanted[1]] and r.paging.next == wanted[3]
    r = ask(q, pb.ClientBatchListRequest(batch_ids=wanted, paging=paging(b[2].batches[0].header_signature)))
    assert r.status == r.INVALID_PAGING  # committed, but not in this filtered list
    r = ask(q, pb.ClientBatchListRequest(batch_ids=[UNKNOWN_ID]))
    assert r.status == r.NO_RESOURCE and r.head_id == b[-1].header_signature
    r = ask(q, pb.ClientBatchListRequest(batch_ids=[wanted[0], "xyz"]))
    assert r.status == r.INVALID_ID


@pytest.mark.parametrize("request_cls", [pb.ClientBatchListRequest, pb.ClientTransactionListRequest])
def test_batch_and_transaction_list_errors(q, request_cls):
    assert ask(q, request_cls(head_id=UNKNOWN_ID)).status == pb.ClientBatchListResponse.NO_ROOT
    assert ask(q, request_cls(head_id="12")).status == pb.ClientBatchListResponse.NO_ROOT
    for keys in (["block_num"], ["default", "x"], ["header_signature"]):
        r = ask(q, request_cls(sorting=[pb.ClientSortControls(keys=keys)]))
        assert r.status == r.INVALID_SORT, keys
    assert ask(q, request_cls(paging=paging(limit=-5))).status == pb.ClientBatchListResponse.INVALID_PAGING
    assert ask(q, request_cls(paging=paging(start=UNKNOWN_ID))).status == pb.ClientBatchListResponse.INVALID_PAGING


def test_transaction_list(chain, q):
    expected = chain.txns_newest_first()
    assert len(expected) == 10
    r = ask(q, pb.ClientTransactionListRequest())
    assert r.status == r.OK and ids(r.transactions) == ids(expected)
    assert r.transactions[0].payload == expected[0].payload
    r = ask(q, pb.ClientTransactionListRequest(sorting=sort("default")))
    assert ids(r.transactions) == ids(reversed(expected))
    # Pages of 4 from the 3rd transaction of block 3 (second of its middle batch).
    start = chain.blocks[3].batches[1].transactions[1].header_signature
    at = ids(expected).index(start)
    r = ask(q, pb.ClientTransactionListRequest(paging=paging(start, 4)))
    assert ids(r.transactions) == ids(expected[at:at + 4]) and r.paging.next == expected[at + 4].header_signature
    head = chain.blocks[1].header_signature
    r = ask(q, pb.ClientTransactionListRequest(head_id=head))
    assert ids(r.transactions) == ids(chain.txns_newest_first(1))
    r = ask(q, pb.ClientTransactionListRequest(head_id=head, paging=paging(start)))
    assert r.status == r.INVALID_PAGING
    wanted = [expected[5].header_signature, expected[0].header_signature, expected[5].header_signature]
    r = ask(q, pb.ClientTransactionListRequest(transaction_ids=wanted))
    assert ids(r.transactions) == wanted  # repeated ids repeat, as in the reference
    r = ask(q, pb.ClientTransactionListRequest(transaction_ids=["0" * 127]))
    assert r.status == r.INVALID_ID


def test_batch_and_transaction_get(chain, q):
    batch = chain.blocks[3].batches[1]
    r = ask(q, pb.ClientBatchGetRequest(batch_id=batch.header_signature))
    assert r.status == r.OK and r.batch == batch
    r = ask(q, pb.ClientTransactionGetRequest(transaction_id=batch.transactions[1].header_signature))
    assert r.status == r.OK and r.transaction == batch.transactions[1]
    r = ask(q, pb.ClientBatchGetRequest(batch_id=UNKNOWN_ID))
    assert r.status == r.NO_RESOURCE and not r.HasField("batch")
    r = ask(q, pb.ClientTransactionGetRequest(transaction_id=UNKNOWN_ID))
    assert r.status == r.NO_RESOURCE
    for bad in ("", "g" * 128, batch.header_signature[:-1]):
        assert ask(q, pb.ClientBatchGetRequest(batch_id=bad)).status == pb.ClientBatchGetResponse.INVALID_ID
        assert ask(q, pb.ClientTransactionGetRequest(transaction_id=bad)).status == \
            pb.ClientTransactionGetResponse.INVALID_ID


# --- state --------------------------------------------------------------------------------


def test_state_list_at_head(chain, q):
    state = chain.state[-1]
    r = ask(q, pb.ClientStateListRequest())
    assert r.status == r.OK and r.state_root == chain.roots[-1]
    assert [(e.address, e.data) for e in r.entries] == sorted(state.items())
    assert (r.paging.start, r.paging.next, r.paging.limit) == (min(state), "", 100)
    r = ask(q, pb.ClientStateListRequest(sorting=sort("default")))
    assert [e.address for e in r.entries] == sorted(state, reverse=True)


def test_state_list_prefix_root_override_and_paging(chain, q):
    under = sorted(a for a in chain.state[-1] if a.startswith(PREFIX))
    r = ask(q, pb.ClientStateListRequest(address=PREFIX))
    assert [e.address for e in r.entries] == under
    # An older root shows the older values, and the deleted address.
    r = ask(q, pb.ClientStateListRequest(state_root=chain.roots[1], address=PREFIX))
    assert r.state_root == chain.roots[1]
    assert [(e.address, e.data) for e in r.entries] == sorted(chain.state[1].items())
    # Pages of 3, forwards and backwards.
    for reverse in (False, True):
        expected = sorted(under, reverse=reverse)
        seen, start = [], ""
        while True:
            r = ask(q, pb.ClientStateListRequest(address=PREFIX, paging=paging(start, 3),
                                                 sorting=sort("default") if reverse else []))
            assert r.status == r.OK and r.paging.start == r.entries[0].address
            seen += [e.address for e in r.entries]
            if not r.paging.next:
                break
            assert r.paging.next == expected[len(seen)]
            start = r.paging.next
        assert seen == expected


def test_state_list_errors(chain, q):
    other = addr("other")
    k1 = addr("k1", PREFIX)
    cases = [
        (pb.ClientStateListRequest(state_root="abc"), "INVALID_ROOT"),
        (pb.ClientStateListRequest(state_root="A" * 64), "INVALID_ROOT"),
        (pb.ClientStateListRequest(state_root="ab" * 32), "NO_ROOT"),
        (pb.ClientStateListRequest(address="abc"), "INVALID_ADDRESS"),
        (pb.ClientStateListRequest(address="AB"), "INVALID_ADDRESS"),
        (pb.ClientStateListRequest(address="ab" * 36), "INVALID_ADDRESS"),
        (pb.ClientStateListRequest(sorting=sort("address")), "INVALID_SORT"),
        (pb.ClientStateListRequest(paging=paging(limit=-1)), "INVALID_PAGING"),
        (pb.ClientStateListRequest(paging=paging(start=addr("absent"))), "INVALID_PAGING"),
        (pb.ClientStateListRequest(paging=paging(start=k1[:10])), "INVALID_PAGING"),
        (pb.ClientStateListRequest(paging=paging(start="zz")), "INVALID_PAGING"),
        # in state, but not under the requested prefix
        (pb.ClientStateListRequest(address=PREFIX, paging=paging(start=other)), "INVALID_PAGING"),
        # deleted at the head
        (pb.ClientStateListRequest(paging=paging(start=addr("k0", PREFIX))), "INVALID_PAGING"),
    ]
    for request, status in cases:
        r = ask(q, request)
        assert r.status == getattr(r, status), (request, status)
    r = ask(q, pb.ClientStateListRequest(address="ee"))
    assert r.status == r.NO_RESOURCE and r.state_root == chain.roots[-1] and not r.entries


def test_state_get(chain, q):
    k0, k4 = addr("k0", PREFIX), addr("k4", PREFIX)
    r = ask(q, pb.ClientStateGetRequest(address=k4))
    assert r.status == r.OK and r.value == b"w4" and r.state_root == chain.roots[-1]
    r = ask(q, pb.ClientStateGetRequest(address=k4, state_root=chain.roots[1]))
    assert r.value == b"v4" and r.state_root == chain.roots[1]
    r = ask(q, pb.ClientStateGetRequest(address=k0, state_root=chain.roots[3]))
    assert r.status == r.OK and r.value == b"v0"
    cases = [
        (k0, "", "NO_RESOURCE"),                 # deleted at the head
        (addr("absent"), "", "NO_RESOURCE"),
        (PREFIX, "", "NO_RESOURCE"),             # an inner node holds no value
        ("", "", "NO_RESOURCE"),
        (k4[:-1], "", "INVALID_ADDRESS"),
        (k4.upper(), "", "INVALID_ADDRESS"),
        (k4 + "00", "", "INVALID_ADDRESS"),
        (k4, "xyz", "INVALID_ROOT"),
        (k4, "cd" * 32, "NO_ROOT"),
    ]
    for address, root, status in cases:
        r = ask(q, pb.ClientStateGetRequest(address=address, state_root=root))
        assert r.status == getattr(r, status), (address, root, status)


# --- receipts, peers, status --------------------------------------------------------------


def test_receipts(chain, q):
    txns = chain.txns_newest_first()
    wanted = [txns[3].header_signature, txns[0].header_signature]
    r = ask(q, pb.ClientReceiptGetRequest(transaction_ids=wanted))
    assert r.status == r.OK and list(r.receipts) == [chain.receipts[i] for i in wanted]
    r = ask(q, pb.ClientReceiptGetRequest(transaction_ids=wanted + [UNKNOWN_ID]))
    assert r.status == r.NO_RESOURCE and not r.receipts
    r = ask(q, pb.ClientReceiptGetRequest(transaction_ids=["nope"]))
    assert r.status == r.INVALID_ID
    r = ask(q, pb.ClientReceiptGetRequest())
    assert r.status == r.OK and not r.receipts


def test_peers_and_status(chain):
    q = chain.queries(endpoint="tcp://node0:8800", peers=lambda: ["tcp://b:8800", "tcp://a:8800"])
    r = ask(q, pb.ClientPeersGetRequest())
    assert r.status == r.OK and list(r.peers) == ["tcp://b:8800", "tcp://a:8800"]
    r = ask(q, pb.ClientStatusGetRequest())
    assert r.status == r.OK and r.endpoint == "tcp://node0:8800"
    assert [p.endpoint for p in r.peers] == ["tcp://a:8800", "tcp://b:8800"]
    r = ask(chain.queries(), pb.ClientStatusGetRequest())
    assert r.status == r.OK and r.endpoint == "" and not r.peers


# --- laziness -----------------------------------------------------------------------------


def test_lists_read_only_about_a_page_of_blocks(tmp_path, monkeypatch):
    """On a 60-block chain, a page of 2 (and a start deep in the chain) reads a few blocks."""
    store = ChainStore(tmp_path)
    c = Chain(store, MerkleRadix(store.get_node))
    signer = PrivateKey.generate()
    _commit(c, signer, [])
    for i in range(60):
        _commit(c, signer, [_batch(signer, 1, f"b{i}")], {addr(f"s{i}"): b"x"})
    q = c.queries()
    read = []
    for name in ("blocks_descending", "blocks_ascending"):
        original = getattr(store, name)

        def counting(from_num, _original=original):
            for block in _original(from_num):
                read.append(block)
                yield block

        monkeypatch.setattr(store, name, counting)

    deep = c.blocks[5].batches[0].header_signature
    deep_txn = c.blocks[5].batches[0].transactions[0].header_signature
    requests = [
        pb.ClientBlockListRequest(paging=paging(limit=2)),
        pb.ClientBlockListRequest(paging=paging(limit=2), sorting=sort("block_num")),
        pb.ClientBatchListRequest(paging=paging(limit=2)),
        pb.ClientBatchListRequest(paging=paging(deep, 2)),
        pb.ClientBatchListRequest(paging=paging(deep, 2), sorting=sort("default")),
        pb.ClientTransactionListRequest(paging=paging(deep_txn, 2)),
    ]
    for request in requests:
        read.clear()
        r = ask(q, request)
        assert r.status == r.OK and r.paging.next
        assert len(read) <= 4, (type(request).__name__, len(read))
    r = ask(q, pb.ClientBatchListRequest(paging=paging(deep, 2)))
    assert ids(r.batches) == [deep, c.blocks[4].batches[0].header_signature]
    store.close()
