"""Byzantine-robust strategies: coordinate-wise median, trimmed mean, Krum, Multi-Krum, Bulyan.

Hand-computed values on small integer-valued updates (exact in float32), the deploy-time
refusal of configurations a rule's guarantee does not cover, the bound a robust rule keeps when
f updates are replaced by arbitrary ones, and the audit recomputing a robust aggregation from
the updates and the on-chain weights."""

from __future__ import annotations

import math
import pathlib
import re
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
    ({"name": "krum", "f": 2}, 6, "krum with f = 2 needs at least 2f + 3 = 7 updates and 6 passed the update checks"),
    ({"name": "multi_krum", "f": 1, "m": 4}, 4, "multi_krum with f = 1 needs at least max(2f + 3, m + f) = 5 "
                                                "updates and 4 passed"),
    ({"name": "bulyan", "f": 1}, 6, "bulyan with f = 1 needs at least 4f + 3 = 7 updates and 6 passed"),
])
def test_a_round_the_update_checks_left_short_keeps_its_starting_model(spec, n, message):
    """Fewer updates than the guarantee needs (the update checks rejected some): the rule does
    not run, the round's model is the one it started from, every update left weighs the same and
    the rule rejects none; one update more and the rule runs."""
    strategy = st.strategy_from_spec(spec)
    updates, start = spread(*range(n)), OrderedDict(w=torch.tensor([7.0]))
    state, weights = strategy.aggregate(updates)
    assert weights == {u.node: 1 / n for u in updates} and strategy.rejections(weights) == {}
    kept, _ = strategy.step(state, start, None, updates)
    assert kept["w"].tolist() == [7.0] and kept["w"] is not start["w"]
    assert strategy.shortfall(n).startswith(message) and strategy.shortfall(n).endswith("the round keeps the model it "
                                                                                         "started from")
    assert strategy.shortfall(n + 1) is None
    more = spread(*range(n + 1))
    state, weights = strategy.aggregate(more)
    assert strategy.step(state, start, None, more)[0]["w"].tolist() != [7.0] and strategy.rejections(weights)


@pytest.mark.parametrize("spec, n, message", [
    ({"name": "median"}, 2, "a median outvotes one arbitrary update only among at least 3 updates and 2 passed"),
    ({"name": "trimmed_mean", "beta": 0.2}, 4, "trimmed_mean with beta = 0.2 trims floor(beta x 4) = 0 values of the "
                                               "4 updates"),
])
def test_a_median_or_trimmed_mean_left_short_keeps_its_starting_model_not_a_plain_mean(spec, n, message):
    """Below what outvotes one update (the update checks rejected some), a median of two or a mean
    that trims nothing would be a plain mean: the round keeps the model it started from instead;
    one update more and the rule combines."""
    strategy = st.strategy_from_spec(spec)
    assert strategy.uses_start
    updates, start = spread(*range(n)), OrderedDict(w=torch.tensor([7.0]))
    state, _ = strategy.aggregate(updates)
    kept, _ = strategy.step(state, start, None, updates)
    assert kept["w"].tolist() == [7.0] and kept["w"] is not start["w"]
    assert strategy.shortfall(n).startswith(message)
    assert strategy.shortfall(n + 1) is None
    more = spread(*range(n + 1))
    state, _ = strategy.aggregate(more)
    assert strategy.step(state, start, None, more)[0]["w"].tolist() == state["w"].tolist() != [7.0]


