"""A tiny validator that answers the CLIENT_* requests from an in-memory chain, for tests.

It binds a zmq.asyncio ROUTER on 127.0.0.1 and follows Sawtooth 1.2's validator side
(validator/sawtooth_validator/state/client_handlers.py, batch_tracker.py): id and address
checks, head / NO_ROOT / NOT_READY rules, the _Pager (start is an id or address, limit
defaults to 100 and is capped at 1000, `next` is the id after the page), block paging by
"0x%016x" block numbers, and batch-status waits that end when nothing is PENDING.

Its "transaction processor" is trivial: a transaction writes its payload to each of its
outputs, unless the payload starts with b"invalid:", which makes it (and its batch) INVALID
with the rest of the payload as the processor's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket

import zmq
import zmq.asyncio
from google.protobuf.message import DecodeError

from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.signing import PrivateKey, verify

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
DEFAULT_WAIT = 300
NULL_BLOCK_ID = "0000000000000000"
FAMILY = "intkey-test"
_ID_RE = re.compile("[0-9a-f]{128}")
_NAMESPACE_RE = re.compile("^([0-9a-f]{2}){0,35}$")
_ROOT_RE = re.compile("[0-9a-f]{64}")

M = pb.Message


class _Failed(Exception):
    """Answer with this status (the client_handlers _ResponseFailed)."""

    def __init__(self, status: int):
        self.status = status


def state_root(state: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for address in sorted(state):
        digest.update(address.encode() + b"=" + state[address] + b";")
    return digest.hexdigest()


def block_num_hex(num: int) -> str:
    return f"0x{num:016x}"


def address(name: str) -> str:
    """A 70-char address in a test namespace, derived from name."""
    return "1cf126" + hashlib.sha512(name.encode()).hexdigest()[:64]


def make_test_batch(signer: PrivateKey, writes: dict[str, bytes]) -> "pb.Batch":
    """One batch with one transaction per (address, payload)."""
    txns = [make_transaction(signer, FAMILY, "1.0", payload, [addr], [addr]) for addr, payload in writes.items()]
    return make_batch(signer, txns)


def _batch_is_valid(batch) -> bool:
    """Signatures and structure, as the validator's BatchListSignature/StructureVerifier check."""
    try:
        header = pb.BatchHeader.FromString(batch.header)
    except Exception:
        return False
    if not verify(header.signer_public_key, batch.header_signature, batch.header):
        return False
    if list(header.transaction_ids) != [t.header_signature for t in batch.transactions]:
        return False
    for txn in batch.transactions:
        try:
            txn_header = pb.TransactionHeader.FromString(txn.header)
        except Exception:
            return False
        if txn_header.batcher_public_key != header.signer_public_key:
            return False
        if not verify(txn_header.signer_public_key, txn.header_signature, txn.header):
            return False
        if hashlib.sha512(txn.payload).hexdigest() != txn_header.payload_sha512:
            return False
    return True


