"""A robust strategy through every real part: Multi-Krum (f = 1, m = 3) over five IoT nodes, one
of whose updates the compute nodes poison (x100 scaling, fl/attacks.py). Every round's result
gives the attacker weight 0 and the audit recomputes the aggregation and passes; FedAvg's
weights would have given it a share."""

from __future__ import annotations

from ledger_helpers import rest, run, running_processor, submit_and_wait
from test_federated_round import stores, until_every_round_is_final  # noqa: F401  (servers)
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

from family_scenario import _WORKFLOWS

WORKFLOW_ID, ROUNDS = "digits-robust", 2


def test_multi_krum_leaves_out_a_scaling_attacker_and_the_audit_passes(devnet, stores, tmp_path):  # noqa: F811
    redis_server, couch_server = stores
    names = [f"iot-{i}" for i in range(1, 6)]
    keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
    attacker = keys["iot-5"]
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition.update(workflow_id=WORKFLOW_ID, strategy={"name": "multi_krum", "f": 1, "m": 3})
    definition["hyperparameters"]["epochs"] = 1
    definition["federation"].update(participant_nodes=names, coordinator_node="iot-1", expected_nodes=5,
                                    min_nodes_required=5, rounds=ROUNDS, round_timeout=60)
    definition = workflow.resolve_node_names(definition, keys)

    async def scenario():
        common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            computes = [ComputeNode(f"compute-{i}", tmp_path / f"compute-{i}", couch_url=couch_server.url,
                                    attacks={attacker: parse_attack("scale:100")}, **common) for i in range(2)]
            for node in computes:
                await node.start()
            owner = load_or_create_key(tmp_path / "owner", "owner")
            [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(
                owner, definition)])])
            assert status["status"] == "COMMITTED", status
            iots = [IoTNode(n, tmp_path / n, workflow_id=WORKFLOW_ID, coordinator=(n == "iot-1"), **common)
                    for n in names]
            for node in iots:
                await node.start()
            try:
                await until_every_round_is_final(iots, ROUNDS)
            finally:
                for node in iots + computes:
                    await node.stop()
            reader = FederationReader(client)
            index = (await reader.rounds(WORKFLOW_ID))["rounds"]
            results = [await reader.round_result(index[str(r)]) for r in range(1, ROUNDS + 1)]
            report = await audit.audit_workflow(WORKFLOW_ID, Endpoints(
                validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url, couch=couch_server.url))
            return results, report

    results, report = run(scenario(), timeout=300)
    for result in results:
        weights = result["aggregation_weights"]
        assert set(weights) == set(keys.values()) and weights[attacker] == 0.0, weights
        assert sum(1 for w in weights.values() if w > 0) == 3  # m = 3 kept
    assert report.ok, audit.render_text(report)
