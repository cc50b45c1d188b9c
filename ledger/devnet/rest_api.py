"""Sawtooth 1.2 REST API, in front of any validator's component endpoint.

Like sawtooth-rest-api, this is a separate component: every route becomes one CLIENT_* request
on a ZMQ DEALER (ledger/messaging.py), and the reply is turned into the same JSON the real one
serves: the envelope {"data", "head", "link", "paging"}, headers expanded to JSON, bytes in
base64, 64-bit integers as strings, and errors as {"error": {"code", "title", "message"}} with
Sawtooth's codes. So our clients work against a real validator + real REST API, and the real
REST API works in front of our dev validator.

Deliberate differences, all where the real one answers 500 or misbehaves:
  * validator statuses it leaves unhandled are mapped (INVALID_ID 400/60, INVALID_ADDRESS on
    /state 400/62, NO_ROOT 404/50);
  * a POST body that is not JSON is 400 (46/82), a BatchList with no batches is 400/34;
  * the `head` query is checked to be a block id (400/60) before asking the validator;
  * `wait` on /receipts is ignored (ClientReceiptGetRequest has no wait field);
  * if the validator is unreachable we answer 503/18 after `connect_timeout` instead of
    queueing the request in ZMQ until `timeout` (a queued batch could be applied much later);
  * an oversized body is 413 with our own code 36 (the real one sends aiohttp's plain text);
  * PING_REQUESTs from the validator are answered, so a reaping validator keeps us.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import json
import logging
import re
import time
from typing import Any, Callable, NamedTuple

from aiohttp import hdrs, web
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from .. import protos as pb
from ..client_messages import exchange_of
from ..messaging import ConnectionLost, ValidatorConnection

LOGGER = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300  # seconds, as sawtooth-rest-api
DEFAULT_CONNECT_TIMEOUT = 2.0
DEFAULT_CLIENT_MAX_SIZE = 10 * 1024 * 1024  # sawtooth-rest-api's client_max_size default
_INT32_MAX = 2**31 - 1
_ID_RE = re.compile("[0-9a-f]{128}")


class ErrorCode(enum.IntEnum):
    """The `code` of an error body; fixed by Sawtooth's REST API (36 is ours)."""

    UNKNOWN_VALIDATOR_ERROR = 10
    VALIDATOR_NOT_READY = 15
    VALIDATOR_TIMED_OUT = 17
    VALIDATOR_DISCONNECTED = 18
    VALIDATOR_RESPONSE_INVALID = 20
    RESOURCE_HEADER_INVALID = 21
    STATUS_RESPONSE_MISSING = 27
    SUBMITTED_BATCHES_INVALID = 30
    BATCH_QUEUE_FULL = 31
    NO_BATCHES_SUBMITTED = 34
    BAD_PROTOBUF_SUBMITTED = 35
    REQUEST_TOO_LARGE = 36
    SUBMISSION_WRONG_CONTENT_TYPE = 42
    STATUS_WRONG_CONTENT_TYPE = 43
    STATUS_BODY_INVALID = 46
    HEAD_NOT_FOUND = 50
    COUNT_INVALID = 53
    PAGING_INVALID = 54
    SORT_INVALID = 57
    INVALID_RESOURCE_ID = 60
    INVALID_STATE_ADDRESS = 62
    STATUS_ID_QUERY_INVALID = 66
    BLOCK_NOT_FOUND = 70
    BATCH_NOT_FOUND = 71
    TRANSACTION_NOT_FOUND = 72
    STATE_NOT_FOUND = 75
    RECEIPT_NOT_FOUND = 80
    RECEIPT_WRONG_CONTENT_TYPE = 81
    RECEIPT_BODY_INVALID = 82
    RECEIPT_ID_QUERY_INVALID = 83


class _Error(NamedTuple):
    status: int  # HTTP
    title: str
    message: str  # some end in ": " or " ", for the detail an ApiError adds


