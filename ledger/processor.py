"""Transaction-processor runtime: the asyncio counterpart of sawtooth_sdk.processor.

A `TransactionProcessor` connects to a validator's component endpoint, registers every
(family, version) of its handlers and answers TP_PROCESS_REQUESTs by running the matching
handler's `apply()`. Handlers read and write state through a `Context` bound to the request's
context_id; the validator enforces the transaction's declared inputs/outputs on every access.

Wire protocol (Sawtooth 1.2 processor.proto / state_context.proto / validator.proto):
  TP_REGISTER_REQUEST   one per (family, version); answered by TP_REGISTER_RESPONSE
  TP_PROCESS_REQUEST    from the validator; we answer TP_PROCESS_RESPONSE, same correlation_id
  TP_STATE_{GET,SET,DELETE}_REQUEST, TP_EVENT_ADD_REQUEST, TP_RECEIPT_ADD_DATA_REQUEST
  PING_REQUEST          from the validator; we answer PING_RESPONSE, same correlation_id
  TP_UNREGISTER_REQUEST on stop()
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Mapping

from . import protos as pb
from .messaging import ConnectionLost, ValidatorConnection
from .next_link import next_link

LOGGER = logging.getLogger(__name__)

# TpRegisterRequest feature level: 1 = "request_header_style is set", what SDK 1.2 sends once a
# header style is chosen. The validator echoes it back when it supports it.
PROTOCOL_VERSION = 1

_MSG = pb.Message
_OK_RESPONSE = pb.TpProcessResponse(status=pb.TpProcessResponse.OK).SerializeToString()  # the usual answer


class _ProcessingError(Exception):
    """An outcome a handler reports: a message and optional extended_data for the receipt."""

    def __init__(self, message: str, extended_data: bytes = b""):
        super().__init__(message)
        if not isinstance(extended_data, (bytes, bytearray)):
            raise TypeError("extended_data must be bytes")
        self.message = message
        self.extended_data = bytes(extended_data)


class InvalidTransaction(_ProcessingError):
    """The transaction is invalid; the validator drops it (and its batch) for good."""


class InternalError(_ProcessingError):
    """Processing failed for a reason unrelated to the transaction; the validator retries it."""


class AuthorizationError(InvalidTransaction):
    """State access outside the transaction's declared inputs/outputs."""


class RegistrationError(RuntimeError):
    """The validator refused to register a (family, version)."""


class TransactionHandler:
    """Business logic of one transaction family. Subclass, set the three attributes, write apply()."""

    family_name: str = ""
    family_versions: list[str] = []
    namespaces: list[str] = []

    async def apply(self, transaction: "pb.TpProcessRequest", context: "Context") -> None:
        raise NotImplementedError


def _describe(addresses: list[str], limit: int = 4) -> str:
    shown = ", ".join(addresses[:limit])
    more = len(addresses) - limit
    return shown + (f" (and {more} more)" if more > 0 else "")


def _name(handler: "TransactionHandler", header) -> str:
    """How logs and errors name a handler; only built when something goes wrong."""
    return f"{type(handler).__name__} ({header.family_name} {header.family_version})"


def _addresses(addresses: Iterable[str]) -> list[str]:
    # A bare string would be iterated character by character: refuse it loudly.
    if isinstance(addresses, (str, bytes)):
        raise TypeError("addresses must be an iterable of address strings, not a single string")
    return list(addresses)


