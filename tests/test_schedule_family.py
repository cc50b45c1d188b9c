"""trustmesh-schedule next to the real workflow, peer and federation families: assignment, any-DAG
dependencies, reports, reassignment, round results, finalization and every rule broken once with
its message read back from the batch status. Deterministic assignment and a whole round run
through the dev validator (`chain`); the rules run on dict state through the handlers' apply()
(`client`, helpers.dict_ledger), where chain time is set rather than waited for."""

from __future__ import annotations

import contextlib
import hashlib
import math

import pytest

from helpers.devnet_process import DevnetProcess
from helpers.dict_ledger import DictLedger
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, schedule
from trustmesh.scheduling.federation import (
    FederationHandler,
    make_close_round_transaction,
    make_open_round_transaction,
    make_submit_transaction,
)
from trustmesh.scheduling.peers import PeerHandler, make_register_transaction
from trustmesh.scheduling.reader import FederationReader
from trustmesh.scheduling.schedule import (
    ScheduleHandler,
    make_assign_transaction,
    make_reassign_transaction,
    make_report_transaction,
    make_round_result_transaction,
)
from trustmesh.scheduling.workflow import WorkflowHandler, make_deploy_transaction


def key(name: str) -> PrivateKey:
    """Fixed keys, so two fresh validators see the same nodes and schedule ids."""
    return PrivateKey(hashlib.sha256(f"schedule-test/{name}".encode()).digest())


def pub(signer: PrivateKey) -> str:
    return signer.public_key().as_hex()


IOT = [key(f"iot-{i}") for i in range(3)]
COORDINATOR = IOT[0]
COMPUTE = [key("compute-0"), key("compute-1")]
RESOURCES = [(8, 16384), (4, 8192)]  # 24 and 12 resource points
SAMPLES = [10, 20, 30]
OUTSIDER = key("outsider")

SIMPLE = [
    {"id": "train", "kind": "local_train", "depends_on": []},
    {"id": "aggregate", "kind": "aggregate", "depends_on": ["train"]},
    {"id": "evaluate", "kind": "evaluate", "depends_on": ["aggregate"]},
]
LINEAR = [
    {"id": "preprocess", "kind": "preprocess", "depends_on": []},
    {"id": "train", "kind": "local_train", "depends_on": ["preprocess"]},
    {"id": "aggregate", "kind": "aggregate", "depends_on": ["train"]},
    {"id": "evaluate", "kind": "evaluate", "depends_on": ["aggregate"]},
]
ANY_DAG = [  # evaluate reads the global model *and* every local update
    {"id": "prep", "kind": "preprocess", "depends_on": []},
    {"id": "train", "kind": "local_train", "depends_on": ["prep"]},
    {"id": "aggregate", "kind": "aggregate", "depends_on": ["train"]},
    {"id": "evaluate", "kind": "evaluate", "depends_on": ["aggregate", "train"]},
]

TWO_SINKS = [
    {"id": "train", "kind": "local_train", "depends_on": []},
    {"id": "agg_a", "kind": "aggregate", "depends_on": ["train"]},
    {"id": "agg_b", "kind": "aggregate", "depends_on": ["train"]},
    {"id": "evaluate", "kind": "evaluate", "depends_on": ["agg_a", "agg_b"]},
]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def definition(workflow_id: str, tasks, *, train_on: str = "compute", round_timeout: int = 600) -> dict:
    return {
        "workflow_id": workflow_id,
        "name": f"schedule test {workflow_id}",
        "tasks": tasks,
        "model": {"type": "mlp", "input_dim": 64, "hidden": [8], "num_classes": 10},
        "hyperparameters": {"epochs": 1, "batch_size": 16, "learning_rate": 0.01, "optimizer": "sgd", "seed": 1},
        "strategy": {"name": "fedavg"},
        "data": {"dataset": "digits", "partition": {"kind": "iid", "seed": 1}, "test_fraction": 0.2},
        "federation": {
            "coordinator_node": pub(COORDINATOR), "participant_nodes": [pub(k) for k in IOT],
            "expected_nodes": len(IOT), "min_nodes_required": 2, "round_timeout": round_timeout,
            "rounds": 3, "train_on": train_on,
        },
    }


def batch(signer, txn):
    return make_batch(signer, [txn])


def raw(signer, body: dict, schedule_id: str | None = None):
    """A trustmesh-schedule transaction with any payload, to break payload rules on purpose."""
    sid = schedule_id or "0" * 64
    addresses = [layout.SCHEDULE_NS, layout.round_address(sid), layout.PEER_NS, layout.WORKFLOW_NS,
                 layout.BLOCK_INFO_NS]
    txn = make_transaction(signer, layout.SCHEDULE_FAMILY, layout.VERSION, cbor.encode(body), addresses,
                           [layout.SCHEDULE_NS])
    return batch(signer, txn)


def schedule_id_of(workflow_id: str) -> str:
    return layout.schedule_id_for(workflow_id, 1, pub(COORDINATOR))


@contextlib.asynccontextmanager
async def ledger(node):
    handlers = (WorkflowHandler(), PeerHandler(), FederationHandler(), ScheduleHandler())
    async with running_processor(node.component_url, *handlers), rest(node.rest_url) as client:
        yield client