def test_the_audit_redoes_a_short_round_and_names_one_that_combined_anyway():
    spec_model = {"type": "mlp", "input_dim": 1, "hidden": [], "num_classes": 2}
    state_of = lambda i: OrderedDict([("layers.0.weight", torch.tensor([[1.0 * i], [2.0]])),  # noqa: E731
                                      ("layers.0.bias", torch.tensor([0.5 * i, 1.0]))])
    updates = [st.ClientUpdate(n, state_of(i), 10, {}) for i, n in enumerate("abcd")]
    updates.append(st.ClientUpdate("e", OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in state_of(0).items()),
                                   10, {}))
    start, spec = state_of(9), {"name": "krum", "f": 1}  # 5 updates, 4 finite: short of 2f + 3 = 5

    def digest(state):
        return model_format.digest(model_format.serialize(state, workflow_id="wf", round=1, model_spec=spec_model))

    weights = {**{n: 0.25 for n in "abcd"}, "e": 0.0}
    rejected = {"e": "update check finite: holds NaN or infinite values"}
    kept = audit.RoundAudit(number=1)
    audit.check_aggregation(kept, updates, spec, {"aggregation_weights": weights, "rejected": rejected,
                                                  "global_model_digest": digest(start)},
                            workflow_id="wf", model_spec=spec_model, start_state=start)
    assert kept.ok, kept.problems
    mixed = audit.RoundAudit(number=1)  # the four averaged instead
    averaged = st.weighted_average({u.node: u.state for u in updates[:4]}, {n: 0.25 for n in "abcd"})
    audit.check_aggregation(mixed, updates, spec, {"aggregation_weights": weights, "rejected": rejected,
                                                   "global_model_digest": digest(averaged)},
                            workflow_id="wf", model_spec=spec_model, start_state=start)
    assert any("digest mismatch" in p for p in mixed.problems), mixed.problems


# --------------------------------------------------------------------------- deploy-time checks


def deploy(strategy: dict, minimum: int) -> None:
    definition = wf.load_definition(WORKFLOWS / "federated-digits.json")
    definition["federation"]["min_nodes_required"] = minimum
    definition["strategy"] = strategy
    wf.validate_definition(definition, allow_node_names=True)


@pytest.mark.parametrize("strategy, least, message", [
    ({"name": "krum", "f": 3}, 9, "definition.strategy 'krum': tolerating f = 3 Byzantine updates takes at least "
                                  "2f + 3 = 9 updates in every round, but federation.min_nodes_required is 8; raise "
                                  "it to 9 (with enough participants) or lower f"),
    ({"name": "krum", "f": 0}, 3, "at least 2f + 3 = 3 updates in every round, but federation.min_nodes_required is 2"),
    ({"name": "bulyan", "f": 1}, 7, "at least 4f + 3 = 7 updates in every round, but federation.min_nodes_required is 6"),
    ({"name": "bulyan", "f": 0}, 3, "at least 4f + 3 = 3 updates in every round, but federation.min_nodes_required is 2"),
    ({"name": "multi_krum", "f": 2, "m": 6}, 8, "at least max(2f + 3, m + f) = 8 updates in every round, but "
                                                "federation.min_nodes_required is 7; raise it to 8 (with enough "
                                                "participants) or lower f or m"),
    ({"name": "multi_krum", "f": 2, "m": 1}, 7, "at least max(2f + 3, m + f) = 7 updates"),
    ({"name": "median"}, 3, "a median outvotes one arbitrary update only among at least 3 updates in every round "
                            "(with 2 it is their mean), but federation.min_nodes_required is 2; raise it to 3"),
    ({"name": "trimmed_mean", "beta": 0.1}, 10, "beta = 0.1 trims floor(beta x 9) = 0 values in a round of "
                                                "federation.min_nodes_required = 9 updates: a plain mean; raise "
                                                "min_nodes_required to 10 or beta to 0.1112"),
    ({"name": "trimmed_mean", "beta": 0.49}, 3, "beta = 0.49 trims floor(beta x 2) = 0 values in a round of "
                                                "federation.min_nodes_required = 2 updates: a plain mean; raise "
                                                "min_nodes_required to 3"),  # no beta below 0.5 trims one of 2
])
def test_deploy_accepts_the_least_round_the_guarantee_covers_and_refuses_one_fewer(strategy, least, message):
    deploy(strategy, least)
    with pytest.raises(wf.DefinitionError, match=re.escape(message)):
        deploy(strategy, least - 1)


