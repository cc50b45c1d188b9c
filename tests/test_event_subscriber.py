"""Event subscriber against a wire-level stand-in for the validator (tests/helpers/wire_peer.py)."""

from __future__ import annotations

import asyncio

import pytest

from trustmesh.ledger import protos as pb
from trustmesh.ledger.events import (
    BLOCK_COMMIT,
    STATE_DELTA,
    EventSubscriber,
    InvalidFilterError,
    UnknownBlockError,
    block_commit_subscription,
    event_subscription,
    state_delta_subscription,
)

from helpers.wire_peer import NULL_BLOCK_ID, M, WirePeer, block_id, run

FL_EVENT = pb.Event(event_type="trustmesh/round", attributes=[pb.Event.Attribute(key="round", value="1")])


async def collect(subscriber, count, timeout=2.0):
    return [await asyncio.wait_for(subscriber.next_block(), timeout) for _ in range(count)]


async def nothing_more(subscriber, within=0.2):
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(subscriber.next_block(), within)


def test_builders():
    delta = state_delta_subscription(["abcdef", "012345"])
    assert delta.event_type == STATE_DELTA
    (f,) = delta.filters
    assert (f.key, f.match_string, f.filter_type) == ("address", "^(?:abcdef|012345)", pb.EventFilter.REGEX_ANY)
    assert block_commit_subscription() == pb.EventSubscription(event_type=BLOCK_COMMIT)
    sub = event_subscription("trustmesh/round", [("round", "1"), ("job", "^j", pb.EventFilter.REGEX_ALL)])
    assert [(f.key, f.match_string, f.filter_type) for f in sub.filters] == [
        ("round", "1", pb.EventFilter.SIMPLE_ANY), ("job", "^j", pb.EventFilter.REGEX_ALL)]
    with pytest.raises(TypeError):
        state_delta_subscription("abcdef")


def test_subscribe_request_contents_adds_block_commit():
    async def main():
        async with WirePeer() as peer:
            for _ in range(3):
                peer.add_block()
            subscriber = EventSubscriber(
                peer.url, [state_delta_subscription(["abcdef"]), ("trustmesh/round", [("round", "1")])],
                last_known_block_ids=[block_id(2)],
            )
            try:
                await subscriber.start()
                _, message = await peer.expect(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST)
                request = pb.ClientEventsSubscribeRequest.FromString(message.content)
                assert [s.event_type for s in request.subscriptions] == [BLOCK_COMMIT, STATE_DELTA, "trustmesh/round"]
                assert list(request.subscriptions[0].filters) == []
                assert list(request.last_known_block_ids) == [block_id(2)]
            finally:
                await subscriber.close()
            await peer.expect(M.CLIENT_EVENTS_UNSUBSCRIBE_REQUEST)  # close() unsubscribed first
            assert subscriber._conn._socket is None
            assert peer.errors == []

    run(main())


def test_blocks_arrive_in_order_with_their_events():
    async def main():
        async with WirePeer() as peer:
            async with EventSubscriber(peer.url, [("trustmesh/round", [])]) as subscriber:
                await peer.expect(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST)
                await peer.wait_for_subscriber()
                for _ in range(3):
                    await peer.commit_block([FL_EVENT])
                blocks = await collect(subscriber, 3)
                assert [b.block_num for b in blocks] == [0, 1, 2]
                assert [b.block_id for b in blocks] == [block_id(n) for n in range(3)]
                assert [b.previous_block_id for b in blocks] == [NULL_BLOCK_ID, block_id(0), block_id(1)]
                assert all(len(b.state_root_hash) == 64 for b in blocks)
                assert [e.event_type for e in blocks[1].events] == [BLOCK_COMMIT, "trustmesh/round"]
                assert blocks[1].of_type("trustmesh/round") == [FL_EVENT]
                assert subscriber.last_block_id == block_id(2)
            # iteration ends after close()
            assert [b async for b in subscriber] == []

    run(main())


def test_replay_from_genesis_with_null_block_id():
    async def main():
        async with WirePeer() as peer:
            for _ in range(3):
                peer.add_block()
            async with EventSubscriber(peer.url, [], last_known_block_ids=[NULL_BLOCK_ID]) as subscriber:
                assert [b.block_num for b in await collect(subscriber, 3)] == [0, 1, 2]

    run(main())


def test_resume_from_caller_block_ignores_replay_of_known_block():
    async def main():
        async with WirePeer() as peer:
            peer.catchup_overlap = 1  # re-sends block 2, which the caller says it has
            for _ in range(3):
                peer.add_block()
            async with EventSubscriber(peer.url, [], last_known_block_ids=[block_id(2)]) as subscriber:
                await peer.wait_for_subscriber()
                await peer.commit_block()
                assert [b.block_num for b in await collect(subscriber, 1)] == [3]
                await nothing_more(subscriber)
            assert peer.received(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST) == 1  # no resubscribe storm

    run(main())