async def ok(client, *batches):
    statuses = await submit_and_wait(client, list(batches))
    bad = [s["invalid_transactions"][0]["message"] for s in statuses if s["status"] != "COMMITTED"]
    assert not bad, bad
    return statuses


async def expect_invalid(client, cases):
    """cases: [(batch, fragment of the processor's message)], submitted together."""
    statuses = await submit_and_wait(client, [b for b, _ in cases])
    for (b, fragment), status in zip(cases, statuses):
        assert status["status"] == "INVALID", (fragment, status)
        message = status["invalid_transactions"][0]["message"]
        assert fragment in message, (fragment, message)


async def record(client, address: str):
    data = await client.get_state(address)
    return None if data is None else cbor.decode(data)


async def assignments(client, sid):
    return await record(client, layout.assignments_address(sid))


async def task_status(client, sid, task_id):
    return await record(client, layout.task_status_address(sid, task_id))


async def load(client, node_key: str) -> dict:
    return await record(client, layout.node_load_address(node_key)) or schedule.empty_load(node_key)


async def events_of(client, txn) -> list[tuple[str, dict]]:
    [receipt] = await client.get_receipts([txn.header_signature])
    return [(e["event_type"], {a["key"]: a["value"] for a in e.get("attributes", [])})
            for e in receipt.get("events", [])]


def register_batches():
    return [
        batch(k, make_register_transaction(k, name=f"compute-{i}", encryption_public_key=sha(f"x25519/{i}"),
                                           cpu_cores=cores, memory_mb=memory))
        for i, (k, (cores, memory)) in enumerate(zip(COMPUTE, RESOURCES))
    ]


async def open_round(client, workflow_id, tasks, *, submitters=IOT, **options) -> str:
    """Deploy a workflow, open its round 1 and submit from `submitters`; returns the schedule_id."""
    sid = schedule_id_of(workflow_id)
    batches = [batch(COORDINATOR, make_deploy_transaction(COORDINATOR, definition(workflow_id, tasks, **options))),
               batch(COORDINATOR, make_open_round_transaction(COORDINATOR, workflow_id, 1))]
    for node in submitters:
        i = IOT.index(node)
        batches.append(batch(node, make_submit_transaction(node, sid, sha(f"{workflow_id}/data/{i}"), SAMPLES[i])))
    await ok(client, *batches)
    return sid


async def assigned(client, workflow_id: str, tasks=SIMPLE) -> tuple[str, dict]:
    """A round of `tasks` opened, submitted to by every IoT node and assigned: (schedule_id, its assignments)."""
    sid = await open_round(client, workflow_id, tasks)
    await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid, workflow_id)))
    return sid, await assignments(client, sid)


def count_requests(monkeypatch) -> list[tuple[str, str]]:
    """(context id, message type) of each request a processor's context sends the validator from
    now on: each is a round trip through the validator."""
    from trustmesh.ledger import processor as runtime
    from trustmesh.ledger import protos as pb

    asked = []
    plain_call = runtime.Context._call

    async def counted(self, request_type, *args, **kwargs):
        asked.append((self.context_id, pb.message_type_name(request_type)))
        return await plain_call(self, request_type, *args, **kwargs)

    monkeypatch.setattr(runtime.Context, "_call", counted)
    return asked


def signer_of_node(node_key: str) -> PrivateKey:
    return {pub(k): k for k in [*IOT, *COMPUTE]}[node_key]


def report(sid, record_, task_id, status, **fields):
    node = signer_of_node(record_["tasks"][task_id]["node"])
    return batch(node, make_report_transaction(node, sid, task_id, status, **fields))


def output(task_id: str) -> str:
    return sha(f"output/{task_id}")


