"""Update checks (fl/screening.py) and the round result's `rejected` map they fill (schedule family)."""

from __future__ import annotations

import copy
import hashlib
import pathlib
from collections import OrderedDict

import pytest
import torch

from helpers.family_scenario import Round, apply
from trustmesh.fl import screening
from trustmesh.fl.strategies import ClientUpdate
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.scheduling import layout, schedule

NAN = "update check finite: holds NaN or infinite values"  # how screening names a non-finite update


def update(node, *values):
    return ClientUpdate(node, OrderedDict(w=torch.tensor(values, dtype=torch.float32)), 10, {})


def test_non_finite_updates_are_always_rejected_and_the_rest_kept_in_order():
    kept, rejected = screening.screen([update("a", 1, 2), update("b", float("nan"), 0), update("c", 3, float("inf"))],
                                      None)
    assert [u.node for u in kept] == ["a"]
    assert rejected == {"b": NAN, "c": NAN}


def test_the_norm_bound_is_relative_to_the_starting_model():
    start = OrderedDict(w=torch.tensor([3.0, 4.0]))  # norm 5
    updates = [update("a", 3, 9), update("b", 3, 9.5)]   # moved 5 and 5.5
    kept, rejected = screening.screen(updates, {"max_norm_ratio": 1.0}, start)
    assert [u.node for u in kept] == ["a"]
    assert rejected == {"b": "update check max_norm_ratio: moved 5.5 from the global model, more than max_norm_ratio 1 "
                             "x its norm (5)"}
    with pytest.raises(ValueError, match="needs the global model the round started from"):
        screening.screen(updates, {"max_norm_ratio": 1.0})


# --------------------------------------------------------------------------- on chain


@pytest.fixture(scope="module")
def scenario():
    return Round()


def result_payload(scenario, weights, rejected):
    keys = sorted(p.public_key().as_hex() for p in scenario.participants)
    return keys, schedule.round_result_payload(
        scenario.schedule_id, hashlib.sha256(b"aggregate").hexdigest(), keys,
        dict(zip(keys, weights)), {"accuracy": 0.9, "loss": 0.3}, rejected=rejected(keys) if rejected else None)


def aggregator(scenario):
    by_key = {n.public_key().as_hex(): n for n in scenario.nodes}
    return by_key[scenario.assigned["aggregate"]]


def test_a_round_result_names_its_rejected_updates_with_weight_zero(scenario):
    state = copy.deepcopy(scenario.states["aggregated"])
    keys, payload = result_payload(scenario, [0.5, 0.5, 0.0], lambda k: {k[2]: NAN})
    apply(state, aggregator(scenario), layout.SCHEDULE_FAMILY, payload)
    result = schedule.decode_record(state[layout.round_result_address(scenario.schedule_id)])
    assert result["rejected"] == {keys[2]: NAN}
    # the rejected node's reputation counts it; the others' load records are not touched
    assert schedule.decode_record(state[layout.node_load_address(keys[2])]) == {
        **schedule.empty_load(keys[2]), "rejected": 1}
    assert layout.node_load_address(keys[0]) not in state
    # an honest update a robust rule merely did not choose is named, and counts nothing against its node
    state = copy.deepcopy(scenario.states["aggregated"])
    chose = "krum (f = 1) did not choose it: another update had a lower Krum score"
    apply(state, aggregator(scenario), layout.SCHEDULE_FAMILY,
          result_payload(scenario, [0.5, 0.5, 0.0], lambda k: {k[2]: chose})[1])
    assert schedule.decode_record(state[layout.round_result_address(scenario.schedule_id)])["rejected"] == {keys[2]: chose}
    assert layout.node_load_address(keys[2]) not in state
    # without rejections the record keeps its shape (and state roots their values)
    state = copy.deepcopy(scenario.states["aggregated"])
    apply(state, aggregator(scenario), layout.SCHEDULE_FAMILY, result_payload(scenario, [0.5, 0.5, 0.0], None)[1])
    assert "rejected" not in schedule.decode_record(state[layout.round_result_address(scenario.schedule_id)])
    assert layout.node_load_address(keys[2]) not in state


