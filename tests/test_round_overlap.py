"""Rounds overlap by one: the coordinator opens the next round while this one trains, and a
compute node starts the next round's training only from this round's global model
(tests/test_federated_round.py runs the whole flow)."""

from __future__ import annotations

import asyncio

import pytest

from trustmesh.compute_node.node import ComputeNode
from trustmesh.compute_node.tasks import InputNotReady, TaskContext, _global_model, starting_model_known
from trustmesh.iot_node.node import IoTNode
from trustmesh.scheduling import events, layout
from trustmesh.scheduling.schedule import StartingModel
from trustmesh.stores.redis_link import RedisLink

WF, SID1, SID2, SID3 = "wf", "1" * 64, "2" * 64, "3" * 64


class _Chain:
    """Rounds, results and assignments as a FederationReader returns them; counts reads."""

    def __init__(self, rounds: dict[int, dict], results: dict[str, dict] | None = None):
        self.rounds_ = rounds
        self.results = results or {}
        self.reads = []

    async def rounds(self, workflow_id):
        self.reads.append("rounds")
        return {"rounds": {str(n): r["schedule_id"] for n, r in self.rounds_.items()}, "latest": max(self.rounds_)}

    async def round(self, sid):
        self.reads.append("round")
        return next((r for r in self.rounds_.values() if r["schedule_id"] == sid), None)

    async def round_core(self, sid):  # what the coordinator reads: status, clock (the lists play no part here)
        self.reads.append("round_core")
        return next((r for r in self.rounds_.values() if r["schedule_id"] == sid), None)

    async def round_result(self, sid):
        self.reads.append("round_result")
        return self.results.get(sid)

    async def starting_model(self, workflow_id, number):
        self.reads.append("starting_model")
        sid = self.rounds_[number - 1]["schedule_id"]
        result = self.results.get(sid)
        if result is None:
            raise LookupError(f"round {number - 1} of {workflow_id!r} has no global model on chain yet")
        return StartingModel.of_previous_round(workflow_id, number, sid, result["global_model_digest"])


def _round(number: int, sid: str, status: str) -> dict:
    return {"schedule_id": sid, "round": number, "status": status}


def _context(chain) -> TaskContext:
    ctx = TaskContext(node="n", encryption_key=None, reader=chain, blobs=None)
    ctx.rounds[SID2] = {"assignments": {"schedule_id": SID2, "workflow_id": WF, "round": 2},
                        "definition": {"model": {}}}
    return ctx


def test_the_next_rounds_training_waits_for_this_rounds_model():
    chain = _Chain({1: _round(1, SID1, "ready"), 2: _round(2, SID2, "ready")})
    ctx = _context(chain)
    assert asyncio.run(starting_model_known(ctx, SID2)) is False
    with pytest.raises(InputNotReady):  # a task run anyway waits and is tried again, it does not fail
        asyncio.run(_global_model(ctx, {"model": {}}, ctx.rounds[SID2]["assignments"]))


def test_training_starts_from_the_nodes_own_aggregate_report_before_it_commits_and_says_so():
    chain = _Chain({1: _round(1, SID1, "ready"), 2: _round(2, SID2, "ready")})
    ctx = _context(chain)

    class _Blobs:
        async def get(self, digest):
            raise AssertionError("the model blob is read only in the test that loads it")

    ctx.blobs = _Blobs()
    ctx.global_models[WF, 1] = {"digest": None, "schedule_id": SID1, "task_id": "aggregate"}
    assert asyncio.run(starting_model_known(ctx, SID2)) is True
    state, built_on, start = asyncio.run(_global_model(ctx, {"model": {}}, ctx.rounds[SID2]["assignments"]))
    assert built_on == ((SID1, "aggregate"),)  # its report names that aggregate's as a dependency
    assert "starting_model" not in chain.reads
    # ... and declares what the lineage rule reads to find that model once it is committed
    assert (start.digest, start.source_round) == (None, 1)
    assert start.inputs == (layout.workflow_rounds_address(WF), layout.round_result_address(SID1))


def _coordinator(tmp_path, chain) -> tuple[IoTNode, list]:
    node = IoTNode("coord", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                   redis_url="redis://127.0.0.1:1", coordinator=True)
    node.reader = chain
    opened = []

    async def open_round(workflow_id, number, previous):
        opened.append((number, previous))

    node._open_round = open_round
    return node, opened