E = ErrorCode
# The texts clients see from sawtooth-rest-api 1.2.
_ERRORS: dict[ErrorCode, _Error] = {
    E.UNKNOWN_VALIDATOR_ERROR: _Error(500, "Unknown Validator Error",
        "An unknown error occurred with the validator while processing your request."),
    E.VALIDATOR_NOT_READY: _Error(503, "Validator Not Ready",
        "The validator has no genesis block, and is not yet ready to be queried. "
        "Try your request again later."),
    E.VALIDATOR_TIMED_OUT: _Error(503, "Validator Timed Out",
        "The request timed out while waiting for a response from the validator. "
        "Your request may or may not have been processed."),
    E.VALIDATOR_DISCONNECTED: _Error(503, "Validator Disconnected",
        "The validator disconnected before sending a response. Try your request again later."),
    E.VALIDATOR_RESPONSE_INVALID: _Error(500, "Invalid Validator Response",
        "The response from the validator could not be decoded. It may have been corrupted "
        "or compromised."),
    E.RESOURCE_HEADER_INVALID: _Error(500, "Invalid Resource Header",
        "The resource fetched from the validator had an invalid header, and may be corrupted."),
    E.STATUS_RESPONSE_MISSING: _Error(500, "Unable to Fetch Statuses",
        "An unknown error occurred while attempting to fetch batch statuses, and nothing "
        "was returned."),
    E.SUBMITTED_BATCHES_INVALID: _Error(400, "Submitted Batches Invalid",
        "The submitted BatchList was rejected by the validator. It was poorly formed, or has "
        "an invalid signature."),
    E.BATCH_QUEUE_FULL: _Error(429, "Unable to Accept Batches",
        "The validator cannot currently accept more batches, due to a full queue.  Please "
        "submit your request again."),
    E.NO_BATCHES_SUBMITTED: _Error(400, "No Batches Submitted",
        "The protobuf BatchList you submitted was empty and contained no Batches. You must "
        "submit at least one Batch."),
    E.BAD_PROTOBUF_SUBMITTED: _Error(400, "Protobuf Not Decodable",
        "The protobuf BatchList you submitted was malformed and could not be read."),
    E.REQUEST_TOO_LARGE: _Error(413, "Request Body Too Large",
        "The request body is larger than this REST API accepts: "),
    E.SUBMISSION_WRONG_CONTENT_TYPE: _Error(400, "Wrong Content Type",
        "Batches must be submitted in a BatchList protobuf binary, with a 'Content-Type' "
        "header of 'application/octet-stream'."),
    E.STATUS_WRONG_CONTENT_TYPE: _Error(400, "Wrong Content Type",
        "Requests for batch statuses sent as a POST must have a 'Content-Type' header of "
        "'application/json'."),
    E.STATUS_BODY_INVALID: _Error(400, "Bad Status Request",
        "Requests for batch statuses sent as a POST must have a JSON formatted body with an "
        "array of at least one id string."),
    E.HEAD_NOT_FOUND: _Error(404, "Head Not Found",
        "There is no block with the id specified in the 'head' query parameter."),
    E.COUNT_INVALID: _Error(400, "Invalid Count Query",
        "The 'count' query parameter must be a positive, non-zero integer."),
    E.PAGING_INVALID: _Error(400, "Invalid Paging Query",
        "Paging request failed as written. One or more of the 'min', 'max', or 'count' "
        "query parameters were invalid or out of range."),
    E.SORT_INVALID: _Error(400, "Invalid Sort Query",
        "The sort request failed as written. Some of the keys specified were not valid."),
    E.INVALID_RESOURCE_ID: _Error(400, "Invalid Resource Id",
        "Blockchain items are identified by 128 character hex-strings. A submitted block, "
        "batch, or transaction id was invalid: "),
    E.INVALID_STATE_ADDRESS: _Error(400, "Invalid State Address",
        "The state address submitted was invalid. To fetch specific state data, you must "
        "submit the full 70-character address."),
    E.STATUS_ID_QUERY_INVALID: _Error(400, "Id Query Invalid or Missing",
        "Requests for batch statuses sent as a GET request must have an 'id' query parameter "
        "with a comma-separated list of at least one batch id."),
    E.BLOCK_NOT_FOUND: _Error(404, "Block Not Found",
        "There is no block with the id specified in the blockchain."),
    E.BATCH_NOT_FOUND: _Error(404, "Batch Not Found",
        "There is no batch with the id specified in the blockchain."),
    E.TRANSACTION_NOT_FOUND: _Error(404, "Transaction Not Found",
        "There is no transaction with the id specified in the blockchain."),
    E.STATE_NOT_FOUND: _Error(404, "State Not Found", "There is no state data at the address specified."),
    E.RECEIPT_NOT_FOUND: _Error(404, "Transaction Receipt Not Found",
        "There is no transaction receipt for the transaction id specified in the receipt store."),
    E.RECEIPT_WRONG_CONTENT_TYPE: _Error(400, "Wrong Content Type",
        "Requests for transaction receipts sent as a POST must have a 'Content-Type' header "
        "of 'application/json'."),
    E.RECEIPT_BODY_INVALID: _Error(400, "Bad Receipts Request",
        "Requests for transaction receipts sent as a POST must have a JSON formatted body "
        "with an array of at least one id string."),
    E.RECEIPT_ID_QUERY_INVALID: _Error(400, "Id Query Invalid or Missing",
        "Requests for transaction receipts sent as a GET request must have an 'id' query "
        "parameter with a comma-separated list of at least one transaction id."),
}