class Context:
    """State, events and receipt data of one transaction, bound to its context_id."""

    def __init__(self, connection: ValidatorConnection, context_id: str, generation: int):
        self._conn = connection
        self.context_id = context_id
        self._generation = generation  # link generation the TP_PROCESS_REQUEST arrived on
        # Values read in this context and not written since (b"": unset). A context's state
        # changes only by its own writes, so what it read it may read again without asking; what
        # it wrote it asks for again (the validator then checks the address is a declared input).
        self._read: dict[str, bytes] = {}

    async def _call(self, request_type: int, response_type: int, request, response_cls, timeout,
                    what: str, touched: list[str] | None = None, declared: str = ""):
        """The validator's answer to one context request; raises unless its status is OK.

        what: the request as errors name it; touched/declared: for state requests, the
        addresses asked for and which declared list ("inputs"/"outputs") had to cover them."""
        # The context only exists in the validator session that sent the request.
        if self._conn.generation != self._generation:
            raise ConnectionLost("the validator that owns this context went away")
        try:
            reply = await self._conn.request(request_type, request, timeout=timeout)
        except asyncio.TimeoutError:
            raise InternalError(
                f"{pb.message_type_name(request_type)} got no answer within {timeout}s"
            ) from None
        if reply.message_type != response_type:
            raise InternalError(
                f"validator answered {pb.message_type_name(request_type)} with "
                f"{pb.message_type_name(reply.message_type)}"
            )
        response = response_cls.FromString(reply.content)
        status = response.status
        if touched is not None and status == response_cls.AUTHORIZATION_ERROR:
            raise AuthorizationError(
                f"{what} of {_describe(touched)}: outside the transaction's declared {declared}"
            )
        if status != response_cls.OK:
            raise InternalError(f"{what} failed with status {status}")
        return response

    async def get_state(self, addresses: Iterable[str], timeout: float | None = None) -> dict[str, bytes]:
        """Values at the given addresses; addresses that are unset (empty) are left out."""
        addresses = _addresses(addresses)
        missing = [a for a in dict.fromkeys(addresses) if a not in self._read]
        if missing:
            response = await self._call(
                _MSG.TP_STATE_GET_REQUEST, _MSG.TP_STATE_GET_RESPONSE,
                pb.TpStateGetRequest(context_id=self.context_id, addresses=missing),
                pb.TpStateGetResponse, timeout, "get_state", touched=missing, declared="inputs",
            )
            self._read.update(dict.fromkeys(missing, b""))
            self._read.update((entry.address, entry.data) for entry in response.entries)
        return {a: self._read[a] for a in addresses if self._read[a]}

    async def prefetch(self, addresses: Iterable[str], timeout: float | None = None) -> None:
        """Read `addresses` now, in one request, so that the reads a rule makes one after another
        find them here: a request is a round trip through the validator. Best effort: an address
        this transaction did not declare fails nothing here (the rule's own read of it says so)."""
        try:
            await self.get_state(addresses, timeout)
        except AuthorizationError:
            pass

    async def set_state(self, entries: Mapping[str, bytes], timeout: float | None = None) -> list[str]:
        """Write the given address -> value pairs; returns the addresses the validator set."""
        request = pb.TpStateSetRequest(context_id=self.context_id)
        add = request.entries.add  # filling in place: about half the cost of building entries first
        for address, data in entries.items():
            add(address=address, data=data)
        response = await self._call(
            _MSG.TP_STATE_SET_REQUEST, _MSG.TP_STATE_SET_RESPONSE, request, pb.TpStateSetResponse, timeout,
            "set_state", touched=list(entries), declared="outputs",
        )
        for address in entries:
            self._read.pop(address, None)
        return list(response.addresses)

    async def delete_state(self, addresses: Iterable[str], timeout: float | None = None) -> list[str]:
        """Unset the given addresses; returns the addresses the validator deleted."""
        addresses = _addresses(addresses)
        response = await self._call(
            _MSG.TP_STATE_DELETE_REQUEST, _MSG.TP_STATE_DELETE_RESPONSE,
            pb.TpStateDeleteRequest(context_id=self.context_id, addresses=addresses),
            pb.TpStateDeleteResponse, timeout, "delete_state", touched=addresses, declared="outputs",
        )
        for address in addresses:
            self._read.pop(address, None)
        return list(response.addresses)

    async def add_event(
        self,
        event_type: str,
        attributes: Iterable[tuple[str, str]] = (),
        data: bytes = b"",
        timeout: float | None = None,
    ) -> None:
        """Attach an event to this transaction's receipt; subscribers see it once the block commits."""
        # Plain dicts for the nested messages: cheaper than building Event objects to copy in.
        event = {
            "event_type": event_type,
            "attributes": [{"key": k, "value": v} for k, v in attributes],
            "data": data,
        }
        await self._call(
            _MSG.TP_EVENT_ADD_REQUEST, _MSG.TP_EVENT_ADD_RESPONSE,
            pb.TpEventAddRequest(context_id=self.context_id, event=event),
            pb.TpEventAddResponse, timeout, f"add_event({event_type!r})",
        )

    async def add_receipt_data(self, data: bytes, timeout: float | None = None) -> None:
        """Attach opaque data to this transaction's receipt."""
        await self._call(
            _MSG.TP_RECEIPT_ADD_DATA_REQUEST, _MSG.TP_RECEIPT_ADD_DATA_RESPONSE,
            pb.TpReceiptAddDataRequest(context_id=self.context_id, data=data),
            pb.TpReceiptAddDataResponse, timeout, "add_receipt_data",
        )


