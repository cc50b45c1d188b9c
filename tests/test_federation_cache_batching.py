"""FederationCache.apply_block sends a block's submissions in pipelines: a few Redis round trips
per block, and the same outcomes and Redis contents as applying its events one by one (missed
events included), against a real redis-server and the dev validator's events and state."""

from __future__ import annotations

import hashlib

import pytest
from redis.asyncio.connection import AbstractConnection

from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.events import NULL_BLOCK_ID, BlockEvents, EventSubscriber
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, workflow
from trustmesh.scheduling.federation import (
    EVENT_ROUND_OPENED,
    EVENT_ROUND_READY,
    EVENT_SUBMISSION_ACCEPTED,
    FederationHandler,
    make_open_round_transaction,
    make_submit_transaction,
)
from trustmesh.scheduling.workflow import WorkflowHandler, make_deploy_transaction
from trustmesh.stores.federation_cache import CURSOR_KEY, FEDERATION_EVENTS, FederationCache, FederationCacheGap
from trustmesh.stores.redis_client import connect
from test_redis_state import WORKFLOWS, snapshot

N = 60  # participants of the big round
BIG, SMALL = "batch-big", "batch-small"  # SMALL: 3 participants, 2 submit, interleaved with BIG's
KEYS = [PrivateKey.generate() for _ in range(N)]
COORDINATOR = KEYS[0]


def definition(workflow_id: str, members: list) -> dict:
    keys = [k.public_key().as_hex() for k in members]
    spec = workflow.load_definition(WORKFLOWS / "federated-digits.json")
    spec["workflow_id"] = workflow_id
    spec["federation"].update(coordinator_node=keys[0], participant_nodes=keys, expected_nodes=len(keys),
                              min_nodes_required=2, round_timeout=3600, rounds=1)
    return spec