# Validator status name -> error, shared by every CLIENT_* response (numbers differ per message,
# names do not). NO_RESOURCE depends on the route, so it is handled separately.
_STATUS_ERRORS = {
    "INTERNAL_ERROR": E.UNKNOWN_VALIDATOR_ERROR,
    "ERROR": E.UNKNOWN_VALIDATOR_ERROR,
    "NOT_READY": E.VALIDATOR_NOT_READY,
    "NO_ROOT": E.HEAD_NOT_FOUND,
    "INVALID_ROOT": E.HEAD_NOT_FOUND,
    "INVALID_PAGING": E.PAGING_INVALID,
    "INVALID_SORT": E.SORT_INVALID,
    "INVALID_ID": E.INVALID_RESOURCE_ID,
    "INVALID_ADDRESS": E.INVALID_STATE_ADDRESS,
    "INVALID_BATCH": E.SUBMITTED_BATCHES_INVALID,
    "QUEUE_FULL": E.BATCH_QUEUE_FULL,
}


class ApiError(Exception):
    def __init__(self, code: ErrorCode, additional_info: str = ""):
        self.code = code
        error = _ERRORS[code]
        self.status, self.title = error.status, error.title
        self.message = error.message + additional_info
        super().__init__(f"{code.value} {self.title}: {self.message}")

    def response(self) -> web.Response:
        body = {"error": {"code": int(self.code), "title": self.title, "message": self.message}}
        return _json_response(body, self.status)


def _json_response(envelope: dict, status: int = 200) -> web.Response:
    # Same formatting as sawtooth-rest-api, so byte-level diffs against it stay quiet.
    text = json.dumps(envelope, indent=2, separators=(",", ": "), sort_keys=True)
    return web.Response(status=status, content_type="application/json", text=text)


def _to_dict(message) -> dict:
    """Protobuf -> JSON dict the way sawtooth-rest-api does (bytes base64, int64 as str)."""
    return MessageToDict(message, always_print_fields_with_no_presence=True, preserving_proto_field_name=True)


def _base64(data: bytes) -> str:
    """bytes as _to_dict writes them (standard base64, padded)."""
    return base64.b64encode(data).decode("ascii")


def _header(header_cls, resource) -> dict:
    try:
        return _to_dict(header_cls.FromString(resource.header))
    except DecodeError:
        LOGGER.error("validator sent a %s with an undecodable header", type(resource).__name__)
        raise ApiError(E.RESOURCE_HEADER_INVALID) from None


def _expand_transaction(txn) -> dict:
    out = _to_dict(txn)
    out["header"] = _header(pb.TransactionHeader, txn)
    return out


