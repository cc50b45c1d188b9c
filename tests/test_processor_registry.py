"""The validator's processor registry (room per processor, waiting, request timeouts) and the
executor's handling of a processor that never answers, without a socket in between."""

from __future__ import annotations

import asyncio

import pytest

from helpers.ledger_helpers import intkey_batch
from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet.batch_checks import check_batch
from trustmesh.ledger.devnet.execution import BlockExecutor, ExecutorSettings
from trustmesh.ledger.devnet.processors import NoProcessor, ProcessorRegistry
from trustmesh.ledger.signing import PrivateKey
from helpers.wire_peer import run

FAMILY, VERSION = "intkey", "1.0"
SIGNER = PrivateKey.generate()


def registered(max_occupancy: int = 1, identity: bytes = b"tp-1") -> ProcessorRegistry:
    registry = ProcessorRegistry()
    registry.register(identity, pb.TpRegisterRequest(family=FAMILY, version=VERSION, max_occupancy=max_occupancy))
    return registry


def test_waiters_get_room_in_arrival_order_and_newcomers_queue_behind_them():
    async def main():
        registry = registered(max_occupancy=1)
        proc, _ = registry.try_acquire(FAMILY, VERSION, "first")
        order = []

        async def wait(name):
            await registry.acquire(FAMILY, VERSION, name, grace=5)
            order.append(name)

        waiters = [asyncio.create_task(wait(f"w{i}")) for i in range(3)]
        await asyncio.sleep(0)
        assert registry.try_acquire(FAMILY, VERSION, "newcomer") is None  # earlier callers go first
        registry.release(proc, "first")  # w0 is woken; a newcomer arriving now still queues behind
        waiters.append(asyncio.create_task(wait("newcomer")))
        for previous in ["w0", "w1", "w2"]:
            while previous not in order:
                await asyncio.sleep(0)
            registry.release(proc, previous)
        await asyncio.wait_for(asyncio.gather(*waiters), 1)
        assert order == ["w0", "w1", "w2", "newcomer"]
        assert list(proc.in_flight) == ["newcomer"]

    run(main())


def test_a_waiter_cancelled_after_being_woken_passes_the_room_on():
    async def main():
        registry = registered(max_occupancy=1)
        proc, _ = registry.try_acquire(FAMILY, VERSION, "first")
        doomed = asyncio.create_task(registry.acquire(FAMILY, VERSION, "doomed", grace=5))
        patient = asyncio.create_task(registry.acquire(FAMILY, VERSION, "patient", grace=5))
        await asyncio.sleep(0)
        registry.release(proc, "first")  # wakes `doomed`...
        doomed.cancel()                  # ...which is cancelled before it can take the room
        with pytest.raises(asyncio.CancelledError):
            await doomed
        got, _ = await asyncio.wait_for(patient, 1)
        assert got is proc and list(proc.in_flight) == ["patient"]

    run(main())


def test_waiting_for_a_family_nobody_registers_ends_after_the_grace_period():
    async def main():
        registry = ProcessorRegistry()
        with pytest.raises(NoProcessor, match="no transaction processor is registered"):
            await registry.acquire(FAMILY, VERSION, "c1", grace=0.05)
        late = asyncio.create_task(registry.acquire(FAMILY, VERSION, "c2", grace=5))
        await asyncio.sleep(0.02)
        registry.register(b"tp-1", pb.TpRegisterRequest(family=FAMILY, version=VERSION))
        proc, _ = await asyncio.wait_for(late, 1)  # a registration wakes the waiters
        assert proc.identity == b"tp-1"

    run(main())


def test_expire_fails_only_requests_older_than_the_limit():
    async def main():
        registry = registered(max_occupancy=2)
        _, old = registry.try_acquire(FAMILY, VERSION, "old")
        await asyncio.sleep(0.05)
        _, fresh = registry.try_acquire(FAMILY, VERSION, "fresh")
        assert registry.expire(0.03) == 1
        with pytest.raises(asyncio.TimeoutError):
            await old
        assert not fresh.done()
        assert registry.expire(0.03) == 0  # already failed: not counted twice

    run(main())


def test_a_request_the_processor_never_answers_is_sent_again_after_request_timeout():
    async def main():
        registry = registered(max_occupancy=4)
        sent = []

        async def send(identity, correlation_id, request):
            sent.append(correlation_id)
            if len(sent) > 1:  # the first request is never answered; the second one is
                ok = pb.TpProcessResponse(status=pb.TpProcessResponse.OK).SerializeToString()
                asyncio.get_running_loop().call_soon(
                    registry.resolve, identity, correlation_id,
                    pb.Message(message_type=pb.Message.TP_PROCESS_RESPONSE, content=ok))

        executor = BlockExecutor(registry, send, ExecutorSettings(request_timeout=0.1))
        batch = check_batch(intkey_batch(SIGNER, ("set", "slow", 1)))
        [outcome] = await executor.execute([batch], lambda address: None)
        assert outcome.valid
        assert len(sent) == 2 and sent[0] != sent[1]
        assert not executor.contexts

    run(main())