def test_deploy_refuses_a_trimmed_mean_that_trims_nothing_and_bad_parameters():
    with pytest.raises(wf.DefinitionError, match="beta = 0 trims nothing: it is a plain mean; choose a beta above 0, "
                                                 "or the fedavg strategy"):
        deploy({"name": "trimmed_mean", "beta": 0}, 10)
    deploy({"name": "trimmed_mean", "beta": 0.49}, 5)  # the largest beta: floor(0.49 * 5) = 2 dropped each end, 1 left
    with pytest.raises(wf.DefinitionError, match=r"definition.strategy.beta must be at most 0.49; got 0.5"):
        deploy({"name": "trimmed_mean", "beta": 0.5}, 5)  # with an even n it would drop every value
    with pytest.raises(wf.DefinitionError, match=r"definition.strategy.f must be an integer, got a number"):
        deploy({"name": "krum", "f": 1.5}, 9)


# --------------------------------------------------------------------------- edge cases


def test_trimmed_mean_at_its_largest_beta_keeps_the_middle_value():
    # n = 5: floor(0.49 * 5) = 2 dropped at each end, the median is left; n = 4: 1 each end
    assert aggregate({"name": "trimmed_mean", "beta": 0.49}, spread(9, -50, 1, 100, 3))[0] == [3.0]
    assert aggregate({"name": "trimmed_mean", "beta": 0.49}, spread(9, -50, 1, 100))[0] == [5.0]
    with pytest.raises(st.StrategyError, match="trimmed_mean beta must be a number between 0 and 0.49; got 0.5"):
        st.strategy_from_spec({"name": "trimmed_mean", "beta": 0.5})