def _expand_batch(batch) -> dict:
    out = _to_dict(batch)
    out["header"] = _header(pb.BatchHeader, batch)
    out["transactions"] = [_expand_transaction(t) for t in batch.transactions]
    return out


def _expand_block(block) -> dict:
    out = _to_dict(block)
    out["header"] = _header(pb.BlockHeader, block)
    out["batches"] = [_expand_batch(b) for b in block.batches]
    return out


def _drop_empty_props(item):
    if isinstance(item, list):
        return [_drop_empty_props(i) for i in item]
    if isinstance(item, dict):
        return {k: _drop_empty_props(v) for k, v in item.items() if v != ""}
    return item


def _drop_id_prefixes(item):
    # "batch_id"/"transaction_id" -> "id", recursively, as the real API presents statuses/receipts.
    if isinstance(item, list):
        return [_drop_id_prefixes(i) for i in item]
    if isinstance(item, dict):
        return {("id" if k.endswith("id") else k): _drop_id_prefixes(v) for k, v in item.items()}
    return item


def _validate_id(resource_id: str) -> None:
    if not _ID_RE.fullmatch(resource_id):
        raise ApiError(E.INVALID_RESOURCE_ID, resource_id)


def _filter_ids(request: web.Request) -> list[str] | None:
    query = request.query.get("id")
    if query is None:
        return None
    ids = query.split(",")
    for resource_id in ids:
        _validate_id(resource_id)
    return ids


def _head_id(request: web.Request) -> str | None:
    head = request.query.get("head")
    if head is not None:
        _validate_id(head)
    return head


def _paging_controls(request: web.Request) -> dict:
    controls: dict[str, Any] = {}
    limit = request.query.get("limit")
    if limit is not None:
        try:
            controls["limit"] = int(limit)
        except ValueError:
            raise ApiError(E.COUNT_INVALID) from None
        if controls["limit"] <= 0:
            raise ApiError(E.COUNT_INVALID)
    start = request.query.get("start")
    if start is not None:
        controls["start"] = start
    return controls


def _paging_message(controls: dict) -> "pb.ClientPagingControls":
    # The validator caps the page at 1000 anyway; clamping only keeps int32 from overflowing.
    limit = min(controls.get("limit", 0), _INT32_MAX)
    return pb.ClientPagingControls(start=controls.get("start", ""), limit=limit)


def _sorting(request: web.Request, default_key: str) -> list:
    # `?reverse` (empty) sorts by the resource's default key; `?reverse=a,b` names keys, which the
    # validator rejects unless they are that default key; `?reverse=false` means no sorting.
    reverse = request.query.get("reverse")
    if reverse is None or reverse.lower() == "false":
        return []
    keys = [default_key] if reverse == "" else reverse.split(",")
    return [pb.ClientSortControls(keys=keys, reverse=True)]


def _forwarded(request: web.Request, key: str) -> str:
    """A value from the Forwarded header, else X-Forwarded-<Key>, else ''."""
    match = re.search(rf"(?<={key}=).+?(?=[\s,;]|$)", request.headers.get("Forwarded", ""), re.IGNORECASE)
    if match is not None:
        value = match.group(0)
        return value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
    return request.headers.get(f"X-Forwarded-{key.title()}", "")


def _build_url(request: web.Request, path: str | None = None, **changes) -> str:
    """This request's URL with some query values replaced (None = keep the original).

    Query order is head, start, limit, then the rest sorted, and an empty value is written
    as a bare key: exactly the links sawtooth-rest-api returns.
    """
    queries = {**request.query, **{k: v for k, v in changes.items() if v is not None}}
    first = [k for k in ("head", "start", "limit") if k in queries]
    keys = first + sorted(k for k in queries if k not in first)
    parts = [f"{k}={queries[k]}" if queries[k] != "" else k for k in keys]
    scheme = _forwarded(request, "proto") or request.url.scheme
    host = _forwarded(request, "host") or request.host
    path = path if path is not None else request.path
    query = "?" + "&".join(parts) if parts else ""
    return f"{scheme}://{host}{_forwarded(request, 'path')}{path}{query}"