@pytest.mark.parametrize("rounds, results, opens", [
    # round 1 ready: round 2 collects while round 1 trains
    ({1: "ready"}, {}, [(2, SID1)]),
    # round 1 still collecting: nothing to open
    ({1: "collecting"}, {}, []),
    # round 2 ready but round 1 has no model yet: one round ahead at most
    ({1: "ready", 2: "ready"}, {}, []),
    # round 1's model is on chain: round 3 may collect while round 2 trains
    ({1: "ready", 2: "ready"}, {SID1: {"global_model_digest": "ab" * 32}}, [(3, SID2)]),
    # round 1 timed out (no model): round 2 trains from the seeded model, round 3 may open
    ({1: "timeout", 2: "ready"}, {}, [(3, SID2)]),
    # round 2 still collecting
    ({1: "ready", 2: "collecting"}, {SID1: {"global_model_digest": "ab" * 32}}, []),
    # the last round is open: nothing beyond it
    ({1: "ready", 2: "ready", 3: "ready"}, {SID1: {"global_model_digest": "ab" * 32},
                                           SID2: {"global_model_digest": "cd" * 32}}, []),
])
def test_the_coordinator_opens_the_next_round_one_round_ahead_at_most(tmp_path, rounds, results, opens):
    sids = {1: SID1, 2: SID2, 3: SID3}
    chain = _Chain({n: _round(n, sids[n], status) for n, status in rounds.items()}, results)
    node, opened = _coordinator(tmp_path, chain)
    asyncio.run(node._open_next(WF, {"rounds": 3}))
    assert opened == opens


def test_a_workflow_is_finished_only_when_every_round_is_over(tmp_path):
    chain = _Chain({1: _round(1, SID1, "ready"), 2: _round(2, SID2, "ready"), 3: _round(3, SID3, "ready")})
    node, _ = _coordinator(tmp_path, chain)
    node.workflow_id = WF
    node.models[WF] = {1: "a", 3: "c"}  # the last round is final, round 2's evaluation is not
    asyncio.run(node._finish_if_over(WF, {"rounds": 3}))
    assert not node.finished.is_set()
    node.models[WF][2] = "b"
    asyncio.run(node._finish_if_over(WF, {"rounds": 3}))
    assert node.finished.is_set()


def test_a_participant_reads_only_a_rounds_result_when_a_round_before_the_last_is_final(tmp_path):
    """Not whether the workflow is over (its rounds index and a round): ~3 reads a node a round."""
    chain = _Chain({1: _round(1, SID1, "ready"), 2: _round(2, SID2, "ready")}, {SID1: {"final": False}})
    node = IoTNode("p", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                   redis_url="redis://127.0.0.1:1", coordinator=False)
    node.reader, node.workflow_id = chain, WF
    definition = {"federation": {"rounds": 2}}
    asyncio.run(node._react_to(events.ROUND_FINALIZED, {"workflow_id": WF, "schedule_id": SID1, "round": "1"},
                               definition))
    assert chain.reads == ["round_result"]
    node.models[WF] = {1: "a", 2: "b"}  # both final (as _collect_final records them): now it looks
    asyncio.run(node._react_to(events.ROUND_FINALIZED, {"workflow_id": WF, "schedule_id": SID2, "round": "2"},
                               definition))
    assert node.finished.is_set()


def test_a_timed_out_round_does_not_hold_the_finish(tmp_path):
    chain = _Chain({1: _round(1, SID1, "ready"), 2: _round(2, SID2, "timeout")})
    node, _ = _coordinator(tmp_path, chain)
    node.models[WF] = {1: "a"}
    asyncio.run(node._finish_if_over(WF, {"rounds": 2}))
    assert WF in node.done


