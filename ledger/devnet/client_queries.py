"""Read-only client requests (state, blocks, batches, transactions, receipts, peers, status)
answered the way a Sawtooth 1.2 validator answers them (client_handlers.py + receipt_store.py).

Semantics kept from the reference:
  * lists use the chain head unless `head_id` names a stored block (bad or unknown -> NO_ROOT;
    no chain yet -> NOT_READY); state requests use `state_root` or the head's state root;
  * default order is newest block first, each block's batches/transactions in block order;
    `reverse` is the exact reverse of that (state: address order / its reverse);
  * the only sort keys accepted are ["block_num"] for blocks and ["default"] otherwise;
  * paging: `start` is the id (address; for blocks the hex block number "0x%016x") of the
    first item to return and must be in the list, `limit` 0 means 100 and is capped at 1000,
    `next` is the id of the item after the page ("" on the last page);
  * a list filtered by ids keeps the order of the ids and only what is at or below the head;
    a block list filtered by ids is neither sorted nor paged (as in the reference);
  * an empty result is NO_RESOURCE, which still carries head_id/state_root and paging.

Where the reference crashes or misbehaves we answer a status instead: undecodable content ->
INTERNAL_ERROR (ERROR for peers/status, whose enums have no INTERNAL_ERROR), negative limit or
a block `start` that is not a block at or below the head -> INVALID_PAGING, malformed receipt
ids -> INVALID_ID, and any unexpected failure -> INTERNAL_ERROR (logged) rather than no reply.

Lists are produced lazily: blocks are read page by page from the store and a `start` is located
through the store's batch/transaction index, so a request costs about one page, not the chain.
"""

from __future__ import annotations

import itertools
import logging
import re
from typing import Callable, Iterable, Iterator, TypeVar

from google.protobuf.message import DecodeError

from .. import protos as pb
from ..client_messages import exchange
from .merkle import MerkleRadix, UnknownStateRoot
from .store import ChainStore

LOGGER = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

_ID_RE = re.compile("[0-9a-f]{128}")
_STATE_ROOT_RE = re.compile("[0-9a-f]{64}")
_NAMESPACE_RE = re.compile("([0-9a-f]{2}){0,35}")
_ADDRESS_RE = re.compile("[0-9a-f]{70}")
_BLOCK_NUM_RE = re.compile("0x[0-9a-fA-F]{1,16}")

M = pb.Message
T = TypeVar("T")


class _Failed(Exception):
    """Ends a request early with just a status, like the reference's _ResponseFailed."""

    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _block_num_hex(block_num: int) -> str:
    return f"{block_num:#018x}"  # the reference's block_num_to_hex: "0x" + 16 digits


def _block_num(block: "pb.Block") -> int:
    return pb.BlockHeader.FromString(block.header).block_num


def _batches_of(block: "pb.Block") -> list:
    return list(block.batches)


def _transactions_of(block: "pb.Block") -> list:
    return [t for b in block.batches for t in b.transactions]


def _header_signature(resource) -> str:
    return resource.header_signature


def _limit(paging: "pb.ClientPagingControls", status: type) -> int:
    if paging.limit < 0:
        raise _Failed(status.INVALID_PAGING)
    return min(paging.limit, MAX_PAGE_SIZE) or DEFAULT_PAGE_SIZE


def _is_reverse(sorting, key: str, status: type) -> bool:
    # As the reference: only the first control counts, and its keys must be exactly [key].
    if not sorting:
        return False
    if list(sorting[0].keys) != [key]:
        raise _Failed(status.INVALID_SORT)
    return sorting[0].reverse


def _validate_ids(ids: Iterable[str], status: type) -> None:
    for resource_id in ids:
        if not _ID_RE.fullmatch(resource_id):
            raise _Failed(status.INVALID_ID)


def _seek(items: Iterator[T], start: str, id_of: Callable[[T], str]) -> Iterator[T] | None:
    """items from the one whose id is start on, or None if it never comes."""
    for item in items:
        if id_of(item) == start:
            return itertools.chain((item,), items)
    return None


def _listing(S, fields: dict, name: str, items: list) -> dict:
    """A list response: an empty one is NO_RESOURCE, which still carries its head/root and paging."""
    return {**fields, "status": S.NO_RESOURCE} if not items else {**fields, name: items}