def strip_deadlines(record_: dict) -> dict:
    return {**record_, "tasks": {t: {k: v for k, v in a.items() if k != "deadline"}
                                 for t, a in record_["tasks"].items()}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """One validator for the module, with both compute nodes registered."""
    node = DevnetProcess(tmp_path_factory.mktemp("schedule-family") / "devnet").start()

    async def register():
        async with ledger(node) as client:
            await ok(client, *register_batches())

    run(register())
    yield node
    node.stop()


@pytest.fixture(scope="module")
def registered() -> dict[str, bytes]:
    """Dict state with both compute nodes registered."""
    ledger_ = DictLedger()
    assert [s["status"] for s in ledger_.submit_now(*register_batches())] == ["COMMITTED"] * len(COMPUTE)
    return ledger_.state


@pytest.fixture
def client(registered) -> DictLedger:
    """The four families' rules on dict state (a copy of `registered`), driven like the validator:
    each rule in milliseconds; a whole round through the validator stays below (`chain`)."""
    return DictLedger(dict(registered))


# --------------------------------------------------------------------------- assign


def test_assignment_is_deterministic_and_spread_across_compute_nodes(tmp_path):
    workflow_id = "det-round"
    sid = schedule_id_of(workflow_id)
    results = []
    for name in ("a", "b"):
        node = DevnetProcess(tmp_path / name).start()
        try:
            async def scenario():
                async with ledger(node) as client:
                    await open_round(client, workflow_id, LINEAR)
                    # nobody registered yet: a clear refusal, and nothing written
                    await expect_invalid(client, [(batch(COORDINATOR, make_assign_transaction(
                        COORDINATOR, sid, workflow_id)), "no compute node is registered")])
                    assert await assignments(client, sid) is None
                    await ok(client, *register_batches())
                    assign = make_assign_transaction(COORDINATOR, sid, workflow_id)
                    await ok(client, batch(COORDINATOR, assign))
                    record_ = await assignments(client, sid)
                    statuses = {t: await task_status(client, sid, t) for t in record_["tasks"]}
                    loads = {pub(k): await load(client, pub(k)) for k in COMPUTE}
                    return record_, statuses, loads, await events_of(client, assign)

            results.append(run(scenario()))
        finally:
            node.stop()

    (first, statuses, loads, events), (second, *_rest) = results
    assert strip_deadlines(first) == strip_deadlines(second)  # same nodes, same order, same ids

    keys = [pub(k) for k in IOT]
    trains = [f"train:{k[:16]}" for k in keys]
    assert first["order"] == ["preprocess", *trains, "aggregate", "evaluate"]
    assert sorted(first["tasks"]) == sorted(first["order"])
    assert first["schedule_id"] == sid and first["workflow_id"] == workflow_id and first["round"] == 1
    assert first["train_on"] == "compute" and first["deadline_seconds"] == schedule.DEFAULT_DEADLINE_SECONDS
    for i, (task_id, node_key) in enumerate(zip(trains, keys)):
        task = first["tasks"][task_id]
        assert task["kind"] == "local_train" and task["task"] == "train" and task["attempt"] == 1
        assert task["inputs"] == [sha(f"{workflow_id}/data/{i}")]
        assert task["data_owner"] == node_key and task["samples"] == SAMPLES[i]
        assert task["fetch_dependency_outputs"] == ["preprocess"]
    assert first["tasks"]["aggregate"]["fetch_dependency_outputs"] == ["preprocess", *trains]
    assert first["tasks"]["evaluate"]["fetch_dependency_outputs"] == ["preprocess", *trains, "aggregate"]

    # spread over both compute nodes, the bigger one (24 vs 12 points) taking at least as many
    nodes = [a["node"] for a in first["tasks"].values()]
    counts = [nodes.count(pub(k)) for k in COMPUTE]
    assert sum(counts) == 6 and counts[1] >= 1 and counts[0] >= counts[1]
    assert [loads[pub(k)]["queue"] for k in COMPUTE] == counts
    assert all(loads[pub(k)]["done"] == 0 and loads[pub(k)]["missed"] == 0 for k in COMPUTE)

    # deadlines: now + 300 for the root, + 300 per dependency level below it
    base = first["tasks"]["preprocess"]["deadline"]
    assert first["tasks"][trains[0]]["deadline"] == base + 300
    assert first["tasks"]["evaluate"]["deadline"] == base + 900
    for task_id, task in first["tasks"].items():
        assert statuses[task_id]["status"] == "assigned" and statuses[task_id]["node"] == task["node"]
        assert statuses[task_id]["attempt"] == 1 and statuses[task_id]["deadline"] == task["deadline"]
        assert statuses[task_id]["history"] == [{"status": "assigned", "node": task["node"], "attempt": 1,
                                                 "at": base - 300}]

    assigned = [a for t, a in events if t == "trustmesh/task-assigned"]
    assert [(a["task_id"], a["node"], a["kind"]) for a in assigned] == [
        (t, first["tasks"][t]["node"], first["tasks"][t]["kind"]) for t in first["order"]]
    [scheduled] = [a for t, a in events if t == "trustmesh/round-scheduled"]
    assert scheduled["schedule_id"] == sid and scheduled["tasks"] == "6" and scheduled["nodes"] == "2"


async def test_a_rounds_trainings_go_by_capacity_even_to_a_node_still_busy(client):
    """A node still queueing the last round's trainings gets its share of this round's: they start
    from the last round's model, so that queue is done before they can run. By queue, the idle
    node took all of them and the round trained on one core of two."""
    workflow_id = "spread-trainings"
    sid = await open_round(client, workflow_id, LINEAR)
    busy, idle = pub(COMPUTE[1]), pub(COMPUTE[0])
    client.state[layout.node_load_address(busy)] = cbor.encode({**schedule.empty_load(busy), "queue": 12})
    await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid, workflow_id)))
    tasks = (await assignments(client, sid))["tasks"]
    trained_on = [a["node"] for a in tasks.values() if a["kind"] == "local_train"]
    assert sorted(trained_on) == sorted([idle, idle, busy])  # 24 and 12 points: two to one
    assert {a["node"] for a in tasks.values() if a["kind"] != "local_train"} == {idle}  # the rest by queue
    assert (await load(client, busy))["queue"] == 13