def test_a_task_queued_by_this_node_runs_without_reading_its_status_again(tmp_path):
    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")

    class _Reader:
        reads = 0

        async def task_status(self, sid, task_id):
            _Reader.reads += 1
            return None  # unknown: the node acks and skips

    class _Queue:
        async def ack(self, message_id):
            return True

    node.reader, node.queue, node.context = _Reader(), _Queue(), None
    from trustmesh.stores.task_queue import TaskMessage

    async def no_run(*args):
        raise RuntimeError("ran")

    import trustmesh.compute_node.node as module
    original, module.run_task = module.run_task, no_run
    try:
        node._queued.add(("s", "t", 1))
        with pytest.raises(RuntimeError, match="ran"):  # straight to the task: no status read
            asyncio.run(node._handle(TaskMessage("1-0", {"schedule_id": "s", "task_id": "t", "attempt": 1}, 1)))
        assert _Reader.reads == 0
        for message, why in ((TaskMessage("2-0", {"schedule_id": "s", "task_id": "t", "attempt": 1}, 2), "redelivered"),
                             (TaskMessage("3-0", {"schedule_id": "s", "task_id": "u", "attempt": 1}, 1), "not queued here")):
            asyncio.run(node._handle(message))  # reads the status, finds nothing, skips
        assert _Reader.reads == 2
        node._reassigned.add(("s", "t"))
        asyncio.run(node._handle(TaskMessage("4-0", {"schedule_id": "s", "task_id": "t", "attempt": 1}, 1)))
        assert _Reader.reads == 3  # moved since it was queued: read again
    finally:
        module.run_task = original


def test_reports_go_out_in_the_order_they_were_made_while_the_next_task_runs(tmp_path):
    from trustmesh.ledger.coalescing_rest import COALESCE_WINDOW, CoalescingRest

    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    sent, acked, posts = [], [], []

    class _Rest(CoalescingRest):  # the node's own client; only the HTTP exchange is played here
        async def submit_batches(self, batches):
            posts.append(len(batches))
            await asyncio.sleep(0.05 if len(posts) == 1 else 0)  # the first POST is the slow one
            sent.extend(b.transactions[0].header_signature for b in batches)
            return [b.header_signature for b in batches]

        async def batch_statuses(self, ids, wait=None):
            return [{"id": i, "status": "COMMITTED"} for i in ids]

    class _Queue:
        async def ack(self, *message_ids):
            acked.extend(message_ids)

    node.queue, node.context = _Queue(), TaskContext("n", None, None, None)
    node.link = RedisLink(None, node.redis_url, node.name)  # acks go through it (waiting out Redis)
    from trustmesh.scheduling import schedule

    async def scenario():
        node.rest = _Rest("http://127.0.0.1:1")
        txns = [schedule.make_report_transaction(node.signer, "a" * 64, f"t{i}", "failed", attempt=1, reason="x")
                for i in range(4)]
        node._report([txns[0]], ["0-0"])  # returns at once: the caller goes on with its next task
        assert sent == [] and node._awaiting_commit == {"0-0"}
        await asyncio.sleep(COALESCE_WINDOW * 4)  # its POST is out (and slow) before the next reports
        for i, txn in enumerate(txns[1:], 1):
            node._report([txn], [f"{i}-0"])
        await asyncio.gather(*node._confirming)
        await node.rest.close()
        return [t.header_signature for t in txns]

    made = asyncio.run(scenario())
    assert posts == [1, 3], "reports made together share a POST"
    assert sent == made and acked == ["0-0", "1-0", "2-0", "3-0"] and not node._awaiting_commit


def test_trainings_made_together_are_reported_in_one_transaction_and_one_by_one_if_it_is_refused(tmp_path):
    """One report_many for a round's trainings made together; should the chain refuse it (one of
    its reports, say, for a task moved meanwhile), each report goes again alone, so the others
    still commit, and every message is acked once its own report is settled."""
    from trustmesh.compute_node.tasks import TaskOutcome
    from trustmesh.ledger import payload as cbor
    from trustmesh.ledger.coalescing_rest import CoalescingRest
    from trustmesh.stores.task_queue import TaskMessage

    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    sent, refused, acked = [], set(), []

    class _Rest(CoalescingRest):  # the chain refuses the first batch (the report_many), takes the rest
        async def submit_batches(self, batches):
            if not sent:
                refused.update(b.header_signature for b in batches)
            sent.extend([cbor.decode(t.payload)["action"] for t in b.transactions] for b in batches)
            return [b.header_signature for b in batches]

        async def batch_statuses(self, ids, wait=None):
            return [{"id": i, "status": "INVALID", "invalid_transactions": [
                        {"message": "report 2 of 3 (task 't1'): task 't1' is assigned to node 02ab…"}]}
                    if i in refused else {"id": i, "status": "COMMITTED"} for i in ids]

    class _Queue:
        async def ack(self, *message_ids):
            acked.append(sorted(message_ids))

    node.queue, node.context = _Queue(), TaskContext("n", None, None, None)
    node.link = RedisLink(None, node.redis_url, node.name)
    sid = "a" * 64
    messages = [TaskMessage(f"{i}-0", {"schedule_id": sid, "task_id": f"t{i}", "attempt": 1}, 1) for i in range(3)]

    async def scenario():
        node.rest = _Rest("http://127.0.0.1:1")
        node._done_together([(m, TaskOutcome("ab" * 32, {"samples": 3})) for m in messages], 0.0)
        assert node._awaiting_commit == {"0-0", "1-0", "2-0"} and len(set(node._uncommitted.values())) == 1
        while node._confirming:  # the report_many, then the three sent again alone
            await asyncio.gather(*list(node._confirming))
        await node.rest.close()

    asyncio.run(scenario())
    assert sent[0] == ["report_many"] and sent[1:] == [["report"]] * 3
    assert sorted(acked) == [["0-0"], ["1-0"], ["2-0"]]  # each once, after its own report committed
    assert sorted(node.completed) == [(sid, f"t{i}") for i in range(3)]
    assert not node._awaiting_commit and not node._uncommitted and not node.context.reported