def test_krum_and_multi_krum_with_f_0_score_by_the_n_minus_2_nearest():
    # f = 0, n = 4: scores sum the 2 nearest squared distances: a 1 + 4 = 5, b 1 + 1 = 2, c 2, d 4 + 100^2
    values, weights = aggregate({"name": "krum", "f": 0}, spread(0, 1, 2, 102))
    assert values == [1.0] and weights == {"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.0}
    values, weights = aggregate({"name": "multi_krum", "f": 0, "m": 3}, spread(0, 1, 2, 102))
    assert weights == {"a": 10 / 60, "b": 20 / 60, "c": 30 / 60, "d": 0.0}


@pytest.mark.parametrize("f", [0, 1, 2])
def test_multi_krum_with_m_1_is_krum(f):
    updates = [update(f"n{i}", *(float((i * 7919 * (k + 1)) % 23) for k in range(3)), samples=i + 1) for i in range(9)]
    krum_state, krum_weights = st.strategy_from_spec({"name": "krum", "f": f}).aggregate(updates)
    multi_state, multi_weights = st.strategy_from_spec({"name": "multi_krum", "f": f, "m": 1}).aggregate(updates)
    assert multi_weights == krum_weights and torch.equal(multi_state["w"], krum_state["w"])


# --------------------------------------------------------------------------- the robust bound
#
# What each rule guarantees when f of n updates are arbitrary (the honest ones: integers, so the
# bounds are exact up to float32 rounding of the output):
#   median          f < n/2: every coordinate within the honest values' range (at most f values
#                   lie on either side of it, so the middle order statistics are honest-bounded)
#   trimmed mean    floor(beta * n) >= f: within the honest range (each end's f extremes dropped)
#   Krum            n >= 2f + 3: an honest update's score is at most (n - f - 2) D^2, D the honest
#                   updates' largest pairwise distance (its n - f - 2 nearest honest others); the
#                   winner's score is no more, and among its n - f - 2 >= f + 1 nearest others one
#                   is honest, so the winner lies within sqrt(n - f - 2) D of an honest update
#                   (the argument of Blanchard et al. 2017, Prop. 1, for a worst case instead of
#                   a variance). It does not keep the honest range: with x = +-1 honest, an
#                   attacker (0, 0.1, 0) can win.
#   Multi-Krum      each of the m chosen (m <= n - f) has a score no above the largest honest one,
#                   so lies within sqrt(n - f - 2) D of an honest update; their average within
#                   that of the honest box in every coordinate. The chosen are those of lowest score.
#   Bulyan          n >= 4f + 3: the median of the theta = n - 2f chosen values is honest-bounded
#                   (theta >= 2f + 3 values, at most f arbitrary); the beta = theta - 2f nearest to
#                   it are no further from it than the beta-th nearest honest value, so at most the
#                   honest range's width D_k: within [lo_k - D_k, hi_k + D_k]. Not within the honest
#                   range: honest (33, 84, ...) with an attacker at 113 in one coordinate gives 93.

HONEST = 9  # updates; with f = 2 attackers, 11 = 4f + 3 (Bulyan's least)
ROBUST = [{"name": "median"}, {"name": "trimmed_mean", "beta": 0.2}, {"name": "bulyan"}, {"name": "krum"},
          {"name": "multi_krum", "m": 3}]


def krum_scores(vectors: list[list[float]], f: int) -> list[float]:
    """Krum's scores, computed here apart from the strategy's own code."""
    n = len(vectors)
    d = [[sum((a - b) ** 2 for a, b in zip(vectors[i], vectors[j])) for j in range(n)] for i in range(n)]
    return [sum(sorted(d[i][j] for j in range(n) if j != i)[:max(1, n - f - 2)]) for i in range(n)]


def distance(a, b) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


arbitrary = hs.lists(hs.one_of(hs.floats(-1e6, 1e6, allow_nan=False, width=32),  # anywhere
                               hs.floats(-1100, 1100, width=32)),               # near the honest ones
                     min_size=3, max_size=3)


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(honest=hs.lists(hs.lists(hs.integers(-1000, 1000), min_size=3, max_size=3), min_size=HONEST, max_size=HONEST),
       attackers=hs.lists(arbitrary, min_size=2, max_size=2), f=hs.sampled_from([1, 2]), rule=hs.sampled_from(ROBUST),
       mimic=hs.booleans())
def test_f_arbitrary_updates_move_a_robust_rule_no_further_than_its_bound(honest, attackers, f, rule, mimic):
    if mimic:  # an attacker a hair from an honest update in two coordinates: Krum may choose it
        attackers = [[float(honest[i][0]), float(honest[i][1]) + 0.5, a[2]] for i, a in enumerate(attackers)]
    attackers = attackers[:f]
    spec = {**rule, **({"f": f} if rule["name"] in ("krum", "multi_krum", "bulyan") else {})}
    updates = [update(f"h{i}", *map(float, v)) for i, v in enumerate(honest)]
    updates += [update(f"x{i}", *v) for i, v in enumerate(attackers)]
    values, weights = aggregate(spec, updates)
    n, columns = len(updates), list(zip(*honest))
    low, high = [min(c) for c in columns], [max(c) for c in columns]
    slack = 1e-6  # float32 rounding of the output, relative
    if rule["name"] in ("median", "trimmed_mean"):
        assert f < n / 2 and math.floor(spec.get("beta", 0.5) * n) >= f  # the guarantee's condition holds
        margin = [0.0] * 3
    elif rule["name"] == "bulyan":
        margin = [h - lo for lo, h in zip(low, high)]
    else:
        vectors = [list(map(float, v)) for v in honest] + [list(map(float, a)) for a in attackers]
        scores = krum_scores(vectors, f)
        chosen = [i for i, u in enumerate(updates) if weights[u.node] > 0]
        assert len(chosen) == spec.get("m", 1)
        assert max(scores[i] for i in chosen) <= min(scores[i] for i in range(n) if i not in chosen) * (1 + 1e-12)
        reach = math.sqrt(n - f - 2) * max(distance(a, b) for a in honest for b in honest)
        if rule["name"] == "krum":
            assert min(distance(values, h) for h in honest) <= reach * (1 + slack) + slack, (values, reach)
        margin = [reach] * 3
    for k, value in enumerate(values):
        assert low[k] - margin[k] - slack * (1 + abs(value)) <= value <= high[k] + margin[k] + slack * (1 + abs(value)), \
            (spec, k, value, low[k], high[k], margin[k])


def test_krum_does_not_keep_the_honest_range():
    """Why the bound above is a distance, not the honest range: honest (+-1, 0, 0) and (0, +-1, 0),
    each 1.01 from the attacker (0, 0, 0.1) and at least 2 from the others: the attacker wins."""
    updates = [update(f"h{i}", *v) for i, v in enumerate([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0)])]
    updates.append(update("x", 0, 0, 0.1))
    values, weights = aggregate({"name": "krum", "f": 1}, updates)
    assert weights["x"] == 1.0 and values[2] == pytest.approx(0.1)  # outside the honest [0, 0] in coordinate 2


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
                                       workflow_id="wf", model_spec=spec_model, start_state=updates[0].state) == digest
        assert honest.ok, (spec, honest.problems)
        if spec["name"] == "krum":  # the attacker's update given the weight instead
            forged = audit.RoundAudit(number=1)
            audit.check_aggregation(forged, updates, spec, {"aggregation_weights": {**{n: 0.0 for n in weights}, "e": 1.0},
                                                            "global_model_digest": digest},
                                    workflow_id="wf", model_spec=spec_model, start_state=updates[0].state)
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