class TransactionProcessor:
    """Serves registered handlers to one validator until stop()."""

    def __init__(self, url: str, *, max_occupancy: int = 10, identity: str | None = None):
        if max_occupancy < 1:
            raise ValueError("max_occupancy must be at least 1")
        self.url = url
        self.max_occupancy = max_occupancy
        self._handlers: dict[tuple[str, str], TransactionHandler] = {}
        self._conn = ValidatorConnection(
            url, on_message=self._on_message, on_reconnect=self._on_reconnect, identity=identity
        )
        # The validator never sends more than max_occupancy at once; this is only a safety net.
        self._slots = asyncio.Semaphore(max_occupancy)
        self._register_lock = asyncio.Lock()
        self._registered_generation: int | None = None
        self._inflight: set[asyncio.Task] = set()
        self._started = False
        self._closed = False
        self._stopping = asyncio.Event()  # stop() began, or a fatal error asks run() to end
        self._stopped = asyncio.Event()   # stop() finished
        self._failure: BaseException | None = None

    # -- setup -------------------------------------------------------------------------------

    def add_handler(self, handler: TransactionHandler) -> None:
        if self._started:
            raise RuntimeError("add handlers before start()")
        if not handler.family_name or not handler.family_versions:
            raise ValueError(f"{type(handler).__name__} needs a family_name and family_versions")
        for version in handler.family_versions:
            key = (handler.family_name, version)
            if key in self._handlers:
                raise ValueError(f"a handler for {key[0]} {key[1]} is already added")
            self._handlers[key] = handler

    def _register_requests(self) -> list["pb.TpRegisterRequest"]:
        return [
            pb.TpRegisterRequest(
                family=family,
                version=version,
                namespaces=list(handler.namespaces),
                max_occupancy=self.max_occupancy,
                protocol_version=PROTOCOL_VERSION,
                request_header_style=pb.TpRegisterRequest.EXPANDED,
            )
            for (family, version), handler in self._handlers.items()
        ]

    async def start(self) -> None:
        """Connect and register every (family, version); waits until the validator accepts."""
        if not self._handlers:
            raise ValueError("add at least one handler before start()")
        if self._started:
            raise RuntimeError("start() was already called")
        self._started = True
        await self._conn.start()
        try:
            await self._register()
        except BaseException:
            await self.stop()  # do not leave a half-registered processor and an open socket
            raise

    async def _register(self) -> None:
        """Register on the current link; retried when the link drops mid-way."""
        async with self._register_lock:
            while (generation := await next_link(self._conn, self._stopping, lambda: self._closed)) is not None:
                if self._registered_generation == generation:
                    return  # this validator session already knows us
                try:
                    await self._send_registrations()
                except ConnectionLost:
                    LOGGER.warning("validator at %s went away during registration; retrying", self.url)
                    continue
                self._registered_generation = generation
                return
            raise ConnectionLost("the processor was stopped before it registered")

    async def _send_registrations(self) -> None:
        requests = self._register_requests()
        replies = await asyncio.gather(
            *(self._conn.request(_MSG.TP_REGISTER_REQUEST, r) for r in requests), return_exceptions=True
        )
        for request, reply in zip(requests, replies):
            if isinstance(reply, BaseException):
                raise reply
            response = pb.TpRegisterResponse.FromString(reply.content)
            if response.status != pb.TpRegisterResponse.OK:
                raise RegistrationError(
                    f"validator at {self.url} refused to register {request.family} {request.version} "
                    f"(status {pb.TpRegisterResponse.Status.Name(response.status)}, validator "
                    f"protocol_version {response.protocol_version}, ours {PROTOCOL_VERSION})"
                )
            if response.protocol_version != PROTOCOL_VERSION:
                # We only ask for EXPANDED headers, which is also what older validators send, so
                # a different answer costs nothing: note it and carry on.
                LOGGER.warning(
                    "validator at %s answered protocol_version %d to our %d for %s %s; continuing",
                    self.url, response.protocol_version, PROTOCOL_VERSION, request.family, request.version,
                )
            LOGGER.info(
                "registered %s %s (namespaces %s, max_occupancy %d) with %s",
                request.family, request.version, list(request.namespaces), self.max_occupancy, self.url,
            )

    async def _on_reconnect(self) -> None:
        # A restarted validator has forgotten every registration: introduce ourselves again.
        LOGGER.info("validator at %s is back; registering again", self.url)
        try:
            await self._register()
        except RegistrationError as exc:
            LOGGER.error("%s", exc)
            self._failure = exc
            self._stopping.set()  # run() re-raises it

    # -- serving -----------------------------------------------------------------------------

    async def _on_message(self, message: "pb.Message") -> None:
        message_type = message.message_type
        if message_type == _MSG.TP_PROCESS_REQUEST:
            task = asyncio.current_task()
            self._inflight.add(task)
            try:
                await self._process(message)
            finally:
                self._inflight.discard(task)
        elif message_type == _MSG.PING_REQUEST:
            await self._conn.send(_MSG.PING_RESPONSE, pb.PingResponse(), message.correlation_id)
        else:
            # e.g. a late reply to a request that already failed with ConnectionLost
            LOGGER.debug("ignoring unsolicited %s", pb.message_type_name(message_type))

    async def _process(self, message: "pb.Message") -> None:
        generation = self._conn.generation
        response = await self._outcome(message, generation)
        if response is None:
            return
        if self._conn.generation != generation:
            # The validator that asked is gone; its successor re-sends the transaction.
            LOGGER.info("dropping the answer to %s: the validator reconnected", message.correlation_id)
            return
        try:
            await self._conn.send(_MSG.TP_PROCESS_RESPONSE, response, message.correlation_id)
        except ConnectionLost:
            LOGGER.info("dropping the answer to %s: connection closed", message.correlation_id)

    async def _outcome(self, message: "pb.Message", generation: int) -> "pb.TpProcessResponse | bytes | None":
        """The TpProcessResponse for one request (serialized when OK), or None when the answer
        must be dropped."""
        Response = pb.TpProcessResponse
        try:
            request = pb.TpProcessRequest.FromString(message.content)
            header = request.header
            if not request.HasField("header") and request.header_bytes:  # RAW style, just in case
                header = pb.TransactionHeader.FromString(request.header_bytes)
        except Exception as exc:
            return Response(status=Response.INTERNAL_ERROR, message=f"malformed TpProcessRequest: {exc}")

        handler = self._handlers.get((header.family_name, header.family_version))
        if handler is None:
            known = ", ".join(f"{f} {v}" for f, v in self._handlers) or "none"
            return Response(
                status=Response.INVALID_TRANSACTION,
                message=f"no handler for transaction family {header.family_name!r} version "
                f"{header.family_version!r} in this processor (it serves: {known})",
            )

        async with self._slots:
            try:
                await handler.apply(request, Context(self._conn, request.context_id, generation))
            except ConnectionLost:
                LOGGER.info("validator went away while %s applied %s; dropping it",
                            _name(handler, header), request.signature[:16])
                return None
            except InvalidTransaction as exc:
                LOGGER.debug("%s: invalid transaction %s: %s", _name(handler, header), request.signature[:16], exc)
                return Response(
                    status=Response.INVALID_TRANSACTION, message=str(exc), extended_data=exc.extended_data
                )
            except InternalError as exc:
                LOGGER.warning("%s: internal error on %s: %s", _name(handler, header), request.signature[:16], exc)
                return Response(
                    status=Response.INTERNAL_ERROR, message=str(exc), extended_data=exc.extended_data
                )
            except Exception as exc:
                name = _name(handler, header)
                LOGGER.exception("%s failed on transaction %s", name, request.signature[:16])
                return Response(
                    status=Response.INTERNAL_ERROR,
                    message=f"handler {name} failed: {type(exc).__name__}: {exc}",
                )
        return _OK_RESPONSE

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self) -> None:
        """start() and serve until stop() is called or the task is cancelled."""
        await self.start()
        try:
            await self._stopping.wait()
            if self._failure is not None:
                raise self._failure
        finally:
            await self.stop()

    async def stop(self, grace: float = 5.0) -> None:
        """Unregister, let in-flight transactions answer (up to `grace` s), then close."""
        if self._closed:
            await self._stopped.wait()  # a second caller returns once the first one is done
            return
        self._closed = True
        self._stopping.set()
        if self._registered_generation is not None and self._conn.connected.is_set():
            try:
                reply = await self._conn.request(_MSG.TP_UNREGISTER_REQUEST, pb.TpUnregisterRequest(), timeout=1.0)
                status = pb.TpUnregisterResponse.FromString(reply.content).status
                LOGGER.info("unregistered from %s: %s", self.url, pb.TpUnregisterResponse.Status.Name(status))
            except (asyncio.TimeoutError, ConnectionLost) as exc:
                LOGGER.info("unregistering from %s: no answer (%s)", self.url, type(exc).__name__)
        pending = self._inflight - {asyncio.current_task()}
        if pending:
            await asyncio.wait(pending, timeout=grace)
        await self._conn.close()
        self._stopped.set()
