"""Differential privacy on chain (fl/privacy_block.py, fl/dp_round.py): the coordinator commits
to each round's noise seed when it opens the round and reveals it once every update is fixed;
the aggregator clips, averages and adds that noise (or each participant noises its own update);
epsilon goes into every round result, a round beyond the budget is refused on chain, and the
audit recomputes the noisy model and the epsilon and names a tampered one."""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

import pytest
import torch

from helpers.family_scenario import Round, apply
from helpers.federation_run import federate
from helpers.ledger_helpers import submit_and_wait
from trustmesh import audit
from trustmesh.fl import dp_round, model_format, privacy, privacy_block
from trustmesh.fl import strategies as st
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import federation, layout, schedule

SERVER = {"mechanism": "dp-fedavg", "clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 1.0,
          "delta": 1e-5, "epsilon_budget": 8.0, "where": "server"}  # epsilon 4.73, 7.08, 9.01 after 1, 2, 3


# --------------------------------------------------------------------------- through every real part


def test_server_side_noise_spends_the_budget_and_the_workflow_ends_when_it_is_spent(devnet, stores, tmp_path):
    async def open_round_3(client, keys):
        coordinator = load_or_create_key(tmp_path / "iot-1" / "keys", "iot-1")
        [status] = await submit_and_wait(client, [make_batch(coordinator, [federation.make_open_round_transaction(
            coordinator, "digits-dp-server", 3, noise_commitment="ab" * 32)])])
        return status

    _, results, _, refused = federate(devnet, stores, tmp_path, "digits-dp-server", rounds=3, attack=None,
                                      privacy=SERVER, after=open_round_3)
    assert len(results) == 2  # the budget allows two of the three rounds
    for number, result in enumerate(results, 1):
        spent = result["privacy"]
        assert spent["epsilon"] == pytest.approx(privacy.epsilon(1.0, 1.0, number, 1e-5))
        assert spent["noise_std"] == pytest.approx(1.0 * 1.0 / 5) and spent["clipping_norm"] == 1.0
        assert set(result["aggregation_weights"].values()) == {0.2}  # the unweighted mean
    assert refused["status"] == "INVALID"
    assert "privacy budget is exhausted" in refused["invalid_transactions"][0]["message"]


def test_client_side_noise_leaves_each_participant_already_noised(devnet, stores, tmp_path):
    block = {**SERVER, "where": "client", "epsilon_budget": 100.0}
    _, results, _, _ = federate(devnet, stores, tmp_path, "digits-dp-client", rounds=2, attack=None, privacy=block)
    for result in results:
        assert "noise_std" not in result["privacy"] and set(result["aggregation_weights"].values()) == {0.2}


def test_adaptive_clipping_carries_its_norm_from_round_to_round(devnet, stores, tmp_path):
    block = {**SERVER, "clipping": "adaptive", "epsilon_budget": 100.0, "target_quantile": 0.5,
             "clipping_learning_rate": 0.2, "count_noise_std": 1.0}
    _, results, _, _ = federate(devnet, stores, tmp_path, "digits-dp-adaptive", rounds=2, attack=None, privacy=block)
    first, second = (r["privacy"] for r in results)
    assert first["clipping_norm"] == 1.0 and second["clipping_norm"] == first["next_clipping_norm"] != 1.0


# --------------------------------------------------------------------------- the rules, on a dict


@pytest.fixture(scope="module")
def private_round():
    return Round(privacy=SERVER)


def _reveal(scenario, state_name, seed, signer=None):
    state = copy.deepcopy(scenario.states[state_name])
    apply(state, signer or scenario.coordinator, layout.SCHEDULE_FAMILY,
          schedule.reveal_noise_payload(scenario.schedule_id, seed.hex()))
    return state


def test_the_coordinator_reveals_the_committed_seed_once_every_update_is_in(private_round):
    state = _reveal(private_round, "aggregated", private_round.noise_seed)
    record = schedule.decode_record(state[layout.noise_seed_address(private_round.schedule_id)])
    assert record["noise_seed"] == private_round.noise_seed.hex()
    with pytest.raises(InvalidTransaction, match="is already revealed"):
        apply(state, private_round.coordinator, layout.SCHEDULE_FAMILY,
              schedule.reveal_noise_payload(private_round.schedule_id, private_round.noise_seed.hex()))