def test_spread_trainings_follows_capacity_and_reliability():
    sid = "cd" * 32
    points = {"a": 24, "b": 12}
    loads = {"a": {**schedule.empty_load("a"), "queue": 40}, "b": schedule.empty_load("b")}
    order = schedule.spread_trainings(sid, points, loads, 9)
    assert order.count("a") == 6 and order.count("b") == 3  # queue does not count, points do
    assert order[:3].count("a") == 2  # interleaved, not one node first
    loads["a"].update(done=1, missed=3)  # reliability 2/5: capacity 9.6 against 12
    assert schedule.spread_trainings(sid, points, loads, 9).count("a") == 4
    assert schedule.spread_trainings(sid, points, loads, 0) == []
    assert schedule.spread_trainings(sid, {"only": 1}, {}, 3) == ["only"] * 3


def test_rank_nodes_scoring_and_spread():
    sid = "ab" * 32
    points = {"big": 24, "small": 12, "tiny": 1}
    loads = {n: schedule.empty_load(n) for n in points}
    assert schedule.rank_nodes(sid, points, loads)[0] == "big"
    loads["big"]["queue"] = 3  # small and tiny are within MAX_QUEUE_SKEW of... no: tiny is idle
    assert "big" not in schedule.rank_nodes(sid, points, loads)  # 3 > 0 + 2: an idle node comes first
    loads["big"]["queue"] = 1
    loads["small"].update(missed=3)  # reliability 1/4 -> 3 points
    assert schedule.rank_nodes(sid, points, loads) == ["big", "small", "tiny"]
    assert schedule.node_score(24, {"queue": 1, "done": 1, "missed": 1}) == 24 * 2 / (3 * 2)
    # ties go by sha256(schedule_id + node key)
    even = {"x": 5, "y": 5}
    expected = sorted(even, key=lambda n: hashlib.sha256((sid + n).encode()).hexdigest())
    assert schedule.rank_nodes(sid, even, {n: schedule.empty_load(n) for n in even}) == expected
    assert schedule.resource_points({"resources": {"cpu_cores": 8, "memory_mb": 16384}}) == 24


async def test_fetch_dependency_outputs_follow_any_dag(client):
    workflow_id = "any-dag"

    sid = await open_round(client, workflow_id, ANY_DAG)
    await ok(client, batch(IOT[1], make_assign_transaction(IOT[1], sid, workflow_id)))  # anyone may
    record_ = await assignments(client, sid)
    trains = [f"train:{pub(k)[:16]}" for k in IOT]
    assert record_["tasks"]["aggregate"]["fetch_dependency_outputs"] == ["prep", *trains]
    assert record_["tasks"]["evaluate"]["fetch_dependency_outputs"] == ["prep", *trains, "aggregate"]
    # evaluate needs the local updates too: done only once aggregate *and* all trains are
    batches = [report(sid, record_, "prep", "done", output_digest=output("prep"))]
    batches += [report(sid, record_, t, "done", output_digest=output(t)) for t in trains]
    await ok(client, *batches)
    await expect_invalid(client, [(report(sid, record_, "evaluate", "done", output_digest=output("e")),
                                   "cannot be done before its dependencies: aggregate not done yet")])
    await ok(client, report(sid, record_, "aggregate", "done", output_digest=output("aggregate")))
    await ok(client, report(sid, record_, "evaluate", "done", output_digest=output("evaluate")))

    # two aggregates nobody else aggregates: the result must say which one is the global model
    sid = await open_round(client, "two-aggregates", TWO_SINKS)
    await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid, "two-aggregates")))
    record_ = await assignments(client, sid)
    assert record_["order"] == ["train:" + pub(k)[:16] for k in IOT] + ["agg_a", "agg_b", "evaluate"]
    batches = [report(sid, record_, t, "done", output_digest=output(t)) for t in record_["order"][:3]]
    batches.append(report(sid, record_, "agg_b", "done", output_digest=output(f"{sid}/global")))
    await ok(client, *batches)
    record_["tasks"]["aggregate"] = record_["tasks"]["agg_b"]  # _result signs as that node
    await expect_invalid(client, [(_result(sid, record_)[0],
                                   "several final aggregate tasks (agg_a, agg_b); name the one")])
    await ok(client, _result(sid, record_, task_id="agg_b")[0])
    result = await record(client, layout.round_result_address(sid))
    assert result["aggregate_task"] == "agg_b" and result["final"] is False


# --------------------------------------------------------------------------- a whole round


async def _train_and_aggregate(client, sid, record_, *, metrics=None):
    trains = [t for t, a in record_["tasks"].items() if a["kind"] == "local_train"]
    await ok(client, *[report(sid, record_, t, "done", output_digest=output(t)) for t in trains])
    await ok(client, report(sid, record_, "aggregate", "done", output_digest=output(f"{sid}/global")))


def _result(sid, record_, **changes):
    node = signer_of_node(record_["tasks"]["aggregate"]["node"])
    keys = [pub(k) for k in IOT]
    args = dict(global_model_digest=output(f"{sid}/global"), participants=keys,
                aggregation_weights={k: s / sum(SAMPLES) for k, s in zip(keys, SAMPLES)},
                metrics={"accuracy": 0.91, "loss": 0.27})
    args.update(changes)
    txn = make_round_result_transaction(node, sid, **args)
    return batch(node, txn), txn


