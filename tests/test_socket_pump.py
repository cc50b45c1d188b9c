"""SocketPump (ledger/messaging.py) on in-process ZMQ sockets: whole multipart messages in,
sends past the high-water mark queued in order, queued sends failed on close."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import zmq

from trustmesh.ledger.messaging import ConnectionLost, SocketPump

pytestmark = pytest.mark.timeout(10)


def pair(name: str, hwm: int = 1000):
    """A ROUTER bound and a DEALER (identity b"peer") connected to it, over inproc."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, hwm)
    router.bind(f"inproc://{name}")
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVHWM, hwm)
    dealer.setsockopt(zmq.IDENTITY, b"peer")
    dealer.connect(f"inproc://{name}")
    return router, dealer


@contextlib.asynccontextmanager
async def pump_with_peer(name: str, hwm: int):
    """pair()'s DEALER and a pump on its ROUTER, once the ROUTER has learned the peer's identity:
    (dealer, pump); all closed afterwards."""
    router, dealer = pair(name, hwm=hwm)
    received = []
    pump = SocketPump(router, received.append)
    try:
        dealer.send(b"hello")
        await until(lambda: received)
        yield dealer, pump
    finally:
        pump.close()
        router.close(), dealer.close()


async def until(condition, timeout: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.001)


def recv_nowait(sock) -> "list[bytes] | None":
    try:
        return sock.recv_multipart(zmq.NOBLOCK)
    except zmq.Again:
        return None


async def test_router_and_dealer_pumps_deliver_whole_multipart_messages():
    router, dealer = pair("pump-multipart")
    at_router, at_dealer = [], []
    router_pump = SocketPump(router, at_router.append)
    dealer_pump = SocketPump(dealer, at_dealer.append)
    try:
        assert dealer_pump.send([b"one"]) is None
        assert dealer_pump.send([b"a", b"b", b"c"]) is None
        await until(lambda: len(at_router) == 2)
        assert at_router == [[b"peer", b"one"], [b"peer", b"a", b"b", b"c"]]
        assert router_pump.send([b"peer", b"x", b"y"]) is None
        assert router_pump.send([b"peer", b"z"]) is None
        await until(lambda: len(at_dealer) == 2)
        assert at_dealer == [[b"x", b"y"], [b"z"]]
    finally:
        router_pump.close(), dealer_pump.close()
        router.close(), dealer.close()


async def test_sends_past_the_high_water_mark_wait_and_go_out_in_order():
    async with pump_with_peer("pump-hwm", hwm=4) as (dealer, pump):
        waits = [pump.send([b"peer", b"%d" % i]) for i in range(40)]
        assert waits[0] is None
        queued = [w for w in waits if w is not None]
        assert queued and not any(w.done() for w in queued)  # the pipe is full
        got = []
        while len(got) < 40:
            message = recv_nowait(dealer)
            if message is None:
                await asyncio.sleep(0.001)
            else:
                got.append(message[0])
        assert got == [b"%d" % i for i in range(40)]
        await asyncio.wait_for(asyncio.gather(*queued), 1)


async def test_close_fails_sends_still_waiting_for_room():
    async with pump_with_peer("pump-close", hwm=2) as (dealer, pump):
        waits = [pump.send([b"peer", b"x"]) for _ in range(10)]
        queued = [w for w in waits if w is not None]
        assert queued
        pump.close()
        for waiting in queued:
            with pytest.raises(ConnectionLost):
                await waiting
        with pytest.raises(zmq.ZMQError):
            pump.send([b"peer", b"late"])


async def test_a_peer_that_stops_reading_does_not_make_the_pump_spin():
    class Spinning(Exception):
        pass

    router, stuck = pair("pump-spin", hwm=2)
    other = zmq.Context.instance().socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.setsockopt(zmq.IDENTITY, b"other")
    other.connect("inproc://pump-spin")
    received = []
    pump = SocketPump(router, received.append)
    flushes = 0
    flush = pump._flush

    def counted_flush():
        nonlocal flushes
        flushes += 1
        if flushes > 50:
            raise Spinning  # a bug here would otherwise hang the loop for good
        return flush()

    pump._flush = counted_flush
    waits = []
    try:
        stuck.send(b"hello"), other.send(b"hello")
        await until(lambda: len(received) == 2)
        waits = [pump.send([b"peer", b"x"]) for _ in range(10)]
        assert any(w is not None for w in waits)  # "peer" is full, "other" still has room
        other.send(b"ping")  # ROUTER now reports POLLOUT, yet the queued sends cannot go
        await until(lambda: len(received) == 3)
        await asyncio.sleep(0.05)
        assert received[-1] == [b"other", b"ping"]
        assert flushes <= 50
    finally:
        pump.close()
        await asyncio.gather(*(w for w in waits if w is not None), return_exceptions=True)
        router.close(), stuck.close(), other.close()