@pytest.mark.parametrize("weights, rejected, message", [
    ([0.5, 0.5, 0.0], lambda k: {"02" + "0" * 64: "x"}, "which is not a participant"),
    ([0.5, 0.25, 0.25], lambda k: {k[2]: "x"}, "is rejected but has aggregation weight 0.25"),
    ([0.5, 0.5, 0.0], lambda k: {k[2]: " "}, "must be a non-empty text of at most 200 characters"),
    ([0.5, 0.5, 0.0], lambda k: {k[2]: "x" * 201}, "must be a non-empty text of at most 200 characters"),
    # weights summing to 0: only when every participant is rejected
    ([0.0, 0.0, 0.0], lambda k: {k[0]: NAN, k[1]: NAN}, r"sum to 0\.0; they must sum to 1"),
    ([0.0, 0.0, 0.0], None, r"sum to 0\.0; they must sum to 1"),
])
def test_a_rejected_map_that_does_not_fit_is_refused(scenario, weights, rejected, message):
    state = copy.deepcopy(scenario.states["aggregated"])
    with pytest.raises(InvalidTransaction, match=message):
        apply(state, aggregator(scenario), layout.SCHEDULE_FAMILY, result_payload(scenario, weights, rejected)[1])


def test_a_round_whose_updates_all_failed_the_checks_records_weights_all_zero(scenario):
    state = copy.deepcopy(scenario.states["aggregated"])
    keys, payload = result_payload(scenario, [0.0, 0.0, 0.0], lambda k: {n: NAN for n in k})
    apply(state, aggregator(scenario), layout.SCHEDULE_FAMILY, payload)
    result = schedule.decode_record(state[layout.round_result_address(scenario.schedule_id)])
    assert result["aggregation_weights"] == {k: 0.0 for k in keys} and result["rejected"] == {k: NAN for k in keys}
    for node in keys:  # each counted in its node's reputation
        assert schedule.decode_record(state[layout.node_load_address(node)])["rejected"] == 1


def test_the_audit_redoes_the_checks_and_names_a_rejection_that_did_not_happen():
    from trustmesh import audit
    from trustmesh.fl import model_format, strategies

    spec = {"type": "mlp", "input_dim": 2, "hidden": [], "num_classes": 2}

    def state(scale):
        return OrderedDict([("layers.0.weight", torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * scale),
                            ("layers.0.bias", torch.tensor([0.5, -0.5]) * scale)])

    updates = [ClientUpdate(n, state(s), 10, {}) for n, s in (("a", 1.0), ("b", 1.1), ("c", float("nan")))]
    kept, rejected = screening.screen(updates, None)
    global_state, weights = strategies.FedAvg().aggregate(kept)
    digest = model_format.digest(model_format.serialize(global_state, workflow_id="wf", round=1, model_spec=spec))
    honest = {"aggregation_weights": {**weights, "c": 0.0}, "global_model_digest": digest, "rejected": rejected}
    checked = audit.RoundAudit(number=1)
    assert audit.check_aggregation(checked, updates, {"name": "fedavg"}, honest, workflow_id="wf",
                                   model_spec=spec) == digest and checked.ok, checked.problems
    # a result that rejected b (and so weighed a alone) did not follow the checks
    forged = audit.RoundAudit(number=1)
    audit.check_aggregation(forged, updates, {"name": "fedavg"},
                            {**honest, "aggregation_weights": {"a": 1.0, "b": 0.0, "c": 0.0},
                             "rejected": {**rejected, "b": NAN}},
                            workflow_id="wf", model_spec=spec)
    assert any("are not the ones the update checks and fedavg reject" in p for p in forged.problems), forged.problems


_SPEC = {"type": "mlp", "input_dim": 2, "hidden": [], "num_classes": 2}


def _state(scale):
    return OrderedDict([("layers.0.weight", torch.tensor([[1.0, 2.0], [3.0, 4.0]]) * scale),
                        ("layers.0.bias", torch.tensor([0.5, -0.5]) * scale)])