async def test_round_runs_to_a_final_result_when_evaluate_finishes_last(chain):
    workflow_id = "full-round"

    async with ledger(chain) as client:
        sid = await open_round(client, workflow_id, SIMPLE)
        await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid, workflow_id)))
        record_ = await assignments(client, sid)
        agg_node = record_["tasks"]["aggregate"]["node"]
        before = await load(client, agg_node)
        train = next(t for t in record_["tasks"] if t.startswith("train:"))

        running = make_report_transaction(signer_of_node(record_["tasks"][train]["node"]), sid, train, "running")
        await ok(client, batch(signer_of_node(record_["tasks"][train]["node"]), running))
        assert (await task_status(client, sid, train))["status"] == "running"
        [(kind, attrs)] = await events_of(client, running)
        assert kind == "trustmesh/task-running" and attrs["task_id"] == train and attrs["attempt"] == "1"

        await _train_and_aggregate(client, sid, record_)
        done = await task_status(client, sid, "aggregate")
        assert done["status"] == "done" and done["output_digest"] == output(f"{sid}/global")
        assert [h["status"] for h in done["history"]] == ["assigned", "done"]
        # aggregate's deadline restarted when its last input was done
        trains = [t for t in record_["tasks"] if t.startswith("train:")]
        last_input = max([(await task_status(client, sid, t))["history"][-1]["at"] for t in trains])
        assert done["deadline"] == last_input + schedule.DEFAULT_DEADLINE_SECONDS
        after = await load(client, agg_node)
        finished = sum(1 for t in [*trains, "aggregate"] if record_["tasks"][t]["node"] == agg_node)
        assert after["done"] == before["done"] + finished and after["queue"] == before["queue"] - finished
        status = await task_status(client, sid, train)
        assert [h["status"] for h in status["history"]] == ["assigned", "running", "done"]

        result_batch, result_txn = _result(sid, record_)
        await ok(client, result_batch)
        result = await record(client, layout.round_result_address(sid))
        assert result["final"] is False and result["aggregate_task"] == "aggregate"
        assert result["participants"] == [pub(k) for k in IOT] and result["reported_by"] == agg_node
        # the next round may train from this model while this one is still being evaluated
        assert await FederationReader(client).previous_global_model(workflow_id, 2) == result["global_model_digest"]
        assert math.isclose(sum(result["aggregation_weights"].values()), 1.0)
        types = [t for t, _ in await events_of(client, result_txn)]
        assert types == ["trustmesh/round-result"]

        evaluate_node = signer_of_node(record_["tasks"]["evaluate"]["node"])
        evaluate = make_report_transaction(evaluate_node, sid, "evaluate", "done",
                                           output_digest=output("evaluate"), metrics={"accuracy": 0.9})
        await ok(client, batch(evaluate_node, evaluate))
        result = await record(client, layout.round_result_address(sid))
        assert result["final"] is True
        assert result["evaluations"] == {"evaluate": {"output_digest": output("evaluate"),
                                                      "metrics": {"accuracy": 0.9}}}
        events = dict(await events_of(client, evaluate))
        assert events["trustmesh/task-done"]["output_digest"] == output("evaluate")
        assert events["trustmesh/task-done"]["metrics"] == '{"accuracy":0.9}'  # as the status records them
        assert events["trustmesh/round-finalized"] == {
            "schedule_id": sid, "workflow_id": workflow_id, "round": "1",
            "global_model_digest": output(f"{sid}/global")}


async def test_a_training_report_reads_state_in_two_round_trips_through_the_validator(chain, monkeypatch):
    """Its status, its node's load and the clock's config together, then its dependents' statuses
    and the clock's block together: five requests, each a round trip through the validator, before."""
    async with ledger(chain) as client:
        sid, record_ = await assigned(client, "few-trips")
        train = next(t for t, a in record_["tasks"].items() if a["kind"] == "local_train")
        asked = count_requests(monkeypatch)
        await ok(client, report(sid, record_, train, "done", output_digest=output(train)))
    reads = [context for context, kind in asked if kind == "TP_STATE_GET_REQUEST"]
    assert len(reads) == 2 and len(set(reads)) == 1, asked


async def test_round_is_final_at_once_when_evaluate_finished_before_the_result(client):
    workflow_id = "eval-first"

    sid = await open_round(client, workflow_id, SIMPLE)
    await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid, workflow_id)))
    record_ = await assignments(client, sid)
    await _train_and_aggregate(client, sid, record_)
    await ok(client, report(sid, record_, "evaluate", "done", output_digest=output("evaluate")))
    result_batch, result_txn = _result(sid, record_)
    await ok(client, result_batch)
    result = await record(client, layout.round_result_address(sid))
    assert result["final"] is True and result["finalized_at"] == result["recorded_at"]
    assert [t for t, _ in await events_of(client, result_txn)] == [
        "trustmesh/round-result", "trustmesh/round-finalized"]


# --------------------------------------------------------------------------- rules


