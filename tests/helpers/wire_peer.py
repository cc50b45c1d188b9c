"""A tiny stand-in for the validator's side of the component wire protocol, for tests.

`WirePeer` binds a zmq ROUTER on 127.0.0.1 and speaks Sawtooth 1.2's validator.proto framing:
it answers registrations, state get/set/delete (from `self.state`, enforcing each context's
declared inputs/outputs), event/receipt additions, event subscriptions (with catch-up from
`self.chain`), and can send TP_PROCESS_REQUEST, PING_REQUEST and CLIENT_EVENTS. `restart()`
closes the socket and binds a fresh one on the same port, like a validator restart.

Fault injection: replace `peer.handlers[message_type]` with your own `async fn(identity, msg)`,
or tweak the knobs (`register_status`, `register_protocol_version`, `catchup_overlap`, ...).
Every message received is also recorded; `await peer.expect(type)` returns the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import re

import zmq
import zmq.asyncio

from trustmesh.ledger import protos as pb

M = pb.Message
NULL_BLOCK_ID = "0000000000000000"


def run(coro, timeout: float = 10.0):
    """Run one test coroutine with a hard ceiling, so a broken protocol fails instead of hanging."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def block_id(num: int, fork: str = "") -> str:
    return hashlib.sha512(f"block-{fork}{num}".encode()).hexdigest()


def commit_event(num: int, previous: str, fork: str = "") -> "pb.Event":
    attrs = {
        "block_id": block_id(num, fork),
        "block_num": str(num),
        "state_root_hash": hashlib.sha256(f"root-{fork}{num}".encode()).hexdigest(),
        "previous_block_id": previous,
    }
    return pb.Event(
        event_type="sawtooth/block-commit",
        attributes=[pb.Event.Attribute(key=k, value=v) for k, v in attrs.items()],
    )


class Context:
    def __init__(self, inputs, outputs):
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.events: list[pb.Event] = []
        self.receipt_data: list[bytes] = []


