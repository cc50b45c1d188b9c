"""Server optimizers (fl/strategies/fedopt.py): FedAvgM, FedAdagrad, FedAdam, FedYogi.

Hand-computed values over two rounds (the state one round leaves is where the next starts),
FedAvgM's degenerate case that is FedAvg bit for bit, the stored state's format, the round
result's server_state_digest on chain, and the audit recomputing round r + 1 from round r's
stored state and naming a forged one."""

from __future__ import annotations

import copy
import hashlib
import math
from collections import OrderedDict

import pytest
import torch

from helpers.family_scenario import Round, apply
from trustmesh import audit
from trustmesh.fl import model_format, server_state
from trustmesh.fl import strategies as st
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.scheduling import layout, schedule

START = [1.0, -2.0]
ROUND_1 = [3.0, -2.0]   # every update's average moves the start by delta = [2, 0] ...
ROUND_2 = [2.0, -4.0]   # ... and then, from round 1's model, by whatever that leaves


def updates(*values: float) -> list[st.ClientUpdate]:
    """Two updates whose sample-weighted (10 and 30) average is `values`."""
    low = [v - 3.0 for v in values]
    high = [v + 1.0 for v in values]
    return [st.ClientUpdate("a", OrderedDict(w=torch.tensor(low, dtype=torch.float32)), 10, {}),
            st.ClientUpdate("b", OrderedDict(w=torch.tensor(high, dtype=torch.float32)), 30, {})]


def two_rounds(spec):
    """(global model after round 1, after round 2, state after round 2) as the compute node runs them."""
    strategy = st.strategy_from_spec(spec)
    start = OrderedDict(w=torch.tensor(START, dtype=torch.float32))
    average, weights = strategy.aggregate(updates(*ROUND_1))
    assert weights == {"a": 0.25, "b": 0.75}  # FedAvg's weights, as the round result records
    first, state = strategy.step(average, start, None)
    average, _ = strategy.aggregate(updates(*ROUND_2))
    second, state = strategy.step(average, first, state)
    return first["w"].tolist(), second["w"].tolist(), state


def by_hand(move):
    """The two rounds computed here in Python floats, one coordinate at a time: move(delta, slots)
    -> (step, slots)."""
    models, slots = [], [None, None]
    for target in (ROUND_1, ROUND_2):
        base = models[-1] if models else START
        model = []
        for k, (b, t) in enumerate(zip(base, target)):
            step, slots[k] = move(t - b, slots[k])
            model.append(float(torch.tensor(b + step, dtype=torch.float32)))  # float32 once, at the end
        models.append(model)
    return models[0], models[1]


def test_fedavgm_adds_momentum_to_the_average_move():
    def move(delta, m):
        m = 0.5 * (m or 0.0) + delta
        return 0.8 * m, m

    first, second, state = two_rounds({"name": "fedavgm", "eta": 0.8, "momentum": 0.5})
    assert (first, second) == by_hand(move)
    assert set(state) == {"m"} and state["m"]["w"].dtype == torch.float64


def test_fedavgm_with_eta_1_and_no_momentum_is_fedavg_bit_for_bit():
    fedavg, _ = st.strategy_from_spec({"name": "fedavg"}).aggregate(updates(0.1, 0.7))
    strategy = st.strategy_from_spec({"name": "fedavgm", "eta": 1.0, "momentum": 0.0})
    average, _ = strategy.aggregate(updates(0.1, 0.7))
    state, _ = strategy.step(average, OrderedDict(w=torch.tensor([0.25, -3.0])), None)
    assert torch.equal(state["w"], fedavg["w"])