async def test_every_rule_is_enforced_with_a_clear_message(client):
    workflow_id = "rules"
    sid = schedule_id_of(workflow_id)
    c = COORDINATOR

    await open_round(client, workflow_id, SIMPLE, submitters=IOT[:1])
    await expect_invalid(client, [
        (batch(c, make_assign_transaction(c, sid, workflow_id)), "is 'collecting', not 'ready'"),
        (batch(c, make_assign_transaction(c, sha("nope"), workflow_id)), "no round with schedule id"),
        (batch(c, make_report_transaction(c, sid, "train", "running")), "no tasks are assigned"),
        (batch(c, make_assign_transaction(c, sid, workflow_id, deadline_seconds=0)),
         "'deadline_seconds' must be between 1 and 604800"),
        (raw(c, {"action": "assign", "schedule_id": sid, "priority": 1}, sid),
         "payload of action 'assign' has unknown field(s) 'priority'"),
        (raw(c, {"action": "destroy", "schedule_id": sid}, sid), "action must be one of"),
        (raw(c, {"action": "assign", "schedule_id": "round-1"}), "64 lowercase hex"),
        (raw(c, {"action": "reassign", "schedule_id": sid}, sid), "lacks the required field 'task_id'"),
    ])
    await ok(client, *[batch(n, make_submit_transaction(n, sid, sha(f"{workflow_id}/data/{IOT.index(n)}"),
                                                        SAMPLES[IOT.index(n)])) for n in IOT[1:]])
    await ok(client, batch(c, make_assign_transaction(c, sid, workflow_id)))
    record_ = await assignments(client, sid)
    t0, t1, t2 = [t for t in record_["tasks"] if t.startswith("train:")]
    node0 = signer_of_node(record_["tasks"][t0]["node"])
    stranger = next(k for k in COMPUTE if pub(k) != record_["tasks"][t0]["node"])
    agg = signer_of_node(record_["tasks"]["aggregate"]["node"])

    def by(signer, task_id, status, **fields):
        return batch(signer, make_report_transaction(signer, sid, task_id, status, **fields))

    await expect_invalid(client, [
        (batch(c, make_assign_transaction(c, sid, workflow_id)), "is already assigned"),
        (by(stranger, t0, "running"), "only that node may report it"),
        (by(node0, "train:nobody", "running"), f"schedule {sid!r} has no task 'train:nobody'"),
        (by(node0, t0, "finished"), "'status' must be one of running, done, failed"),
        (by(node0, t0, "done"), "lacks the required field 'output_digest'"),
        (by(node0, t0, "done", output_digest="abc"), "sha256 (64 lowercase hex)"),
        (by(node0, t0, "running", output_digest=output(t0)), "belongs to a 'done' report only"),
        (by(node0, t0, "done", output_digest=output(t0), reason="x"), "belongs to a 'failed' report only"),
        (raw(node0, {"action": "report", "schedule_id": sid, "task_id": t0, "status": "running",
                     "metrics": {"acc": "high"}}, sid), "metric 'acc' must be a finite number"),
        (by(node0, t0, "running", attempt=2), "is in attempt 1; this report is for attempt 2"),
        (by(agg, "aggregate", "done", output_digest=output("a")), "cannot be done before its dependencies"),
        (batch(c, make_reassign_transaction(c, sid, t0)), "is not overdue"),
        (batch(c, make_reassign_transaction(c, sid, "aggregate")), "is waiting for its dependencies"),
        (_result(sid, record_)[0], "report it done with the global model's digest"),
        (_result(sid, record_, task_id=t0)[0], "is a local_train task, not an aggregate task"),
        (by(node0, t0, "running", metrics={"bad name!": 1}), "metric names are 1-64 characters"),
        (by(node0, t0, "running", metrics={f"m{i}": i for i in range(33)}), "holds 33 entries; at most 32"),
        (by(node0, t0, "failed", reason="x" * 501), "'reason' is 501 characters; at most 500"),
        (_result(sid, record_, global_model_digest="XYZ")[0],
         "'global_model_digest' must be the sha256 (64 lowercase hex) of the global model"),
        (_result(sid, record_, participants=["iot-1"], aggregation_weights={"iot-1": 1.0})[0],
         "'participants': 'iot-1' is not a node public key"),
    ])

    # forward only: running twice; failed needs a reassign first
    node1 = signer_of_node(record_["tasks"][t1]["node"])
    failed_before = await load(client, pub(node1))
    await ok(client, by(node0, t0, "running"), by(node1, t1, "failed", reason="out of memory"))
    await expect_invalid(client, [
        (by(node0, t0, "running"), "is already 'running'; statuses only move forward"),
        (by(node1, t1, "done", output_digest=output(t1)), "must be reassigned before it is reported again"),
    ])
    failed_after = await load(client, pub(node1))
    assert failed_after["missed"] == failed_before["missed"] + 1
    assert failed_after["queue"] == failed_before["queue"] - 1
    status = await task_status(client, sid, t1)
    assert status["status"] == "failed" and status["history"][-1]["reason"] == "out of memory"

    # a failed task may be reassigned at once: to the other compute node, attempt 2
    reassign = make_reassign_transaction(OUTSIDER, sid, t1)
    await ok(client, batch(OUTSIDER, reassign))
    moved = (await assignments(client, sid))["tasks"][t1]
    assert moved["node"] != pub(node1) and moved["attempt"] == 2
    assert (await load(client, pub(node1)))["missed"] == failed_after["missed"]  # counted once
    [(kind, attrs)] = await events_of(client, reassign)
    assert kind == "trustmesh/task-reassigned" and attrs["previous_status"] == "failed"
    assert attrs["node"] == moved["node"] and attrs["previous_node"] == pub(node1)
    new1 = signer_of_node(moved["node"])
    node2 = signer_of_node(record_["tasks"][t2]["node"])
    await ok(client, by(node0, t0, "done", output_digest=output(t0)),
             by(new1, t1, "done", output_digest=output(t1), attempt=2),
             by(node2, t2, "done", output_digest=output(t2)))
    await expect_invalid(client, [
        (by(node0, t0, "done", output_digest=output(t0)), "is already done; a task is reported done once"),
        (batch(c, make_reassign_transaction(c, sid, t0)), "a done task is never reassigned"),
    ])
    if pub(node1) != moved["node"]:
        await expect_invalid(client, [(by(node1, t1, "running"), "only that node may report it")])

    await ok(client, by(agg, "aggregate", "done", output_digest=output(f"{sid}/global")))
    keys = [pub(k) for k in IOT]
    third = {k: 1 / 3 for k in keys}
    not_agg = next(k for k in [*COMPUTE, *IOT] if pub(k) != pub(agg))
    await expect_invalid(client, [
        (batch(not_agg, make_round_result_transaction(
            not_agg, sid, output(f"{sid}/global"), keys, third, {"accuracy": 0.9, "loss": 0.3})),
         "only node"),
        (_result(sid, record_, global_model_digest=output("other"))[0], "differs from the output_digest"),
        (_result(sid, record_, participants=[*keys[:2], pub(OUTSIDER)],
                 aggregation_weights={k: 1 / 3 for k in [*keys[:2], pub(OUTSIDER)]})[0],
         "did not submit to round"),
        (_result(sid, record_, aggregation_weights={k: 0.5 for k in keys[:2]})[0],
         "must cover exactly the participants; missing"),
        (_result(sid, record_, aggregation_weights={k: 0.3 for k in keys})[0], "they must sum to 1"),
        # all 0 only when every participant is rejected (tests/test_screening.py records one)
        (_result(sid, record_, aggregation_weights={k: 0.0 for k in keys})[0], "they must sum to 1"),
        (_result(sid, record_, aggregation_weights={k: 0.0 for k in keys},
                 rejected={k: "update check finite: holds NaN or infinite values" for k in keys[:2]})[0],
         "they must sum to 1"),
        (_result(sid, record_, aggregation_weights={keys[0]: -0.5, keys[1]: 0.5, keys[2]: 1.0})[0],
         "must be a finite number >= 0"),
        (_result(sid, record_, metrics={"loss": 0.3})[0], "lacks the metric(s) accuracy"),
        (_result(sid, record_, participants=[], aggregation_weights={})[0], "'participants' is empty"),
        (_result(sid, record_, participants=[keys[0], keys[0]])[0], "names a node twice"),
    ])
    await ok(client, _result(sid, record_, participants=keys[:2],
                             aggregation_weights={keys[0]: 0.25, keys[1]: 0.75})[0])
    await expect_invalid(client, [(_result(sid, record_)[0], "is already recorded; it is recorded once")])