def _content_type(request: web.Request) -> str:
    # A missing header must not count as octet-stream (aiohttp's default for request.content_type).
    return request.headers.get(hdrs.CONTENT_TYPE, "").split(";")[0].strip().lower()


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(E.REQUEST_TOO_LARGE, f"at most {request.app[_MAX_SIZE]} bytes.") from None


async def _requested_ids(request: web.Request, wrong_type: ErrorCode, body_invalid: ErrorCode,
                         query_invalid: ErrorCode) -> list[str]:
    """The ids a status or receipt request asks for: a POST's JSON list, else the `id` query."""
    if request.method != "POST":
        ids = _filter_ids(request)
        if not ids:
            raise ApiError(query_invalid)
        return ids
    if _content_type(request) != "application/json":
        raise ApiError(wrong_type)
    try:
        ids = json.loads(await _read_body(request))
    except ValueError:  # also UnicodeDecodeError
        raise ApiError(body_invalid) from None
    if not ids or not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ApiError(body_invalid)
    for resource_id in ids:
        _validate_id(resource_id)
    return ids


class _Handlers:
    def __init__(self, validator_url: str, timeout: float, connect_timeout: float,
                 chain_head: Callable[[], tuple[str, str]] | None = None, queries=None):
        self._url = validator_url
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._chain_head = chain_head
        self._queries = queries
        self._conn: ValidatorConnection | None = None

    async def start(self, _app=None) -> None:
        self._conn = ValidatorConnection(self._url, on_message=self._on_message)
        await self._conn.start()
        LOGGER.info("REST API talking to the validator at %s", self._url)

    async def close(self, _app=None) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _on_message(self, message) -> None:
        if message.message_type == pb.Message.PING_REQUEST:
            await self._conn.send(pb.Message.PING_RESPONSE, pb.PingResponse(), message.correlation_id)

    # -- validator round trip ------------------------------------------------------------------

    async def _query(self, request, *, not_found: ErrorCode | None = None):
        """Send one CLIENT_* request; return the parsed reply or raise the matching ApiError.

        not_found: the error for NO_RESOURCE; None means NO_RESOURCE is just an empty list.
        """
        request_type, _, _, response_cls = exchange_of(type(request))
        name = pb.message_type_name(request_type)
        if self._queries is not None and request_type in self._queries.HANDLED_TYPES:
            # In the validator's own process: its query handler answers in place, the same bytes
            # it would send back, without two ZMQ messages through its own endpoint.
            _, content = self._queries.handle(request_type, request.SerializeToString())
        else:
            content = await self._round_trip(request_type, request, name)
        try:
            response = response_cls.FromString(content)
            status = response_cls.Status.Name(response.status)
        except (DecodeError, ValueError):
            LOGGER.error("validator reply to %s is not a %s", name, response_cls.__name__)
            raise ApiError(E.VALIDATOR_RESPONSE_INVALID) from None
        LOGGER.debug("validator answered %s with %s", name, status)
        if status == "OK" or (status == "NO_RESOURCE" and not_found is None):
            return response
        if status == "NO_RESOURCE":
            raise ApiError(not_found)
        raise ApiError(_STATUS_ERRORS.get(status, E.VALIDATOR_RESPONSE_INVALID))

    async def _round_trip(self, request_type: int, request, name: str) -> bytes:
        """The validator's reply to a request, through its component endpoint."""
        conn = self._conn
        if not conn.connected.is_set():
            # Never queue into a disconnected DEALER: ZMQ would deliver it whenever the validator
            # comes back, long after we answered.
            try:
                await asyncio.wait_for(conn.connected.wait(), self._connect_timeout)
            except TimeoutError:
                LOGGER.warning("validator at %s is unreachable", self._url)
                raise ApiError(E.VALIDATOR_DISCONNECTED) from None
        LOGGER.debug("sending %s to the validator", name)
        try:
            reply = await conn.request(request_type, request, timeout=self._timeout)
        except ConnectionLost:
            LOGGER.warning("validator disconnected while answering %s", name)
            raise ApiError(E.VALIDATOR_DISCONNECTED) from None
        except TimeoutError:
            LOGGER.warning("validator did not answer %s within %ss", name, self._timeout)
            raise ApiError(E.VALIDATOR_TIMED_OUT) from None
        return reply.content

    async def _head_to_root(self, head: str | None) -> tuple[str, str]:
        """(block id, state root) of the requested head, or of the chain head."""
        if not head and self._chain_head is not None:
            return self._chain_head()
        if head:
            response = await self._query(pb.ClientBlockGetByIdRequest(block_id=head), not_found=E.BLOCK_NOT_FOUND)
            block = response.block
        else:
            response = await self._query(pb.ClientBlockListRequest(paging=pb.ClientPagingControls(limit=1)))
            if not response.blocks:
                raise ApiError(E.VALIDATOR_NOT_READY)
            block = response.blocks[0]
        return block.header_signature, _header(pb.BlockHeader, block)["state_root_hash"]

    # -- envelopes -----------------------------------------------------------------------------

    @staticmethod
    def _metadata(request: web.Request, head: str | None = None) -> dict:
        metadata = {"link": _build_url(request, head=head)}
        if head is not None:
            metadata["head"] = head
        return metadata

    @staticmethod
    def _paginated(request: web.Request, response, controls: dict, data: list, head: str) -> web.Response:
        page = response.paging  # an empty ClientPagingResponse when absent, like the real reply
        link = _build_url(request, head=head, start=page.start, limit=page.limit)
        # `start`/`limit` echo the client's query (null when absent); the validator's choice is in `link`.
        paging: dict[str, Any] = {"limit": controls.get("limit"), "start": controls.get("start")}
        if page.next:
            paging["next_position"] = page.next
            paging["next"] = _build_url(request, head=head, limit=controls.get("limit"), start=page.next)
        return _json_response({"data": data, "head": head, "link": link, "paging": paging})

    def _set_wait(self, request: web.Request, query) -> None:
        wait = request.query.get("wait", "false")
        if wait.lower() == "false":
            return
        query.wait = True
        try:
            query.timeout = max(0, int(wait))
        except ValueError:  # bare `?wait`: most of our own timeout, so the validator answers first
            query.timeout = int(self._timeout * 0.95)

    # -- routes --------------------------------------------------------------------------------

    async def submit_batches(self, request: web.Request) -> web.Response:
        if _content_type(request) != "application/octet-stream":
            raise ApiError(E.SUBMISSION_WRONG_CONTENT_TYPE)
        body = await _read_body(request)
        if not body:
            raise ApiError(E.NO_BATCHES_SUBMITTED)
        try:
            batch_list = pb.BatchList.FromString(body)
        except DecodeError:
            raise ApiError(E.BAD_PROTOBUF_SUBMITTED) from None
        if not batch_list.batches:
            raise ApiError(E.NO_BATCHES_SUBMITTED)
        await self._query(pb.ClientBatchSubmitRequest(batches=batch_list.batches))
        ids = ",".join(b.header_signature for b in batch_list.batches)
        return _json_response({"link": _build_url(request, path="/batch_statuses", id=ids)}, 202)

    async def list_statuses(self, request: web.Request) -> web.Response:
        ids = await _requested_ids(request, E.STATUS_WRONG_CONTENT_TYPE, E.STATUS_BODY_INVALID,
                                   E.STATUS_ID_QUERY_INVALID)
        query = pb.ClientBatchStatusRequest(batch_ids=ids)
        self._set_wait(request, query)
        response = await self._query(query, not_found=E.STATUS_RESPONSE_MISSING)
        return self._by_ids(request, response.batch_statuses)

    async def list_receipts(self, request: web.Request) -> web.Response:
        ids = await _requested_ids(request, E.RECEIPT_WRONG_CONTENT_TYPE, E.RECEIPT_BODY_INVALID,
                                   E.RECEIPT_ID_QUERY_INVALID)
        response = await self._query(pb.ClientReceiptGetRequest(transaction_ids=ids), not_found=E.RECEIPT_NOT_FOUND)
        return self._by_ids(request, response.receipts)

    def _by_ids(self, request: web.Request, items) -> web.Response:
        # Statuses and receipts: ids as "id"; a POST's answer has no link (its ids are in no URL).
        envelope = {} if request.method == "POST" else self._metadata(request)
        envelope["data"] = _drop_id_prefixes(_drop_empty_props([_to_dict(i) for i in items]))
        return _json_response(envelope)

    async def list_state(self, request: web.Request) -> web.Response:
        controls = _paging_controls(request)
        head, root = await self._head_to_root(_head_id(request))
        response = await self._query(pb.ClientStateListRequest(
            state_root=root, address=request.query.get("address", ""),
            sorting=_sorting(request, "default"), paging=_paging_message(controls)))
        # what _to_dict gives, built directly: a page of a thousand entries took ~20 ms through it
        data = [{"address": entry.address, "data": _base64(entry.data)} for entry in response.entries]
        return self._paginated(request, response, controls, data, head)

    async def fetch_state(self, request: web.Request) -> web.Response:
        head, root = await self._head_to_root(_head_id(request))
        query = pb.ClientStateGetRequest(state_root=root, address=request.match_info["address"])
        response = await self._query(query, not_found=E.STATE_NOT_FOUND)
        envelope = self._metadata(request, head)
        envelope["data"] = _base64(response.value)
        return _json_response(envelope)

    async def list_resources(self, kind: "_ChainResource", request: web.Request) -> web.Response:
        """/blocks, /batches, /transactions"""
        # head, ids, then paging: the order their errors take precedence in.
        head_id, ids = _head_id(request) or "", _filter_ids(request) or []
        query = kind.list_request(head_id=head_id, sorting=_sorting(request, kind.sort_key),
                                  **{f"{kind.name}_ids": ids})
        controls = _paging_controls(request)
        query.paging.CopyFrom(_paging_message(controls))
        response = await self._query(query)
        data = [kind.expand(item) for item in getattr(response, kind.plural)]
        return self._paginated(request, response, controls, data, response.head_id)

    async def fetch_resource(self, kind: "_ChainResource", request: web.Request) -> web.Response:
        """/blocks/{block_id}, /batches/{batch_id}, /transactions/{transaction_id}"""
        resource_id = request.match_info[f"{kind.name}_id"]
        _validate_id(resource_id)
        response = await self._query(kind.get_request(**{f"{kind.name}_id": resource_id}), not_found=kind.not_found)
        return _json_response({**self._metadata(request), "data": kind.expand(getattr(response, kind.name))})

    async def fetch_peers(self, request: web.Request) -> web.Response:
        response = await self._query(pb.ClientPeersGetRequest())
        return _json_response({**self._metadata(request), "data": list(response.peers)})

    async def fetch_status(self, request: web.Request) -> web.Response:
        response = await self._query(pb.ClientStatusGetRequest())
        data = {"peers": [{"endpoint": p.endpoint} for p in response.peers], "endpoint": response.endpoint}
        return _json_response({**self._metadata(request), "data": data})


