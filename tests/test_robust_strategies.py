"""Byzantine-robust strategies: coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan.

Hand-computed values on small integer-valued updates (exact in float32), the deploy-time
refusal of configurations a rule's guarantee does not cover, the bound a robust rule keeps when
f updates are replaced by arbitrary ones, and the audit recomputing a robust aggregation from
the updates and the on-chain weights."""

from __future__ import annotations

import pathlib
from collections import OrderedDict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from trustmesh import audit
from trustmesh.fl import model_format
from trustmesh.fl import strategies as st
from trustmesh.scheduling import workflow as wf

torch.set_num_threads(1)
WORKFLOWS = pathlib.Path(__file__).resolve().parents[1] / "workflows"


def update(node: str, *values: float, samples: int = 10) -> st.ClientUpdate:
    return st.ClientUpdate(node, OrderedDict(w=torch.tensor(values, dtype=torch.float32)), samples, {"accuracy": 0.5})


def spread(*values: float) -> list[st.ClientUpdate]:
    """Updates a, b, c, ... holding one value each."""
    return [update(chr(ord("a") + i), v, samples=10 * (i + 1)) for i, v in enumerate(values)]


def aggregate(spec, updates):
    state, weights = st.strategy_from_spec(spec).aggregate(updates)
    return state["w"].tolist(), weights


# --------------------------------------------------------------------------- hand-computed values


def test_median_is_coordinate_wise_and_ignores_sample_counts():
    values, weights = aggregate({"name": "median"}, [update("a", 1, 2, 3, samples=1), update("b", 2, 9, 4, samples=1000),
                                                      update("c", 100, -50, 5, samples=1)])
    assert values == [2.0, 2.0, 4.0]
    assert weights == {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}
    assert aggregate({"name": "median"}, spread(1, 2, 3, 100))[0] == [2.5]  # even n: the two middle ones' mean


def test_trimmed_mean_drops_beta_of_each_end_per_coordinate():
    assert aggregate({"name": "trimmed_mean", "beta": 0.25}, spread(1, 2, 3, 100))[0] == [2.5]
    assert aggregate({"name": "trimmed_mean", "beta": 0.0}, spread(1, 2, 3, 100))[0] == [26.5]  # the plain mean
    # each coordinate trims its own extremes: here a's first value and b's second
    values, _ = aggregate({"name": "trimmed_mean", "beta": 0.2},
                          [update("a", -90, 1), update("b", 1, 90), update("c", 2, 2), update("d", 3, 3), update("e", 4, 4)])
    assert values == [2.0, 3.0]


def test_krum_keeps_the_update_closest_to_its_neighbours():
    # f = 1, n = 5: scores sum the n - f - 2 = 2 smallest squared distances: a 5, b 2, c 2, d 5, e huge
    values, weights = aggregate({"name": "krum", "f": 1}, spread(0, 1, 2, 3, 100))
    assert values == [1.0]  # b and c tie; the smaller node key wins
    assert weights == {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0, "e": 0.0}
    assert st.strategy_from_spec({"name": "krum", "f": 1}).rejections(weights) == {
        n: "krum (f = 1) did not choose it: another update had a lower Krum score" for n in "acde"}
    assert st.strategy_from_spec({"name": "median"}).rejections(weights) == {}  # it leaves nobody out


def test_multi_krum_averages_the_m_best_by_samples():
    values, weights = aggregate({"name": "multi_krum", "f": 1, "m": 3}, spread(0, 1, 2, 3, 100))
    # b (2), c (2), then a and d tie at 5: a; samples 10, 20, 30
    assert weights == {"a": 10 / 60, "b": 20 / 60, "c": 30 / 60, "d": 0.0, "e": 0.0}
    assert values == pytest.approx([(0 * 10 + 1 * 20 + 2 * 30) / 60])


def test_bulyan_chooses_by_krum_then_averages_the_values_nearest_the_median():
    # f = 1, n = 7: Krum picks c, d, b, e, a in turn (theta = 5); f and g are rejected. Per
    # coordinate the beta = 3 chosen values nearest their median (2) are 2, 1, 3: mean 2.
    values, weights = aggregate({"name": "bulyan", "f": 1}, spread(0, 1, 2, 3, 4, 5, 100))
    assert weights == {**{n: 0.2 for n in "abcde"}, "f": 0.0, "g": 0.0}
    assert values == [2.0]


