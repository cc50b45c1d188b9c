"""One asyncio ZMQ DEALER connection to a validator's component endpoint.

Every frame is a serialized `Message` (validator.proto). Replies are matched to requests by
correlation_id; anything else (TP_PROCESS_REQUEST, PING_REQUEST, CLIENT_EVENTS, ...) goes to
`on_message`. ZMQ reconnects the TCP link by itself, but a restarted validator has forgotten us:
a socket monitor tells us when the link comes back so the owner can register or subscribe again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import uuid
from typing import Awaitable, Callable

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from . import protos as pb

LOGGER = logging.getLogger(__name__)

MessageHandler = Callable[["pb.Message"], Awaitable[None]]
ReconnectHandler = Callable[[], Awaitable[None]]


class ConnectionLost(ConnectionError):
    """The validator went away while a request was waiting for its reply."""


class ValidatorConnection:
    def __init__(
        self,
        url: str,
        *,
        on_message: MessageHandler | None = None,
        on_reconnect: ReconnectHandler | None = None,
        identity: str | None = None,
    ):
        self.url = url
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        # A stable identity lets the validator's ROUTER hand the route over on reconnect.
        self._identity = (identity or f"trustmesh-{os.getpid()}-{uuid.uuid4().hex[:8]}").encode()
        self._ctx = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]
        self._monitor: zmq.asyncio.Socket | None = None
        self.connected = asyncio.Event()
        # Bumped on every disconnect: work that began on an older link belongs to a validator
        # session that no longer exists, so owners compare generations before answering.
        self.generation = 0

    async def start(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self._identity)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        monitor = sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.url)
        self._socket = sock
        self._monitor = monitor
        self._spawn(self._receive_loop())
        self._spawn(self._monitor_loop(monitor))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def new_correlation_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def send(self, message_type: int, content, correlation_id: str | None = None) -> str:
        """Send without waiting for a reply (used for replies to the validator's requests)."""
        if self._socket is None:
            raise ConnectionLost(f"connection to {self.url} is closed")
        correlation_id = correlation_id or self.new_correlation_id()
        body = content if isinstance(content, bytes) else content.SerializeToString()
        frame = pb.Message(message_type=message_type, correlation_id=correlation_id, content=body)
        await self._socket.send(frame.SerializeToString())
        return correlation_id

    async def request(self, message_type: int, content, *, timeout: float | None = None) -> "pb.Message":
        correlation_id = self.new_correlation_id()
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            await self.send(message_type, content, correlation_id)
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(correlation_id, None)

    async def _receive_loop(self) -> None:
        while True:
            try:
                frame = await self._socket.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            message = pb.Message()
            try:
                message.ParseFromString(frame)
            except Exception:
                LOGGER.warning("dropped a frame from %s that is not a Message", self.url)
                continue
            future = self._pending.get(message.correlation_id)
            if future is not None and not future.done():
                future.set_result(message)
            elif self._on_message is not None:
                self._spawn(self._dispatch(message))

    async def _dispatch(self, message) -> None:
        try:
            await self._on_message(message)
        except Exception:
            LOGGER.exception("handler for %s failed", pb.message_type_name(message.message_type))

    async def _monitor_loop(self, monitor) -> None:
        first = True
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected.set()
                if not first and self._on_reconnect is not None:
                    LOGGER.info("reconnected to %s", self.url)
                    self._spawn(self._reconnected())
                first = False
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                self.generation += 1
                LOGGER.warning("lost the validator at %s; waiting for it to come back", self.url)
                for future in list(self._pending.values()):
                    if not future.done():
                        future.set_exception(ConnectionLost(f"validator at {self.url} went away"))

    async def _reconnected(self) -> None:
        try:
            await self._on_reconnect()
        except Exception:
            LOGGER.exception("re-establishing the session with %s failed", self.url)

    async def close(self) -> None:
        # close() may run inside one of our own dispatch tasks (a handler stopping its owner):
        # never cancel or await the caller itself.
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionLost("connection closed"))
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:  # the PAIR socket is ours to close, not libzmq's
            self._monitor.close(linger=0)
            self._monitor = None
        await asyncio.gather(*tasks, return_exceptions=True)