def test_fedprox_adds_mu_times_the_drift_to_the_gradient_by_hand():
    """One sample x = 1 of class 0, a linear model from zero weights, SGD lr 0.1, two steps.
    Step 1 starts at the global model (no drift): w1 = -lr * g(0) = +-0.05 (softmax (1/2, 1/2)).
    Step 2: logits (0.1, -0.1), p0 = 1 / (1 + e^-0.2), cross-entropy gradient (p0 - 1, 1 - p0)
    for weight and bias alike, and FedProx adds mu * (w1 - w_start) = mu * (+-0.05)."""
    from trustmesh.fl import training

    spec = {"type": "mlp", "input_dim": 1, "hidden": [], "num_classes": 2}
    hp = {"epochs": 2, "batch_size": 1, "learning_rate": 0.1, "optimizer": "sgd", "seed": 1}
    start = OrderedDict([("layers.0.weight", torch.zeros(2, 1)), ("layers.0.bias", torch.zeros(2))])
    x, y = torch.ones(1, 1).numpy(), torch.zeros(1, dtype=torch.int64).numpy()
    p0 = 1 / (1 + math.exp(-0.2))
    for mu in (0.0, 2.0):
        options = st.strategy_from_spec({"name": "fedprox", "mu": mu}).training_options()
        state = training.local_train(spec, hp, start, x, y, seed=1, **options).state
        first = 0.05 - 0.1 * ((p0 - 1) + mu * 0.05)  # class 0's weight and bias after step 2
        expected = [first, -first]
        assert state["layers.0.weight"].flatten().tolist() == pytest.approx(expected, rel=1e-6), mu
        assert state["layers.0.bias"].tolist() == pytest.approx(expected, rel=1e-6), mu


def test_bulyan_keeps_its_bound_but_not_the_honest_range():
    """Found by search (6 honest, f = 1): the attacker copies an honest update but for 113 in the
    second coordinate; Bulyan gives 93 there, above the honest 84, within 84 + the range's width."""
    honest = [(33, -85, -10), (40, 5, 37), (-49, 82, 37), (8, 69, -83), (82, -32, 90), (56, 84, 92)]
    updates = [update(f"h{i}", *v) for i, v in enumerate(honest)] + [update("x", 33, 112.97014651673231, -10)]
    values, weights = aggregate({"name": "bulyan", "f": 1}, updates)
    assert weights["x"] > 0 and 84 < values[1] <= 84 + (84 - -85), values