class WirePeer:
    def __init__(self, port: int | None = None):
        self.port = port
        self.ctx = zmq.asyncio.Context.instance()
        self.sock: zmq.asyncio.Socket | None = None
        self._loop_task: asyncio.Task | None = None
        self._ids = itertools.count()
        self._pending: dict[str, asyncio.Future] = {}
        self._inbox: dict[int, asyncio.Queue] = {}
        self.errors: list[Exception] = []
        # validator-side state
        self.state: dict[str, bytes] = {}
        self.contexts: dict[str, Context] = {}
        self.gets: list[list[str]] = []  # the addresses of each state get request, in order
        self.registrations: list[tuple[bytes, pb.TpRegisterRequest]] = []
        self.subscribers: dict[bytes, list] = {}  # identity -> subscriptions (listening)
        self.chain: list[tuple[str, int, pb.EventList]] = []  # committed blocks: (id, num, events)
        # knobs
        self.register_status = pb.TpRegisterResponse.OK
        self.register_protocol_version: int | None = None  # None: echo the request's
        self.catchup_overlap = 0  # re-send this many already-known blocks in a catch-up
        self.handlers = {
            M.TP_REGISTER_REQUEST: self._on_register,
            M.TP_UNREGISTER_REQUEST: self._on_unregister,
            M.TP_STATE_GET_REQUEST: self._on_state_get,
            M.TP_STATE_SET_REQUEST: self._on_state_set,
            M.TP_STATE_DELETE_REQUEST: self._on_state_delete,
            M.TP_EVENT_ADD_REQUEST: self._on_event_add,
            M.TP_RECEIPT_ADD_DATA_REQUEST: self._on_receipt_add,
            M.CLIENT_EVENTS_SUBSCRIBE_REQUEST: self._on_subscribe,
            M.CLIENT_EVENTS_UNSUBSCRIBE_REQUEST: self._on_unsubscribe,
            M.CLIENT_BLOCK_LIST_REQUEST: self._on_block_list,
        }

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> "WirePeer":
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # sending to an unknown peer is an error, not a no-op
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)   # a reconnecting identity takes its route over
        if self.port is None:
            self.port = sock.bind_to_random_port("tcp://127.0.0.1")
        else:
            # The old listener is released asynchronously by libzmq: retry briefly.
            for attempt in range(100):
                try:
                    sock.bind(self.url)
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != zmq.EADDRINUSE or attempt == 99:
                        sock.close(linger=0)
                        raise
                    await asyncio.sleep(0.02)
        self.sock = sock
        self._loop_task = asyncio.get_running_loop().create_task(self._receive_loop())
        return self

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        for future in self._pending.values():
            future.cancel()
        self._pending.clear()

    async def restart(self, down_for: float = 0.0) -> None:
        """Validator restart: sessions, registrations and contexts are forgotten; state and chain kept."""
        await self.close()
        self.registrations.clear()
        self.subscribers.clear()
        self.contexts.clear()
        if down_for:
            await asyncio.sleep(down_for)
        await self.start()

    async def __aenter__(self) -> "WirePeer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- wire --------------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            identity, frame = await self.sock.recv_multipart()
            message = M.FromString(frame)
            future = self._pending.pop(message.correlation_id, None)
            if future is not None and not future.done():
                future.set_result(message)
            self._inbox.setdefault(message.message_type, asyncio.Queue()).put_nowait((identity, message))
            handler = self.handlers.get(message.message_type)
            if handler is not None:
                try:
                    await handler(identity, message)
                except Exception as exc:  # keep serving; tests can assert `errors` is empty
                    self.errors.append(exc)

    async def send(self, identity: bytes, message_type: int, content, correlation_id: str | None = None) -> str:
        correlation_id = correlation_id or f"peer-{next(self._ids)}"
        body = content if isinstance(content, bytes) else content.SerializeToString()
        frame = M(message_type=message_type, correlation_id=correlation_id, content=body)
        await self.sock.send_multipart([identity, frame.SerializeToString()])
        return correlation_id

    async def reply(self, identity: bytes, request: "pb.Message", message_type: int, content) -> None:
        await self.send(identity, message_type, content, request.correlation_id)

    async def request(self, identity: bytes, message_type: int, content, timeout: float = 2.0) -> "pb.Message":
        correlation_id = f"peer-{next(self._ids)}"
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        await self.send(identity, message_type, content, correlation_id)
        return await asyncio.wait_for(future, timeout)

    async def expect(self, message_type: int, timeout: float = 2.0) -> tuple[bytes, "pb.Message"]:
        """The next message of this type received (whether or not it was answered)."""
        queue = self._inbox.setdefault(message_type, asyncio.Queue())
        return await asyncio.wait_for(queue.get(), timeout)

    def received(self, message_type: int) -> int:
        """How many messages of this type are waiting in the inbox."""
        queue = self._inbox.get(message_type)
        return queue.qsize() if queue else 0

    # -- processor side ----------------------------------------------------------------------

    async def wait_registered(self, count: int = 1, timeout: float = 3.0) -> bytes:
        """Wait for `count` registrations on the current socket; returns the registrant identity."""
        async def poll():
            while len(self.registrations) < count:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)
        return self.registrations[-1][0]

    def make_process_request(
        self, family: str, version: str, payload: bytes = b"", *, inputs=(), outputs=(), context_id=None
    ) -> "pb.TpProcessRequest":
        context_id = context_id or f"ctx-{next(self._ids)}"
        self.contexts[context_id] = Context(inputs, outputs)
        header = pb.TransactionHeader(
            family_name=family, family_version=version, inputs=list(inputs), outputs=list(outputs),
            payload_sha512=hashlib.sha512(payload).hexdigest(), nonce=context_id,
        )
        return pb.TpProcessRequest(
            header=header, payload=payload, signature=hashlib.sha512(context_id.encode()).hexdigest(),
            context_id=context_id,
        )

    async def process(self, identity: bytes, family: str, version: str, payload: bytes = b"", *,
                      inputs=(), outputs=(), timeout: float = 2.0) -> "pb.TpProcessResponse":
        request = self.make_process_request(family, version, payload, inputs=inputs, outputs=outputs)
        reply = await self.request(identity, M.TP_PROCESS_REQUEST, request, timeout)
        assert reply.message_type == M.TP_PROCESS_RESPONSE, pb.message_type_name(reply.message_type)
        return pb.TpProcessResponse.FromString(reply.content)

    async def _on_register(self, identity, message):
        request = pb.TpRegisterRequest.FromString(message.content)
        self.registrations.append((identity, request))
        version = request.protocol_version if self.register_protocol_version is None else self.register_protocol_version
        await self.reply(identity, message, M.TP_REGISTER_RESPONSE,
                         pb.TpRegisterResponse(status=self.register_status, protocol_version=version))

    async def _on_unregister(self, identity, message):
        self.registrations[:] = [r for r in self.registrations if r[0] != identity]
        await self.reply(identity, message, M.TP_UNREGISTER_RESPONSE,
                         pb.TpUnregisterResponse(status=pb.TpUnregisterResponse.OK))

    @staticmethod
    def _covered(prefixes, addresses) -> bool:
        return all(any(a.startswith(p) for p in prefixes) for a in addresses)

    async def _on_state_get(self, identity, message):
        request = pb.TpStateGetRequest.FromString(message.content)
        self.gets.append(list(request.addresses))
        context = self.contexts.get(request.context_id)
        if context is None or not self._covered(context.inputs, request.addresses):
            response = pb.TpStateGetResponse(status=pb.TpStateGetResponse.AUTHORIZATION_ERROR)
        else:  # like the validator: one entry per address, empty data when unset
            response = pb.TpStateGetResponse(
                status=pb.TpStateGetResponse.OK,
                entries=[pb.TpStateEntry(address=a, data=self.state.get(a, b"")) for a in request.addresses],
            )
        await self.reply(identity, message, M.TP_STATE_GET_RESPONSE, response)

    async def _on_state_set(self, identity, message):
        request = pb.TpStateSetRequest.FromString(message.content)
        context = self.contexts.get(request.context_id)
        addresses = [e.address for e in request.entries]
        if context is None or not self._covered(context.outputs, addresses):
            response = pb.TpStateSetResponse(status=pb.TpStateSetResponse.AUTHORIZATION_ERROR)
        else:
            self.state.update((e.address, e.data) for e in request.entries)
            response = pb.TpStateSetResponse(status=pb.TpStateSetResponse.OK, addresses=addresses)
        await self.reply(identity, message, M.TP_STATE_SET_RESPONSE, response)

    async def _on_state_delete(self, identity, message):
        request = pb.TpStateDeleteRequest.FromString(message.content)
        context = self.contexts.get(request.context_id)
        if context is None or not self._covered(context.outputs, request.addresses):
            response = pb.TpStateDeleteResponse(status=pb.TpStateDeleteResponse.AUTHORIZATION_ERROR)
        else:
            deleted = [a for a in request.addresses if self.state.pop(a, None) is not None]
            response = pb.TpStateDeleteResponse(status=pb.TpStateDeleteResponse.OK, addresses=deleted)
        await self.reply(identity, message, M.TP_STATE_DELETE_RESPONSE, response)

    async def _on_event_add(self, identity, message):
        request = pb.TpEventAddRequest.FromString(message.content)
        await self._add_to_receipt(identity, message, request, "events", request.event,
                                   M.TP_EVENT_ADD_RESPONSE, pb.TpEventAddResponse)

    async def _on_receipt_add(self, identity, message):
        request = pb.TpReceiptAddDataRequest.FromString(message.content)
        await self._add_to_receipt(identity, message, request, "receipt_data", request.data,
                                   M.TP_RECEIPT_ADD_DATA_RESPONSE, pb.TpReceiptAddDataResponse)

    async def _add_to_receipt(self, identity, message, request, kept_in: str, item, response_type, response_cls):
        # An event or receipt data: kept with its context, ERROR when that context is unknown.
        context = self.contexts.get(request.context_id)
        if context is not None:
            getattr(context, kept_in).append(item)
        status = response_cls.ERROR if context is None else response_cls.OK
        await self.reply(identity, message, response_type, response_cls(status=status))

    # -- event side --------------------------------------------------------------------------

    def add_block(self, extra_events=(), fork: str = "") -> tuple[str, int, "pb.EventList"]:
        """Commit the next block to `self.chain` without telling anyone."""
        num = len(self.chain)
        previous = self.chain[-1][0] if self.chain else NULL_BLOCK_ID
        events = pb.EventList(events=[commit_event(num, previous, fork), *extra_events])
        block = (block_id(num, fork), num, events)
        self.chain.append(block)
        return block

    async def commit_block(self, extra_events=()) -> tuple[str, int, "pb.EventList"]:
        """Commit the next block and broadcast it to every listening subscriber."""
        block = self.add_block(extra_events)
        for identity in list(self.subscribers):
            await self.send(identity, M.CLIENT_EVENTS, block[2])
        return block

    async def wait_for_subscriber(self, count: int = 1, timeout: float = 3.0) -> None:
        """Wait until `count` subscribers are listening for live blocks."""
        async def poll():
            while len(self.subscribers) < count:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(poll(), timeout)

    async def _on_subscribe(self, identity, message):
        request = pb.ClientEventsSubscribeRequest.FromString(message.content)
        Response = pb.ClientEventsSubscribeResponse
        for sub in request.subscriptions:
            for f in sub.filters:
                if f.filter_type in (pb.EventFilter.REGEX_ANY, pb.EventFilter.REGEX_ALL):
                    try:
                        re.compile(f.match_string)
                    except re.error as exc:
                        await self.reply(identity, message, M.CLIENT_EVENTS_SUBSCRIBE_RESPONSE,
                                         Response(status=Response.INVALID_FILTER, response_message=str(exc)))
                        return
        start = len(self.chain)  # no known blocks: live events only
        if request.last_known_block_ids:
            ids = {b[0]: i for i, b in enumerate(self.chain)}
            known = [ids[k] for k in request.last_known_block_ids if k in ids]
            if NULL_BLOCK_ID in request.last_known_block_ids:
                known.append(-1)
            if not known:
                await self.reply(identity, message, M.CLIENT_EVENTS_SUBSCRIBE_RESPONSE,
                                 Response(status=Response.UNKNOWN_BLOCK,
                                          response_message="none of the last known blocks is in the chain"))
                return
            start = max(known) + 1
        await self.reply(identity, message, M.CLIENT_EVENTS_SUBSCRIBE_RESPONSE, Response(status=Response.OK))
        for _, _, events in self.chain[max(0, start - self.catchup_overlap):]:  # catch-up, one list per block
            await self.send(identity, M.CLIENT_EVENTS, events)
        self.subscribers[identity] = list(request.subscriptions)

    async def _on_block_list(self, identity, message):
        """Only what subscribers ask: the chain head (newest block first, limit 1)."""
        Response = pb.ClientBlockListResponse
        if not self.chain:
            response = Response(status=Response.NOT_READY)
        else:
            response = Response(status=Response.OK, head_id=self.chain[-1][0],
                                blocks=[pb.Block(header_signature=self.chain[-1][0])])
        await self.reply(identity, message, M.CLIENT_BLOCK_LIST_RESPONSE, response)

    async def _on_unsubscribe(self, identity, message):
        self.subscribers.pop(identity, None)
        await self.reply(identity, message, M.CLIENT_EVENTS_UNSUBSCRIBE_RESPONSE,
                         pb.ClientEventsUnsubscribeResponse(status=pb.ClientEventsUnsubscribeResponse.OK))