class _ChainResource(NamedTuple):
    """What /{plural} and /{plural}/{name}_id serve."""

    name: str  # the request fields are {name}_ids and {name}_id, the response's one item {name}
    plural: str  # the path, and the list response's field
    list_request: type
    sort_key: str  # what a bare `?reverse` sorts by
    get_request: type
    not_found: ErrorCode
    expand: Callable[[Any], dict]


_CHAIN_RESOURCES = (
    _ChainResource("block", "blocks", pb.ClientBlockListRequest, "block_num", pb.ClientBlockGetByIdRequest,
                   E.BLOCK_NOT_FOUND, _expand_block),
    _ChainResource("batch", "batches", pb.ClientBatchListRequest, "default", pb.ClientBatchGetRequest,
                   E.BATCH_NOT_FOUND, _expand_batch),
    _ChainResource("transaction", "transactions", pb.ClientTransactionListRequest, "default",
                   pb.ClientTransactionGetRequest, E.TRANSACTION_NOT_FOUND, _expand_transaction),
)


_MAX_SIZE = web.AppKey("client_max_size", int)
_HANDLERS = web.AppKey("rest_api_handlers", _Handlers)


@web.middleware
async def _errors_and_logging(request: web.Request, handler):
    started = time.perf_counter()
    status = 500  # what aiohttp answers for an exception we did not expect
    try:
        try:
            max_size = request.app[_MAX_SIZE]
            if request.content_length is not None and request.content_length > max_size:
                raise ApiError(E.REQUEST_TOO_LARGE, f"at most {max_size} bytes.")
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        status = response.status
        return response
    except web.HTTPException as exc:  # aiohttp's own 404/405
        status = exc.status
        raise
    finally:
        LOGGER.debug("%s %s -> %s in %.1f ms", request.method, request.path_qs, status,
                     (time.perf_counter() - started) * 1000)