def test_unknown_block_is_a_clear_error():
    async def main():
        async with WirePeer() as peer:
            peer.add_block()
            subscriber = EventSubscriber(peer.url, [], last_known_block_ids=["ab" * 64])
            with pytest.raises(UnknownBlockError, match="UNKNOWN_BLOCK: none of the last known blocks") as info:
                await subscriber.start()
            assert info.value.response_message == "none of the last known blocks is in the chain"
            assert subscriber._conn._socket is None  # start() closed the connection

    run(main())


def test_invalid_filter_is_a_clear_error():
    async def main():
        async with WirePeer() as peer:
            bad = event_subscription("x", [("k", "(", pb.EventFilter.REGEX_ANY)])
            subscriber = EventSubscriber(peer.url, [bad])
            with pytest.raises(InvalidFilterError, match="INVALID_FILTER"):
                await subscriber.start()

    run(main())


def test_resumes_after_validator_restart_without_gap_or_duplicate():
    async def main():
        async with WirePeer() as peer:
            peer.catchup_overlap = 2  # the restarted validator also replays blocks we already have
            async with EventSubscriber(peer.url, []) as subscriber:
                await peer.expect(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST)
                await peer.wait_for_subscriber()
                for _ in range(3):
                    await peer.commit_block()
                assert [b.block_num for b in await collect(subscriber, 3)] == [0, 1, 2]

                await peer.close()        # validator down ...
                peer.add_block()          # ... the chain moves on meanwhile (blocks 3 and 4)
                peer.add_block()
                await peer.restart()
                _, message = await peer.expect(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST, timeout=3)
                request = pb.ClientEventsSubscribeRequest.FromString(message.content)
                assert list(request.last_known_block_ids) == [block_id(2)]

                await peer.wait_for_subscriber()
                await peer.commit_block()  # block 5, live
                blocks = await collect(subscriber, 3)
                assert [b.block_num for b in blocks] == [3, 4, 5]
                assert blocks[0].previous_block_id == block_id(2)
                await nothing_more(subscriber)
                assert peer.received(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST) == 0  # replays dropped quietly
            assert peer.errors == []

    run(main())


def test_gap_triggers_resubscribe_from_last_delivered_block():
    async def main():
        async with WirePeer() as peer:
            async with EventSubscriber(peer.url, []) as subscriber:
                await peer.expect(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST)
                await peer.wait_for_subscriber()
                await peer.commit_block()
                await peer.commit_block()
                assert [b.block_num for b in await collect(subscriber, 2)] == [0, 1]

                peer.add_block()            # block 2 is never broadcast (lost) ...
                await peer.commit_block()   # ... block 3 is
                _, message = await peer.expect(M.CLIENT_EVENTS_SUBSCRIBE_REQUEST)
                request = pb.ClientEventsSubscribeRequest.FromString(message.content)
                assert list(request.last_known_block_ids) == [block_id(1)]
                assert [b.block_num for b in await collect(subscriber, 2)] == [2, 3]
                await nothing_more(subscriber)

    run(main())


def test_unknown_block_on_resume_reaches_the_caller():
    async def main():
        async with WirePeer() as peer:
            async with EventSubscriber(peer.url, []) as subscriber:
                await peer.wait_for_subscriber()
                await peer.commit_block()
                await collect(subscriber, 1)
                await peer.close()
                peer.chain.clear()  # the validator came back with a different chain
                await peer.restart()
                with pytest.raises(UnknownBlockError):
                    await asyncio.wait_for(subscriber.next_block(), 3)
                with pytest.raises(UnknownBlockError):  # and keeps saying so
                    await subscriber.next_block()

    run(main())


async def test_a_block_missed_before_the_first_delivery_is_caught_up_after_restart():
    """Without last_known_block_ids the subscriber anchors on the head it subscribed at, so a
    block committed while the validator was restarting is replayed even if none had arrived."""

    async with WirePeer() as peer:
        peer.add_block()
        head_id, _, _ = peer.add_block()
        subscriber = EventSubscriber(peer.url, [])
        await subscriber.start()
        await peer.wait_for_subscriber()
        await peer.restart()
        missed_id, missed_num, _ = peer.add_block()  # committed while we were away
        block = await asyncio.wait_for(subscriber.next_block(), 5)
        assert (block.block_id, block.previous_block_id) == (missed_id, head_id)
        await nothing_more(subscriber)
        await subscriber.close()
