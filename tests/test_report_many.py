"""trustmesh-schedule report_many: a node's reports of one round in one transaction. It must leave
exactly the state and events the same reports leave one transaction each; each of its own rules is
broken once; one bad report refuses the whole transaction and keeps nothing; the audit reads each
of its reports as a signed report. Rules on dict state (helpers.dict_ledger); the whole path through
the dev validator and real compute nodes runs in test_federated_round and test_audit."""

from __future__ import annotations

import pytest

from helpers.dict_ledger import DictLedger
from test_schedule_family import (COMPUTE, COORDINATOR, IOT, LINEAR, SIMPLE, assigned, batch, count_requests,
                                  expect_invalid, ledger, ok, output, pub, raw, register_batches, report, task_status)
from test_schedule_family import chain  # noqa: F401  (the module's validator with both compute nodes registered)
from trustmesh import audit
from trustmesh.scheduling import schedule
from trustmesh.scheduling.schedule import MAX_REPORTS_PER_TRANSACTION

NODE = COMPUTE[0]  # the only compute node registered: every task of the round is its


async def _assigned(workflow_id: str, tasks=SIMPLE) -> tuple[DictLedger, str, dict]:
    ledger = DictLedger()
    await ok(ledger, register_batches()[0])
    return ledger, *await assigned(ledger, workflow_id, tasks)


def _trains(record_: dict) -> list[str]:
    return [t for t in record_["order"] if record_["tasks"][t]["kind"] == "local_train"]


def _fields(task_id: str, **more) -> dict:
    return {"task_id": task_id, "status": "done", "output_digest": output(task_id),
            "metrics": {"accuracy": 0.5, "samples": 10}, "attempt": 1, **more}


def _many(sid: str, reports: list[dict]):
    txn = schedule.make_report_many_transaction(NODE, sid, reports)
    return batch(NODE, txn), txn


async def test_report_many_leaves_the_state_and_events_of_the_same_reports_sent_one_by_one():
    one_by_one, sid, record_ = await _assigned("many-equals-one")
    together, same_sid, _ = await _assigned("many-equals-one")
    assert same_sid == sid and together.state == one_by_one.state
    trains = _trains(record_)
    assert len(trains) == len(IOT) and all(record_["tasks"][t]["node"] == pub(NODE) for t in trains)

    singles = [report(sid, record_, t, "done", output_digest=output(t), metrics={"accuracy": 0.5, "samples": 10},
                      attempt=1) for t in trains]
    await ok(one_by_one, *singles)
    many_batch, many = _many(sid, [_fields(t) for t in trains])
    await ok(together, many_batch)

    # statuses with their history, the node's load (queue and done counted once per report), the
    # aggregate's countdown of unsettled inputs and its deadline: all as the reports one by one
    assert together.state == one_by_one.state
    assert (await task_status(together, sid, "aggregate"))["unsettled_inputs"] == 0
    single_events = [e for b in singles for e in one_by_one.receipts[b.transactions[0].header_signature]]
    assert together.receipts[many.header_signature] == single_events
    assert [t for t, _ in single_events] == ["trustmesh/task-done"] * len(trains)

    # the round goes on from there as it would have
    for ledger in (one_by_one, together):
        await ok(ledger, report(sid, record_, "aggregate", "done", output_digest=output("global")))
    assert together.state == one_by_one.state


async def test_each_report_sees_what_the_earlier_ones_in_the_transaction_wrote():
    """preprocess done, then a training that waits for it, in one transaction: the training may be
    done only because the report before it in the same transaction settled its input."""
    ledger, sid, record_ = await _assigned("many-in-order", LINEAR)
    first_train = _trains(record_)[0]
    await expect_invalid(ledger, [(_many(sid, [_fields(first_train), _fields("preprocess")])[0],
                                   f"report 1 of 2 (task {first_train!r}): task {first_train!r} cannot be done "
                                   f"before its dependencies: preprocess not done yet")])
    await ok(ledger, _many(sid, [_fields("preprocess"), _fields(first_train)])[0])
    assert (await task_status(ledger, sid, first_train))["status"] == "done"