def create_app(
    validator_url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    client_max_size: int = DEFAULT_CLIENT_MAX_SIZE,
    chain_head: Callable[[], tuple[str, str]] | None = None,
    queries=None,
) -> web.Application:
    """The REST API app; it connects to validator_url (tcp://host:4004) when the app starts.

    timeout: seconds to wait for each validator reply (then 503/17).
    connect_timeout: seconds a request waits for an unconnected validator (then 503/18).
    client_max_size: largest accepted request body in bytes (then 413/36).
    chain_head: for a REST API in the validator's own process, () -> (block id, state root) of
    the chain head as the validator has it now. A state read without ?head= then asks the
    validator for the value only, not first for the whole head block (every batch in it: at 100
    participants a block of submissions is ~100 KB, fetched and parsed for each read).
    queries: for a REST API in the validator's own process, its ClientQueries: the client queries
    it answers at once (state, blocks, batches, transactions, receipts) are asked of it directly,
    not through the validator's ZMQ endpoint (~100 REST requests a round at ten participants,
    each two messages through the validator's own socket and I/O thread).
    """
    app = web.Application(client_max_size=client_max_size, middlewares=[_errors_and_logging])
    handlers = _Handlers(validator_url, timeout, connect_timeout, chain_head, queries)
    app[_MAX_SIZE] = client_max_size
    app[_HANDLERS] = handlers
    app.on_startup.append(handlers.start)
    app.on_cleanup.append(handlers.close)
    app.router.add_post("/batches", handlers.submit_batches)
    app.router.add_get("/batch_statuses", handlers.list_statuses)
    app.router.add_post("/batch_statuses", handlers.list_statuses)
    app.router.add_get("/state", handlers.list_state)
    app.router.add_get("/state/{address}", handlers.fetch_state)
    for kind in _CHAIN_RESOURCES:
        app.router.add_get(f"/{kind.plural}", functools.partial(handlers.list_resources, kind))
        app.router.add_get(f"/{kind.plural}/{{{kind.name}_id}}", functools.partial(handlers.fetch_resource, kind))
    app.router.add_get("/receipts", handlers.list_receipts)
    app.router.add_post("/receipts", handlers.list_receipts)
    app.router.add_get("/peers", handlers.fetch_peers)
    app.router.add_get("/status", handlers.fetch_status)
    return app


class RestApiServer:
    """A running REST API: `.url`, `.port` (the bound one when asked for port 0), `await close()`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int):
        self.runner = runner
        self.app = runner.app
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_rest_api(validator_url: str, host: str = "127.0.0.1", port: int = 8008, **options) -> RestApiServer:
    """Serve create_app(validator_url, **options) on host:port until close()."""
    runner = web.AppRunner(create_app(validator_url, **options), access_log=None)  # we log at DEBUG
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    LOGGER.info("REST API listening on http://%s:%s", host, bound_port)
    return RestApiServer(runner, host, bound_port)