def _page(items: Iterator[T], limit: int, id_of: Callable[[T], str]) -> tuple[list[T], "pb.ClientPagingResponse"]:
    page = list(itertools.islice(items, limit))
    if not page:
        return page, pb.ClientPagingResponse()
    following = next(items, None)
    return page, pb.ClientPagingResponse(
        start=id_of(page[0]), limit=limit, next="" if following is None else id_of(following)
    )


class ClientQueries:
    """Answers the validator's read-only CLIENT_* requests from a ChainStore and its state."""

    def __init__(
        self,
        store: ChainStore,
        merkle: MerkleRadix,
        *,
        endpoint: str = "",
        peers: Callable[[], list[str]] = lambda: [],
    ):
        self._store = store
        self._merkle = merkle
        self._endpoint = endpoint
        self._peers = peers

    def handle(self, message_type: int, content: bytes) -> tuple[int, bytes]:
        """(response message type, serialized response) for one request; message_type must be
        in HANDLED_TYPES. Bad content never raises: it gets the response's error status."""
        respond = self._RESPONDERS.get(message_type)
        if respond is None:
            raise ValueError(f"not a client query: {pb.message_type_name(message_type)}")
        _, request_cls, response_type, response_cls = exchange(message_type)
        # Peers/status responses have ERROR where the others have INTERNAL_ERROR.
        internal_error = getattr(response_cls, "INTERNAL_ERROR", None) or response_cls.ERROR
        try:
            request = request_cls.FromString(content)
        except DecodeError:
            LOGGER.info("%s failed to deserialize", request_cls.__name__)
            return response_type, response_cls(status=internal_error).SerializeToString()
        try:
            fields = respond(self, request, response_cls)
        except _Failed as failed:
            fields = {"status": failed.status}
        except Exception:  # a reply with a status beats leaving the client to time out
            LOGGER.exception("%s failed", request_cls.__name__)
            fields = {"status": internal_error}
        fields.setdefault("status", response_cls.OK)
        return response_type, response_cls(**fields).SerializeToString()

    # -- heads and chain iteration --------------------------------------------------------

    def _chain_head(self, status: type) -> "pb.Block":
        head = self._store.head
        if head is None:
            raise _Failed(status.NOT_READY)
        return head

    def _head(self, head_id: str, status: type) -> tuple[str, int]:
        """(id, number) of the requested head block, or of the chain head."""
        if not head_id:
            head = self._chain_head(status)
            return head.header_signature, _block_num(head)
        num = self._store.block_num_of(head_id) if _ID_RE.fullmatch(head_id) else None
        if num is None:
            raise _Failed(status.NO_ROOT)
        return head_id, num

    def _blocks(self, head_num: int, from_num: int, reverse: bool) -> Iterator[tuple[int, "pb.Block"]]:
        """(number, block) newest first from from_num, or oldest first up to the head."""
        if not reverse:
            for block in self._store.blocks_descending(min(from_num, head_num)):
                yield _block_num(block), block
            return
        for block in self._store.blocks_ascending(from_num):
            num = _block_num(block)
            if num > head_num:
                return
            yield num, block

    def _chain_items(self, head_num: int, from_num: int, reverse: bool, items_of) -> Iterator:
        # Reverse is the exact reverse of the default order, so items in a block flip too.
        for _, block in self._blocks(head_num, from_num, reverse):
            items = items_of(block)
            yield from reversed(items) if reverse else items

    def _list(self, request, ids, head_num, reverse, limit, status, items_of, locate, fetch):
        """Page of batches or transactions: the shared part of both list requests."""
        start = request.paging.start
        if ids:
            # Fetch in the order asked for, dropping unknown ones and those above the head.
            cache: dict[int, pb.Block] = {}
            found = [item for item in (fetch(i, head_num, cache) for i in ids) if item is not None]
            if reverse:
                found.reverse()
            items = iter(found)
            if start:
                items = _seek(items, start, _header_signature)
                if items is None:
                    if found:
                        raise _Failed(status.INVALID_PAGING)
                    items = iter(())  # an empty list is NO_RESOURCE whatever the start
        else:
            from_num = 0 if reverse else head_num
            items = None
            if start:
                location = locate(start)
                if location is not None and location[0] <= head_num:
                    items = _seek(
                        self._chain_items(head_num, location[0], reverse, items_of), start, _header_signature
                    )
                if items is None:
                    if next(self._chain_items(head_num, head_num, False, items_of), None) is not None:
                        raise _Failed(status.INVALID_PAGING)
                    items = iter(())
            else:
                items = self._chain_items(head_num, from_num, reverse, items_of)
        return _page(items, limit, _header_signature)

    # -- fetch by id ----------------------------------------------------------------------

    def _cached_block(self, num: int, cache: dict) -> "pb.Block":
        block = cache.get(num)
        if block is None:
            block = cache[num] = self._store.block_by_num(num)
        return block

    def _fetch_batch(self, batch_id: str, head_num: int, cache: dict):
        location = self._store.batch_location(batch_id)
        if location is None or location[0] > head_num:
            return None
        num, position = location
        return self._cached_block(num, cache).batches[position]

    def _fetch_transaction(self, txn_id: str, head_num: int, cache: dict):
        location = self._store.transaction_location(txn_id)
        if location is None or location[0] > head_num:
            return None
        num, batch_id, position = location
        batch = self._fetch_batch(batch_id, head_num, cache)
        return batch.transactions[position]

    # -- state ----------------------------------------------------------------------------

    def _state_root(self, request, status: type) -> str:
        if request.state_root:
            if not _STATE_ROOT_RE.fullmatch(request.state_root):
                raise _Failed(status.INVALID_ROOT)
            root = request.state_root
        else:
            head = self._chain_head(status)
            root = pb.BlockHeader.FromString(head.header).state_root_hash
        try:
            self._merkle.leaves(root)  # only checks the root is stored; nothing is read yet
        except UnknownStateRoot:
            raise _Failed(status.NO_ROOT) from None
        return root

    def _state_list(self, request, S):
        root = self._state_root(request, S)
        prefix = request.address
        if not _NAMESPACE_RE.fullmatch(prefix):
            raise _Failed(S.INVALID_ADDRESS)
        reverse = _is_reverse(request.sorting, "default", S)
        limit = _limit(request.paging, S)
        start = request.paging.start or None
        items = None
        if start is None:
            items = self._merkle.leaves(root, prefix, reverse=reverse)
        elif _ADDRESS_RE.fullmatch(start) and start.startswith(prefix):
            items = _seek(self._merkle.leaves(root, prefix, start=start, reverse=reverse), start, lambda e: e[0])
        if items is None:  # start is not an address in this list
            anything = next(self._merkle.leaves(root, prefix), None)
            if anything is not None:
                raise _Failed(S.INVALID_PAGING)
            items = iter(())
        page, paging = _page(items, limit, lambda e: e[0])
        entries = [S.Entry(address=a, data=v) for a, v in page]
        return _listing(S, {"state_root": root, "paging": paging}, "entries", entries)

    def _state_get(self, request, S):
        root = self._state_root(request, S)
        if not _NAMESPACE_RE.fullmatch(request.address):
            raise _Failed(S.INVALID_ADDRESS)
        # A well-formed partial address names an inner node, which holds no value: NO_RESOURCE.
        value = self._merkle.get(root, request.address) if len(request.address) == 70 else None
        if value is None:
            return {"status": S.NO_RESOURCE}
        return {"state_root": root, "value": value}

    # -- blocks ---------------------------------------------------------------------------

    def _block_list(self, request, S):
        head_id, head_num = self._head(request.head_id, S)
        _validate_ids(request.block_ids, S)
        if request.block_ids:
            blocks = []
            for block_id in request.block_ids:
                num = self._store.block_num_of(block_id)
                if num is not None and num <= head_num:
                    blocks.append(self._store.block_by_num(num))
            paging = pb.ClientPagingResponse()
        else:
            reverse = _is_reverse(request.sorting, "block_num", S)
            limit = _limit(request.paging, S)
            start = request.paging.start
            if start:
                if not _BLOCK_NUM_RE.fullmatch(start) or int(start, 16) > head_num:
                    raise _Failed(S.INVALID_PAGING)
                from_num = int(start, 16)
            else:
                from_num = 0 if reverse else head_num
            page, paging = _page(self._blocks(head_num, from_num, reverse), limit, lambda nb: _block_num_hex(nb[0]))
            blocks = [block for _, block in page]
        return _listing(S, {"head_id": head_id, "paging": paging}, "blocks", blocks)

    def _block_by_id(self, request, S):
        _validate_ids([request.block_id], S)
        block = self._store.block_by_id(request.block_id)
        return {"block": block} if block is not None else {"status": S.NO_RESOURCE}

    def _block_by_num(self, request, S):
        head = self._store.head
        # Checked against the head first: a uint64 beyond SQLite's int64 would not bind.
        if head is None or request.block_num > _block_num(head):
            return {"status": S.NO_RESOURCE}
        block = self._store.block_by_num(request.block_num)
        return {"block": block} if block is not None else {"status": S.NO_RESOURCE}

    def _block_by_transaction(self, request, S):
        return self._block_holding(request.transaction_id, self._store.transaction_location, S)

    def _block_by_batch(self, request, S):
        return self._block_holding(request.batch_id, self._store.batch_location, S)

    def _block_holding(self, item_id: str, locate, S):
        _validate_ids([item_id], S)
        location = locate(item_id)
        if location is None:
            return {"status": S.NO_RESOURCE}
        return {"block": self._store.block_by_num(location[0])}

    # -- batches and transactions ---------------------------------------------------------

    def _batch_list(self, request, S):
        return self._item_list(request, S, request.batch_ids, "batches", _batches_of, self._store.batch_location,
                               self._fetch_batch)

    def _transaction_list(self, request, S):
        return self._item_list(request, S, request.transaction_ids, "transactions", _transactions_of,
                               self._store.transaction_location, self._fetch_transaction)

    def _item_list(self, request, S, ids, field, items_of, locate, fetch):
        head_id, head_num = self._head(request.head_id, S)
        _validate_ids(ids, S)
        reverse = _is_reverse(request.sorting, "default", S)
        limit = _limit(request.paging, S)
        page, paging = self._list(request, ids, head_num, reverse, limit, S, items_of, locate, fetch)
        return _listing(S, {"head_id": head_id, "paging": paging}, field, page)

    def _batch_get(self, request, S):
        _validate_ids([request.batch_id], S)
        batch = self._fetch_batch(request.batch_id, float("inf"), {})
        return {"batch": batch} if batch is not None else {"status": S.NO_RESOURCE}

    def _transaction_get(self, request, S):
        _validate_ids([request.transaction_id], S)
        txn = self._fetch_transaction(request.transaction_id, float("inf"), {})
        return {"transaction": txn} if txn is not None else {"status": S.NO_RESOURCE}

    # -- receipts, peers, status ----------------------------------------------------------

    def _receipt_get(self, request, S):
        _validate_ids(request.transaction_ids, S)
        receipts = []
        for txn_id in request.transaction_ids:
            receipt = self._store.receipt(txn_id)
            if receipt is None:  # one unknown id fails the whole request, as the reference
                return {"status": S.NO_RESOURCE}
            receipts.append(receipt)
        return {"receipts": receipts}

    def _peers_get(self, request, S):
        return {"peers": list(self._peers())}

    def _status_get(self, request, S):
        endpoints = sorted(self._peers())
        return {"endpoint": self._endpoint, "peers": [S.Peer(endpoint=e) for e in endpoints]}

    # request type -> responder(self, request, response class) -> response fields; which
    # classes go with a type is client_messages' rule
    _RESPONDERS = {
        M.CLIENT_STATE_LIST_REQUEST: _state_list,
        M.CLIENT_STATE_GET_REQUEST: _state_get,
        M.CLIENT_BLOCK_LIST_REQUEST: _block_list,
        M.CLIENT_BLOCK_GET_BY_ID_REQUEST: _block_by_id,
        M.CLIENT_BLOCK_GET_BY_NUM_REQUEST: _block_by_num,
        M.CLIENT_BLOCK_GET_BY_TRANSACTION_ID_REQUEST: _block_by_transaction,
        M.CLIENT_BLOCK_GET_BY_BATCH_ID_REQUEST: _block_by_batch,
        M.CLIENT_BATCH_LIST_REQUEST: _batch_list,
        M.CLIENT_BATCH_GET_REQUEST: _batch_get,
        M.CLIENT_TRANSACTION_LIST_REQUEST: _transaction_list,
        M.CLIENT_TRANSACTION_GET_REQUEST: _transaction_get,
        M.CLIENT_RECEIPT_GET_REQUEST: _receipt_get,
        M.CLIENT_PEERS_GET_REQUEST: _peers_get,
        M.CLIENT_STATUS_GET_REQUEST: _status_get,
    }
    HANDLED_TYPES = frozenset(_RESPONDERS)
