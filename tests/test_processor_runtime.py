"""Transaction-processor runtime against a wire-level stand-in for the validator (tests/helpers/wire_peer.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from trustmesh.ledger import protos as pb
from trustmesh.ledger.addressing import make_address, namespace
from trustmesh.ledger.processor import (
    PROTOCOL_VERSION,
    AuthorizationError,
    InternalError,
    InvalidTransaction,
    RegistrationError,
    TransactionHandler,
    TransactionProcessor,
)

from helpers.wire_peer import M, WirePeer

FAMILY = "tm-test"
NS = namespace(FAMILY)
A = make_address(NS, "a")
B = make_address(NS, "b")
OTHER = make_address(namespace("elsewhere"), "x")
OK = pb.TpProcessResponse.OK
INVALID = pb.TpProcessResponse.INVALID_TRANSACTION
INTERNAL = pb.TpProcessResponse.INTERNAL_ERROR

pytestmark = pytest.mark.timeout(10)  # a broken protocol fails instead of hanging


class ScriptedHandler(TransactionHandler):
    """Runs the coroutine function the test puts under the payload's name."""

    family_name = FAMILY
    family_versions = ["1.0", "2.0"]
    namespaces = [NS]

    def __init__(self, **scripts):
        self.scripts = scripts

    async def apply(self, transaction, context):
        await self.scripts[transaction.payload.decode()](transaction, context)


@contextlib.asynccontextmanager
async def serving(handler, **kwargs):
    """A started peer and a processor registered with it (both versions): (peer, processor, the
    processor's identity at the peer); both shut down afterwards."""
    peer = await WirePeer().start()
    processor = TransactionProcessor(peer.url, **kwargs)
    processor.add_handler(handler)
    try:
        await processor.start()
    except BaseException:
        await peer.close()
        raise
    try:
        yield peer, processor, peer.registrations[-1][0]
    finally:
        await shutdown(peer, processor)


async def shutdown(peer, processor):
    await processor.stop(grace=1.0)
    await peer.close()
    assert peer.errors == []


async def test_registers_every_family_version_with_expected_fields(caplog):
    caplog.set_level(logging.INFO, logger="trustmesh.ledger.processor")
    async with serving(ScriptedHandler(), max_occupancy=7) as (peer, processor, _):
        regs = {r.version: r for _, r in peer.registrations}
        assert sorted(regs) == ["1.0", "2.0"]
        for request in regs.values():
            assert request.family == FAMILY
            assert list(request.namespaces) == [NS]
            assert request.max_occupancy == 7
            assert request.protocol_version == PROTOCOL_VERSION == 1
            assert request.request_header_style == pb.TpRegisterRequest.EXPANDED
    assert any("registered tm-test 1.0" in r.message and r.levelno == logging.INFO for r in caplog.records)
    await peer.expect(M.TP_UNREGISTER_REQUEST, timeout=0.1)  # stop() unregistered


async def test_other_protocol_version_in_answer_is_logged_and_tolerated(caplog):
    peer = await WirePeer().start()
    peer.register_protocol_version = 0  # an older validator that does not echo the field
    processor = TransactionProcessor(peer.url)
    processor.add_handler(ScriptedHandler(ok=lambda t, c: asyncio.sleep(0)))
    try:
        await processor.start()
        identity = await peer.wait_registered(2)
        assert (await peer.process(identity, FAMILY, "1.0", b"ok")).status == OK
    finally:
        await shutdown(peer, processor)
    assert any("protocol_version 0" in r.message for r in caplog.records if r.levelno == logging.WARNING)


async def test_refused_registration_raises_and_closes():
    peer = await WirePeer().start()
    peer.register_status = pb.TpRegisterResponse.ERROR
    processor = TransactionProcessor(peer.url)
    processor.add_handler(ScriptedHandler())
    try:
        with pytest.raises(RegistrationError, match="refused to register tm-test"):
            await processor.start()
        assert processor._conn._socket is None  # start() cleaned up after itself
    finally:
        await peer.close()