def test_a_refused_report_built_on_the_nodes_own_report_is_left_to_run_again(tmp_path):
    """A training made on the aggregate this node had just reported names that report as its
    dependency; when the chain refuses the aggregate, it refuses the training too (its lineage
    lacks the round result). That message stays pending, so the stream hands it out again and the
    task runs once more on what the chain then holds; acked, the task waited for its deadline
    (a Redis that came back empty twice left a round so). So does a training that ended after the
    aggregate's refusal, though its report names no transaction of the aggregate's any more. A
    refused report built on nothing of this node's is final: its message is acked."""
    from trustmesh.compute_node.tasks import TaskOutcome
    from trustmesh.ledger.coalescing_rest import CoalescingRest
    from trustmesh.stores.task_queue import TaskMessage

    node = ComputeNode("c", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                       redis_url="redis://127.0.0.1:1")
    acked = []

    class _Rest(CoalescingRest):  # the chain refuses every report
        async def submit_batches(self, batches):
            return [b.header_signature for b in batches]

        async def batch_statuses(self, ids, wait=None):
            return [{"id": i, "status": "INVALID", "invalid_transactions": [
                        {"message": "the lineage rule of task 'train:x' reads ... no round result"}]} for i in ids]

    class _Queue:
        async def ack(self, *message_ids):
            acked.extend(message_ids)

    node.queue, node.context = _Queue(), TaskContext("n", None, None, None)
    node.link = RedisLink(None, node.redis_url, node.name)
    sid, next_sid = "a" * 64, "b" * 64
    aggregate = TaskMessage("1-0", {"schedule_id": sid, "task_id": "aggregate", "attempt": 1}, 1)
    training = TaskMessage("2-0", {"schedule_id": next_sid, "task_id": "train:x", "attempt": 1}, 1)
    later = TaskMessage("3-0", {"schedule_id": next_sid, "task_id": "train:y", "attempt": 1}, 1)
    alone = TaskMessage("4-0", {"schedule_id": next_sid, "task_id": "train:z", "attempt": 1}, 1)

    async def settle():
        while node._confirming:
            await asyncio.gather(*list(node._confirming))

    async def scenario():
        node.rest = _Rest("http://127.0.0.1:1")
        node._done_alone(aggregate, node._done_fields(aggregate, TaskOutcome("ab" * 32, {"samples": 3}), 0.0)[0], [])
        built_on = TaskOutcome("cd" * 32, {"samples": 3}, built_on=[(sid, "aggregate")])
        fields, waits_for = node._done_fields(training, built_on, 0.0)
        assert waits_for == [node._uncommitted[sid, "aggregate"]]  # it names the aggregate's report
        node._done_alone(training, fields, waits_for)
        await settle()
        # a training that ended after the aggregate's refusal names no transaction, but it rests
        # on that aggregate all the same
        fields, waits_for = node._done_fields(later, built_on, 0.0)
        assert waits_for == []
        node._done_alone(later, fields, waits_for)
        fields, waits_for = node._done_fields(alone, TaskOutcome("ef" * 32, {"samples": 3}), 0.0)
        node._done_alone(alone, fields, waits_for)
        await settle()
        await node.rest.close()

    asyncio.run(scenario())
    assert acked == ["1-0", "4-0"], "the trainings on the refused aggregate stay pending; the others are final"
    assert not node._awaiting_commit and not node._uncommitted and not node.context.reported


