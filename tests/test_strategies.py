"""Aggregation strategies: FedAvg, PerfFedAvg, and bit-for-bit reproducible averaging."""

import pathlib
import random
from collections import OrderedDict

import numpy as np
import pytest
import torch

from trustmesh.fl import model_format as mf
from trustmesh.fl import strategies as st
from trustmesh.fl.models import build_model, state_of

torch.set_num_threads(1)

SPEC = {"type": "mlp", "input_dim": 8, "hidden": [5], "num_classes": 3}


def update(node, samples, accuracy=0.5, seed=None, **tensors):
    state = OrderedDict((k, torch.tensor(v, dtype=torch.float32)) for k, v in tensors.items()) \
        if seed is None else state_of(build_model(SPEC, seed=seed))
    return st.ClientUpdate(node, state, samples, {"accuracy": accuracy})


def model_updates():
    accs = [0.91, 0.35, 0.77, 0.6, 0.12]
    return [update(f"node-{i}", samples=10 + 37 * i, accuracy=accs[i], seed=i) for i in range(5)]


def same_state(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_is_the_sample_weighted_mean_of_hand_made_tensors():
    updates = [update("b", 3, w=[3.0, 6.0], b=[1.0]), update("a", 1, w=[1.0, 2.0], b=[-3.0])]
    state, weights = st.FedAvg().aggregate(updates)
    assert weights == {"a": 0.25, "b": 0.75} and list(weights) == ["a", "b"]
    assert list(state) == ["w", "b"]
    assert state["w"].tolist() == [2.5, 5.0] and state["b"].tolist() == [0.0]
    assert state["w"].dtype == torch.float32


def test_fedavg_matches_a_float64_reference_bit_for_bit():
    updates = model_updates()
    state, weights = st.FedAvg().aggregate(updates)
    total = sum(u.samples for u in updates)
    assert weights == {u.node: u.samples / total for u in updates}
    for name in state:
        acc = np.zeros(tuple(state[name].shape), dtype=np.float64)
        for u in sorted(updates, key=lambda u: u.node):
            acc = acc + (u.samples / total) * u.state[name].numpy().astype(np.float64)
        assert np.array_equal(state[name].numpy(), acc.astype(np.float32)), name


def test_arrival_order_does_not_change_a_bit():
    updates = model_updates()
    state, weights = st.FedAvg().aggregate(updates)
    shuffled = list(updates)
    random.Random(3).shuffle(shuffled)
    again, weights_again = st.FedAvg().aggregate(shuffled)
    assert weights == weights_again and list(weights) == sorted(weights)
    blob = lambda s: mf.serialize(s, workflow_id="wf", round=1, model_spec=SPEC)  # noqa: E731
    assert blob(state) == blob(again)
    # Floating-point sums depend on order: a + b + c = 1/3 here, c + a + b = 0. Sorted node
    # order is what makes every aggregator and auditor get 1/3.
    a, b, c = update("a", 1, w=[1e30]), update("b", 1, w=[-1e30]), update("c", 1, w=[1.0])
    for order in ([a, b, c], [c, a, b], [b, c, a]):
        state, _ = st.FedAvg().aggregate(order)
        assert state["w"].item() == np.float32(1 / 3)
        assert st.weighted_average({u.node: u.state for u in order}, {"c": 1 / 3, "a": 1 / 3, "b": 1 / 3}) \
            ["w"].item() == np.float32(1 / 3)


def test_auditor_recomputes_the_aggregate_from_stored_blobs():
    updates = model_updates()
    state, weights = st.PerfFedAvg(0.3).aggregate(updates)
    stored = {u.node: mf.serialize(u.state, workflow_id="wf", round=2, model_spec=SPEC) for u in updates}
    on_chain = {"weights": dict(weights),
                "global": mf.digest(mf.serialize(state, workflow_id="wf", round=2, model_spec=SPEC)),
                "updates": {n: mf.digest(b) for n, b in stored.items()}}
    # the auditor: verified loads of every update, the chain's weights, one call
    states = {n: mf.load(b, on_chain["updates"][n], SPEC).state for n, b in stored.items()}
    recomputed = st.weighted_average(states, on_chain["weights"])
    blob = mf.serialize(recomputed, workflow_id="wf", round=2, model_spec=SPEC)
    assert mf.digest(blob) == on_chain["global"]
    # and the weights themselves from the stored samples and accuracies
    assert st.PerfFedAvg(0.3).weights(updates) == weights


# --------------------------------------------------------------------------- PerfFedAvg


def test_perf_fedavg_alpha_one_is_fedavg_bit_for_bit():
    updates = model_updates()
    fed_state, fed_weights = st.FedAvg().aggregate(updates)
    perf_state, perf_weights = st.PerfFedAvg(1).aggregate(updates)
    assert perf_weights == fed_weights
    assert same_state(perf_state, fed_state)


def test_perf_fedavg_alpha_zero_weighs_by_accuracy_only():
    updates = model_updates()
    weights = st.PerfFedAvg(0.0).weights(updates)
    total = sum(u.metrics["accuracy"] for u in updates)
    for u in updates:
        assert weights[u.node] == pytest.approx(u.metrics["accuracy"] / total, rel=1e-15)
    assert weights["node-0"] / weights["node-4"] == pytest.approx(0.91 / 0.12)
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_perf_fedavg_blends_the_two_shares():
    updates = [update("a", 30, 0.9, w=[1.0]), update("b", 10, 0.3, w=[0.0])]
    weights = st.PerfFedAvg(0.25).weights(updates)
    assert weights["a"] == pytest.approx(0.25 * 0.75 + 0.75 * 0.75)
    assert weights["b"] == pytest.approx(0.25 * 0.25 + 0.75 * 0.25)
    skewed = st.PerfFedAvg(0.5).weights([update("a", 10, 1.0, w=[1.0]), update("b", 10, 0.0, w=[0.0])])
    assert skewed == {"a": 0.75, "b": 0.25}


def test_all_zero_accuracies_fall_back_to_sample_shares():
    updates = [update("a", 30, 0.0, w=[1.0]), update("b", 10, 0.0, w=[0.0])]
    for alpha in (0.0, 0.5):
        assert st.PerfFedAvg(alpha).weights(updates) == st.FedAvg().weights(updates) == {"a": 0.75, "b": 0.25}


@pytest.mark.parametrize("metrics", [{}, {"accuracy": 1.5}, {"accuracy": float("nan")}, {"accuracy": "0.9"}])
def test_perf_fedavg_needs_a_valid_accuracy(metrics):
    updates = [update("a", 3, w=[1.0]), st.ClientUpdate("b", {"w": torch.tensor([2.0])}, 1, metrics)]
    with pytest.raises(st.StrategyError, match="needs metrics\\['accuracy'\\] in \\[0, 1\\].*node b"):
        st.PerfFedAvg(0.5).weights(updates)
    st.FedAvg().weights(updates)  # FedAvg does not look at accuracy


# --------------------------------------------------------------------------- specs and registry


def test_strategy_from_spec():
    assert isinstance(st.strategy_from_spec({"name": "fedavg"}), st.FedAvg)
    perf = st.strategy_from_spec({"name": "perf_fedavg", "alpha": 0.4})
    assert isinstance(perf, st.PerfFedAvg) and perf.alpha == 0.4
    assert perf.spec() == {"name": "perf_fedavg", "alpha": 0.4}


@pytest.mark.parametrize("spec, message", [
    ({"name": "fedbogus"}, "must be one of " + ", ".join(sorted(st.STRATEGIES)) + ";"),  # the registry's names
    ("fedavg", "must be one of"),
    ({"name": "perf_fedavg"}, "exactly the fields alpha, name"),
    ({"name": "fedavg", "alpha": 1}, "exactly the fields name"),
    ({"name": "perf_fedavg", "alpha": 1.5}, "alpha must be a number between 0 and 1"),
    ({"name": "perf_fedavg", "alpha": True}, "alpha must be a number between 0 and 1"),
])
def test_bad_strategy_specs(spec, message):
    with pytest.raises(st.StrategyError, match=message):
        st.strategy_from_spec(spec)


def test_a_new_strategy_is_one_class():
    class Uniform(st.Strategy):
        name = "test-uniform"

        def _weights(self, updates):
            return {u.node: 1 / len(updates) for u in updates}

    try:
        strategy = st.strategy_from_spec({"name": "test-uniform"})
        state, weights = strategy.aggregate([update("a", 1, w=[1.0]), update("b", 9, w=[3.0])])
        assert weights == {"a": 0.5, "b": 0.5} and state["w"].tolist() == [2.0]
    finally:
        del st.STRATEGIES["test-uniform"]


def test_a_new_strategy_file_is_all_the_rules_and_the_schema_need(tmp_path):
    """The workflow rules and the published schema take names and parameter bounds from the
    registry: a strategy registered by one class is deployable, its bounds enforced, with no
    other edit."""
    import json

    import jsonschema

    from trustmesh.scheduling import workflow as wf

    published = wf.load_schema()  # loaded (and cached) before the registry grows, as in a real process

    class Scaled(st.Strategy):
        name = "test-scaled"
        parameters = {"beta": st.Number(low=0, high=0.5)}

        def __init__(self, beta):
            self.beta = beta

        def _weights(self, updates):
            return st.sample_shares(updates)

    definition = wf.load_definition(pathlib.Path(__file__).parents[1] / "workflows" / "federated-digits.json")
    try:
        definition["strategy"] = {"name": "test-scaled", "beta": 0.25}
        wf.validate_definition(definition, allow_node_names=True)
        schema = {**published, "$defs": {**published["$defs"], "strategy": st.schema_of_strategies()}}
        jsonschema.Draft202012Validator(schema).validate(json.loads(json.dumps(definition)))
        definition["strategy"] = {"name": "test-scaled", "beta": 0.75}
        with pytest.raises(wf.DefinitionError, match=r"definition.strategy.beta must be at most 0.5; got 0.75"):
            wf.validate_definition(definition, allow_node_names=True)
        assert not jsonschema.Draft202012Validator(schema).is_valid(json.loads(json.dumps(definition)))
        definition["strategy"] = {"name": "test-scaled"}
        with pytest.raises(wf.DefinitionError, match=r"definition.strategy lacks the required field 'beta'"):
            wf.validate_definition(definition, allow_node_names=True)
    finally:
        del st.STRATEGIES["test-scaled"]


def test_the_registry_makes_the_published_strategy_schema_and_loads_no_torch():
    import subprocess
    import sys

    from trustmesh.scheduling import workflow as wf

    assert wf.load_schema()["$defs"]["strategy"] == st.schema_of_strategies()
    # the processors validate strategy maps with the registry and never load torch
    code = ("import sys; import trustmesh.scheduling.handlers, trustmesh.fl.strategies; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("updates, message", [
    ([], "no updates"),
    ([update("a", 1, w=[1.0]), update("a", 2, w=[1.0])], "node a sent two updates"),
    ([update("a", 0, w=[1.0])], "samples must be an integer >= 1"),
    ([update("a", 1, w=[1.0]), update("b", 1, w=[1.0, 2.0])], "has shape \\[2\\], node a's has \\[1\\]"),
    ([update("a", 1, w=[1.0]), update("b", 1, v=[1.0])], "not the same model"),
    ([update("a", 1, w=[1.0]), update("b", 1, w=[float("nan")])], "node b: parameter w holds NaN"),
    ([update("a", 1, w=[1.0]), st.ClientUpdate("b", {"w": torch.tensor([1.0], dtype=torch.float64)}, 1)],
     "must be a float32 tensor"),
    ([("a", {}, 1)], "ClientUpdate objects"),
])
def test_bad_updates_are_refused(updates, message):
    with pytest.raises(st.StrategyError, match=message):
        st.FedAvg().aggregate(updates)


@pytest.mark.parametrize("weights, message", [
    ({"a": 0.5, "b": 0.4}, "sum to"),
    ({"a": 1.0}, "must match"),
    ({"a": 1.5, "b": -0.5}, "finite number >= 0"),
    ({"a": float("nan"), "b": 0.5}, "finite number >= 0"),
])
def test_weighted_average_checks_the_weights(weights, message):
    states = {"a": {"w": torch.tensor([1.0])}, "b": {"w": torch.tensor([2.0])}}
    with pytest.raises(st.StrategyError, match=message):
        st.weighted_average(states, weights)


def test_the_registry_holds_every_strategy_the_project_ships():
    """The one place the names are written out: a strategy file removed (or renamed) is noticed
    here, and the robust ones are those the dashboard lists rejected updates for."""
    assert sorted(st.STRATEGIES) == ["bulyan", "fedadagrad", "fedadam", "fedavg", "fedavgm", "fedprox", "fedyogi", "krum",
                                     "median", "multi_krum", "perf_fedavg", "qfedavg", "trimmed_mean"]
    assert sorted(n for n, kind in st.STRATEGIES.items() if kind.robust) == ["bulyan", "krum", "median", "multi_krum",
                                                                            "trimmed_mean"]