async def test_ok_with_state_events_and_receipt_data():
    async def apply(transaction, context):
        assert transaction.header.family_name == FAMILY
        assert await context.get_state([A, B]) == {A: b"1"}  # B is unset: left out
        assert await context.set_state({B: b"2"}) == [B]
        assert await context.delete_state([A]) == [A]
        await context.add_event("tm/done", [("k", "v")], b"data")
        await context.add_receipt_data(b"receipt")

    async with serving(ScriptedHandler(work=apply)) as (peer, processor, identity):
        peer.state[A] = b"1"
        request = peer.make_process_request(FAMILY, "2.0", b"work", inputs=[NS], outputs=[NS])
        reply = await peer.request(identity, M.TP_PROCESS_REQUEST, request)
        assert reply.message_type == M.TP_PROCESS_RESPONSE
        assert pb.TpProcessResponse.FromString(reply.content).status == OK
        assert peer.state == {B: b"2"}
        context = peer.contexts[request.context_id]
        assert [(e.event_type, [(a.key, a.value) for a in e.attributes], e.data) for e in context.events] == [
            ("tm/done", [("k", "v")], b"data")
        ]
        assert context.receipt_data == [b"receipt"]


async def test_a_context_asks_for_an_address_once_until_it_writes_it_and_prefetches_in_one_request():
    async def apply(transaction, context):
        await context.prefetch([A, B, OTHER])  # OTHER is not a declared input: nothing fails, nothing kept
        await context.prefetch([A, B])
        assert await context.get_state([A]) == {A: b"1"} and await context.get_state([B, A]) == {A: b"1"}
        await context.set_state({A: b"2"})
        assert await context.get_state([A, B]) == {A: b"2"}  # its own write: asked again

    async with serving(ScriptedHandler(work=apply)) as (peer, processor, identity):
        peer.state[A] = b"1"
        assert (await peer.process(identity, FAMILY, "1.0", b"work", inputs=[NS], outputs=[NS])).status == OK
        assert peer.gets == [[A, B, OTHER], [A, B], [A]]


async def test_invalid_transaction_carries_message_and_extended_data():
    async def apply(transaction, context):
        raise InvalidTransaction("round 3 is closed", b"\x01\x02")

    async with serving(ScriptedHandler(bad=apply)) as (peer, processor, identity):
        response = await peer.process(identity, FAMILY, "1.0", b"bad")
        assert (response.status, response.message, response.extended_data) == (
            INVALID, "round 3 is closed", b"\x01\x02")


async def test_internal_errors_declared_and_unexpected(caplog):
    async def declared(transaction, context):
        raise InternalError("model store offline", b"retry")

    async def unexpected(transaction, context):
        raise ValueError("boom")

    async with serving(ScriptedHandler(declared=declared, unexpected=unexpected)) as (peer, processor, identity):
        response = await peer.process(identity, FAMILY, "1.0", b"declared")
        assert (response.status, response.message, response.extended_data) == (
            INTERNAL, "model store offline", b"retry")
        response = await peer.process(identity, FAMILY, "1.0", b"unexpected")
        assert response.status == INTERNAL
        assert "ScriptedHandler" in response.message and "tm-test 1.0" in response.message
        assert "ValueError: boom" in response.message

    failures = [r for r in caplog.records if r.levelno == logging.ERROR and r.exc_info]
    assert failures and failures[0].exc_info[0] is ValueError  # traceback logged


async def test_state_access_outside_declared_inputs_outputs():
    seen = []

    async def read_outside(transaction, context):
        try:
            await context.get_state([OTHER])
        except AuthorizationError as exc:
            seen.append(exc)
            raise

    async def write_outside(transaction, context):
        await context.set_state({OTHER: b"x"})

    async def delete_outside(transaction, context):
        await context.delete_state([OTHER])

    handler = ScriptedHandler(read=read_outside, write=write_outside, delete=delete_outside)
    async with serving(handler) as (peer, processor, identity):
        response = await peer.process(identity, FAMILY, "1.0", b"read", inputs=[NS], outputs=[NS])
        assert response.status == INVALID
        assert OTHER in response.message and "outside the transaction's declared inputs" in response.message
        assert isinstance(seen[0], InvalidTransaction)  # AuthorizationError is an InvalidTransaction
        for verb in ("write", "delete"):
            response = await peer.process(identity, FAMILY, "1.0", verb.encode(), inputs=[NS], outputs=[NS])
            assert response.status == INVALID
            assert OTHER in response.message and "declared outputs" in response.message
        assert OTHER not in peer.state


