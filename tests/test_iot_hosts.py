"""Many IoT nodes per process (iot-node/host.py): `trustmesh up --iot-nodes 50 --iot-hosts 2`
runs them in two host processes, each node keeping its own key (0600) and signing its own
transactions; a two-round workflow of all 50 completes and its audit passes. The host's shared
reads and coalesced submissions are checked in one process against a real dev validator."""

from __future__ import annotations

import asyncio
import json
import os
import stat

from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from helpers.local_network import ROOT, processes_of, trustmesh
from trustmesh.iot_node.host import SharedReader
from trustmesh.ledger.coalescing_rest import CoalescingRest
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.intkey import IntkeyHandler, make_intkey_transaction
from trustmesh.ledger.signing import load_or_create_key


def _workflow(tmp_path, workflow_id: str, participants: int, rounds: int):
    definition = json.loads((ROOT / "workflows" / "federated-digits-100.json").read_text())
    definition["workflow_id"] = workflow_id
    definition["hyperparameters"]["epochs"] = 1
    definition["federation"].update(participant_nodes=[f"iot-{i}" for i in range(1, participants + 1)],
                                    expected_nodes=participants, min_nodes_required=participants,
                                    rounds=rounds, round_timeout=300)
    path = tmp_path / f"{workflow_id}.json"
    path.write_text(json.dumps(definition))
    return path


def test_fifty_iot_nodes_in_two_host_processes_run_two_audited_rounds(home, tmp_path):  # noqa: F811
    up = trustmesh(home, "up", "--compute-nodes", "2", "--iot-nodes", "50", "--iot-hosts", "2", timeout=240)
    assert "MiB resident" in up.stdout, up.stdout
    services = json.loads((home / "network.json").read_text())["services"]
    hosts = {name: s for name, s in services.items() if s["kind"] == "iot"}
    assert sorted(hosts) == ["iot-host-1", "iot-host-2"], sorted(services)
    hosted = {name: key for s in hosts.values() for name, key in s["nodes"].items()}
    assert sorted(hosted, key=lambda n: int(n.split("-")[1])) == [f"iot-{i}" for i in range(1, 51)]
    assert len(set(hosted.values())) == 50, "each node has its own key"
    for name in ("iot-1", "iot-50"):
        private = home / "nodes" / name / "keys" / f"{name}.priv"
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    assert sum(" iot-host --nodes " in cmd for cmd in processes_of(home)) == 2, "two host processes, not fifty"
    assert not any(" iot-node " in cmd for cmd in processes_of(home))
    status = trustmesh(home, "status").stdout
    assert "iot-host-1" in status and "25 IoT nodes: iot-1 … iot-25" in status, status

    result = trustmesh(home, "run", str(_workflow(tmp_path, "hosted-50", 50, rounds=2)), "--timeout", "300",
                       timeout=360)
    assert "2/2 rounds final" in result.stdout, result.stdout

    report = json.loads(trustmesh(home, "audit", "hosted-50", "--json").stdout)
    assert report["ok"] is True and len(report["rounds"]) == 2
    # every participant's own signature is on its submission: the audit checks signers, and all 50 took part
    from trustmesh.ledger import payload as cbor  # noqa: F401  (state_of decodes with it)
    from helpers.local_network import state_of
    from trustmesh.scheduling import layout

    rest_url = json.loads((home / "network.json").read_text())["endpoints"]["rest"]
    index = state_of(layout.workflow_rounds_address("hosted-50"), rest_url)
    for sid in index["rounds"].values():
        assert state_of(layout.round_address(sid), rest_url)["submitted"] == len(hosted)  # the core's count
        assert all("position" in state_of(layout.round_member_address(sid, node), rest_url) for node in hosted.values())
    # a run without faults: no node had to fall back on a retry (a bug that fails every look for
    # runnable tasks still finishes its rounds, a block later each time, and says so only here)
    for log in sorted((home / "logs").glob("*.log")):
        retried = [line for line in log.read_text().splitlines() if "could not queue" in line or "stumbled" in line
                   or "failed unexpectedly" in line or "trying again shortly" in line or "not committed" in line]
        assert not retried, f"{log.name}: {retried[:3]}"
    # the trainings a compute node made together went in report_many transactions, which the audit read
    together = [line for log in (home / "logs").glob("compute-*.log") for line in log.read_text().splitlines()
                if "reported in one transaction" in line]
    assert together, "no report_many: each training was reported alone"


def test_a_hosts_nodes_share_reads_and_requests_but_sign_their_own_batches(devnet, tmp_path):
    async def scenario():
        async with running_processor(devnet.component_url, IntkeyHandler()), rest(devnet.rest_url) as client:
            shared = CoalescingRest(devnet.rest_url)
            reader = SharedReader(shared)
            try:
                signers = [load_or_create_key(tmp_path / f"n{i}", f"n{i}") for i in range(30)]
                batches = [make_batch(s, [make_intkey_transaction(s, "set", f"k{i}", i)]) for i, s in enumerate(signers)]
                statuses = await asyncio.gather(*(shared.submit_until_final([b], 30) for b in batches))
                assert [s["status"] for [s] in statuses] == ["COMMITTED"] * 30
                assert 1 <= shared.posts <= 3, f"30 submissions took {shared.posts} POSTs"
                # each batch is its own: signed by its own node
                for batch, signer in zip(batches, signers):
                    got = await client.get_batch(batch.header_signature)
                    assert got["header"]["signer_public_key"] == signer.public_key().as_hex()

                # thirty readers of one record at one head: one REST read; a new block starts afresh
                from trustmesh.scheduling import layout

                address = layout.workflow_address("nothing-here")
                found = await asyncio.gather(*(reader._record(address) for _ in range(30)))
                assert found == [None] * 30 and reader.reads == 1
                await reader._record(address)
                assert reader.reads == 1
                reader.new_block()
                await reader._record(address)
                assert reader.reads == 2
            finally:
                await shared.close()

    run(scenario(), timeout=60)


