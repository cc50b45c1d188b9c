"""Running a whole federation in one test process: the stores, nodes started and waited for, and
`federate`, a short federated-digits workflow through every real part followed by its audit."""

from __future__ import annotations

import asyncio
import base64

from helpers.family_scenario import _WORKFLOWS
from helpers.servers import stores  # noqa: F401  (re-exported: modules that import the fixture from here)
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from trustmesh import audit
from trustmesh.compute_node.node import ComputeNode
from trustmesh.endpoints import Endpoints
from trustmesh.fl.attacks import parse_attack
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import workflow
from trustmesh.scheduling.handlers import federation_handlers
from trustmesh.scheduling.reader import FederationReader
from trustmesh.stores.couch import CouchClient
from trustmesh.stores.redis_client import connect


def digits_definition(keys: dict[str, str], rounds: int = 2) -> dict:
    """federated-digits as workflow "digits-e2e" for three IoT nodes (`keys`: name -> public key),
    iot-1 coordinating, 2 epochs, `rounds` rounds."""
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["workflow_id"] = "digits-e2e"
    definition["hyperparameters"]["epochs"] = 2
    definition["federation"].update(participant_nodes=list(keys), coordinator_node="iot-1", expected_nodes=3,
                                    min_nodes_required=2, rounds=rounds, round_timeout=60)
    return workflow.resolve_node_names(definition, keys)


async def start_compute_nodes(count: int, tmp_path, couch_url: str, common: dict) -> list[ComputeNode]:
    computes = [ComputeNode(f"compute-{i}", tmp_path / f"compute-{i}", couch_url=couch_url, **common)
                for i in range(count)]
    for node in computes:
        await node.start()
    return computes


async def start_iot_nodes(names, tmp_path, workflow_id: str, common: dict) -> list[IoTNode]:
    """iot-1 coordinates; iot-3 brings its own data file (tmp_path / "iot-3.npz")."""
    iots = [IoTNode(n, tmp_path / n, workflow_id=workflow_id, coordinator=(n == "iot-1"),
                    data_path=str(tmp_path / "iot-3.npz") if n == "iot-3" else None, **common) for n in names]
    for node in iots:
        await node.start()
    return iots


async def until_every_round_is_final(iots, rounds: int) -> None:
    await asyncio.wait_for(iots[0].finished.wait(), 240)
    for node in iots:  # every node fetched and verified every global model
        await asyncio.wait_for(until(lambda: len(node.global_models) == rounds), 30)


async def until_history_is_recorded(computes, rounds: int) -> None:
    """The CouchDB history follows the chain off the rounds' path: wait for every final round
    in it before stopping the nodes (and before an audit looks for it)."""
    await asyncio.wait_for(until(lambda: finals_recorded(computes) == rounds), 30)


def finals_recorded(computes) -> int:
    return sum(kind == "trustmesh/round-finalized" for node in computes for kind, _ in node.recorder.recorded)


async def until(predicate, pause: float = 0.1):
    while not predicate():
        await asyncio.sleep(pause)


async def _until_settled(reader: FederationReader, workflow_id: str) -> None:
    index = (await reader.rounds(workflow_id))["rounds"]
    for sid in index.values():
        result = await reader.round_result(sid)
        while result is not None and result.get("final") and await reader.settlement(sid) is None:
            await asyncio.sleep(0.1)