@pytest.mark.parametrize("state_name, seed, signer, message", [
    ("scheduled", Round.noise_seed, None, "are not done yet"),           # before the updates are fixed
    ("aggregated", bytes(32), None, "does not hash to the round's noise_commitment"),
    ("aggregated", Round.noise_seed, "participant", "only the round's coordinator"),
])
def test_a_seed_revealed_early_wrong_or_by_another_is_refused(private_round, state_name, seed, signer, message):
    who = private_round.participants[1] if signer else None
    with pytest.raises(InvalidTransaction, match=message):
        _reveal(private_round, state_name, seed, who)


def test_open_round_carries_a_commitment_exactly_when_the_aggregator_adds_noise(private_round):
    state = copy.deepcopy(private_round.states["registered"])
    with pytest.raises(InvalidTransaction, match="must carry noise_commitment"):
        apply(state, private_round.coordinator, layout.FEDERATION_FAMILY,
              federation.make_open_round_payload(private_round.workflow_id, 1))
    plain = Round()
    with pytest.raises(InvalidTransaction, match="adds no server-side noise; leave noise_commitment out"):
        apply(copy.deepcopy(plain.states["registered"]), plain.coordinator, layout.FEDERATION_FAMILY,
              federation.make_open_round_payload(plain.workflow_id, 1, "ab" * 32))
    with pytest.raises(InvalidTransaction, match="has no noise commitment"):
        _reveal(plain, "aggregated", Round.noise_seed)


def test_a_workflow_whose_budget_cannot_pay_one_round_is_refused_at_deploy():
    from trustmesh.scheduling import workflow

    with pytest.raises(workflow.DefinitionError, match="one round already spends epsilon 4.729"):
        Round(privacy={**SERVER, "epsilon_budget": 4.0})
    with pytest.raises(workflow.DefinitionError, match="aggregates by its own rule"):
        definition = {**Round(privacy=SERVER).definition, "strategy": {"name": "median"}}
        workflow.validate_definition(definition)


# --------------------------------------------------------------------------- the audit


def _dp_case():
    spec = {"type": "mlp", "input_dim": 2, "hidden": [], "num_classes": 2}
    start = OrderedDict([("layers.0.weight", torch.zeros(2, 2)), ("layers.0.bias", torch.zeros(2))])
    updates = [st.ClientUpdate(n, OrderedDict([("layers.0.weight", torch.full((2, 2), 0.5 * (i + 1))),
                                               ("layers.0.bias", torch.full((2,), -1.0 * i))]), 10, {})
               for i, n in enumerate("abc")]
    seed = bytes(range(32))
    state, weights, record = dp_round.aggregate(SERVER, start, updates, workflow_id="wf", round_number=1,
                                                seed=seed, norm=1.0)
    digest = model_format.digest(model_format.serialize(state, workflow_id="wf", round=1, model_spec=spec))
    result = {"aggregation_weights": weights, "global_model_digest": digest, "privacy": record}
    return spec, start, updates, seed, result


def _audit(spec, start, updates, seed, result):
    report = audit.RoundAudit(number=1)
    audit.check_aggregation(report, updates, {"name": "fedavg"}, result, workflow_id="wf", model_spec=spec,
                            start_state=start, privacy=SERVER, noise_seed=seed, clipping_norm=1.0)
    return report


def test_the_audit_recomputes_the_noisy_model_and_names_a_tampered_epsilon_or_seed():
    spec, start, updates, seed, result = _dp_case()
    assert result["privacy"]["clipped"] == 2  # b and c moved further than 1; a exactly 1, which needs no clipping
    honest = _audit(spec, start, updates, seed, result)
    assert honest.ok, honest.problems
    tampered = _audit(spec, start, updates, seed, {**result, "privacy": {**result["privacy"], "epsilon": 1.0}})
    assert any("privacy record on chain" in p and "epsilon 1.0 on chain" in p for p in tampered.problems)
    other_seed = _audit(spec, start, updates, bytes(32), result)  # not the noise the model got
    assert any("global_model_digest" in p for p in other_seed.problems), other_seed.problems