class ClientWirePeer:
    def __init__(self, *, genesis: bool = True):
        self.signer = PrivateKey.generate()
        self.blocks: list = []  # index == block_num
        self._block_by_id: dict[str, object] = {}
        self._batch_by_id: dict[str, object] = {}
        self._txn_by_id: dict[str, object] = {}
        self.states: dict[str, dict[str, bytes]] = {}  # state root -> snapshot
        self.pending: dict[str, object] = {}  # batch id -> batch, in arrival order
        self.invalid: dict[str, list[dict]] = {}  # batch id -> invalid transaction infos
        self.receipts: dict[str, object] = {}
        self.endpoint = "tcp://127.0.0.1:8800"
        self.peers = ["tcp://10.0.0.2:8800", "tcp://10.0.0.1:8800"]
        self.queue_full = 0  # answer QUEUE_FULL to this many next submissions
        self.mute = False  # swallow requests, to make the REST API time out
        self.received: list[int] = []  # message types, in arrival order
        self.url = ""
        self._changed: asyncio.Condition | None = None
        self._socket = None
        self._tasks: set[asyncio.Task] = set()
        if genesis:
            self._append_block([])

    # -- the chain -----------------------------------------------------------------------------

    @property
    def head(self):
        return self.blocks[-1] if self.blocks else None

    def head_state(self) -> dict[str, bytes]:
        if not self.blocks:
            return {}
        return self.states[pb.BlockHeader.FromString(self.head.header).state_root_hash]

    def _append_block(self, batches) -> "pb.Block":
        state = dict(self.head_state())
        for batch in batches:
            for txn in batch.transactions:
                header = pb.TransactionHeader.FromString(txn.header)
                changes = []
                for out in header.outputs:
                    state[out] = txn.payload
                    changes.append(pb.StateChange(address=out, value=txn.payload, type=pb.StateChange.SET))
                self.receipts[txn.header_signature] = pb.TransactionReceipt(
                    transaction_id=txn.header_signature, state_changes=changes,
                    events=[pb.Event(event_type="test/written", attributes=[pb.Event.Attribute(key="n", value="1")])],
                    data=[b"ok"])
                self._txn_by_id[txn.header_signature] = txn
            self._batch_by_id[batch.header_signature] = batch
        root = state_root(state)
        self.states[root] = state
        header = pb.BlockHeader(
            block_num=len(self.blocks),
            previous_block_id=self.head.header_signature if self.blocks else NULL_BLOCK_ID,
            signer_public_key=self.signer.public_key().as_hex(),
            batch_ids=[b.header_signature for b in batches],
            consensus=b"Devmode",
            state_root_hash=root,
        )
        header_bytes = header.SerializeToString()
        block = pb.Block(header=header_bytes, header_signature=self.signer.sign(header_bytes), batches=batches)
        self.blocks.append(block)
        self._block_by_id[block.header_signature] = block
        return block

    def add_block(self, batches) -> "pb.Block":
        """Commit these batches directly (seeding), applying them as the processor would."""
        block = self._append_block(list(batches))
        self._notify()
        return block

    def commit_pending(self) -> "pb.Block":
        """Publish a block with every pending valid batch; invalid ones become INVALID."""
        good = []
        for batch_id, batch in list(self.pending.items()):
            bad = [t for t in batch.transactions if t.payload.startswith(b"invalid:")]
            if bad:
                self.invalid[batch_id] = [
                    {"transaction_id": t.header_signature, "message": t.payload[len(b"invalid:"):].decode(),
                     "extended_data": b"\x01\x02"} for t in bad]
            else:
                good.append(batch)
        self.pending.clear()
        block = self._append_block(good)
        self._notify()
        return block

    def _notify(self) -> None:
        if self._changed is not None:
            self._spawn(self._notify_async())

    async def _notify_async(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def status_of(self, batch_id: str) -> int:
        S = pb.ClientBatchStatus
        if batch_id in self._batch_by_id:
            return S.COMMITTED
        if batch_id in self.invalid:
            return S.INVALID
        if batch_id in self.pending:
            return S.PENDING
        return S.UNKNOWN

    # -- wire ----------------------------------------------------------------------------------

    async def start(self) -> str:
        self._changed = asyncio.Condition()
        self._socket = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        port = self._socket.bind_to_random_port("tcp://127.0.0.1")
        self.url = f"tcp://127.0.0.1:{port}"
        self._spawn(self._serve())
        return self.url

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    async def _serve(self) -> None:
        while True:
            identity, frame = await self._socket.recv_multipart()
            message = pb.Message.FromString(frame)
            self.received.append(message.message_type)
            if self.mute:
                continue
            # Each request in its own task: a waiting batch-status request must not block others.
            self._spawn(self._answer(identity, message))

    async def _answer(self, identity: bytes, message) -> None:
        handler = self._HANDLERS.get(message.message_type)
        if handler is None:
            return
        request_cls, response_cls, response_type, method = handler
        try:
            response = await method(self, request_cls.FromString(message.content), response_cls)
        except _Failed as failed:
            response = response_cls(status=failed.status)
        except DecodeError:
            response = response_cls(status=2)  # INTERNAL_ERROR (ERROR for peers/status)
        reply = pb.Message(message_type=response_type, correlation_id=message.correlation_id,
                           content=response.SerializeToString())
        await self._socket.send_multipart([identity, reply.SerializeToString()])

    # -- helpers shared by handlers (client_handlers._ClientRequestHandler) ----------------------

    def _chain_head(self, R):
        if not self.blocks:
            raise _Failed(R.NOT_READY)
        return self.head

    def _head_block(self, request, R):
        if request.head_id:
            if not _ID_RE.fullmatch(request.head_id) or request.head_id not in self._block_by_id:
                raise _Failed(R.NO_ROOT)
            return self._block_by_id[request.head_id]
        return self._chain_head(R)

    @staticmethod
    def _validate_ids(ids, R) -> None:
        if any(not _ID_RE.fullmatch(i) for i in ids):
            raise _Failed(R.INVALID_ID)

    @staticmethod
    def _is_reverse(sorting, key: str, R) -> bool:
        if not sorting:
            return False
        if list(sorting[0].keys) != [key]:
            raise _Failed(R.INVALID_SORT)
        return sorting[0].reverse

    @staticmethod
    def _paginate(request, resources, key, R):
        """client_handlers._Pager: returns (page, ClientPagingResponse)."""
        if not resources:
            return resources, pb.ClientPagingResponse()
        limit = min(request.paging.limit, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE
        ids = [key(r) for r in resources]
        if request.paging.start:
            if request.paging.start not in ids:
                raise _Failed(R.INVALID_PAGING)
            start = ids.index(request.paging.start)
        else:
            start = 0
        page = resources[start:start + limit]
        nxt = ids[start + limit] if start + limit < len(resources) else ""
        return page, pb.ClientPagingResponse(next=nxt, start=ids[start], limit=limit)

    def _chain_from(self, head_id: str):
        """Blocks from head_id back to genesis, newest first."""
        block = self._block_by_id.get(head_id)
        while block is not None:
            yield block
            block = self._block_by_id.get(pb.BlockHeader.FromString(block.header).previous_block_id)

    def _list_store_resources(self, request, head_id, filter_ids, by_id, xform):
        if filter_ids and not request.head_id:
            return [by_id[i] for i in filter_ids if i in by_id]  # unknown ids are omitted
        resources = [r for block in self._chain_from(head_id) for r in xform(block)]
        if request.head_id and filter_ids:
            matches = {r.header_signature: r for r in resources}
            resources = [matches[i] for i in filter_ids if i in matches]
        return resources

    def _set_root(self, request, R) -> str:
        if request.state_root:
            if not _ROOT_RE.fullmatch(request.state_root):
                raise _Failed(R.INVALID_ROOT)
            root = request.state_root
        else:
            root = pb.BlockHeader.FromString(self._chain_head(R).header).state_root_hash
        if root not in self.states:
            raise _Failed(R.NO_ROOT)
        return root

    # -- handlers ------------------------------------------------------------------------------

    async def _batch_submit(self, request, R):
        if self.queue_full > 0:
            self.queue_full -= 1
            return R(status=R.QUEUE_FULL)
        if not all(_batch_is_valid(b) for b in request.batches):
            return R(status=R.INVALID_BATCH)
        for batch in request.batches:
            if self.status_of(batch.header_signature) == pb.ClientBatchStatus.UNKNOWN:
                self.pending[batch.header_signature] = batch  # PENDING before we answer OK
        self._notify()
        return R(status=R.OK)

    async def _batch_status(self, request, R):
        self._validate_ids(request.batch_ids, R)
        ids = list(request.batch_ids)
        if request.wait:
            timeout = request.timeout or DEFAULT_WAIT  # 0 means the default, as in 1.2
            pending = lambda: any(self.status_of(i) == pb.ClientBatchStatus.PENDING for i in ids)  # noqa: E731
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait_for(lambda: not pending()), timeout)
            except TimeoutError:
                pass
        if not ids:
            return R(status=R.NO_RESOURCE)
        statuses = []
        for batch_id in ids:
            status = self.status_of(batch_id)
            invalid = self.invalid.get(batch_id, []) if status == pb.ClientBatchStatus.INVALID else []
            statuses.append(pb.ClientBatchStatus(
                batch_id=batch_id, status=status,
                invalid_transactions=[pb.ClientBatchStatus.InvalidTransaction(**i) for i in invalid]))
        return R(status=R.OK, batch_statuses=statuses)

    async def _state_list(self, request, R):
        root = self._set_root(request, R)
        if not _NAMESPACE_RE.fullmatch(request.address):
            raise _Failed(R.INVALID_ADDRESS)
        entries = [R.Entry(address=a, data=v) for a, v in sorted(self.states[root].items())
                   if a.startswith(request.address)]
        if self._is_reverse(request.sorting, "default", R):
            entries.reverse()
        entries, paging = self._paginate(request, entries, lambda e: e.address, R)
        status = R.OK if entries else R.NO_RESOURCE
        return R(status=status, state_root=root, paging=paging, entries=entries)

    async def _state_get(self, request, R):
        root = self._set_root(request, R)
        if not _NAMESPACE_RE.fullmatch(request.address) or len(request.address) != 70:
            raise _Failed(R.INVALID_ADDRESS)
        if request.address not in self.states[root]:
            raise _Failed(R.NO_RESOURCE)
        return R(status=R.OK, state_root=root, value=self.states[root][request.address])

    async def _block_list(self, request, R):
        head = self._head_block(request, R)
        head_num = pb.BlockHeader.FromString(head.header).block_num
        self._validate_ids(request.block_ids, R)
        if request.block_ids:
            blocks = [self._block_by_id[i] for i in request.block_ids if i in self._block_by_id]
            blocks = [b for b in blocks if pb.BlockHeader.FromString(b.header).block_num <= head_num]
            paging = pb.ClientPagingResponse()
        else:
            reverse = self._is_reverse(request.sorting, "block_num", R)
            limit = min(request.paging.limit, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE
            if request.paging.start:
                start = request.paging.start
                if not start.startswith("0x"):
                    raise _Failed(R.INVALID_PAGING)
                try:
                    first = int(start, 16)
                except ValueError:
                    raise _Failed(R.INVALID_PAGING) from None
                if first >= len(self.blocks):
                    raise _Failed(R.INVALID_PAGING)  # 1.2 raises IndexError here; see the lead's notes
            else:
                first = 0 if reverse else head_num
            step = 1 if reverse else -1
            nums = []
            n = first
            while 0 <= n < len(self.blocks) and len(nums) <= limit:  # one extra for `next`
                if reverse and n > head_num:
                    break
                nums.append(n)
                n += step
            blocks = [self.blocks[i] for i in nums[:limit]]
            nxt = block_num_hex(nums[limit]) if len(nums) > limit else ""
            paging = pb.ClientPagingResponse(next=nxt, start=block_num_hex(first), limit=limit)
        status = R.OK if blocks else R.NO_RESOURCE
        return R(status=status, head_id=head.header_signature, paging=paging, blocks=blocks)

    async def _block_get(self, request, R):
        return self._get_by_id(R, request.block_id, self._block_by_id, "block")

    async def _batch_list(self, request, R):
        return self._item_list(request, R, request.batch_ids, self._batch_by_id, lambda b: list(b.batches),
                               "batches")

    async def _batch_get(self, request, R):
        return self._get_by_id(R, request.batch_id, self._batch_by_id, "batch")

    async def _txn_list(self, request, R):
        return self._item_list(request, R, request.transaction_ids, self._txn_by_id,
                               lambda b: [t for batch in b.batches for t in batch.transactions], "transactions")

    async def _txn_get(self, request, R):
        return self._get_by_id(R, request.transaction_id, self._txn_by_id, "transaction")

    def _item_list(self, request, R, ids, by_id, items_of, field: str):
        # Batches or transactions: the same list request but for the ids' and the answer's field.
        head_id = self._head_block(request, R).header_signature
        self._validate_ids(ids, R)
        items = self._list_store_resources(request, head_id, list(ids), by_id, items_of)
        if self._is_reverse(request.sorting, "default", R):
            items.reverse()
        items, paging = self._paginate(request, items, lambda i: i.header_signature, R)
        return R(status=R.OK if items else R.NO_RESOURCE, head_id=head_id, paging=paging, **{field: items})

    def _get_by_id(self, R, item_id: str, by_id: dict, field: str):
        self._validate_ids([item_id], R)
        if item_id not in by_id:
            raise _Failed(R.NO_RESOURCE)
        return R(status=R.OK, **{field: by_id[item_id]})

    async def _receipt_get(self, request, R):
        # All or nothing, as the 1.2 receipt store handler: one unknown id -> NO_RESOURCE.
        if any(i not in self.receipts for i in request.transaction_ids):
            raise _Failed(R.NO_RESOURCE)
        return R(status=R.OK, receipts=[self.receipts[i] for i in request.transaction_ids])

    async def _peers_get(self, request, R):
        return R(status=R.OK, peers=self.peers)

    async def _status_get(self, request, R):
        peers = [R.Peer(endpoint=e) for e in sorted(self.peers)]
        return R(status=R.OK, endpoint=self.endpoint, peers=peers)

    _HANDLERS = {
        M.CLIENT_BATCH_SUBMIT_REQUEST: (pb.ClientBatchSubmitRequest, pb.ClientBatchSubmitResponse,
                                        M.CLIENT_BATCH_SUBMIT_RESPONSE, _batch_submit),
        M.CLIENT_BATCH_STATUS_REQUEST: (pb.ClientBatchStatusRequest, pb.ClientBatchStatusResponse,
                                        M.CLIENT_BATCH_STATUS_RESPONSE, _batch_status),
        M.CLIENT_STATE_LIST_REQUEST: (pb.ClientStateListRequest, pb.ClientStateListResponse,
                                      M.CLIENT_STATE_LIST_RESPONSE, _state_list),
        M.CLIENT_STATE_GET_REQUEST: (pb.ClientStateGetRequest, pb.ClientStateGetResponse,
                                     M.CLIENT_STATE_GET_RESPONSE, _state_get),
        M.CLIENT_BLOCK_LIST_REQUEST: (pb.ClientBlockListRequest, pb.ClientBlockListResponse,
                                      M.CLIENT_BLOCK_LIST_RESPONSE, _block_list),
        M.CLIENT_BLOCK_GET_BY_ID_REQUEST: (pb.ClientBlockGetByIdRequest, pb.ClientBlockGetResponse,
                                           M.CLIENT_BLOCK_GET_RESPONSE, _block_get),
        M.CLIENT_BATCH_LIST_REQUEST: (pb.ClientBatchListRequest, pb.ClientBatchListResponse,
                                      M.CLIENT_BATCH_LIST_RESPONSE, _batch_list),
        M.CLIENT_BATCH_GET_REQUEST: (pb.ClientBatchGetRequest, pb.ClientBatchGetResponse,
                                     M.CLIENT_BATCH_GET_RESPONSE, _batch_get),
        M.CLIENT_TRANSACTION_LIST_REQUEST: (pb.ClientTransactionListRequest, pb.ClientTransactionListResponse,
                                            M.CLIENT_TRANSACTION_LIST_RESPONSE, _txn_list),
        M.CLIENT_TRANSACTION_GET_REQUEST: (pb.ClientTransactionGetRequest, pb.ClientTransactionGetResponse,
                                           M.CLIENT_TRANSACTION_GET_RESPONSE, _txn_get),
        M.CLIENT_RECEIPT_GET_REQUEST: (pb.ClientReceiptGetRequest, pb.ClientReceiptGetResponse,
                                       M.CLIENT_RECEIPT_GET_RESPONSE, _receipt_get),
        M.CLIENT_PEERS_GET_REQUEST: (pb.ClientPeersGetRequest, pb.ClientPeersGetResponse,
                                     M.CLIENT_PEERS_GET_RESPONSE, _peers_get),
        M.CLIENT_STATUS_GET_REQUEST: (pb.ClientStatusGetRequest, pb.ClientStatusGetResponse,
                                      M.CLIENT_STATUS_GET_RESPONSE, _status_get),
    }


def closed_port_url(scheme: str = "tcp") -> str:
    """A 127.0.0.1 URL on a port nobody listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"{scheme}://127.0.0.1:{port}"


def seed_chain(peer: ClientWirePeer, signer: PrivateKey) -> dict:
    """Genesis + block 1 (a=1, b=2) + block 2 (c=3 | a=4): blocks, batches, addresses."""
    a, b, c = address("a"), address("b"), address("c")
    batch1 = make_test_batch(signer, {a: b"1", b: b"2"})
    block1 = peer.add_block([batch1])
    batch2 = make_test_batch(signer, {c: b"3"})
    batch3 = make_test_batch(signer, {a: b"4"})
    block2 = peer.add_block([batch2, batch3])
    return {"a": a, "b": b, "c": c, "blocks": [peer.blocks[0], block1, block2], "batches": [batch1, batch2, batch3]}


@contextlib.asynccontextmanager
async def serving(peer: ClientWirePeer | None = None, *, validator_url: str | None = None, **rest_options):
    """A started peer (unless validator_url points elsewhere) and a REST API in front of it."""
    from trustmesh.ledger.devnet.rest_api import start_rest_api

    if peer is not None:
        await peer.start()
    server = await start_rest_api(validator_url or peer.url, "127.0.0.1", 0, **rest_options)
    try:
        yield server
    finally:
        await server.close()
        if peer is not None:
            await peer.close()