def federate(devnet, stores, tmp_path, workflow_id: str, *, rounds: int = 2, attack: str | None = "scale:100",
             epochs: int = 1, federation: dict | None = None, after=None, finals: int | None = None,
             task_deadline: int = 300, **changes):
    """Run a workflow (federated-digits, 5 IoT nodes iot-1..iot-5 with iot-1 coordinating, two
    compute nodes, `epochs` (1), `rounds`, `federation` and definition `changes`) with iot-5's
    updates poisoned by both compute nodes with `attack`. Then the audit, which must pass.
    after(client, keys) runs last against the REST API, while the chain is still up; its return
    value is returned too. finals: how many rounds end final (default: all; the others time out).
    -> (iot-5's key, round results (None for a round without one), node loads by key, after's value)."""
    redis_server, couch_server = stores
    names = [f"iot-{i}" for i in range(1, 6)]
    keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
    attacker = keys["iot-5"]
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition.update(workflow_id=workflow_id, **changes)
    definition["hyperparameters"]["epochs"] = epochs
    definition["federation"].update({"participant_nodes": names, "coordinator_node": "iot-1", "expected_nodes": 5,
                                     "min_nodes_required": 5, "rounds": rounds, "round_timeout": 60, **(federation or {})})
    definition = workflow.resolve_node_names(definition, keys)
    planned = rounds
    if "privacy" in definition:
        from trustmesh.fl import privacy_block

        planned = privacy_block.planned_rounds(definition)

    async def scenario():
        common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            started = []  # every node started is stopped, whatever fails (a refused deploy included)
            try:
                for i in range(2):
                    node = ComputeNode(f"compute-{i}", tmp_path / f"compute-{i}", couch_url=couch_server.url,
                                       attacks={attacker: parse_attack(attack)} if attack else {}, **common)
                    await node.start()
                    started.append(node)
                computes = list(started)
                owner = load_or_create_key(tmp_path / "owner", "owner")
                deploy = [workflow.make_deploy_transaction(owner, definition)]
                if "rewards" in definition:  # its budget escrowed with the deployment, as `trustmesh run` does
                    from trustmesh.scheduling import rewards

                    deploy.append(rewards.make_escrow_transaction(owner, workflow_id))
                [status] = await submit_and_wait(client, [make_batch(owner, deploy)])
                assert status["status"] == "COMMITTED", f"the deploy was refused: {status}"
                iots = [IoTNode(n, tmp_path / n, workflow_id=workflow_id, coordinator=(n == "iot-1"),
                                task_deadline=task_deadline, **common) for n in names]
                for node in iots:
                    await node.start()
                    started.append(node)
                await until_every_round_is_final(iots, planned if finals is None else finals)
                await until_history_is_recorded(computes, planned if finals is None else finals)  # the audit reads it
                if "rewards" in definition:  # the coordinator pays each final round from the escrow
                    await asyncio.wait_for(_until_settled(FederationReader(client), workflow_id), 30)
            finally:
                for node in reversed(started):
                    await node.stop()
            reader = FederationReader(client)
            index = (await reader.rounds(workflow_id))["rounds"]
            results = [await reader.round_result(index[str(r)]) for r in range(1, planned + 1)]
            loads = {key: await reader.node_load(key) or {} for key in keys.values()}
            report = await audit.audit_workflow(workflow_id, Endpoints(
                validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url, couch=couch_server.url))
            extra = await after(client, keys) if after is not None else None
            return results, loads, report, extra

    results, loads, report, extra = run(scenario(), timeout=300)
    assert report.ok, audit.render_text(report)
    for result in results:
        assert result is None or set(result["aggregation_weights"]) <= set(keys.values())
    return attacker, results, loads, extra


def encodings(raw: bytes) -> list[bytes]:
    """The forms bytes take in a store: themselves, hex (either case), base64 at each of its three
    phases in a longer buffer."""
    found = [raw, raw.hex().encode(), raw.hex().upper().encode()]
    for shift in range(3):
        found.append(base64.b64encode(b"\0" * shift + raw)[4:-4])
    return found


async def scan_stores(client, canary, couch_url, redis_url) -> dict[str, set[str]]:
    """Every value in chain state, every transaction payload in the blocks, Redis and CouchDB
    (documents and attachments): canary.found_in must find nothing in any. A canary with
    `controls_in(blob)` (the names of the expected needles a blob holds) gets back where each was
    found: store ("chain state", "blocks", "redis", "couchdb") -> names, the scan's positive control."""
    controls: dict[str, set[str]] = {store: set() for store in ("chain state", "blocks", "redis", "couchdb")}
    seen = getattr(canary, "controls_in", lambda blob: set())

    def check(store: str, value, where: str) -> None:
        assert not canary.found_in(value), f"raw data in {where}"
        controls[store] |= seen(value)

    async for address, value in client.list_state():
        check("chain state", value, f"chain state at {address}")
    async for block in client.list_blocks():
        for batch in block["batches"]:
            for txn in batch["transactions"]:
                where = f"the payload of transaction {txn['header_signature'][:16]} (block {block['header']['block_num']})"
                check("blocks", txn["payload"], where)  # as the REST API serves it, base64
                check("blocks", base64.b64decode(txn["payload"]), where)
    redis = await connect(redis_url)
    try:
        async for key in redis.scan_iter(count=500):
            kind = (await redis.type(key)).decode()
            if kind == "string":
                values = [await redis.get(key)]
            elif kind == "list":
                values = await redis.lrange(key, 0, -1)
            elif kind == "hash":
                values = list((await redis.hgetall(key)).values())
            elif kind == "stream":
                values = [v for _, fields in await redis.xrange(key) for v in fields.values()]
            else:
                values = [m for m in await redis.zrange(key, 0, -1)] if kind == "zset" else []
            for value in values:
                check("redis", value, f"Redis key {key!r}")
    finally:
        await redis.aclose()
    async with CouchClient(couch_url) as couch:
        _, databases = await couch._request("GET", "/_all_dbs", retry=True)
        for db in databases:
            for doc in await couch.all_docs(db):
                check("couchdb", repr(doc).encode(), f"CouchDB {db}/{doc.get('_id')}")
                for name in (doc.get("_attachments") or {}):
                    data = await couch.get_attachment(db, doc["_id"], name)
                    check("couchdb", data, f"CouchDB attachment {doc['_id']}/{name}")
    return controls