def _kept_start(start, updates, checks, *, block=None, norm=None, carried=None, strategy="fedavg"):
    """What compute-node/tasks.py `_aggregate` records for a round whose updates all fail `checks`."""
    from trustmesh.fl import dp_round, model_format, server_state

    kept, rejected = screening.screen(updates, checks, start)
    assert kept == []
    digest = model_format.digest(model_format.serialize(start, workflow_id="wf", round=2, model_spec=_SPEC))
    result = {"aggregation_weights": {n: 0.0 for n in rejected}, "global_model_digest": digest, "rejected": rejected,
              "server_state_digest": None if carried is None else server_state.digest(
                  server_state.serialize(carried, strategy=strategy, workflow_id="wf", round=2))}
    if block is not None:
        result["privacy"] = dp_round.kept_start_record(block, 2, norm, planned=2, earlier={1: 1.0})
    return result


@pytest.mark.parametrize("strategy, private", [("fedavg", False), ("fedadam", False), ("fedavg", True)])
def test_a_round_whose_updates_all_fail_the_checks_keeps_its_starting_model_and_the_audit_agrees(strategy, private):
    from trustmesh import audit
    from trustmesh.fl import privacy_block

    block = {"mechanism": "dp-fedavg", "clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 1.0,
             "delta": 1e-5, "epsilon_budget": 8.0, "where": "server"} if private else None
    start, checks = _state(1.0), {"max_norm_ratio": 0.01}  # both updates moved 10% and 20% of its norm
    updates = [ClientUpdate(n, _state(s), 10, {}) for n, s in (("a", 1.1), ("b", 1.2))]
    spec = {"name": "fedavg"} if strategy == "fedavg" else {"name": "fedadam", "eta": 0.03, "beta_1": 0.9,
                                                           "beta_2": 0.99, "tau": 0.001}
    carried = None if strategy == "fedavg" else {
        slot: OrderedDict((name, torch.full_like(t, 0.5, dtype=torch.float64)) for name, t in start.items())
        for slot in ("m", "v")}
    result = _kept_start(start, updates, checks, block=block, norm=1.0, carried=carried, strategy=strategy)
    assert set(result["rejected"]) == {"a", "b"} and all("max_norm_ratio" in w for w in result["rejected"].values())
    if private:  # no noise, accounted as a planned round at the block's multiplier
        assert "noise_std" not in result["privacy"] and result["privacy"]["noise_multiplier"] == 1.0
        assert result["privacy"]["epsilon"] == privacy_block.epsilon_after(block, 2, {1: 1.0})
    dp = dict(privacy=block, noise_seed=b"\0" * 32, clipping_norm=1.0, planned=2, earlier={1: 1.0}) if private else {}

    def audited(claimed):
        checked = audit.RoundAudit(number=2)
        audit.check_aggregation(checked, updates, spec, claimed, workflow_id="wf", model_spec=_SPEC,
                                update_checks=checks, start_state=start, server_state=carried, **dp)
        return checked

    checked = audited(result)
    assert checked.ok and checked.recomputed_global_model == result["global_model_digest"], checked.problems
    # a global model other than the starting one (here: the rejected updates averaged) is caught
    from trustmesh.fl import model_format, strategies

    averaged, _ = strategies.FedAvg().aggregate(updates)
    forged = audited({**result, "global_model_digest": model_format.digest(
        model_format.serialize(averaged, workflow_id="wf", round=2, model_spec=_SPEC))})
    assert any("digest mismatch" in p for p in forged.problems), forged.problems
    if carried is not None:  # a server state not carried over unchanged is caught too
        moved = audited({**result, "server_state_digest": "ab" * 32})
        assert any("server state the round started with" in p for p in moved.problems), moved.problems


# --------------------------------------------------------------------------- accuracy floor


def _digits_workflow():
    from trustmesh.scheduling import workflow

    return workflow.load_definition(pathlib.Path(__file__).resolve().parents[1] / "workflows" / "federated-digits.json")