async def _federation_events(devnet: DevnetProcess) -> list:
    """Deploy BIG and SMALL, open a round of each, let all of BIG and two of SMALL submit
    (SMALL's among BIG's); every federation event committed, in chain order."""
    def submit(signer, schedule_id, i):
        digest = hashlib.sha256(f"{schedule_id}-{i}".encode()).hexdigest()
        return make_batch(signer, [make_submit_transaction(signer, schedule_id, digest, 10 + i, {"i": i})])

    async with running_processor(devnet.component_url, WorkflowHandler(), FederationHandler()), \
            rest(devnet.rest_url) as client:
        await submit_and_wait(client, [make_batch(COORDINATOR, [make_deploy_transaction(COORDINATOR, d)])
                                       for d in (definition(BIG, KEYS), definition(SMALL, KEYS[:3]))],
                              raise_invalid=True)
        await submit_and_wait(client, [make_batch(COORDINATOR, [make_open_round_transaction(COORDINATOR, w, 1)])
                                       for w in (BIG, SMALL)], raise_invalid=True)
        big, small = (layout.schedule_id_for(w, 1, COORDINATOR.public_key().as_hex()) for w in (BIG, SMALL))
        batches = [submit(k, big, i) for i, k in enumerate(KEYS)]
        batches[20:20] = [submit(KEYS[1], small, 1)]
        batches[40:40] = [submit(KEYS[2], small, 2)]
        await submit_and_wait(client, batches, timeout=60, raise_invalid=True)
        head = (await client.head())["header_signature"]
    events = []
    async with EventSubscriber(devnet.component_url, FederationCache.subscriptions(),
                               last_known_block_ids=[NULL_BLOCK_ID]) as subscriber:
        async for block in subscriber:
            events += [e for e in block.events if e.event_type in FEDERATION_EVENTS]
            if block.block_id == head:
                return events


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(the dev validator, its federation events in chain order)."""
    node = DevnetProcess(tmp_path_factory.mktemp("batching") / "devnet").start()
    try:
        yield node, run(_federation_events(node))
    finally:
        node.stop()


def blocks(*groups: list) -> list[BlockEvents]:
    """Blocks of the given events (a replay may group committed events any way)."""
    return [BlockEvents(f"{n:0128x}", n, "", "", list(events)) for n, events in enumerate(groups, start=1)]


def attribute(event, key: str) -> str:
    return next(a.value for a in event.attributes if a.key == key)


def of(events: list, event_type: str, workflow_id: str | None = None) -> list:
    return [e for e in events if e.event_type == event_type
            and workflow_id in (None, attribute(e, "workflow_id"))]


async def one_by_one(cache: FederationCache, block) -> list[str]:
    """What apply_block did before it batched: apply_event per event, then the cursor."""
    outcomes = [await cache.apply_event(e) for e in block.events if e.event_type in FEDERATION_EVENTS]
    await cache.redis.hset(CURSOR_KEY, mapping={"block_id": block.block_id, "block_num": str(block.block_num)})
    return outcomes


async def fill(redis, cache, apply, block_list) -> tuple[list, dict]:
    """(outcomes, or the FederationCacheGap raised; Redis contents) after applying the blocks to a
    flushed Redis."""
    await redis.flushdb()
    outcomes = []
    try:
        for block in block_list:
            outcomes.append(await apply(cache, block))
    except FederationCacheGap as exc:
        outcomes.append(type(exc))
    return outcomes, await snapshot(redis)


@pytest.fixture
def round_trips(monkeypatch):
    """The first command of each write to Redis: one per round trip (a pipeline writes once)."""
    sent = []
    send = AbstractConnection.send_packed_command

    async def counting(self, command, *args, **kwargs):
        sent.append(b"".join(command if isinstance(command, list) else [command]).split(b"\r\n")[2])
        return await send(self, command, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    return sent


async def test_a_block_of_submissions_costs_a_few_round_trips(chain, stores, round_trips):
    _, events = chain
    redis = await connect(stores[0].url)
    await redis.flushdb()
    cache = FederationCache(redis, app="preprocess")
    opens, subs = of(events, EVENT_ROUND_OPENED), of(events, EVENT_SUBMISSION_ACCEPTED, BIG)
    first, warm, second, last = blocks(opens, subs[:2], subs[2:-1], subs[-1:] + of(events, EVENT_ROUND_READY))
    assert await cache.apply_block(first) == ["applied", "applied"]
    assert await cache.apply_block(warm) == ["applied", "applied"]  # Redis has the scripts now

    round_trips.clear()
    assert await cache.apply_block(second) == ["applied"] * (N - 3)
    # the list key of the round, SCRIPT EXISTS (redis-py, before a pipeline with scripts), the
    # scripts and the cursor: not 2 per submission
    assert round_trips == [b"HGET", b"SCRIPT", b"EVALSHA"]
    assert await cache.cursor() == (second.block_id, second.block_num)

    # scripts gone (as after a Redis restart): the pipeline loads them again
    await redis.script_flush()
    assert await cache.apply_block(last) == ["applied", "applied"]
    schedule_id = attribute(subs[0], "schedule_id")
    assert [s["position"] for s in await cache.submissions(BIG, schedule_id)] == list(range(1, N + 1))
    assert (await cache.round_state(BIG, schedule_id))["status"] == "ready"
    await redis.aclose()


@pytest.mark.parametrize("scenario", ["one-block", "three-blocks", "replayed", "missed-submissions",
                                      "missed-opens"])
async def test_blocks_apply_as_their_events_one_by_one(chain, stores, scenario):
    devnet, events = chain
    opens, ready = of(events, EVENT_ROUND_OPENED), of(events, EVENT_ROUND_READY)
    subs = of(events, EVENT_SUBMISSION_ACCEPTED)  # BIG's, SMALL's two among them
    block_list = {
        "one-block": blocks(events),  # an open, submissions to it and round-ready share a block
        "three-blocks": blocks(opens, subs[:30], subs[30:] + ready),
        "replayed": blocks(opens, subs[:30], subs[30:] + ready, events),
        # BIG's first 5 submissions never seen: BIG is rebuilt at its 6th, SMALL's still apply
        "missed-submissions": blocks(opens, subs[5:40], subs[40:] + ready),
        # nothing cached: both rounds are rebuilt at their first submission
        "missed-opens": blocks(subs[:50], subs[50:] + ready),
    }[scenario]
    redis = await connect(stores[0].url)
    async with rest(devnet.rest_url) as client:
        cache = FederationCache(redis, rest_client=client)
        expected = await fill(redis, cache, one_by_one, block_list)
        batched = await fill(redis, cache, FederationCache.apply_block, block_list)
        assert batched == expected
        assert batched[1][CURSOR_KEY]["block_num"] == str(len(block_list))
        outcomes = [o for block in batched[0] for o in block]
        if scenario.startswith("missed"):
            assert "rebuilt" in outcomes
        # and what they filled is what chain state holds
        await redis.flushdb()
        for workflow_id in (BIG, SMALL):
            await cache.rebuild_from_chain(client, workflow_id)
        assert await snapshot(redis) == {k: v for k, v in batched[1].items() if k != CURSOR_KEY}
    await redis.aclose()


async def test_a_gap_without_rest_client_raises_and_leaves_the_cursor(chain, stores):
    _, events = chain
    opens, subs = of(events, EVENT_ROUND_OPENED), of(events, EVENT_SUBMISSION_ACCEPTED, BIG)
    # BIG's first 5 submissions missed; the block ends with submissions (the cursor would ride
    # on its pipeline)
    block_list = blocks(opens, subs[5:15])
    redis = await connect(stores[0].url)
    blind = FederationCache(redis, app="preprocess")
    expected = await fill(redis, blind, one_by_one, block_list)
    assert expected[0] == [["applied", "applied"], FederationCacheGap]
    assert await fill(redis, blind, FederationCache.apply_block, block_list) == expected
    assert expected[1][CURSOR_KEY]["block_num"] == "1"
    await redis.aclose()
