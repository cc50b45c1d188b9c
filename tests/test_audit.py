"""`trustmesh audit`: one small federated workflow is run once (dev validator, the four families,
Redis, a CouchDB-protocol server, two compute nodes, three IoT nodes); its audit passes, and each
kind of tampering with the stores makes it fail naming what and where, restored afterwards."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import json
import re
from dataclasses import dataclass

import pytest

from helpers.devnet_process import DevnetProcess
from helpers.family_scenario import _WORKFLOWS
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from helpers.federation_run import until_history_is_recorded
from trustmesh import audit
from trustmesh import endpoints as network_endpoints
from trustmesh.fl import model_format
from trustmesh.compute_node.node import ComputeNode
from trustmesh.fl.strategies import ClientUpdate
from trustmesh.endpoints import Endpoints
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import schedule, workflow
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.couch import CouchClient, CouchHistory, inline_attachment
from trustmesh.stores.redis_client import connect
from trustmesh.stores.servers import CouchServer, RedisServer, free_port

WORKFLOW_ID = "digits-audit"
ROUNDS = 2
STRATEGY = {"name": "perf_fedavg", "alpha": 0.5}  # weights from samples and metrics: both recomputed


@dataclass
class Federation:
    endpoints: Endpoints
    definition: dict


def _definition(keys: dict[str, str]) -> dict:
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["workflow_id"] = WORKFLOW_ID
    definition["hyperparameters"]["epochs"] = 1
    definition["strategy"] = dict(STRATEGY)
    definition["federation"].update(participant_nodes=list(keys), coordinator_node="iot-1", expected_nodes=len(keys),
                                    min_nodes_required=2, rounds=ROUNDS, round_timeout=60)
    return workflow.resolve_node_names(definition, keys)


async def _federate(devnet, redis_url: str, couch_url: str, folder) -> dict:
    names = ["iot-1", "iot-2", "iot-3"]
    keys = {n: load_or_create_key(folder / n / "keys", n).public_key().as_hex() for n in names}
    definition = _definition(keys)
    common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_url)
    async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
        computes = [ComputeNode(f"compute-{i}", folder / f"compute-{i}", couch_url=couch_url, **common)
                    for i in range(2)]
        for node in computes:
            await node.start()
        owner = load_or_create_key(folder / "owner", "owner")
        deploy = workflow.make_deploy_transaction(owner, definition)
        [status] = await submit_and_wait(client, [make_batch(owner, [deploy])])
        assert status["status"] == "COMMITTED", status
        iots = [IoTNode(n, folder / n, workflow_id=WORKFLOW_ID, coordinator=(n == "iot-1"), **common) for n in names]
        for node in iots:
            await node.start()
        try:
            await asyncio.wait_for(iots[0].finished.wait(), 150)
            await until_history_is_recorded(computes, ROUNDS)  # the audits read it
        finally:
            for node in iots + computes:
                await node.stop()
    return definition


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit")
    devnet = DevnetProcess(folder / "devnet").start()
    try:
        with RedisServer() as redis_server, CouchServer() as couch_server:
            definition = run(_federate(devnet, redis_server.url, couch_server.url, folder), timeout=200)
            yield Federation(Endpoints(validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url,
                                       couch=couch_server.url), definition)
    finally:
        devnet.stop()


# --------------------------------------------------------------------------- helpers


async def _round(endpoints: Endpoints, number: int) -> dict:
    """Round `number` as the chain has it: record, assignments, task statuses, result."""
    async with rest(endpoints.rest) as client:
        reader = FederationReader(client)
        sid = (await reader.rounds(WORKFLOW_ID))["rounds"][str(number)]
        assignments = await reader.assignments(sid)
        return {"record": await reader.round(sid), "assignments": assignments,
                "statuses": {t: await reader.task_status(sid, t) for t in assignments["tasks"]},
                "result": await reader.round_result(sid)}


async def _workflow_owner(endpoints: Endpoints) -> str:
    async with rest(endpoints.rest) as client:
        return (await FederationReader(client).workflow(WORKFLOW_ID))["owner"]


def _local_train(chain_round: dict) -> list[tuple[str, dict]]:
    """(data owner, task status) of every local_train instance of a round."""
    tasks = chain_round["assignments"]["tasks"]
    return [(tasks[t]["data_owner"], s) for t, s in chain_round["statuses"].items()
            if tasks[t]["kind"] == "local_train"]


@contextlib.asynccontextmanager
async def _tampered_blob(redis_url: str, digest: str, replacement: bytes | None):
    """Replace (or, with None, delete) a Redis blob; the original is put back afterwards."""
    redis = await connect(redis_url)
    key = f"blob_{digest}"
    original = await redis.get(key)
    assert original is not None
    try:
        if replacement is None:
            await redis.delete(key)
        else:
            await redis.set(key, replacement)
        yield
    finally:
        await redis.set(key, original)
        await redis.aclose()


@contextlib.asynccontextmanager
async def _couch_round_doc(couch_url: str, number: int):
    """(client, doc id, the round document as stored); the document and its model are restored afterwards."""
    async with CouchClient(couch_url) as couch:
        history = CouchHistory(couch)
        doc_id = history.round_doc_id(WORKFLOW_ID, number)
        original = await couch.get(history.db, doc_id)
        model = await history.get_round_model(WORKFLOW_ID, number)
        try:
            yield couch, doc_id, original
        finally:
            restored = {k: v for k, v in original.items() if k != "_rev"}
            restored["_attachments"] = {"global_model": inline_attachment(model)}
            await couch.update(history.db, doc_id, lambda current: restored)
            assert await history.get_round_model(WORKFLOW_ID, number, expected_digest=original["global_model_digest"])


def _audit(endpoints: Endpoints, **kwargs) -> audit.AuditReport:
    return run(audit.audit_workflow(WORKFLOW_ID, endpoints, **kwargs), timeout=60)


def _command(monkeypatch, tmp_path, *argv: str) -> int:
    monkeypatch.setenv("TRUSTMESH_HOME", str(tmp_path))  # no local network.json to fall back on
    for name in ("TRUSTMESH_REST", "TRUSTMESH_REDIS", "COUCHDB_URL"):
        monkeypatch.delenv(name, raising=False)
    parser = argparse.ArgumentParser(prog="trustmesh")
    audit.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["audit", *argv])
    return args.func(args)


def _flags(endpoints: Endpoints) -> list[str]:
    return ["--rest", endpoints.rest, "--redis", endpoints.redis, "--couch", endpoints.couch]


# --------------------------------------------------------------------------- the untouched workflow


def test_untouched_workflow_passes_every_check(federation):
    seen = []
    report = _audit(federation.endpoints, progress=seen.append)
    assert report.ok, audit.render_text(report)
    assert [r.number for r in report.rounds] == [1, 2] and all(r.status == "final" for r in report.rounds)
    first, second = report.rounds
    for r in report.rounds:
        assert r.global_model and r.recomputed_global_model == r.global_model
        assert r.checks > 40 and not r.problems
    assert first.initial_model is None and second.initial_model == first.global_model
    # deploy + per round: open, 3 submits, assign, 6 done reports (and running ones), round_result
    assert report.transactions >= 1 + ROUNDS * 12, report.transactions
    assert any("round 1 of 2" in text for text in seen) and any("round 2 of 2" in text for text in seen)
    text = audit.render_text(report)
    assert "✓ round 1" in text and "✓ round 2" in text and "OK" in text and "✗" not in text


# --------------------------------------------------------------------------- tampered stores


def test_an_overwritten_update_is_named_and_stops_the_recomputation(federation):
    owner, status = _local_train(run(_round(federation.endpoints, 2)))[0]
    digest = status["output_digest"]

    async def scenario():
        async with _tampered_blob(federation.endpoints.redis, digest, b"other bytes"):
            return await audit.audit_workflow(WORKFLOW_ID, federation.endpoints)

    report = run(scenario())
    assert not report.ok
    assert report.rounds[0].ok, report.rounds[0].problems
    problems = report.rounds[1].problems
    assert any(p.startswith(f"round 2: update of node {owner[:16]}…: Redis blob {digest[:16]}… digest mismatch")
               for p in problems), problems
    assert any("aggregation not recomputed" in p and owner[:16] in p for p in problems), problems
    assert report.rounds[1].recomputed_global_model is None
    assert _audit(federation.endpoints).ok  # restored


def test_a_deleted_submission_is_missing(federation):
    record = run(_round(federation.endpoints, 1))["record"]
    node = record["submitted_nodes"][1]
    digest = record["submissions"][node]["digest"]

    async def scenario():
        async with _tampered_blob(federation.endpoints.redis, digest, None):
            return await audit.audit_workflow(WORKFLOW_ID, federation.endpoints)

    report = run(scenario())
    missing = f"round 1: submission of node {node[:16]}…: Redis blob {digest[:16]}… missing"
    assert report.rounds[0].problems == [missing]
    assert report.rounds[1].ok and not report.problems


def test_a_replaced_couchdb_round_model_is_a_digest_mismatch_and_a_deleted_one_missing(federation):
    where = f"CouchDB trustmesh/round:{WORKFLOW_ID}:000002"

    async def replaced():
        async with _couch_round_doc(federation.endpoints.couch, 2) as (couch, doc_id, doc):
            await couch.put_attachment("trustmesh", doc_id, "global_model", b"other bytes", rev=doc["_rev"])
            return await audit.audit_workflow(WORKFLOW_ID, federation.endpoints)

    async def deleted():
        async with _couch_round_doc(federation.endpoints.couch, 2) as (couch, doc_id, doc):
            await couch.delete("trustmesh", doc_id, doc["_rev"])
            return await audit.audit_workflow(WORKFLOW_ID, federation.endpoints)

    report = run(replaced())
    assert report.rounds[0].ok and len(report.rounds[1].problems) == 1, report.rounds[1].problems
    assert report.rounds[1].problems[0].startswith(f"round 2: global model: {where} digest mismatch")
    report = run(deleted())
    assert report.rounds[1].problems == [f"round 2: global model: {where} missing"]
    assert _audit(federation.endpoints).ok  # restored


def test_weights_that_do_not_reproduce_the_global_model_are_named(federation):
    chain_round = run(_round(federation.endpoints, 1))
    spec, result = federation.definition["model"], chain_round["result"]

    async def updates():
        redis = await connect(federation.endpoints.redis)
        try:
            found = []
            for owner, status in _local_train(chain_round):
                blob = await redis.get(f"blob_{status['output_digest']}")
                state = model_format.load(blob, status["output_digest"], spec).state
                found.append(ClientUpdate(owner, state, int(status["metrics"]["samples"]), status["metrics"]))
            return found
        finally:
            await redis.aclose()

    loaded = run(updates())

    def check(strategy, weights):
        checked = audit.RoundAudit(number=1)
        digest = audit.check_aggregation(checked, loaded, strategy, {**result, "aggregation_weights": weights},
                                         workflow_id=WORKFLOW_ID, model_spec=spec)
        return checked, digest

    honest, digest = check(STRATEGY, result["aggregation_weights"])
    # the update checks (none rejected), the weights, the digest
    assert honest.ok and honest.checks == 3 and digest == result["global_model_digest"]

    nodes = sorted(result["aggregation_weights"])
    shifted = dict(result["aggregation_weights"])
    shifted[nodes[0]] += 0.01
    shifted[nodes[1]] -= 0.01
    altered, digest = check(STRATEGY, shifted)
    assert digest != result["global_model_digest"]
    assert any(p.startswith("round 1: aggregation weights on chain are not perf_fedavg's") and nodes[0][:16] in p
               for p in altered.problems), altered.problems
    assert any(p.startswith(f"round 1: recomputed global model {digest[:16]}… does not match the on-chain "
                            f"global_model_digest {result['global_model_digest'][:16]}…: digest mismatch")
               for p in altered.problems), altered.problems

    # another strategy: its weights differ, yet the global model is what the on-chain weights give
    other, digest = check({"name": "fedavg"}, result["aggregation_weights"])
    assert digest == result["global_model_digest"]
    assert len(other.problems) == 1 and "are not fedavg's" in other.problems[0]


def test_a_forged_lineage_is_named(federation):
    """The processor refuses a local_train report that names the wrong starting model, so a chain
    that holds one was not made by our rules: the audit re-applies the rule and names it."""
    chain_round = run(_round(federation.endpoints, 2))
    first = run(_round(federation.endpoints, 1))
    start = schedule.StartingModel(WORKFLOW_ID, 2, first["result"]["global_model_digest"], 1)
    rnd = audit._Round(record=chain_round["record"], definition=federation.definition,
                       assignments=chain_round["assignments"], statuses=chain_round["statuses"])
    honest = audit.RoundAudit(number=2)
    audit.check_lineage(honest, rnd, start)
    trains = [t for t, a in rnd.tasks.items() if a["kind"] == "local_train"]
    assert honest.ok and honest.checks == len(trains) == 3

    forged_from = _local_train(first)[0][1]["output_digest"]  # round 1's update of a node, not its global model
    statuses = {**rnd.statuses, trains[0]: {**rnd.statuses[trains[0]], "base_model_digest": forged_from}}
    statuses[trains[1]] = {k: v for k, v in rnd.statuses[trains[1]].items() if k != "base_model_digest"}
    forged = audit.RoundAudit(number=2)
    audit.check_lineage(forged, dataclasses.replace(rnd, statuses=statuses), start)
    assert sorted(forged.problems) == sorted([
        f"round 2: task {trains[0]} trained from model {forged_from[:16]}… but round 1's global model is "
        f"{start.digest[:16]}…",
        f"round 2: task {trains[1]} trained from the initial weights but round 1's global model is "
        f"{start.digest[:16]}…",
    ])


# --------------------------------------------------------------------------- transactions


def test_a_transaction_verifies_only_as_signed(federation):
    async def first_submit():
        async with rest(federation.endpoints.rest) as client:
            async for txn in client.list_transactions():
                if txn["header"]["family_name"] == "trustmesh-federation" and \
                        cbor.decode(base64.b64decode(txn["payload"]))["action"] == "submit":
                    return txn

    txn = run(first_submit())
    verified = audit.verify_transaction(txn)
    assert verified.problem is None and verified.action == "submit"
    assert verified.signer == txn["header"]["signer_public_key"] and verified.txn_id == txn["header_signature"]

    body = {**verified.body, "samples": verified.body["samples"] + 1}
    other_payload = {**txn, "payload": base64.b64encode(cbor.encode(body)).decode()}
    assert audit.verify_transaction(other_payload).problem == "payload does not hash to the header's payload_sha512"
    other_key = next(k for k in federation.definition["federation"]["participant_nodes"] if k != verified.signer)
    for header in ({**txn["header"], "signer_public_key": other_key}, {**txn["header"], "nonce": "0"}):
        forged = audit.verify_transaction({**txn, "header": header})
        assert forged.problem == "header signature does not verify against its signer_public_key", header


def test_transactions_signed_by_the_wrong_node_are_named(federation, monkeypatch):
    fed = federation.definition["federation"]
    coordinator = fed["coordinator_node"]
    outsider = next(n for n in fed["participant_nodes"] if n != coordinator)
    first, second = (run(_round(federation.endpoints, n)) for n in (1, 2))
    sids = [first["record"]["schedule_id"], second["record"]["schedule_id"]]
    tasks = second["assignments"]["tasks"]
    aggregate = next(t for t in tasks if tasks[t]["kind"] == "aggregate")
    owner = run(_workflow_owner(federation.endpoints))

    def forge(a) -> str | None:
        """Who else signs it: the chain is made to hold a signer the rules refuse."""
        body = a.body
        if a.action == "deploy" or (a.action == "open_round" and body["round"] == 2):
            return outsider
        if a.action == "submit" and body["schedule_id"] == sids[0] and a.signer == outsider:
            return coordinator
        if a.action == "report" and body["schedule_id"] == sids[1] and body["task_id"] == aggregate:
            return coordinator
        if a.action == "round_result" and body["schedule_id"] == sids[0]:
            return outsider
        return None

    genuine, forged = audit._chain_actions, []

    async def chain_actions(rest_client, head):
        actions = await genuine(rest_client, head)
        for i, a in enumerate(actions):
            if forge(a) is not None:
                actions[i] = dataclasses.replace(a, signer=forge(a))
                forged.append(a.action)
        return actions

    monkeypatch.setattr(audit, "_chain_actions", chain_actions)
    report = _audit(federation.endpoints)
    problems = report.all_problems()
    submissions = first["record"]["submissions"]
    expected = [
        f"trustmesh-workflow deploy transaction .*: signed by {outsider[:16]}…, not by the owner {owner[:16]}…",
        f"round 2: trustmesh-federation open_round transaction .*: signed by {outsider[:16]}…, not by the "
        f"coordinator_node {coordinator[:16]}…",
        "round 2: no open_round transaction signed by the round's coordinator",
        f"round 1: trustmesh-federation submit transaction .*: submits {submissions[outsider]['digest'][:16]}… but "
        f"the round holds {submissions[coordinator]['digest'][:16]}… for its signer",
        f"round 1: submission of node {outsider[:16]}… has no submit transaction signed by that node",
        f"round 2: trustmesh-schedule report transaction .*: report of task {aggregate} signed by "
        f"{coordinator[:16]}…, not by the node assigned to it at that attempt",
        f"round 2: task {aggregate} is done without a done report signed by its node",
        f"round 1: trustmesh-schedule round_result transaction .*: signed by {outsider[:16]}…, not by the "
        f"aggregate task's node",
        "round 1: the round result has no round_result transaction signed by its reporter",
    ]
    for pattern in expected:
        assert any(re.fullmatch(pattern + ".*", p) for p in problems), (pattern, problems)
    assert len(problems) == len(expected), problems
    assert sorted(forged) == ["deploy", "open_round", "report", "round_result", "submit"]


# --------------------------------------------------------------------------- the command


def test_command_exits_0_when_clean_and_1_with_a_problem(federation, monkeypatch, tmp_path, capsys):
    assert _command(monkeypatch, tmp_path, WORKFLOW_ID, *_flags(federation.endpoints)) == 0
    out = capsys.readouterr().out
    assert "✓ round 1" in out and "✓ round 2" in out and "OK: every check passed" in out

    assert _command(monkeypatch, tmp_path, WORKFLOW_ID, "--json", *_flags(federation.endpoints)) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True and report["workflow_id"] == WORKFLOW_ID
    assert [r["number"] for r in report["rounds"]] == [1, 2] and report["checks"] > 80

    record = run(_round(federation.endpoints, 2))["record"]
    node = record["submitted_nodes"][0]
    digest = record["submissions"][node]["digest"]

    async def tampered(*argv):
        async with _tampered_blob(federation.endpoints.redis, digest, b"not the bundle"):
            return await asyncio.to_thread(_command, monkeypatch, tmp_path, *argv)

    assert run(tampered(WORKFLOW_ID, *_flags(federation.endpoints))) == 1
    out = capsys.readouterr().out
    assert "✓ round 1" in out and "✗ round 2" in out and "FAILED: 1 problem(s)" in out
    assert f"round 2: submission of node {node[:16]}…: Redis blob {digest[:16]}… digest mismatch" in out
    assert run(tampered(WORKFLOW_ID, "--json", *_flags(federation.endpoints))) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["rounds"][1]["problems"][0].startswith("round 2: submission of node")


def test_without_couchdb_the_stores_left_are_still_checked(federation, monkeypatch, tmp_path, capsys):
    endpoints = federation.endpoints
    assert _command(monkeypatch, tmp_path, WORKFLOW_ID, "--json", "--rest", endpoints.rest,
                    "--redis", endpoints.redis) == 0
    without = json.loads(capsys.readouterr().out)
    with_couch = _audit(endpoints).to_json()
    assert without["ok"] and without["checks"] == with_couch["checks"] - ROUNDS  # one CouchDB model per round


def test_an_unknown_workflow_exits_2_with_a_message(federation, monkeypatch, tmp_path, capsys):
    assert _command(monkeypatch, tmp_path, "no-such-workflow", *_flags(federation.endpoints)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "workflow 'no-such-workflow' is not on chain" in captured.err and "Traceback" not in captured.err


@pytest.mark.parametrize("store", ["redis", "rest", "couch"])
def test_an_unreachable_store_exits_2_naming_it(federation, monkeypatch, tmp_path, capsys, store):
    endpoints = federation.endpoints
    port = free_port()
    urls = {"rest": endpoints.rest, "redis": endpoints.redis, "couch": endpoints.couch}
    urls[store] = {"redis": f"redis://:secret@127.0.0.1:{port}/0", "rest": f"http://127.0.0.1:{port}",
                   "couch": f"http://127.0.0.1:{port}"}[store]
    argv = [WORKFLOW_ID, "--rest", urls["rest"], "--redis", urls["redis"], "--couch", urls["couch"]]
    # The audit runs in this process: a REST API that never answered is given up on after
    # FIRST_CONTACT seconds; 10 s of it are timed in test_outage_waits, here 1 s does.
    monkeypatch.setattr(network_endpoints, "FIRST_CONTACT", 1.0)
    assert _command(monkeypatch, tmp_path, *argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    named = {"redis": f"Redis at redis://:***@127.0.0.1:{port}/0 is unreachable",
             "rest": f"cannot read the chain through the REST API at http://127.0.0.1:{port}",
             "couch": f"CouchDB at http://127.0.0.1:{port} is unreachable"}[store]
    assert named in captured.err and "secret" not in captured.err