def _trained_and_noisy():
    """A model trained one epoch on a shard, and the same with noise:10 (fl/attacks.py) on it."""
    from trustmesh.fl import attacks, datasets, training

    definition = _digits_workflow()
    shard = datasets.federated_digits(definition["data"], 5).shards[0]
    hp = {**definition["hyperparameters"], "epochs": 1}
    trained = training.local_train(definition["model"], hp, None, shard.x, shard.y, seed=0).state
    start = training.initial_state(definition["model"], hp["seed"])
    return definition, trained, attacks.parse_attack("noise:10").poison_update(start, trained, 1)


def test_exact_predictions_agree_with_the_model_and_ignore_the_thread_count():
    from trustmesh.fl import datasets, models

    definition, trained, _ = _trained_and_noisy()
    test = datasets.held_out(definition["data"])
    model = models.build_model(definition["model"], seed=0)
    model.load_state_dict(trained)
    with torch.no_grad():
        torch_says = model(torch.as_tensor(test.x)).argmax(dim=1)
    exact = models.exact_predictions(definition["model"], trained, test.x)
    assert (exact != torch_says).sum() <= 1  # float64 in a fixed order vs float32 BLAS: at most a near-tie apart
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(models.exact_predictions(definition["model"], trained, test.x), exact)
    finally:
        torch.set_num_threads(threads)


def test_an_update_below_the_accuracy_floor_is_rejected_with_its_score():
    definition, trained, noisy = _trained_and_noisy()
    accuracy = screening.held_out_accuracy(definition)
    assert accuracy(trained) > 0.25 and accuracy(noisy) < 0.1, (accuracy(trained), accuracy(noisy))
    updates = [ClientUpdate("a", trained, 10, {}), ClientUpdate("b", noisy, 10, {})]
    kept, rejected = screening.screen(updates, {"min_accuracy": 0.2}, accuracy=accuracy)
    assert [u.node for u in kept] == ["a"]
    assert rejected == {"b": f"update check min_accuracy: scored accuracy {accuracy(noisy):.4f} on the held-out split, "
                        f"below min_accuracy 0.2"}
    with pytest.raises(ValueError, match="min_accuracy needs the held-out split"):
        screening.screen(updates, {"min_accuracy": 0.2})
    # and the audit, scoring the same updates itself, agrees or names the difference
    from trustmesh import audit
    from trustmesh.fl import model_format, strategies

    global_state, weights = strategies.FedAvg().aggregate(kept)
    digest = model_format.digest(model_format.serialize(global_state, workflow_id="wf", round=1,
                                                        model_spec=definition["model"]))
    honest = {"aggregation_weights": {**weights, "b": 0.0}, "global_model_digest": digest, "rejected": rejected}
    for claimed, ok in ((honest, True), ({**honest, "rejected": {"b": "moved too far"}}, False)):
        checked = audit.RoundAudit(number=1)
        audit.check_aggregation(checked, updates, {"name": "fedavg"}, claimed, workflow_id="wf",
                                model_spec=definition["model"], update_checks={"min_accuracy": 0.2},
                                data_spec=definition["data"])
        assert checked.ok is ok, checked.problems


@pytest.mark.parametrize("checks, data, message", [
    ({"min_accuracy": 1.5}, None, "min_accuracy must be at most 1; got 1.5"),
    ({"min_accuracy": 0.3}, {"dataset": "npz", "test_fraction": 0.2}, "only data.dataset 'digits' has"),
    ({"max_norm_ratio": 0}, None, "max_norm_ratio must be at least 1e-06; got 0"),
])
def test_update_checks_that_cannot_work_are_refused_at_deploy(checks, data, message):
    from trustmesh.scheduling import workflow

    definition = {**_digits_workflow(), "update_checks": checks}
    if data is not None:
        definition["data"] = data
    with pytest.raises(workflow.DefinitionError, match=message):
        workflow.validate_definition(definition, allow_node_names=True)
    workflow.validate_definition({**_digits_workflow(), "update_checks": {"min_accuracy": 0.3}}, allow_node_names=True)