async def test_reassign_after_deadline_and_timeout_round(client):
    late, iot_late, timeout_wf = "late", "late-iot", "too-few"

    sid = await open_round(client, late, SIMPLE)
    iot_sid = await open_round(client, iot_late, SIMPLE, train_on="iot")
    timeout_sid = await open_round(client, timeout_wf, SIMPLE, submitters=IOT[:1], round_timeout=1)
    c = COORDINATOR
    await ok(client, batch(c, make_assign_transaction(c, sid, late, deadline_seconds=1)),
             batch(c, make_assign_transaction(c, iot_sid, iot_late, deadline_seconds=1)))
    record_ = await assignments(client, sid)
    iot_record = await assignments(client, iot_sid)
    # local training on the IoT nodes' own data: each instance goes to its submitter
    for task_id, task in iot_record["tasks"].items():
        if task["kind"] == "local_train":
            assert task["node"] == task["data_owner"] and task_id == f"train:{task['node'][:16]}"
        else:
            assert task["node"] in [pub(k) for k in COMPUTE]
    train = next(t for t in record_["tasks"] if t.startswith("train:"))
    old = record_["tasks"][train]["node"]
    await ok(client, report(sid, record_, train, "running"))
    before = await load(client, old)

    client.advance(3)  # chain time past every deadline of 1 s (on a validator: a 2.5 s sleep)

    await ok(client, batch(c, make_close_round_transaction(c, timeout_sid)))
    await expect_invalid(client, [
        (batch(c, make_assign_transaction(c, timeout_sid, timeout_wf)), "is 'timeout', not 'ready'"),
        (batch(c, make_reassign_transaction(c, sid, "aggregate")), "is waiting for its dependencies"),
    ])

    reassign = make_reassign_transaction(OUTSIDER, sid, train)
    await ok(client, batch(OUTSIDER, reassign))
    task = (await assignments(client, sid))["tasks"][train]
    assert task["node"] != old and task["attempt"] == 2
    status = await task_status(client, sid, train)
    assert status["status"] == "assigned" and status["node"] == task["node"] and status["attempt"] == 2
    assert status["deadline"] == task["deadline"] == status["history"][-1]["at"] + 1
    assert [h["status"] for h in status["history"]] == ["assigned", "running", "assigned"]
    after = await load(client, old)
    assert after["missed"] == before["missed"] + 1 and after["queue"] == before["queue"] - 1
    [(kind, attrs)] = await events_of(client, reassign)
    assert kind == "trustmesh/task-reassigned" and attrs["previous_status"] == "running"
    assert attrs["node"] == task["node"] and attrs["previous_node"] == old and attrs["attempt"] == "2"

    old_signer, new_signer = signer_of_node(old), signer_of_node(task["node"])
    await expect_invalid(client, [
        (batch(old_signer, make_report_transaction(old_signer, sid, train, "done",
                                                   output_digest=output(train))),
         "only that node may report it"),
    ])
    await ok(client, batch(new_signer, make_report_transaction(new_signer, sid, train, "done",
                                                               output_digest=output(train), attempt=2)))
    assert (await task_status(client, sid, train))["status"] == "done"

    # an IoT node's own data cannot move: its overdue task gets a new attempt on the same node
    iot_train = next(t for t in iot_record["tasks"] if t.startswith("train:"))
    await ok(client, batch(c, make_reassign_transaction(c, iot_sid, iot_train)))
    moved = (await assignments(client, iot_sid))["tasks"][iot_train]
    assert moved["node"] == iot_record["tasks"][iot_train]["node"] and moved["attempt"] == 2


