"""Defences through every real part, five IoT nodes, one of whose updates the compute nodes poison
(x100 scaling, fl/attacks.py): Multi-Krum (f = 1, m = 3) gives the attacker weight 0 in every
round; FedAvg behind update checks (max_norm_ratio) rejects it by name; checks that reject every update
end each round with the model it started from. Either way the audit
recomputes the aggregation, and the checks, and passes. A server optimizer (FedAdam) leaves a state
for the next round that the audit recomputes from the state the round started with."""

from __future__ import annotations

import functools

from helpers.federation_run import federate

ROUNDS = 2
_federate = functools.partial(federate, rounds=ROUNDS)


def test_multi_krum_leaves_out_a_scaling_attacker_and_the_audit_passes(devnet, stores, tmp_path):
    attacker, results, loads, _ = _federate(devnet, stores, tmp_path, "digits-multi-krum",
                                  strategy={"name": "multi_krum", "f": 1, "m": 3})
    for result in results:
        weights = result["aggregation_weights"]
        assert weights[attacker] == 0.0 and sum(1 for w in weights.values() if w > 0) == 3, weights  # m = 3 kept
        # the two left out are named, with the rule's reason
        assert sorted(result["rejected"]) == sorted(n for n, w in weights.items() if w == 0)
        assert result["rejected"][attacker] == ("multi_krum (f = 1) did not choose it: not among the m updates "
                                                "with the lowest Krum scores")


def test_update_checks_reject_a_scaling_attacker_by_name_and_the_audit_agrees(devnet, stores, tmp_path):
    attacker, results, loads, _ = _federate(devnet, stores, tmp_path, "digits-update-checks", strategy={"name": "fedavg"},
                                  update_checks={"max_norm_ratio": 3.0})
    for result in results:
        assert result["aggregation_weights"][attacker] == 0.0
        assert list(result["rejected"]) == [attacker]
        assert "more than max_norm_ratio 3 x its norm" in result["rejected"][attacker]
        assert sum(1 for w in result["aggregation_weights"].values() if w > 0) == 4
    assert loads[attacker]["rejected"] == ROUNDS  # counted in its node's reputation, once a round


def test_a_round_whose_updates_all_fail_the_checks_keeps_its_starting_model_and_the_workflow_goes_on(
        devnet, stores, tmp_path):
    # every honest update moves more than 1e-6 x the starting model's norm: the checks reject all
    _, results, loads, _ = _federate(devnet, stores, tmp_path, "digits-all-rejected", attack=None,
                                     strategy={"name": "fedavg"}, update_checks={"max_norm_ratio": 1e-6})
    for result in results:  # each round ends final; the audit (run by federate) found its starting model kept
        assert result["final"] is True
        assert set(result["aggregation_weights"].values()) == {0.0}, result["aggregation_weights"]
        assert sorted(result["rejected"]) == sorted(result["participants"]) and len(result["participants"]) == 5
        assert all("more than max_norm_ratio 1e-06 x its norm" in why for why in result["rejected"].values())
    assert all(loads[node]["rejected"] == ROUNDS for node in results[0]["participants"])


def test_a_server_optimizer_carries_its_state_from_round_to_round_and_the_audit_recomputes_it(devnet, stores,
                                                                                               tmp_path):
    _, results, _, _ = _federate(devnet, stores, tmp_path, "digits-fedadam", attack=None,
                           strategy={"name": "fedadam", "eta": 0.03, "beta_1": 0.9, "beta_2": 0.99, "tau": 0.001})
    states = [result["server_state_digest"] for result in results]
    assert len(set(states)) == ROUNDS, states  # each round left its own state, the audit checked each


def test_an_accuracy_floor_rejects_a_noisy_update_by_its_score_and_the_audit_rescores_it(devnet, stores,
                                                                                          tmp_path):
    # noise:10 leaves a model no better than chance (at most 0.16 of the held-out split over 60
    # seeds); honest six-epoch models score at least 0.39 from round 1 on (measured alike)
    attacker, results, loads, _ = _federate(devnet, stores, tmp_path, "digits-accuracy-floor", attack="noise:10",
                                         epochs=6, strategy={"name": "fedavg"}, update_checks={"min_accuracy": 0.25})
    for result in results:
        assert list(result["rejected"]) == [attacker], result["rejected"]
        assert "on the held-out split, below min_accuracy 0.25" in result["rejected"][attacker]
    assert loads[attacker]["rejected"] == ROUNDS


def test_qfedavg_weighs_by_the_reported_starting_loss_and_the_audit_recomputes_it(devnet, stores,
                                                                                  tmp_path):
    _, results, _, _ = _federate(devnet, stores, tmp_path, "digits-qfedavg", attack=None,
                              strategy={"name": "qfedavg", "q": 1.0, "learning_rate": 0.1})
    # the audit (in _federate) recomputed each weight F_k / sum F from the start_loss on chain and
    # each global model from the round's starting model; each participant's loss differs
    for result in results:
        assert len(set(result["aggregation_weights"].values())) == 5, result["aggregation_weights"]


def test_a_refused_deploy_fails_at_once_with_its_reason_and_stops_the_nodes(devnet, stores, tmp_path):
    import time

    import pytest

    from trustmesh.scheduling.workflow import DefinitionError

    started = time.monotonic()
    with pytest.raises(DefinitionError, match=r"tolerating f = 2 Byzantine updates takes at least 2f \+ 3 = 7 updates"):
        _federate(devnet, stores, tmp_path, "digits-refused", strategy={"name": "krum", "f": 2})  # 5 nodes
    assert time.monotonic() - started < 60  # the nodes it started were stopped: nothing waits for rounds
