"""The validator's component endpoint: one ZMQ ROUTER socket, Sawtooth 1.2's messages.

Transaction processors register and answer TP_PROCESS_REQUESTs here and use the state context
messages; clients (our REST API, the real sawtooth-rest-api, event subscribers) send CLIENT_*
requests. Every frame is a `Message`; replies carry the request's correlation_id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import uuid
from types import CoroutineType

import zmq
import zmq.asyncio

from .. import protos as pb
from ..messaging import SocketPump
from .batch_checks import check_batches
from .chain import NULL_BLOCK_ID, Chain, QueueFull
from .client_queries import ClientQueries
from .event_broadcast import InvalidFilter, Subscriber, Subscription, events_for_block
from .execution import AuthorizationError, BlockExecutor
from .processors import PROTOCOL_VERSION, ProcessorRegistry

LOGGER = logging.getLogger(__name__)
M = pb.Message
_BATCH_ID = re.compile(r"\A[0-9a-f]{128}\Z")
_EVENT_ADD_OK = pb.TpEventAddResponse(status=pb.TpEventAddResponse.OK).SerializeToString()  # serialized once


class ComponentEndpoint:
    def __init__(
        self,
        url: str,
        chain: Chain,
        registry: ProcessorRegistry,
        executor: BlockExecutor,
        queries: ClientQueries,
        *,
        ping_interval: float = 10.0,
        status_wait_default: float = 300.0,
    ):
        self._url = url
        self.chain = chain
        self.registry = registry
        self.executor = executor
        self.queries = queries
        self._ping_interval = ping_interval
        self._status_wait_default = status_wait_default
        self._socket: zmq.asyncio.Socket | None = None
        self._pump: SocketPump | None = None
        self._subscribers: dict[bytes, Subscriber] = {}
        self._tasks: set[asyncio.Task] = set()
        # Submitted batches are checked here: the signature checks (~50 us a transaction, most
        # of a submission's cost) run without the GIL, so the event loop goes on executing
        # meanwhile. One thread: submissions are checked, and so queued, in arrival order.
        self._checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batch-checks")
        self.bound_url = url
        self._handlers = {
            M.TP_REGISTER_REQUEST: self._tp_register,
            M.TP_UNREGISTER_REQUEST: self._tp_unregister,
            M.TP_PROCESS_RESPONSE: self._tp_process_response,
            M.TP_STATE_GET_REQUEST: self._tp_state_get,
            M.TP_STATE_SET_REQUEST: self._tp_state_set,
            M.TP_STATE_DELETE_REQUEST: self._tp_state_delete,
            M.TP_RECEIPT_ADD_DATA_REQUEST: self._tp_receipt_add_data,
            M.TP_EVENT_ADD_REQUEST: self._tp_event_add,
            M.PING_REQUEST: self._ping_request,
            M.PING_RESPONSE: self._ping_response,
            M.CLIENT_BATCH_SUBMIT_REQUEST: self._batch_submit,
            M.CLIENT_BATCH_STATUS_REQUEST: self._batch_status,
            M.CLIENT_EVENTS_SUBSCRIBE_REQUEST: self._events_subscribe,
            M.CLIENT_EVENTS_UNSUBSCRIBE_REQUEST: self._events_unsubscribe,
            M.CLIENT_EVENTS_GET_REQUEST: self._events_get,
        }

    # -- socket plumbing ---------------------------------------------------------------

    async def start(self) -> None:
        sock = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer must fail loudly
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a reconnecting peer takes over its identity
        sock.bind(self._url)
        self.bound_url = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._socket = sock
        self._pump = SocketPump(sock, self._on_frames)
        self._spawn(self._ping_loop())
        LOGGER.info("component endpoint listening on %s", self.bound_url)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pump is not None:
            self._pump.close()
            self._pump = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        self._checker.shutdown(wait=False, cancel_futures=True)

    async def send(self, identity: bytes, message_type: int, content, correlation_id: str | None = None) -> bool:
        """Send to one peer; False (and the peer forgotten) when it is gone."""
        result = self._post(identity, message_type, content, correlation_id)
        return result if isinstance(result, bool) else await result

    def _post(self, identity: bytes, message_type: int, content, correlation_id: str | None = None):
        """Send without a task or a future when the socket takes the message at once (nearly
        always): True/False as send(); otherwise a coroutine to await for the answer."""
        body = content if isinstance(content, bytes) else content.SerializeToString()
        frame = M(message_type=message_type, correlation_id=correlation_id or uuid.uuid4().hex, content=body)
        if self._pump is None:
            return False
        try:
            waiting = self._pump.send([identity, frame.SerializeToString()])
        except zmq.ZMQError as exc:
            return self._send_failed(identity, exc)
        return True if waiting is None else self._await_queued(identity, waiting)

    async def _await_queued(self, identity: bytes, waiting) -> bool:
        try:
            await waiting
        except zmq.ZMQError as exc:
            return self._send_failed(identity, exc)
        return True

    def _send_failed(self, identity: bytes, exc: "zmq.ZMQError") -> bool:
        if exc.errno == zmq.EHOSTUNREACH:
            self._forget(identity, "disconnected")
            return False
        raise exc

    def _forget(self, identity: bytes, reason: str) -> None:
        self.registry.unregister(identity, reason)
        self._subscribers.pop(identity, None)

    async def send_process_request(self, identity: bytes, correlation_id: str, request) -> None:
        sent = self._post(identity, M.TP_PROCESS_REQUEST, request, correlation_id)
        if sent is False or (sent is not True and not await sent):
            raise ConnectionError("processor disconnected")

    def _on_frames(self, frames: list) -> None:
        if len(frames) != 2:
            return  # not the two frames a DEALER sends
        identity, frame = frames
        try:
            message = M.FromString(frame)
        except Exception:
            LOGGER.warning("dropped a frame that is not a Sawtooth Message (%d bytes)", len(frame))
            return
        handler = self._handlers.get(message.message_type)
        if handler is None and message.message_type in self.queries.HANDLED_TYPES:
            handler = self._client_query
        if handler is None:
            LOGGER.warning("no handler for %s; ignored", pb.message_type_name(message.message_type))
            return
        try:
            # Most handlers answer synchronously; only what must wait gets a task.
            result = handler(identity, message)
            if isinstance(result, CoroutineType):  # asyncio.iscoroutine() costs an ABC check for bools
                self._spawn(self._guard(result, message))
        except Exception:
            LOGGER.exception("handling %s failed", pb.message_type_name(message.message_type))

    async def _guard(self, coro, message) -> None:
        try:
            await coro
        except Exception:
            LOGGER.exception("handling %s failed", pb.message_type_name(message.message_type))

    async def _ping_loop(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval)
            for identity in self.registry.stale(3 * self._ping_interval):
                self._forget(identity, "stopped answering pings")
            for identity in self.registry.identities():
                await self.send(identity, M.PING_REQUEST, pb.PingRequest())

    def _reply(self, identity: bytes, request: "pb.Message", message_type: int, content):
        """From a synchronous handler: returns a coroutine only when the send has to wait."""
        return self._post(identity, message_type, content, request.correlation_id)

    async def _areply(self, identity: bytes, request: "pb.Message", message_type: int, content) -> bool:
        return await self.send(identity, message_type, content, request.correlation_id)

    # -- transaction processors --------------------------------------------------------

    def _tp_register(self, identity, message):
        request = pb.TpRegisterRequest.FromString(message.content)
        R = pb.TpRegisterResponse
        if request.protocol_version > PROTOCOL_VERSION:
            # Like Sawtooth 1.2: refuse features we do not have and say which level we speak.
            LOGGER.warning("processor %s %s asks for protocol version %d; this validator speaks %d",
                           request.family, request.version, request.protocol_version, PROTOCOL_VERSION)
            response = R(status=R.ERROR, protocol_version=PROTOCOL_VERSION)
        elif not request.family or not request.version:
            LOGGER.warning("registration without family or version refused")
            response = R(status=R.ERROR, protocol_version=request.protocol_version)
        else:
            self.registry.register(identity, request)
            # Echo the requested level: the SDK checks it got exactly what it asked for.
            response = R(status=R.OK, protocol_version=request.protocol_version)
        return self._reply(identity, message, M.TP_REGISTER_RESPONSE, response)

    def _tp_unregister(self, identity, message):
        self.registry.unregister(identity)
        response = pb.TpUnregisterResponse(status=pb.TpUnregisterResponse.OK)
        return self._reply(identity, message, M.TP_UNREGISTER_RESPONSE, response)

    def _tp_process_response(self, identity, message):
        if not self.registry.resolve(identity, message.correlation_id, message):
            LOGGER.debug("late or unknown TP_PROCESS_RESPONSE %s ignored", message.correlation_id)

    def _context_call(self, identity, message, request_cls, response_cls, response_type, action):
        request = request_cls.FromString(message.content)
        context = self.executor.contexts.get(request.context_id)
        response = response_cls()
        try:
            if context is None:
                raise AuthorizationError(f"context {request.context_id!r} is not active")
            action(context, request, response)
            response.status = response_cls.OK
        except AuthorizationError as exc:
            LOGGER.info("state access refused: %s", exc)
            response.Clear()
            response.status = response_cls.AUTHORIZATION_ERROR
        return self._reply(identity, message, response_type, response)

    def _tp_state_get(self, identity, message):
        def get(context, request, response):
            for address, data in context.get(list(request.addresses)):
                response.entries.add(address=address, data=data)

        return self._context_call(identity, message, pb.TpStateGetRequest, pb.TpStateGetResponse,
                                  M.TP_STATE_GET_RESPONSE, get)

    def _tp_state_set(self, identity, message):
        def set_(context, request, response):
            entries = [(e.address, e.data) for e in request.entries]
            context.set(entries)
            response.addresses.extend(address for address, _ in entries)

        return self._context_call(identity, message, pb.TpStateSetRequest, pb.TpStateSetResponse,
                                  M.TP_STATE_SET_RESPONSE, set_)

    def _tp_state_delete(self, identity, message):
        def delete(context, request, response):
            context.delete(list(request.addresses))
            response.addresses.extend(request.addresses)

        return self._context_call(identity, message, pb.TpStateDeleteRequest, pb.TpStateDeleteResponse,
                                  M.TP_STATE_DELETE_RESPONSE, delete)

    def _tp_receipt_add_data(self, identity, message):
        request = pb.TpReceiptAddDataRequest.FromString(message.content)
        context = self.executor.contexts.get(request.context_id)
        status = pb.TpReceiptAddDataResponse.ERROR
        if context is not None:
            context.data.append(request.data)
            status = pb.TpReceiptAddDataResponse.OK
        response = pb.TpReceiptAddDataResponse(status=status)
        return self._reply(identity, message, M.TP_RECEIPT_ADD_DATA_RESPONSE, response)

    def _tp_event_add(self, identity, message):
        request = pb.TpEventAddRequest.FromString(message.content)
        context = self.executor.contexts.get(request.context_id)
        event = request.event
        if context is not None and event.event_type:
            context.events.append(event)
            return self._reply(identity, message, M.TP_EVENT_ADD_RESPONSE, _EVENT_ADD_OK)
        response = pb.TpEventAddResponse(status=pb.TpEventAddResponse.ERROR)
        return self._reply(identity, message, M.TP_EVENT_ADD_RESPONSE, response)

    def _ping_request(self, identity, message):
        return self._reply(identity, message, M.PING_RESPONSE, pb.PingResponse())

    def _ping_response(self, identity, message):
        self.registry.seen(identity)

    # -- clients -----------------------------------------------------------------------

    def _client_query(self, identity, message):
        response_type, body = self.queries.handle(message.message_type, message.content)
        return self._reply(identity, message, response_type, body)

    def _batch_submit(self, identity, message):
        try:
            batches = list(pb.ClientBatchSubmitRequest.FromString(message.content).batches)
        except Exception:
            batches = []
        if not batches:
            LOGGER.warning("malformed or empty ClientBatchSubmitRequest refused")
            response = pb.ClientBatchSubmitResponse(status=pb.ClientBatchSubmitResponse.INVALID_BATCH)
            return self._reply(identity, message, M.CLIENT_BATCH_SUBMIT_RESPONSE, response)
        return self._submit_checked(identity, message, batches)

    async def _submit_checked(self, identity, message, batches):
        response = pb.ClientBatchSubmitResponse(status=pb.ClientBatchSubmitResponse.OK)
        try:
            checks = await asyncio.get_running_loop().run_in_executor(
                self._checker, check_batches, batches, self.chain.settings.limits)
            if self.chain.submit(batches, checks):
                response.status = pb.ClientBatchSubmitResponse.INVALID_BATCH
        except QueueFull as exc:
            LOGGER.info("submission refused, queue full: %s", exc)
            response.status = pb.ClientBatchSubmitResponse.QUEUE_FULL
        except Exception:
            LOGGER.warning("malformed ClientBatchSubmitRequest refused", exc_info=True)
            response.status = pb.ClientBatchSubmitResponse.INVALID_BATCH
        await self._areply(identity, message, M.CLIENT_BATCH_SUBMIT_RESPONSE, response)

    async def _batch_status(self, identity, message):
        response = pb.ClientBatchStatusResponse(status=pb.ClientBatchStatusResponse.OK)
        try:
            request = pb.ClientBatchStatusRequest.FromString(message.content)
        except Exception:
            response.status = pb.ClientBatchStatusResponse.INTERNAL_ERROR
            return await self._areply(identity, message, M.CLIENT_BATCH_STATUS_RESPONSE, response)
        ids = list(request.batch_ids)
        if not ids:
            response.status = pb.ClientBatchStatusResponse.NO_RESOURCE
        elif not all(_BATCH_ID.match(i) for i in ids):
            response.status = pb.ClientBatchStatusResponse.INVALID_ID
        else:
            if request.wait:
                await self.chain.wait_until_settled(ids, request.timeout or self._status_wait_default)
            response.batch_statuses.extend(self.chain.batch_status(i) for i in ids)
        await self._areply(identity, message, M.CLIENT_BATCH_STATUS_RESPONSE, response)

    # -- events ------------------------------------------------------------------------

    async def _events_subscribe(self, identity, message):
        R = pb.ClientEventsSubscribeResponse
        request = pb.ClientEventsSubscribeRequest.FromString(message.content)
        try:
            subscriptions = tuple(Subscription.from_proto(s) for s in request.subscriptions)
        except InvalidFilter as exc:
            return await self._areply(identity, message, M.CLIENT_EVENTS_SUBSCRIBE_RESPONSE,
                                     R(status=R.INVALID_FILTER, response_message=str(exc)))
        last_num = None
        if request.last_known_block_ids:
            known = [-1 if b == NULL_BLOCK_ID else self.chain.store.block_num_of(b)
                     for b in request.last_known_block_ids]
            known = [n for n in known if n is not None]
            if not known:
                return await self._areply(identity, message, M.CLIENT_EVENTS_SUBSCRIBE_RESPONSE, R(
                    status=R.UNKNOWN_BLOCK,
                    response_message="none of last_known_block_ids is on this validator's chain",
                ))
            last_num = max(known)
        subscriber = Subscriber(identity, subscriptions, last_num)
        async with self.chain.commit_lock:  # no block may be published between ack and catch-up
            self._subscribers[identity] = subscriber
            await self._areply(identity, message, M.CLIENT_EVENTS_SUBSCRIBE_RESPONSE, R(status=R.OK))
            if last_num is not None:
                for block in self.chain.store.blocks_ascending(last_num + 1):
                    events = events_for_block(block, self._receipts(block), subscriptions)
                    if not await self.send(identity, M.CLIENT_EVENTS, pb.EventList(events=events)):
                        return
            subscriber.listening = True
        LOGGER.info("event subscriber joined (%d subscriptions, catch-up from %s)", len(subscriptions), last_num)

    def _events_unsubscribe(self, identity, message):
        self._subscribers.pop(identity, None)
        R = pb.ClientEventsUnsubscribeResponse
        return self._reply(identity, message, M.CLIENT_EVENTS_UNSUBSCRIBE_RESPONSE, R(status=R.OK))

    def _events_get(self, identity, message):
        R = pb.ClientEventsGetResponse
        request = pb.ClientEventsGetRequest.FromString(message.content)
        try:
            subscriptions = tuple(Subscription.from_proto(s) for s in request.subscriptions)
        except InvalidFilter:
            return self._reply(identity, message, M.CLIENT_EVENTS_GET_RESPONSE, R(status=R.INVALID_FILTER))
        response = R(status=R.OK)
        for block_id in request.block_ids:
            block = self.chain.store.block_by_id(block_id)
            if block is None:
                return self._reply(identity, message, M.CLIENT_EVENTS_GET_RESPONSE, R(status=R.UNKNOWN_BLOCK))
            response.events.extend(events_for_block(block, self._receipts(block), subscriptions))
        return self._reply(identity, message, M.CLIENT_EVENTS_GET_RESPONSE, response)

    def _receipts(self, block) -> list:
        receipts = []
        for batch in block.batches:
            for txn in batch.transactions:
                receipt = self.chain.store.receipt(txn.header_signature)
                if receipt is not None:
                    receipts.append(receipt)
        return receipts

    async def broadcast_block(self, block, receipts) -> None:
        """Called by the chain, under its commit lock, once a block is durable."""
        for identity, subscriber in list(self._subscribers.items()):
            if not subscriber.listening:
                continue
            events = events_for_block(block, receipts, subscriber.subscriptions)
            if events:
                await self.send(identity, M.CLIENT_EVENTS, pb.EventList(events=events))