# --------------------------------------------------------------------------- lineage


async def test_lineage_a_local_train_names_the_model_it_started_from(client):
    """Round 1 trains from the initial weights (no base_model_digest); round 2 from round 1's
    global model, named in the report, which declares the records the rule reads. A report
    naming another model, or leaving out those records, is refused."""
    workflow_id = "lineage"

    reader = FederationReader(client)
    sid1 = await open_round(client, workflow_id, SIMPLE)
    await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid1, workflow_id)))
    record1 = await assignments(client, sid1)
    train1 = next(t for t in record1["tasks"] if t.startswith("train:"))
    start1 = await reader.starting_model(workflow_id, 1)
    assert start1.digest is None and start1.inputs == ()  # the initial weights: nothing to read
    await expect_invalid(client, [
        (report(sid1, record1, train1, "done", output_digest=output(train1),
                starting_model=schedule.StartingModel(workflow_id, 1, sha("some model"))),
         f"task {train1} trained from model {sha('some model')[:16]}… but round 1 starts from the initial "
         f"weights"),
        (report(sid1, record1, "aggregate", "failed", reason="x",
                starting_model=schedule.StartingModel(workflow_id, 1, sha("some model"))),
         "base_model_digest belongs to a local_train 'done' report only"),
    ])
    await _train_and_aggregate(client, sid1, record1)
    await ok(client, _result(sid1, record1)[0])
    global1 = output(f"{sid1}/global")

    sid2 = layout.schedule_id_for(workflow_id, 2, pub(COORDINATOR))
    await ok(client, batch(COORDINATOR, make_open_round_transaction(COORDINATOR, workflow_id, 2,
                                                                    previous_schedule_id=sid1)))
    await ok(client, *[batch(n, make_submit_transaction(n, sid2, sha(f"{workflow_id}/2/{i}"), SAMPLES[i]))
                       for i, n in enumerate(IOT)])
    await ok(client, batch(COORDINATOR, make_assign_transaction(COORDINATOR, sid2, workflow_id)))
    record2 = await assignments(client, sid2)
    train2 = next(t for t in record2["tasks"] if t.startswith("train:"))
    start2 = await reader.starting_model(workflow_id, 2)
    assert (start2.digest, start2.source_round) == (global1, 1)
    other_round = schedule.StartingModel(workflow_id, 2, output(train1), 1, start2.inputs)
    await expect_invalid(client, [
        # another round's model (round 1's local update of that node, not its global model)
        (report(sid2, record2, train2, "done", output_digest=output(train2), starting_model=other_round),
         f"round 2 task {train2} trained from model {output(train1)[:16]}… but round 1's global model is "
         f"{global1[:16]}…"),
        # the initial weights again, as if round 1 had produced nothing
        (report(sid2, record2, train2, "done", output_digest=output(train2),
                starting_model=schedule.StartingModel(workflow_id, 2, None, None, start2.inputs)),
         f"task {train2} trained from the initial weights but round 1's global model is"),
        # the right model, without declaring what the rule reads
        (report(sid2, record2, train2, "done", output_digest=output(train2),
                starting_model=schedule.StartingModel(workflow_id, 2, global1, 1)),
         "which this report does not declare as an input"),
    ])
    await ok(client, report(sid2, record2, train2, "done", output_digest=output(train2),
                            starting_model=start2))
    status = await task_status(client, sid2, train2)
    assert status["status"] == "done" and status["base_model_digest"] == global1