async def test_every_report_many_rule_is_enforced_with_a_clear_message():
    ledger, sid, record_ = await _assigned("many-rules")
    trains = _trains(record_)
    before = dict(ledger.state)

    def body(reports) -> dict:
        return {"action": "report_many", "schedule_id": sid, "reports": reports}

    entry = {"task_id": trains[0], "status": "done", "output_digest": output(trains[0])}
    await expect_invalid(ledger, [
        (raw(NODE, body([]), sid), "payload field 'reports' holds 0 reports; a report_many carries 1 to "
                                   f"{MAX_REPORTS_PER_TRANSACTION}"),
        (raw(NODE, body([entry] * (MAX_REPORTS_PER_TRANSACTION + 1)), sid),
         f"holds {MAX_REPORTS_PER_TRANSACTION + 1} reports"),
        (raw(NODE, body("not a list"), sid), "'reports'"),
        (raw(NODE, body([entry, "done"]), sid), "entry 1 must be a map"),
        (raw(NODE, body([{**entry, "schedule_id": sid}]), sid), "entry 0 names its own schedule_id or action"),
        (raw(NODE, body([{**entry, "action": "report"}]), sid), "entry 0 names its own schedule_id or action"),
        (raw(NODE, body([{**entry, "bogus": 1}]), sid), "payload of action 'report' has unknown field(s) 'bogus'"),
        (raw(NODE, body([{"status": "done"}]), sid), "'task_id'"),
        (raw(NODE, body([entry, {**entry, "output_digest": output("other")}]), sid),
         f"task {trains[0]!r} is reported twice"),
        (raw(NODE, {**body([entry]), "extra": 1}, sid), "unknown field(s) 'extra'"),
        # a report's own rules hold for each report it carries, which it names
        (raw(NODE, body([entry, {"task_id": trains[1], "status": "done"}]), sid),
         f"report 2 of 2 (task {trains[1]!r}): payload lacks the required field 'output_digest'"),
        (_many(sid, [_fields(trains[0]), _fields("aggregate")])[0],
         "report 2 of 2 (task 'aggregate'): task 'aggregate' cannot be done before its dependencies"),
        (_many(sid, [_fields(trains[0]), _fields("no-such-task")])[0], "report 2 of 2 (task 'no-such-task')"),
    ])
    other = COMPUTE[1]
    forged = schedule.make_report_many_transaction(other, sid, [_fields(trains[0])])
    await expect_invalid(ledger, [(batch(other, forged), f"report 1 of 1 (task {trains[0]!r}): task {trains[0]!r} "
                                                         f"is assigned to node {pub(NODE)}")])
    # nothing of a refused report_many is kept, not even the reports before the bad one
    assert ledger.state == before


def test_the_audit_reads_each_report_of_a_report_many_as_a_report_signed_by_its_signer():
    node, other = pub(NODE), pub(COMPUTE[1])
    statuses = {t: {"status": "done", "node": node, "output_digest": output(t),
                    "history": [{"status": "assigned", "node": node, "attempt": 1},
                                {"status": "done", "node": node, "attempt": 1}]} for t in ("train:a", "train:b")}
    rnd = audit._Round({"coordinator": pub(COORDINATOR)}, {}, statuses=statuses)

    def action(signer: str, reports) -> audit.SignedAction:
        return audit.SignedAction("f" * 128, schedule.FAMILY_NAME, signer,
                                  {"action": "report_many", "schedule_id": "a" * 64, "reports": reports}, None)

    def problems(*actions) -> list[str]:
        checks = audit.RoundAudit(1)
        audit._check_round_transactions(checks, actions, rnd)
        return [p for p in checks.problems if "open_round" not in p]

    reports = [{"task_id": t, "status": "done", "output_digest": output(t), "attempt": 1} for t in statuses]
    assert problems(action(node, reports)) == []
    assert problems(action(node, reports[:1])) == ["round 1: task train:b is done without a done report signed by its node "
                                                    f"{node[:16]}…"]
    forged = problems(action(other, reports))
    assert len(forged) == 4 and all(f"signed by {other[:16]}…, not by the node assigned" in p for p in forged[:2])
    assert problems(action(node, reports + reports[:1]))[0].endswith(
        "its reports do not read as reports (payload field 'reports': task 'train:a' is reported twice; once per "
        "report_many)")


@pytest.mark.parametrize("count", [1, MAX_REPORTS_PER_TRANSACTION])
def test_a_full_report_many_fits_the_family_payload_limit(count):
    """The most reports one may carry, with the longest metrics a compute node sends, stay inside
    the payload limit every family enforces."""
    from trustmesh.scheduling.common import MAX_PAYLOAD_BYTES

    metrics = {"accuracy": 0.123456789, "loss": 1.23456789, "samples": 1000, "compute_seconds": 0.123456,
               "task_seconds": 1.234567}
    reports = [{"task_id": f"train:{i:016x}", "status": "done", "output_digest": output(str(i)), "metrics": metrics,
                "attempt": 1, "base_model_digest": output("base")} for i in range(count)]
    assert len(schedule.report_many_payload("a" * 64, reports)) < MAX_PAYLOAD_BYTES


async def test_through_the_validator_a_report_many_reads_in_two_round_trips_and_writes_in_one(chain, monkeypatch):
    """However many reports it carries: every status and the node's load at once, then what those
    name (the aggregate's status, the clock); all writes in one request at the end."""
    async with ledger(chain) as client:
        sid, record_ = await assigned(client, "many-trips")
        by_node: dict[str, list[str]] = {}
        for t in _trains(record_):
            by_node.setdefault(record_["tasks"][t]["node"], []).append(t)
        node_key, trains = max(by_node.items(), key=lambda item: len(item[1]))
        signer = next(k for k in COMPUTE if pub(k) == node_key)
        assert len(trains) >= 2, by_node  # three trainings on two compute nodes
        requests = count_requests(monkeypatch)
        txn = schedule.make_report_many_transaction(signer, sid, [_fields(t) for t in trains])
        await ok(client, batch(signer, txn))
        monkeypatch.undo()
        asked = [kind for _, kind in requests]
        assert [(await task_status(client, sid, t))["status"] for t in trains] == ["done"] * len(trains)
    assert asked.count("TP_STATE_GET_REQUEST") == 2 and asked.count("TP_STATE_SET_REQUEST") == 1, asked
    assert asked.count("TP_EVENT_ADD_REQUEST") == len(trains)
