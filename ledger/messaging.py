"""One asyncio ZMQ DEALER connection to a validator's component endpoint.

Every frame is a serialized `Message` (validator.proto). Replies are matched to requests by
correlation_id; anything else (TP_PROCESS_REQUEST, PING_REQUEST, CLIENT_EVENTS, ...) goes to
`on_message`. ZMQ reconnects the TCP link by itself (every 0.1 s at first, backing off to 2 s),
but a restarted validator has forgotten us: a socket monitor tells us when the link comes back so
the owner can register or subscribe again. While the link is down (or not up yet) an Outage
says once on stderr, after a second, `waiting for the validator at tcp://… (down 1 s)`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import uuid
from typing import Awaitable, Callable

import zmq
import zmq.asyncio
import zmq.backend
from zmq.utils.monitor import parse_monitor_message

from trustmesh.outage import Outage

from . import protos as pb

LOGGER = logging.getLogger(__name__)
_Message = pb.Message

MessageHandler = Callable[["pb.Message"], Awaitable[None]]
ReconnectHandler = Callable[[], Awaitable[None]]


class ConnectionLost(ConnectionError):
    """The validator went away while a request was waiting for its reply."""


class BadEndpoint(ValueError):
    """The validator endpoint cannot be one (not tcp://HOST:PORT), or its host does not resolve."""


_OUTAGE_POLL = 0.25  # seconds between looks at an outage that may be due for its announcement


# pyzmq's constants are IntFlag members: every `|` or `&` with one builds an enum member (~1-2
# µs). The pump works with plain ints.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


class SocketPump:
    """Drives one ZMQ socket from the asyncio loop: a reader on the socket's FD, then plain
    non-blocking recv/send.

    Why not zmq.asyncio's awaitable recv/send: they cost a future, loop callbacks and an
    EVENTS query per message, and the validator <-> processor protocol is 4-5 small messages
    per transaction (measured: 8.8k vs 15.4k echo round trips/s between two processes here).
    Draining every ready message per wakeup also batches work under load. The pump talks to
    pyzmq's Cython socket directly: the Python `zmq.Socket` layer on top (send_multipart's
    checks, recv_multipart's RCVMORE query through an enum) cost several µs per message.

    The FD is edge-triggered (zmq_getsockopt ZMQ_FD): it only says "libzmq has commands to
    process", and a send can swallow the edge of a message that arrived meanwhile, so a send
    made outside the pump schedules one more look (one per loop iteration, however many sends).
    Sends keep their order: once one has to wait (EAGAIN: HWM reached), later ones queue behind
    it and are flushed when ZMQ_EVENTS reports POLLOUT.
    """

    _BURST = 256  # messages handled per wakeup before other tasks get the loop

    def __init__(self, socket: "zmq.Socket", on_frames: Callable[[list], None]):
        self._sock = zmq.backend.Socket(shadow=socket.underlying)
        # A ROUTER's first frame is the peer identity, always followed by the message.
        self._routed = socket.type == zmq.ROUTER
        self._on_frames = on_frames
        self._loop = asyncio.get_running_loop()
        self._fd = self._sock.get(zmq.FD)
        self._out: "collections.deque[tuple[list, asyncio.Future]]" = collections.deque()
        self._scheduled = False
        self._pumping = False
        self._closed = False
        self._loop.add_reader(self._fd, self._pump)
        self._schedule()  # messages may be waiting already

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        self._pumping = True  # sends made by the handlers need no extra look: the loop below is it
        try:
            self._drain()
        finally:
            self._pumping = False

    def _drain(self) -> None:
        # Receive until EAGAIN rather than asking ZMQ_EVENTS before every message: the failed
        # recv processes libzmq's pending commands just as the EVENTS query would (so the FD's
        # edge is rearmed), and costs one exception per wakeup instead of a getsockopt (a
        # poll(2) and an enum conversion inside pyzmq) per message.
        handled = 0
        while not self._closed:
            try:
                if self._out and self._sock.get(_EVENTS) & _POLLOUT:
                    self._flush()
                if handled >= self._BURST:
                    self._schedule()
                    return
                frames = self._recv()
            except zmq.Again:
                # That recv may have processed the command that gives waiting sends room; if some
                # go out, their sends may have taken the FD's edge in turn: look again. (Only on
                # progress: a ROUTER reports POLLOUT when any peer has room, maybe not ours.)
                if self._out and self._sock.get(_EVENTS) & _POLLOUT and self._flush():
                    continue
                return
            except zmq.ZMQError as exc:
                LOGGER.debug("socket pump stopped: %s", exc)
                self.close()
                return
            handled += 1
            try:
                self._on_frames(frames)
            except Exception:
                LOGGER.exception("handling a received message failed")

    def _recv(self) -> list:
        """One whole message. A Frame says whether more parts follow (no getsockopt)."""
        recv = self._sock.recv
        frames = [recv(_NOBLOCK)] if self._routed else []
        frame = recv(_NOBLOCK, False)
        frames.append(frame.bytes)
        while frame.more:
            frame = recv(_NOBLOCK, False)
            frames.append(frame.bytes)
        return frames

    def _send_now(self, frames: list) -> None:
        # EAGAIN can only come from the first part: libzmq checks the HWM per message.
        send = self._sock.send
        last = len(frames) - 1
        for i in range(last):
            send(frames[i], _NOBLOCK | _SNDMORE)
        send(frames[last], _NOBLOCK)

    def _flush(self) -> bool:
        """Send what waits, in order, until EAGAIN; True if any message left the queue."""
        progress = False
        while self._out:
            frames, future = self._out[0]
            try:
                self._send_now(frames)
            except zmq.Again:
                return progress
            except zmq.ZMQError as exc:
                self._out.popleft()
                progress = True
                if not future.done():
                    future.set_exception(exc)
                continue
            self._out.popleft()
            progress = True
            if not future.done():
                future.set_result(None)
        return progress

    def send(self, frames: list) -> "asyncio.Future | None":
        """Send now if the socket takes it (None); otherwise a future that resolves once sent.
        ZMQ errors other than EAGAIN (e.g. EHOSTUNREACH) are raised here."""
        if self._closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket closed")
        if not self._out:
            try:
                self._send_now(frames)
            except zmq.Again:
                pass
            else:
                if not self._pumping:  # the send may have eaten the FD's edge
                    self._schedule()
                return None
        future = self._loop.create_future()
        self._out.append((frames, future))
        self._schedule()
        return future

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        except Exception:  # loop already closed
            pass
        while self._out:
            _, future = self._out.popleft()
            if not future.done():
                future.set_exception(ConnectionLost("connection closed"))


class ValidatorConnection:
    def __init__(
        self,
        url: str,
        *,
        on_message: MessageHandler | None = None,
        on_reconnect: ReconnectHandler | None = None,
        identity: str | None = None,
        outage: Outage | None = None,
    ):
        """outage: the announcer for this validator (default: a new one), to share one line among
        several connections to the same validator."""
        self.url = url
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        # A stable identity lets the validator's ROUTER hand the route over on reconnect.
        self._identity = (identity or f"trustmesh-{os.getpid()}-{uuid.uuid4().hex[:8]}").encode()
        self._ctx = zmq.asyncio.Context.instance()
        self._socket: zmq.asyncio.Socket | None = None
        self._pump: SocketPump | None = None
        self._pending: dict[str, asyncio.Future] = {}
        self._tasks: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:12]
        self._monitor: zmq.asyncio.Socket | None = None
        self.connected = asyncio.Event()
        self.outage = outage or Outage("the validator", url)
        self._watching = False
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
        try:
            sock.connect(self.url)
        except zmq.ZMQError as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise BadEndpoint(f"{self.url!r} is not a validator endpoint ({exc.strerror}); expected "
                              f"tcp://HOST:PORT, e.g. tcp://127.0.0.1:4004") from None
        self._socket = sock
        self._monitor = monitor
        self._pump = SocketPump(sock, self._on_frames)
        self._spawn(self._monitor_loop(monitor))
        self._went_down("not connected yet")

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        # Logs here rather than in a wrapper coroutine: one coroutine less per dispatched message.
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            LOGGER.error("handling a message from %s failed", self.url, exc_info=task.exception())

    def new_correlation_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def send(self, message_type: int, content, correlation_id: str | None = None) -> str:
        """Send without waiting for a reply (used for replies to the validator's requests)."""
        correlation_id = correlation_id or self.new_correlation_id()
        waiting = self._post(message_type, content, correlation_id)
        if waiting is not None:  # only when ZMQ's queue is full
            await waiting
        return correlation_id

    def _post(self, message_type: int, content, correlation_id: str) -> "asyncio.Future | None":
        if self._pump is None:
            raise ConnectionLost(f"connection to {self.url} is closed")
        body = content if isinstance(content, bytes) else content.SerializeToString()
        frame = _Message(message_type=message_type, correlation_id=correlation_id, content=body)
        return self._pump.send([frame.SerializeToString()])

    async def request(self, message_type: int, content, *, timeout: float | None = None) -> "pb.Message":
        correlation_id = self.new_correlation_id()
        future = asyncio.get_running_loop().create_future()
        self._pending[correlation_id] = future
        try:
            waiting = self._post(message_type, content, correlation_id)
            if waiting is not None:
                await waiting
            if timeout is None:  # no wait_for: it costs a wrapper coroutine per request
                return await future
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(correlation_id, None)

    def _on_frames(self, frames: list) -> None:
        try:
            message = _Message.FromString(frames[-1])
        except Exception:
            LOGGER.warning("dropped a frame from %s that is not a Message", self.url)
            return
        future = self._pending.get(message.correlation_id)
        if future is not None and not future.done():
            future.set_result(message)
        elif self._on_message is not None:
            self._spawn(self._on_message(message))

    async def _monitor_loop(self, monitor) -> None:
        first = True
        while True:
            try:
                event = parse_monitor_message(await monitor.recv_multipart())
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            if event["event"] == zmq.EVENT_CONNECTED:
                self.connected.set()
                self.outage.up()
                if not first and self._on_reconnect is not None:
                    LOGGER.info("reconnected to %s", self.url)
                    self._spawn(self._reconnected())
                first = False
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                self.generation += 1
                # Said once on stderr by the outage if it lasts; a blip is only logged.
                LOGGER.info("lost the validator at %s; waiting for it to come back", self.url)
                self._went_down("disconnected")
                for future in list(self._pending.values()):
                    if not future.done():
                        future.set_exception(ConnectionLost(f"validator at {self.url} went away"))

    def _went_down(self, reason: str) -> None:
        self.outage.down(reason)
        if not self._watching:
            self._watching = True
            self._spawn(self._watch_outage())

    async def _watch_outage(self) -> None:
        """Nothing fails while ZMQ reconnects on its own: look now and then, to announce in time."""
        try:
            while not self.connected.is_set() and self._socket is not None:
                self.outage.poll()
                await asyncio.sleep(_OUTAGE_POLL)
        finally:
            self._watching = False

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
        if self._pump is not None:
            self._pump.close()
            self._pump = None
        if self._socket is not None:
            self._socket.disable_monitor()
            self._socket.close(linger=0)
            self._socket = None
        if self._monitor is not None:  # the PAIR socket is ours to close, not libzmq's
            self._monitor.close(linger=0)
            self._monitor = None
        await asyncio.gather(*tasks, return_exceptions=True)
