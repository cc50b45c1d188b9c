"""A compute node builds on its own reports before they are committed, and never runs a task
again whose report is on its way (tests/test_federated_round.py runs the whole flow)."""

from __future__ import annotations

import asyncio

from helpers.ledger_helpers import run, running_processor
from trustmesh.compute_node.node import ComputeNode, _all_done
from trustmesh.ledger import protos as pb
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.events import BlockEvents
from trustmesh.scheduling import events
from trustmesh.compute_node.tasks import TaskContext
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.stores.task_queue import TaskMessage


class _NoReader:
    """Any chain read fails the test: the answers must come from the node's own reports."""

    def __getattr__(self, name):
        raise AssertionError(f"read the chain ({name}) for a status the node reported itself")


def _context() -> TaskContext:
    return TaskContext(node="n", encryption_key=None, reader=_NoReader(), blobs=None)


def test_a_reported_dependency_is_read_from_the_report_not_the_chain():
    ctx = _context()
    status = {"status": "done", "output_digest": "ab" * 32, "metrics": {"samples": 3}}
    ctx.reported["s", "train:1"] = status
    assert asyncio.run(ctx.dependency_status("s", "train:1")) is status


def test_dependencies_are_done_only_when_each_is_and_checking_stops_at_the_first_that_is_not():
    looked = []

    async def status(task_id):
        looked.append(task_id)
        return {"a": {"status": "done"}, "b": {"status": "assigned"}}.get(task_id)

    assert asyncio.run(_all_done(["a", "b", "c"], status)) is False
    assert looked == ["a", "b"]  # c never read
    assert asyncio.run(_all_done(["a"], status)) is True
    assert asyncio.run(_all_done(["a", "missing"], status)) is False


def test_a_message_whose_report_awaits_its_commit_is_not_run_again(tmp_path):
    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    node.reader = _NoReader()  # running the task would read its status first
    node._awaiting_commit.add("7-0")
    message = TaskMessage("7-0", {"schedule_id": "s", "task_id": "train:1", "attempt": 1}, 2)
    asyncio.run(node._handle(message))  # returns without touching the chain, the stores or the queue
    node._awaiting_commit.clear()
    try:
        asyncio.run(node._handle(message))
    except AssertionError as exc:
        assert "task_status" in str(exc)  # without the guard it goes on to read the task's status
    else:
        raise AssertionError("the message was not handled at all")


def test_a_node_whose_last_block_is_not_on_the_chain_replays_from_genesis(devnet, stores, tmp_path, caplog):  # noqa: F811
    redis_server, _ = stores
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "c.last-block").write_text("ab" * 64)  # e.g. half an id, or another chain's

    async def scenario():
        async with running_processor(devnet.component_url, *federation_handlers()):
            node = ComputeNode("c", tmp_path / "c", validator_url=devnet.component_url, rest_url=devnet.rest_url,
                               redis_url=redis_server.url)
            await node.start()
            await node.stop()

    run(scenario(), timeout=60)
    assert "is not on this chain; replaying every block" in caplog.text


class _CountingReader:
    """Answers task_status from a table and counts the reads: each one is a REST call."""

    def __init__(self, statuses: dict):
        self.statuses, self.reads = statuses, []

    async def task_status(self, schedule_id, task_id):
        self.reads.append(task_id)
        return self.statuses.get(task_id)


def _block(number: int, *task_events) -> BlockEvents:
    """A committed block holding task events (event type, task_id, attempt) of round "s"."""
    found = [pb.Event(event_type=kind, attributes=[pb.Event.Attribute(key=k, value=str(v)) for k, v in
                                                   (("schedule_id", "s"), ("task_id", task), ("attempt", attempt))])
             for kind, task, attempt in task_events]
    return BlockEvents(f"b{number}", number, "00" * 32, f"b{number - 1}", found)


def _node_reading(tmp_path, statuses: dict) -> tuple[ComputeNode, _CountingReader]:
    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    reader = _CountingReader(statuses)
    node.context = TaskContext(node="c", encryption_key=None, reader=reader, blobs=None)
    return node, reader