def test_what_a_node_remembers_of_queued_tasks_is_bounded():
    from trustmesh.compute_node.tasks import Recent

    recent = Recent(3)
    for key in range(5):
        recent.add(key)
    assert list(recent) == [2, 3, 4] and 4 in recent and 0 not in recent
    recent.put(9, "nine")
    assert list(recent.items()) == [(3, None), (4, None), (9, "nine")]


@pytest.mark.parametrize("result_at, late", [
    (None, False),          # round 1 has no model yet: round 2's training cannot start, so it is not late
    ("recent", False),      # the model appeared 10 s ago: the task's clock started then
    ("long ago", True),     # the model appeared long before: late, and its node is dead
])
def test_a_training_that_waited_for_the_previous_rounds_model_is_late_only_after_it(tmp_path, result_at, late):
    import time as clock

    now = clock.time()
    results = {} if result_at is None else {
        SID1: {"global_model_digest": "ab" * 32, "recorded_at": now - (10 if result_at == "recent" else 1000)}}
    chain = _Chain({1: _round(1, SID1, "ready"), 2: _round(2, SID2, "ready")}, results)
    task = {"kind": "local_train", "node": "dead", "attempt": 1, "deadline": now - 500}

    async def assignments(sid):
        return {"deadline_seconds": 60, "tasks": {"train:a": task}}

    async def task_status(sid, task_id):
        return {"status": "assigned", "attempt": 1}

    chain.assignments, chain.task_status = assignments, task_status
    node, _ = _coordinator(tmp_path, chain)
    sent = []

    class _Heartbeats:
        async def is_alive(self, node):
            return False

    async def once(key, txn, what):
        sent.append(key)

    node.heartbeats, node._once = _Heartbeats(), once
    asyncio.run(node._keep_moving(WF, chain.rounds_[2]))
    assert sent == ([("reassign", SID2, "train:a", 1)] if late else [])


def test_a_block_with_only_its_commit_event_needs_no_full_look_at_the_chain(tmp_path):
    from trustmesh.ledger import protos as pb
    from trustmesh.ledger.events import BLOCK_COMMIT, BlockEvents

    node, _ = _coordinator(tmp_path, _Chain({1: _round(1, SID1, "ready")}))
    commit = pb.Event(event_type=BLOCK_COMMIT, attributes=[pb.Event.Attribute(key="block_num", value="7")])
    block = BlockEvents(block_id="b", block_num=7, state_root_hash="", previous_block_id="a", events=[commit])
    assert node._react(block) is True  # every block has it: a full re-read per block per node is what it avoids
    deployed = pb.Event(event_type="trustmesh/workflow-deployed", attributes=[pb.Event.Attribute(key="workflow_id", value=WF)])
    block.events.append(deployed)
    assert node._react(block) is False


def test_a_refused_reassign_is_not_sent_again_every_tick(tmp_path, monkeypatch):
    """With no live node to take a late task the schedule family refuses the reassign; the
    coordinator tries again after REASSIGN_RETRY seconds, not on every one-second tick."""
    import time as clock

    from trustmesh.iot_node import node as iot_node

    class Chain:
        async def assignments(self, sid):
            return {"deadline_seconds": 1, "tasks": {"preprocess": {"kind": "preprocess", "deadline": 0,
                                                                     "attempt": 1, "node": "c"}}}

        async def task_status(self, sid, task_id):
            return {"status": "assigned", "attempt": 1}

    class DeadNodes:
        async def is_alive(self, node):
            return False

    node = IoTNode("coord", tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                   redis_url="redis://127.0.0.1:1", coordinator=True)
    node.reader, node.heartbeats, sent = Chain(), DeadNodes(), []

    async def refused(txn, what):
        sent.append(what)
        return False

    node._commit = refused
    now = [1000.0]
    monkeypatch.setattr(clock, "time", lambda: now[0])
    record = {"schedule_id": SID1, "status": "ready"}
    for _ in range(5):  # five ticks within the retry pause: one attempt
        asyncio.run(node._keep_moving(WF, record))
        now[0] += 1
    assert sent == ["reassign late task preprocess"]
    now[0] += iot_node.REASSIGN_RETRY
    asyncio.run(node._keep_moving(WF, record))
    assert len(sent) == 2