async def test_unknown_family_or_version_is_invalid():
    async with serving(ScriptedHandler()) as (peer, processor, identity):
        for family, version in (("nobody", "1.0"), (FAMILY, "9.9")):
            response = await peer.process(identity, family, version, b"x")
            assert response.status == INVALID
            assert f"no handler for transaction family {family!r} version {version!r}" in response.message


async def test_ping_is_answered_with_same_correlation_id():
    async with serving(ScriptedHandler()) as (peer, processor, identity):
        reply = await peer.request(identity, M.PING_REQUEST, pb.PingRequest())
        assert reply.message_type == M.PING_RESPONSE  # request() matched the correlation id


async def test_max_occupancy_requests_run_concurrently():
    n = 5
    barrier = asyncio.Barrier(n)

    async def apply(transaction, context):
        # Only passes if all n applies are in flight at the same time.
        async with asyncio.timeout(2):
            await barrier.wait()

    async with serving(ScriptedHandler(meet=apply), max_occupancy=n) as (peer, processor, identity):
        responses = await asyncio.gather(
            *(peer.process(identity, FAMILY, "1.0", b"meet", timeout=3) for _ in range(n)))
        assert [r.status for r in responses] == [OK] * n


async def test_no_more_than_max_occupancy_in_flight():
    active, peak = 0, 0

    async def apply(transaction, context):
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.02)
        active -= 1

    # A misbehaving validator sends more than advertised: the rest queue up.
    async with serving(ScriptedHandler(busy=apply), max_occupancy=2) as (peer, processor, identity):
        responses = await asyncio.gather(*(peer.process(identity, FAMILY, "1.0", b"busy") for _ in range(6)))
        assert [r.status for r in responses] == [OK] * 6
        assert peak == 2


async def test_registers_again_after_validator_restart_and_drops_stale_work():
    entered, release = asyncio.Event(), asyncio.Event()
    outcome = []

    async def slow(transaction, context):
        entered.set()
        await release.wait()
        try:
            await context.get_state([A])  # the context died with the old validator
        except Exception as exc:
            outcome.append(type(exc).__name__)
            raise

    async def quick(transaction, context):
        assert await context.get_state([A]) == {A: b"kept"}

    async with serving(ScriptedHandler(slow=slow, quick=quick)) as (peer, processor, identity):
        peer.state[A] = b"kept"
        request = peer.make_process_request(FAMILY, "1.0", b"slow", inputs=[NS])
        await peer.send(identity, M.TP_PROCESS_REQUEST, request)
        await asyncio.wait_for(entered.wait(), 2)

        await peer.restart()
        assert await peer.wait_registered(2) == identity  # both versions, same identity
        assert {r.version for _, r in peer.registrations} == {"1.0", "2.0"}

        release.set()  # the stale transaction now fails and must not be answered
        response = await peer.process(identity, FAMILY, "1.0", b"quick", inputs=[NS])
        assert response.status == OK
        await asyncio.sleep(0.1)
        assert outcome == ["ConnectionLost"]
        stale = []
        while peer.received(M.TP_PROCESS_RESPONSE):
            _, message = await peer.expect(M.TP_PROCESS_RESPONSE)
            stale.append(message.correlation_id)
        assert len(stale) == 1  # only the answer to the quick request
        assert len(peer.registrations) == 2  # registered once per version, not twice


async def test_run_until_stop():
    peer = await WirePeer().start()
    processor = TransactionProcessor(peer.url)
    processor.add_handler(ScriptedHandler(ok=lambda t, c: asyncio.sleep(0)))
    try:
        task = asyncio.create_task(processor.run())
        identity = await peer.wait_registered(2)
        assert (await peer.process(identity, FAMILY, "1.0", b"ok")).status == OK
        await processor.stop()
        await asyncio.wait_for(task, 2)
        await peer.expect(M.TP_UNREGISTER_REQUEST)
    finally:
        await processor.stop()
        await peer.close()


def test_handler_configuration_errors():
    processor = TransactionProcessor("tcp://127.0.0.1:1")
    processor.add_handler(ScriptedHandler())
    with pytest.raises(ValueError, match="already added"):
        processor.add_handler(ScriptedHandler())
    with pytest.raises(ValueError):
        TransactionProcessor("tcp://127.0.0.1:1", max_occupancy=0)