def test_a_status_that_is_not_settled_is_read_once_per_block_in_a_round_not_watched_from_its_assignment(tmp_path):
    node, reader = _node_reading(tmp_path, {"train:1": {"status": "assigned", "attempt": 1},
                                            "train:2": {"status": "done", "attempt": 1}})

    async def looks():
        node._take_up(_block(7, (events.TASK_DONE, "train:9", 1)))  # a round assigned before this node started
        for _ in range(3):  # a block's events and this node's own reports each look again
            assert (await node._status_in_view("s", "train:1"))["status"] == "assigned"
        assert reader.reads == ["train:1"]  # state only changes in a block: read once in this one
        node._take_up(_block(8))  # the next block may have moved it
        assert (await node._status_in_view("s", "train:1"))["status"] == "assigned"
        assert reader.reads == ["train:1", "train:1"]
        for _ in range(2):  # done is final: read once, kept
            assert (await node._status_in_view("s", "train:2"))["status"] == "done"
        node._take_up(_block(9))
        assert (await node._status_in_view("s", "train:2"))["status"] == "done"
        assert reader.reads == ["train:1", "train:1", "train:2"]

    asyncio.run(looks())


def test_a_round_watched_from_its_assignment_takes_its_statuses_from_the_task_events(tmp_path):
    node, reader = _node_reading(tmp_path, {})

    async def status(task_id):
        return (await node._status_in_view("s", task_id))["status"], (await node._status_in_view("s", task_id))["attempt"]

    async def looks():
        node._take_up(_block(5, (events.TASK_ASSIGNED, "train:1", 1), (events.TASK_ASSIGNED, "train:2", 1),
                             (events.TASK_ASSIGNED, "aggregate", 1)))
        assert await status("train:1") == ("assigned", 1)
        node._take_up(_block(6, (events.TASK_DONE, "train:1", 1), (events.TASK_FAILED, "train:2", 1)))
        assert await status("train:1") == ("done", 1)
        assert await status("train:2") == ("failed", 1)
        node._take_up(_block(7, (events.TASK_REASSIGNED, "train:2", 2)))
        assert await status("train:2") == ("assigned", 2)
        node._take_up(_block(8, (events.TASK_DROPPED, "train:2", 2)))
        assert await status("train:2") == ("dropped", 2)
        assert reader.reads == []  # not one chain read

    asyncio.run(looks())


def test_a_missing_starting_model_is_looked_up_once_per_block_and_at_once_when_this_node_made_one(
        tmp_path, monkeypatch):
    from trustmesh.compute_node import node as node_module

    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    looked = []

    async def starting_model_known(ctx, schedule_id):  # three chain reads each, in the node
        looked.append(schedule_id)
        return False

    monkeypatch.setattr(node_module, "starting_model_known", starting_model_known)
    node.context = TaskContext(node="c", encryption_key=None, reader=_NoReader(), blobs=None)
    node._view = 3

    async def looks():
        for _ in range(3):
            assert await node._model_known("s2") is False
        assert looked == ["s2"]
        node._models_made += 1  # this node's aggregate of the previous round was just reported
        assert await node._model_known("s2") is False
        assert looked == ["s2", "s2"]
        node._view = 4
        await node._model_known("s2")
        assert looked == ["s2", "s2", "s2"]

    asyncio.run(looks())


def test_a_task_done_event_gives_the_whole_done_status_so_the_aggregate_reads_none(tmp_path):
    node, reader = _node_reading(tmp_path, {})
    done = pb.Event(event_type=events.TASK_DONE, attributes=[pb.Event.Attribute(key=k, value=v) for k, v in (
        ("schedule_id", "s"), ("task_id", "train:1"), ("attempt", "2"), ("node", "c2"), ("kind", "local_train"),
        ("output_digest", "ab" * 32), ("metrics", '{"accuracy":0.5,"samples":14}'))])
    node._take_up(BlockEvents("b5", 5, "00" * 32, "b4", [done]))
    status = asyncio.run(node.context.dependency_status("s", "train:1"))
    assert status == {"status": "done", "node": "c2", "attempt": 2, "output_digest": "ab" * 32,
                      "metrics": {"accuracy": 0.5, "samples": 14}}
    assert reader.reads == []