@pytest.mark.parametrize("spec, second_moment", [
    ({"name": "fedadagrad", "eta": 0.1, "tau": 1e-3}, lambda v, d2: v + d2),
    ({"name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
     lambda v, d2: 0.99 * v + (1 - 0.99) * d2),
    ({"name": "fedyogi", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
     lambda v, d2: v - (1 - 0.99) * d2 * ((v > d2) - (v < d2))),
])
def test_adaptive_optimizers_scale_the_move_by_the_second_moment(spec, second_moment):
    beta_1 = spec.get("beta_1", 0.0)

    def move(delta, slots):
        m, v = slots or (0.0, 0.0)
        m = beta_1 * m + (1 - beta_1) * delta
        v = second_moment(v, delta * delta)
        return 0.1 * (m / (math.sqrt(v) + 1e-3)), (m, v)

    first, second, state = two_rounds(spec)
    assert (first, second) == pytest.approx(by_hand(move), rel=1e-6)
    assert set(state) == {"m", "v"}
    # a coordinate that never moved stays where it was: 0 / (0 + tau)
    assert first[1] == START[1]


def test_yogi_and_adam_differ_where_the_second_moment_falls():
    adam = two_rounds({"name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.5, "tau": 1e-3})[2]["v"]["w"]
    yogi = two_rounds({"name": "fedyogi", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.5, "tau": 1e-3})[2]["v"]["w"]
    assert not torch.equal(adam, yogi)


@pytest.mark.parametrize("spec, message", [
    ({"name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99}, "takes exactly the fields"),
    ({"name": "fedadam", "eta": 0, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}, "eta must be a number between"),
    ({"name": "fedavgm", "eta": 1.0, "momentum": 1.0}, "momentum must be a number between 0 and 0.999"),
    ({"name": "fedadagrad", "eta": 0.1, "tau": 0}, "tau must be a number between"),
])
def test_bad_optimizer_parameters_are_refused(spec, message):
    with pytest.raises(st.StrategyError, match=message):
        st.strategy_from_spec(spec)


def test_a_state_of_another_shape_is_refused_not_broadcast():
    strategy = st.strategy_from_spec({"name": "fedavgm", "eta": 1.0, "momentum": 0.5})
    start = OrderedDict(w=torch.tensor(START))
    with pytest.raises(st.StrategyError, match="has no float64 m of shape"):
        strategy.step(start, start, {"m": {"w": torch.zeros(3, dtype=torch.float64)}})


# --------------------------------------------------------------------------- the stored state


def test_the_stored_state_round_trips_exactly_and_is_verified():
    _, _, state = two_rounds({"name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3})
    blob = server_state.serialize(state, strategy="fedadam", workflow_id="wf", round=2)
    assert blob == server_state.serialize(copy.deepcopy(state), strategy="fedadam", workflow_id="wf", round=2)
    digest = server_state.digest(blob)
    loaded = server_state.load(blob, digest, strategy="fedadam")
    assert all(torch.equal(loaded[s]["w"], state[s]["w"]) for s in state)
    with pytest.raises(server_state.ServerStateError, match="digest mismatch"):
        server_state.load(blob + b"\0", digest, strategy="fedadam")
    # a workflow version that changed its strategy starts the new one afresh
    assert server_state.load(blob, digest, strategy="fedyogi") is None


# --------------------------------------------------------------------------- on chain


@pytest.fixture(scope="module")
def scenario():
    return Round()


def _result(scenario, **extra):
    keys = sorted(p.public_key().as_hex() for p in scenario.participants)
    return schedule.round_result_payload(scenario.schedule_id, hashlib.sha256(b"aggregate").hexdigest(), keys,
                                         dict(zip(keys, [0.5, 0.25, 0.25])), {"accuracy": 0.9, "loss": 0.3}, **extra)


def _aggregator(scenario):
    return {n.public_key().as_hex(): n for n in scenario.nodes}[scenario.assigned["aggregate"]]


def test_the_round_result_records_the_server_state_digest_and_the_lineage_carries_it(scenario):
    state = copy.deepcopy(scenario.states["aggregated"])
    kept = hashlib.sha256(b"server state").hexdigest()
    apply(state, _aggregator(scenario), layout.SCHEDULE_FAMILY, _result(scenario, server_state_digest=kept))
    result = schedule.decode_record(state[layout.round_result_address(scenario.schedule_id)])
    assert result["server_state_digest"] == kept
    # the next round starts from this round's model and the state it left
    workflow_id = scenario.definition["workflow_id"]

    async def read(address):
        return schedule.decode_record(state.get(address)) if address in state else None

    import asyncio

    start = asyncio.run(schedule.starting_model(read, workflow_id, 2))
    assert (start.digest, start.server_state_digest) == (result["global_model_digest"], kept)
    # without one the record keeps its shape (and state roots their values)
    state = copy.deepcopy(scenario.states["aggregated"])
    apply(state, _aggregator(scenario), layout.SCHEDULE_FAMILY, _result(scenario))
    assert "server_state_digest" not in schedule.decode_record(state[layout.round_result_address(scenario.schedule_id)])


@pytest.mark.parametrize("digest, message", [("ab" * 31, "server_state_digest.*sha256"),
                                             ("AB" * 32, "server_state_digest.*sha256"),
                                             (7, "'server_state_digest' must be a string")])
def test_a_server_state_digest_that_is_no_sha256_is_refused(scenario, digest, message):
    state = copy.deepcopy(scenario.states["aggregated"])
    with pytest.raises(InvalidTransaction, match=message):
        apply(state, _aggregator(scenario), layout.SCHEDULE_FAMILY, _result(scenario, server_state_digest=digest))


# --------------------------------------------------------------------------- the audit


def test_the_audit_recomputes_round_2_from_round_1s_state_and_names_a_forged_one():
    spec_model = {"type": "mlp", "input_dim": 1, "hidden": [], "num_classes": 2}
    strategy_spec = {"name": "fedadam", "eta": 0.1, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3}
    strategy = st.strategy_from_spec(strategy_spec)

    def model(*values):
        w = torch.tensor(values, dtype=torch.float32)
        return OrderedDict([("layers.0.weight", w[:2].reshape(2, 1)), ("layers.0.bias", w[2:])])

    start = model(0.5, -0.5, 0.0, 0.0)
    ups = [st.ClientUpdate("a", model(1.0, 0.0, 0.25, -0.25), 10, {}),
           st.ClientUpdate("b", model(0.0, -1.0, 0.5, 0.5), 30, {})]
    average, weights = strategy.aggregate(ups)
    first, state_1 = strategy.step(average, start, None)
    average, _ = strategy.aggregate(ups)
    second, state_2 = strategy.step(average, first, state_1)

    def blob_digest(state):
        return model_format.digest(model_format.serialize(state, workflow_id="wf", round=2, model_spec=spec_model))

    def state_digest(state):
        return server_state.digest(server_state.serialize(state, strategy="fedadam", workflow_id="wf", round=2))

    honest_result = {"aggregation_weights": weights, "global_model_digest": blob_digest(second),
                     "server_state_digest": state_digest(state_2)}

    def check(result, previous):
        report = audit.RoundAudit(number=2)
        audit.check_aggregation(report, ups, strategy_spec, result, workflow_id="wf", model_spec=spec_model,
                                start_state=first, server_state=previous)
        return report

    assert check(honest_result, state_1).ok, check(honest_result, state_1).problems
    # a result that claims another state for the next round
    forged = check({**honest_result, "server_state_digest": state_digest(state_1)}, state_1)
    assert any("server_state_digest" in p and "digest mismatch" in p for p in forged.problems), forged.problems
    # a round that did not start from round 1's state (here: a fresh one) made another model
    fresh = check(honest_result, None)
    assert any("global_model_digest" in p for p in fresh.problems), fresh.problems
    # FedAvg keeps no state: a result naming one is not FedAvg's
    plain = audit.RoundAudit(number=2)
    fedavg, _ = st.FedAvg().aggregate(ups)
    audit.check_aggregation(plain, ups, {"name": "fedavg"},
                            {"aggregation_weights": weights, "global_model_digest": blob_digest(fedavg),
                             "server_state_digest": state_digest(state_1)}, workflow_id="wf", model_spec=spec_model)
    assert any("fedavg keeps none" in p for p in plain.problems), plain.problems


# --------------------------------------------------------------------------- q-FedAvg


def _with_losses(*losses: float) -> list[st.ClientUpdate]:
    values = ([1.0, 0.0], [3.0, -2.0], [0.0, 4.0])
    return [st.ClientUpdate(n, OrderedDict(w=torch.tensor(v)), 10 * (i + 1), {"start_loss": loss})
            for i, (n, v, loss) in enumerate(zip("abc", values, losses))]


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 3.0])
def test_qfedavg_is_the_papers_update_rule(q):
    """start - sum F^q dw / sum h, with dw = L (start - w_k), h = q F^(q-1) |dw|^2 + L F^q (Li et al.
    2020, Algorithm 2), computed here directly in Python floats."""
    lr, losses, start = 0.1, (0.5, 2.0, 1.0), [0.5, 0.5]
    ups = _with_losses(*losses)
    strategy = st.strategy_from_spec({"name": "qfedavg", "q": q, "learning_rate": lr})
    average, weights = strategy.aggregate(ups)
    state, kept = strategy.step(average, OrderedDict(w=torch.tensor(start)), None, ups)
    L = 1 / lr
    F = [x + 1e-10 for x in losses]
    dw = [[L * (s - w) for s, w in zip(start, u.state["w"].tolist())] for u in ups]
    h = [q * f ** (q - 1) * L * L * sum((s - w) ** 2 for s, w in zip(start, u.state["w"].tolist())) + L * f ** q
         for f, u in zip(F, ups)]
    expected = [start[j] - sum(f ** q * d[j] for f, d in zip(F, dw)) / sum(h) for j in range(2)]
    assert state["w"].tolist() == pytest.approx(expected, rel=1e-6) and kept is None
    assert weights == pytest.approx({n: f ** q / sum(x ** q for x in F) for n, f in zip("abc", F)})
    if q == 0:  # no fairness term: the plain mean of the updates, whatever their sample counts
        assert state["w"].tolist() == pytest.approx([4 / 3, 2 / 3])


def test_qfedavg_needs_each_participants_starting_loss():
    ups = _with_losses(0.5, float("nan"), 1.0)
    with pytest.raises(st.StrategyError, match="qfedavg needs metrics\\['start_loss'\\] >= 0"):
        st.strategy_from_spec({"name": "qfedavg", "q": 1.0, "learning_rate": 0.1}).aggregate(ups)
    assert st.strategy_from_spec({"name": "qfedavg", "q": 1.0, "learning_rate": 0.1}).training_options() == {
        "start_loss": True}


def test_local_training_reports_the_starting_models_loss_when_asked():
    import json
    import pathlib

    from trustmesh.fl import datasets, training

    workflow = json.loads((pathlib.Path(__file__).resolve().parents[1] / "workflows" / "federated-digits.json").read_text())
    shard = datasets.federated_digits(workflow["data"], 10).shards[0]
    hp = {**workflow["hyperparameters"], "epochs": 1}
    plain = training.local_train(workflow["model"], hp, None, shard.x, shard.y, seed=1)
    asked = training.local_train(workflow["model"], hp, None, shard.x, shard.y, seed=1, start_loss=True)
    assert "start_loss" not in plain.metrics
    assert asked.metrics["start_loss"] > asked.metrics["loss"]  # training lowered it
    assert all(torch.equal(plain.state[k], asked.state[k]) for k in plain.state)  # and changed nothing else
