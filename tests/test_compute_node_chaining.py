"""A compute node builds on its own reports before they are committed, and never runs a task
again whose report is on its way (tests/test_federated_round.py runs the whole flow)."""

from __future__ import annotations

import asyncio

from helpers.ledger_helpers import run, running_processor
from trustmesh.compute_node.node import ComputeNode, _all_done
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