async def test_hosted_nodes_that_train_their_own_data_share_one_task_stream(devnet, stores, tmp_path):  # noqa: F811
    """train_on "iot": every hosted node trains its own local_train task, its trainer fed from the
    host's one task-event subscription (its own assignments only); the round completes, audited."""
    from helpers.family_scenario import _WORKFLOWS
    from helpers.federation_run import until, until_history_is_recorded
    from trustmesh import audit
    from trustmesh.compute_node.node import ComputeNode
    from trustmesh.endpoints import Endpoints
    from trustmesh.iot_node.host import IoTHost
    from trustmesh.scheduling import workflow
    from trustmesh.scheduling.handlers import federation_handlers
    from trustmesh.stores.heartbeats import Heartbeats

    redis_server, couch_server = stores
    names = [f"iot-{i}" for i in range(1, 5)]
    keys = {n: load_or_create_key(tmp_path / "nodes" / n / "keys", n).public_key().as_hex() for n in names}
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition["workflow_id"] = "hosted-iot"
    definition["hyperparameters"]["epochs"] = 1
    definition["federation"].update(participant_nodes=names, coordinator_node="iot-1", expected_nodes=4,
                                    min_nodes_required=4, rounds=1, round_timeout=120, train_on="iot")
    definition = workflow.resolve_node_names(definition, keys)
    common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
    async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
        compute = ComputeNode("compute-1", tmp_path / "compute-1", couch_url=couch_server.url, **common)
        await compute.start()
        host = IoTHost(names, tmp_path / "nodes", workflow_id="hosted-iot", **common)
        try:
            owner = load_or_create_key(tmp_path / "owner", "owner")
            [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(owner, definition)])])
            assert status["status"] == "COMMITTED", status
            host.beat_every = 0.2
            await host.start()
            # the host beats for all its nodes: a node whose heartbeat is gone is soon live again
            await asyncio.wait_for(until(lambda: len(host.beats) == 4), 10)
            assert sorted(host.beats) == sorted(keys.values())
            beats = Heartbeats(host.redis)
            await beats.forget(keys["iot-3"])
            assert not await beats.is_alive(keys["iot-3"])
            for _ in range(50):
                await asyncio.sleep(0.1)
                if await beats.is_alive(keys["iot-3"]):
                    break
            assert (await beats.live())[keys["iot-3"]]["role"] == "iot"
            await asyncio.wait_for(host.nodes[0].finished.wait(), 90)
            await until_history_is_recorded([compute], 1)  # the audit reads it
            trainers = [node.trainer for node in host.nodes]
            assert all(t is not None and t.subscriber in host._trainer_inboxes for t in trainers)
            assert all(len(t.completed) == 1 for t in trainers), [t.completed for t in trainers]  # each its own
            assert [t.subscriber.assignments for t in trainers] == [1, 1, 1, 1]  # not the others' as well
            assert host.task_subscriber is not None
        finally:
            await host.stop()
            await compute.stop()
        assert host.beats == {}  # a stopped node is no longer beaten for
        report = await audit.audit_workflow("hosted-iot", Endpoints(
            validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url, couch=couch_server.url))
        assert report.ok, audit.render_text(report)


async def test_a_hosts_nodes_fetch_and_check_a_global_model_once_for_all(tmp_path):
    from trustmesh.fl import model_format
    from trustmesh.fl.training import initial_state
    from trustmesh.iot_node.host import IoTHost
    from trustmesh.iot_node.node import IoTNode
    from trustmesh.stores.blobs import BlobNotFound, BlobStore
    from trustmesh.stores.redis_client import client
    from trustmesh.stores.servers import RedisServer

    spec = {"type": "mlp", "input_dim": 64, "hidden": [8], "num_classes": 10}
    model = model_format.serialize(initial_state(spec, 1), workflow_id="wf", round=1, model_spec=spec)
    host = IoTHost(["n1"], tmp_path, validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                   redis_url="redis://127.0.0.1:1")
    with RedisServer() as server:
        redis = client(server.url)
        blobs = BlobStore(redis)
        try:
            digest = await blobs.put(model)
            await blobs.get(digest)  # loads the read script (its first EVALSHA is refused: NOSCRIPT)
            before = (await redis.info("commandstats")).get("cmdstat_evalsha", {}).get("calls", 0)
            nodes = [IoTNode(f"n{i}", tmp_path / f"n{i}", validator_url="tcp://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                             redis_url=server.url, host=host) for i in range(3)]
            for node in nodes:
                node.blobs = blobs
            found = await asyncio.gather(*(node._verified_model(digest, spec) for node in nodes for _ in range(10)))
            after = (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"]
            assert found == [model] * 30 and after - before == 1  # thirty nodes, one fetch
            missing = "ab" * 32
            for _ in range(2):  # a fetch that failed is not kept: each ask tries again
                try:
                    await host.verified_model(missing, spec, blobs)
                except BlobNotFound:
                    pass
            assert (await redis.info("commandstats"))["cmdstat_evalsha"]["calls"] - after == 2
        finally:
            await redis.aclose()