@pytest.mark.parametrize("spec, n, message", [
    ({"name": "krum", "f": 2}, 6, "krum with f = 2 needs at least 2f + 3 = 7 updates; this round has 6"),
    ({"name": "multi_krum", "f": 1, "m": 4}, 5, "needs at least max(2f + 3, m + f) = 5"),
    ({"name": "bulyan", "f": 1}, 6, "bulyan with f = 1 needs at least 4f + 3 = 7 updates; this round has 6"),
])
def test_a_round_with_too_few_updates_for_the_guarantee_is_refused(spec, n, message):
    updates = spread(*range(n))
    if n >= 5 and spec["name"] == "multi_krum":
        assert aggregate(spec, updates)  # 5 suffice for f = 1, m = 4
        updates = updates[:4]
        message = "needs at least max(2f + 3, m + f) = 5 updates; this round has 4"
    with pytest.raises(st.StrategyError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        aggregate(spec, updates)


# --------------------------------------------------------------------------- deploy-time checks


@pytest.mark.parametrize("strategy, minimum, message", [
    ({"name": "krum", "f": 3}, 7, "definition.strategy 'krum': tolerating f = 3 Byzantine updates takes at least "
                                  "2f + 3 = 9 updates in every round, but federation.min_nodes_required is 7"),
    ({"name": "bulyan", "f": 1}, 6, "at least 4f + 3 = 7 updates in every round, but federation.min_nodes_required is 6"),
    ({"name": "multi_krum", "f": 2, "m": 6}, 8, "m must be at most min_nodes_required - f = 6"),
])
def test_deploy_refuses_what_the_guarantee_does_not_cover(strategy, minimum, message):
    definition = wf.load_definition(WORKFLOWS / "federated-digits.json")
    definition["federation"]["min_nodes_required"] = minimum
    definition["strategy"] = strategy
    if strategy["name"] == "multi_krum":
        wf.validate_definition(definition, allow_node_names=True)  # m = 6 <= 8 - 2: fine
        definition["strategy"] = {**strategy, "m": 7}
        message = "m must be at most min_nodes_required - f = 6"
    with pytest.raises(wf.DefinitionError, match=message.replace("+", r"\+")):
        wf.validate_definition(definition, allow_node_names=True)
    definition["strategy"] = {"name": strategy["name"], "f": 1.5, **({"m": 1} if "m" in strategy else {})}
    with pytest.raises(wf.DefinitionError, match=r"definition.strategy.f must be an integer, got a number"):
        wf.validate_definition(definition, allow_node_names=True)


# --------------------------------------------------------------------------- the robust bound


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(honest=hs.lists(hs.lists(hs.integers(-1000, 1000), min_size=3, max_size=3), min_size=7, max_size=7),
       attackers=hs.lists(hs.lists(hs.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=3, max_size=3),
                          min_size=1, max_size=1),
       spec=hs.sampled_from([{"name": "median"}, {"name": "trimmed_mean", "beta": 0.2}, {"name": "bulyan", "f": 1},
                             {"name": "krum", "f": 1}, {"name": "multi_krum", "f": 1, "m": 3}]))
def test_one_arbitrary_update_cannot_move_a_coordinate_outside_the_honest_range(honest, attackers, spec):
    updates = [update(f"h{i}", *map(float, v)) for i, v in enumerate(honest)]
    updates += [update(f"x{i}", *v) for i, v in enumerate(attackers)]
    values, weights = aggregate(spec, updates)
    for k, value in enumerate(values):
        column = [v[k] for v in honest]
        assert min(column) <= value <= max(column), (spec, k, value)


# --------------------------------------------------------------------------- the audit


def test_the_audit_recomputes_a_robust_aggregation_and_names_forged_weights():
    spec_model = {"type": "mlp", "input_dim": 2, "hidden": [], "num_classes": 2}
    updates = [st.ClientUpdate(n, OrderedDict(
        [("layers.0.weight", torch.tensor([[1.0 + i, 2.0], [3.0, -i * 1.0]])), ("layers.0.bias", torch.tensor([0.5 * i, 1.0]))]),
        10, {"accuracy": 0.5}) for i, n in enumerate("abcde")]
    updates[4] = st.ClientUpdate("e", OrderedDict([(k, v * 1000) for k, v in updates[4].state.items()]), 10, {})
    for spec in ({"name": "median"}, {"name": "krum", "f": 1}, {"name": "bulyan", "f": 0}):
        strategy = st.strategy_from_spec(spec)
        state, weights = strategy.aggregate(updates)
        digest = model_format.digest(model_format.serialize(state, workflow_id="wf", round=1, model_spec=spec_model))
        honest = audit.RoundAudit(number=1)
        assert audit.check_aggregation(honest, updates, spec, {"aggregation_weights": weights,
                                                               "rejected": strategy.rejections(weights),
                                                               "global_model_digest": digest},
                                       workflow_id="wf", model_spec=spec_model) == digest
        assert honest.ok, (spec, honest.problems)
        if spec["name"] == "krum":  # the attacker's update given the weight instead
            forged = audit.RoundAudit(number=1)
            audit.check_aggregation(forged, updates, spec, {"aggregation_weights": {**{n: 0.0 for n in weights}, "e": 1.0},
                                                            "global_model_digest": digest},
                                    workflow_id="wf", model_spec=spec_model)
            assert any("aggregation weights on chain are not krum's" in p for p in forged.problems), forged.problems
            assert any("digest mismatch" in p for p in forged.problems), forged.problems


# --------------------------------------------------------------------------- FedProx


def test_fedprox_keeps_local_models_near_the_global_one_and_mu_0_is_fedavg():
    import json

    from trustmesh.fl import datasets, screening, training

    workflow = json.loads((WORKFLOWS / "federated-digits.json").read_text())
    spec, hp = workflow["model"], {**workflow["hyperparameters"], "epochs": 2}
    shard = datasets.federated_digits(workflow["data"], 10).shards[0]
    start = training.initial_state(spec, hp["seed"])

    def moved(strategy):
        options = st.strategy_from_spec(strategy).training_options()
        state = training.local_train(spec, hp, start, shard.x, shard.y, seed=3, **options).state
        return state, screening.squared_norm(screening.flat(state) - screening.flat(start)) ** 0.5

    plain, plain_moved = moved({"name": "fedavg"})
    same, _ = moved({"name": "fedprox", "mu": 0})
    assert all(torch.equal(plain[k], same[k]) for k in plain)  # mu = 0: FedAvg's training, bit for bit
    _, prox_moved = moved({"name": "fedprox", "mu": 1.0})
    assert prox_moved < 0.9 * plain_moved, (prox_moved, plain_moved)
    values, weights = aggregate({"name": "fedprox", "mu": 0.1}, spread(1, 3))  # FedAvg's weights
    assert weights == {"a": 10 / 30, "b": 20 / 30}