def test_a_batch_of_trainings_looks_once_for_what_it_lets_run(tmp_path, monkeypatch):
    """Not once after each: a node given 500 of a round's trainings walked the round's 1,000 tasks 500 times."""
    from trustmesh.compute_node import node as node_module
    from trustmesh.compute_node.tasks import TaskOutcome

    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    node.context = TaskContext(node="c", encryption_key=None, reader=_NoReader(), blobs=None)
    looks, reported = [], []

    async def enqueue_runnable(schedule_id):
        looks.append(schedule_id)

    async def trained(ctx, schedule_id, task_ids):  # what run_local_trains gives back: an outcome per task
        return {t: TaskOutcome("ab" * 32, {"samples": 3, "accuracy": 0.5, "loss": 0.1}) for t in task_ids}

    node.enqueue_runnable = enqueue_runnable
    node._report = lambda txns, message_ids, completed=(), **kw: reported.append(
        ([cbor.decode(t.payload)["action"] for t in txns], message_ids))
    monkeypatch.setattr(node_module, "run_local_trains", trained)
    node._queued = {("s", f"train:{i}", 1) for i in range(5)}  # queued by this node: no status read first
    asyncio.run(node._handle_trains([TaskMessage(f"{i}-0", {"schedule_id": "s", "task_id": f"train:{i}", "attempt": 1}, 1)
                                     for i in range(5)]))
    assert looks == ["s"]
    assert reported == [(["report_many"], [f"{i}-0" for i in range(5)])]  # one transaction for the five



def test_an_aggregate_this_node_made_lets_it_look_for_the_next_rounds_model_again_at_once(tmp_path, monkeypatch):
    """Not a block later: the node that aggregated round r can start round r+1's trainings from it."""
    from trustmesh.compute_node import node as node_module
    from trustmesh.compute_node.tasks import TaskOutcome

    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    node.context = TaskContext(node="c", encryption_key=None, reader=_NoReader(), blobs=None)
    node.context.rounds["s1"] = {"assignments": {"schedule_id": "s1", "workflow_id": "wf", "round": 1}}
    looks = []

    async def model_known(ctx, schedule_id):  # round 2's starting model: there once round 1 is aggregated
        looks.append(schedule_id)
        return ("wf", 1) in ctx.global_models

    async def enqueue_runnable(schedule_id):
        pass

    monkeypatch.setattr(node_module, "starting_model_known", model_known)
    node.enqueue_runnable = enqueue_runnable
    node._report = lambda txns, message_ids, completed=(), **kw: None
    node._take_up(_block(4))
    assert not asyncio.run(node._model_known("s2")) and not asyncio.run(node._model_known("s2"))
    assert looks == ["s2"]  # missing: looked up once in this block
    result = {"participants": [node.node], "aggregation_weights": {node.node: 1.0}, "metrics": {"loss": 0.1, "accuracy": 0.5}}
    asyncio.run(node._done(TaskMessage("9-0", {"schedule_id": "s1", "task_id": "aggregate", "attempt": 1}, 1),
                           TaskOutcome("ab" * 32, {"samples": 3, "accuracy": 0.5, "loss": 0.1}, round_result=result), 0.0))
    assert asyncio.run(node._model_known("s2")) and looks == ["s2", "s2"]  # the same block, looked up again


def test_tasks_made_runnable_together_are_published_once_and_remembered(tmp_path):
    """One Redis round trip for the lot (publish_once_many); each remembered as queued, so the next
    look (after the next block, or this node's next report) publishes nothing again."""
    from trustmesh.stores.redis_client import connect
    from trustmesh.stores.servers import RedisServer
    from trustmesh.stores.task_queue import TaskQueue

    async def looks(url):
        node, reader = _node_reading(tmp_path, {t: {"status": "assigned", "attempt": 1} for t in ("p:1", "p:2")})
        tasks = {t: {"kind": "preprocess", "node": "c", "attempt": 1, "fetch_dependency_outputs": []}
                 for t in ("p:1", "p:2")}
        node.context.rounds["s"] = {"assignments": {"schedule_id": "s", "order": ["p:1", "p:2"], "tasks": tasks}}
        node.node = "c"
        redis = await connect(url)
        node.queue = TaskQueue(redis, "tasks_c")
        published = []
        many = node.queue.publish_once_many

        async def counted(items, *args):
            published.append(len(items))
            return await many(items, *args)

        node.queue.publish_once_many = counted
        try:
            await node.enqueue_runnable("s")
            await node.enqueue_runnable("s")
            assert published == [2, 0] and await redis.xlen("tasks_c") == 2
            assert {("s", "p:1", 1), ("s", "p:2", 1)} <= set(node._queued)
        finally:
            await redis.aclose()

    with RedisServer() as server:
        asyncio.run(looks(server.url))
