"""Defences through every real part, five IoT nodes, one of whose updates the compute nodes poison
(x100 scaling, fl/attacks.py): Multi-Krum (f = 1, m = 3) gives the attacker weight 0 in every
round; FedAvg behind update checks (max_norm_ratio) rejects it by name. Either way the audit
recomputes the aggregation, and the checks, and passes. A server optimizer (FedAdam) leaves a state
for the next round that the audit recomputes from the state the round started with."""

from __future__ import annotations

from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from test_federated_round import stores, until_every_round_is_final, until_history_is_recorded  # noqa: F401
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

from helpers.family_scenario import _WORKFLOWS

ROUNDS = 2


def _federate(devnet, stores, tmp_path, workflow_id: str, attack: str | None = "scale:100", epochs: int = 1,  # noqa: F811
              **changes):
    """Run a workflow (federated-digits, 5 nodes, `epochs` (1), `changes`) with iot-5's updates
    poisoned by both compute nodes with `attack`: (iot-5's key, round results); the audit passes."""
    redis_server, couch_server = stores
    names = [f"iot-{i}" for i in range(1, 6)]
    keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in names}
    attacker = keys["iot-5"]
    definition = workflow.load_definition(_WORKFLOWS / "federated-digits.json")
    definition.update(workflow_id=workflow_id, **changes)
    definition["hyperparameters"]["epochs"] = epochs
    definition["federation"].update(participant_nodes=names, coordinator_node="iot-1", expected_nodes=5,
                                    min_nodes_required=5, rounds=ROUNDS, round_timeout=60)
    definition = workflow.resolve_node_names(definition, keys)

    async def scenario():
        common = dict(validator_url=devnet.component_url, rest_url=devnet.rest_url, redis_url=redis_server.url)
        async with running_processor(devnet.component_url, *federation_handlers()), rest(devnet.rest_url) as client:
            computes = [ComputeNode(f"compute-{i}", tmp_path / f"compute-{i}", couch_url=couch_server.url,
                                    attacks={attacker: parse_attack(attack)} if attack else {}, **common)
                        for i in range(2)]
            for node in computes:
                await node.start()
            owner = load_or_create_key(tmp_path / "owner", "owner")
            [status] = await submit_and_wait(client, [make_batch(owner, [workflow.make_deploy_transaction(
                owner, definition)])])
            assert status["status"] == "COMMITTED", status
            iots = [IoTNode(n, tmp_path / n, workflow_id=workflow_id, coordinator=(n == "iot-1"), **common)
                    for n in names]
            for node in iots:
                await node.start()
            try:
                await until_every_round_is_final(iots, ROUNDS)
                await until_history_is_recorded(computes, ROUNDS)  # the audit below reads it
            finally:
                for node in iots + computes:
                    await node.stop()
            reader = FederationReader(client)
            index = (await reader.rounds(workflow_id))["rounds"]
            results = [await reader.round_result(index[str(r)]) for r in range(1, ROUNDS + 1)]
            loads = {key: await reader.node_load(key) or {} for key in keys.values()}
            report = await audit.audit_workflow(workflow_id, Endpoints(
                validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url, couch=couch_server.url))
            return results, loads, report

    results, loads, report = run(scenario(), timeout=300)
    assert report.ok, audit.render_text(report)
    for result in results:
        assert set(result["aggregation_weights"]) == set(keys.values())
    return attacker, results, loads


def test_multi_krum_leaves_out_a_scaling_attacker_and_the_audit_passes(devnet, stores, tmp_path):  # noqa: F811
    attacker, results, loads = _federate(devnet, stores, tmp_path, "digits-multi-krum",
                                  strategy={"name": "multi_krum", "f": 1, "m": 3})
    for result in results:
        weights = result["aggregation_weights"]
        assert weights[attacker] == 0.0 and sum(1 for w in weights.values() if w > 0) == 3, weights  # m = 3 kept
        # the two left out are named, with the rule's reason
        assert sorted(result["rejected"]) == sorted(n for n, w in weights.items() if w == 0)
        assert result["rejected"][attacker] == ("multi_krum (f = 1) did not choose it: not among the m updates "
                                                "with the lowest Krum scores")


def test_update_checks_reject_a_scaling_attacker_by_name_and_the_audit_agrees(devnet, stores, tmp_path):  # noqa: F811
    attacker, results, loads = _federate(devnet, stores, tmp_path, "digits-update-checks", strategy={"name": "fedavg"},
                                  update_checks={"max_norm_ratio": 3.0})
    for result in results:
        assert result["aggregation_weights"][attacker] == 0.0
        assert list(result["rejected"]) == [attacker]
        assert "more than max_norm_ratio 3 x its norm" in result["rejected"][attacker]
        assert sum(1 for w in result["aggregation_weights"].values() if w > 0) == 4
    assert loads[attacker]["rejected"] == ROUNDS  # counted in its node's reputation, once a round


def test_a_server_optimizer_carries_its_state_from_round_to_round_and_the_audit_recomputes_it(devnet, stores,  # noqa: F811
                                                                                               tmp_path):
    _, results, _ = _federate(devnet, stores, tmp_path, "digits-fedadam", attack=None,
                           strategy={"name": "fedadam", "eta": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001})
    states = [result["server_state_digest"] for result in results]
    assert len(set(states)) == ROUNDS, states  # each round left its own state, the audit checked each


def test_an_accuracy_floor_rejects_a_noisy_update_by_its_score_and_the_audit_rescores_it(devnet, stores,  # noqa: F811
                                                                                          tmp_path):
    # noise:10 leaves a model no better than chance (at most 0.16 of the held-out split over 60
    # seeds); honest six-epoch models score at least 0.39 from round 1 on (measured alike)
    attacker, results, loads = _federate(devnet, stores, tmp_path, "digits-accuracy-floor", attack="noise:10",
                                         epochs=6, strategy={"name": "fedavg"}, update_checks={"min_accuracy": 0.25})
    for result in results:
        assert list(result["rejected"]) == [attacker], result["rejected"]
        assert "on the held-out split, below min_accuracy 0.25" in result["rejected"][attacker]
    assert loads[attacker]["rejected"] == ROUNDS


def test_qfedavg_weighs_by_the_reported_starting_loss_and_the_audit_recomputes_it(devnet, stores,  # noqa: F811
                                                                                  tmp_path):
    _, results, _ = _federate(devnet, stores, tmp_path, "digits-qfedavg", attack=None,
                              strategy={"name": "qfedavg", "q": 1.0, "learning_rate": 0.1})
    # the audit (in _federate) recomputed each weight F_k / sum F from the start_loss on chain and
    # each global model from the round's starting model; each participant's loss differs
    for result in results:
        assert len(set(result["aggregation_weights"].values())) == 5, result["aggregation_weights"]
