"""Models from specs, local training and evaluation: seeded, deterministic, checked inputs."""

import hashlib
import math

import numpy as np
import pytest
import torch

from trustmesh.fl import model_format as mf
from trustmesh.fl import models, training
from trustmesh.fl.datasets import load_digits, split_train_test

torch.set_num_threads(1)

SPEC = {"type": "mlp", "input_dim": 64, "hidden": [64, 32], "num_classes": 10}
HP = {"epochs": 3, "batch_size": 32, "learning_rate": 0.01, "optimizer": "adam", "seed": 42}


@pytest.fixture(scope="module")
def data():
    train, test = split_train_test(load_digits(), 0.2, seed=7)
    return train.subset(np.arange(400)), test


def digest(state):
    return mf.digest(mf.serialize(state, workflow_id="t", round=1, model_spec=SPEC))


# --------------------------------------------------------------------------- models


def test_model_from_spec_has_the_expected_shapes():
    assert list(models.model_shapes(SPEC).items()) == [
        ("layers.0.weight", (64, 64)), ("layers.0.bias", (64,)), ("layers.1.weight", (32, 64)),
        ("layers.1.bias", (32,)), ("layers.2.weight", (10, 32)), ("layers.2.bias", (10,)),
    ]
    model = models.build_model(SPEC, seed=1)
    assert models.parameter_count(SPEC) == models.parameter_count(model) == 6570
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    flat = models.build_model({"type": "mlp", "input_dim": 3, "hidden": [], "num_classes": 2}, seed=1)
    assert models.parameter_count(flat) == 8


def test_init_depends_on_the_seed_only_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b = models.state_of(models.build_model(SPEC, seed=5)), models.state_of(models.build_model(SPEC, seed=5))
    assert torch.equal(before, torch.get_rng_state())
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = models.state_of(models.build_model(SPEC, seed=6))
    assert not torch.equal(a["layers.0.weight"], c["layers.0.weight"])
    # PyTorch's default Linear scheme: |w| <= 1/sqrt(fan_in) (kaiming uniform, a = sqrt(5))
    assert a["layers.0.weight"].abs().max() <= 1 / math.sqrt(64)
    assert a["layers.0.weight"].std() > 0.5 / math.sqrt(3 * 64)


@pytest.mark.parametrize("spec, message", [
    ({"type": "cnn"}, "model.type must be one of mlp; got 'cnn'"),
    ({"input_dim": 3}, "model.type must be one of mlp; got None"),
    ({"type": "mlp", "input_dim": 0, "hidden": [], "num_classes": 2}, "model.input_dim must be between 1"),
    ({"type": "mlp", "input_dim": 3, "hidden": [4], "num_classes": 1}, "model.num_classes must be between 2"),
    ({"type": "mlp", "input_dim": 3, "hidden": [4], "num_classes": 2, "dropout": 0.1}, "unknown field"),
    ([1, 2], "must be a map"),
])
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(models.ModelSpecError, match=message):
        models.build_model(spec, seed=0)


def test_spec_digest_is_canonical():
    reordered = {"num_classes": 10, "hidden": [64, 32], "type": "mlp", "input_dim": 64}
    assert models.spec_digest(reordered) == models.spec_digest(SPEC)
    assert models.spec_digest(dict(SPEC, hidden=[64, 33])) != models.spec_digest(SPEC)


def test_new_model_type_is_one_class():
    class Linear(models.ModelType):
        name = "test-linear"

        def check(self, spec):
            pass

        def build(self, spec, device):
            return torch.nn.Linear(spec["input_dim"], spec["num_classes"], device=device)

    try:
        spec = {"type": "test-linear", "input_dim": 3, "num_classes": 2}
        assert models.parameter_count(models.build_model(spec, seed=0)) == 8
    finally:
        del models.MODEL_TYPES["test-linear"]


# --------------------------------------------------------------------------- training


def test_short_training_improves_test_accuracy(data):
    train, test = data
    initial = models.state_of(models.build_model(SPEC, seed=HP["seed"]))
    before = training.evaluate(SPEC, initial, test.x, test.y)
    result = training.local_train(SPEC, dict(HP, epochs=8), None, train.x, train.y)
    after = training.evaluate(SPEC, result.state, test.x, test.y)
    assert before["accuracy"] < 0.3
    assert after["accuracy"] > 0.8 and after["loss"] < before["loss"]
    assert after["samples"] == len(test) and result.samples == 400


def test_sgd_learns_too(data):
    train, test = data
    hp = dict(HP, optimizer="sgd", learning_rate=0.1, epochs=10, batch_size=16)
    result = training.local_train(SPEC, hp, None, train.x, train.y)
    assert training.evaluate(SPEC, result.state, test.x, test.y)["accuracy"] > 0.75


def test_metrics_hold_per_batch_and_per_epoch_figures(data):
    train, _ = data
    result = training.local_train(SPEC, HP, None, train.x, train.y)
    m = result.metrics
    assert len(m["batches"]) == m["steps"] == 3 * math.ceil(400 / 32)
    assert [e["epoch"] for e in m["epochs"]] == [1, 2, 3]
    assert sum(b["size"] for b in m["batches"] if b["epoch"] == 1) == 400
    assert m["batches"][12]["size"] == 400 - 12 * 32
    epoch1 = [b for b in m["batches"] if b["epoch"] == 1]
    assert m["epochs"][0]["loss"] == pytest.approx(sum(b["loss"] * b["size"] for b in epoch1) / 400)
    assert m["epochs"][-1]["loss"] < m["epochs"][0]["loss"]
    assert 0 <= m["accuracy"] <= 1 and m["samples"] == 400
    own = training.evaluate(SPEC, result.state, train.x, train.y)
    assert (m["accuracy"], m["loss"]) == (own["accuracy"], own["loss"])  # evaluated after training
    scalars = training.scalar_metrics(m)
    assert set(scalars) == {"loss", "accuracy", "samples", "steps", "train_loss", "train_accuracy"}


def test_same_seeds_give_identical_digests(data):
    train, _ = data
    a = training.local_train(SPEC, HP, None, train.x, train.y, seed=9)
    b = training.local_train(SPEC, HP, None, train.x, train.y, seed=9)
    c = training.local_train(SPEC, HP, None, train.x, train.y, seed=10)
    assert digest(a.state) == digest(b.state) != digest(c.state)
    assert a.metrics == b.metrics


def test_training_continues_from_a_global_state(data):
    train, test = data
    first = training.local_train(SPEC, HP, None, train.x, train.y)
    blob = mf.serialize(first.state, workflow_id="t", round=1, model_spec=SPEC)
    loaded = mf.load(blob, mf.digest(blob), SPEC).state
    hp = dict(HP, epochs=1, learning_rate=1e-12, optimizer="sgd")  # ~no change: the start is kept
    second = training.local_train(SPEC, hp, loaded, train.x, train.y)
    assert training.evaluate(SPEC, second.state, test.x, test.y)["accuracy"] == pytest.approx(
        training.evaluate(SPEC, first.state, test.x, test.y)["accuracy"])
    wrong = dict(loaded)
    wrong["layers.2.bias"] = torch.zeros(11)
    with pytest.raises(models.StateMismatchError, match=r"layers.2.bias has shape \[11\]"):
        training.local_train(SPEC, HP, wrong, train.x, train.y)


def test_progress_reports_every_step_and_can_cancel(data):
    train, _ = data
    seen = []
    training.local_train(SPEC, dict(HP, epochs=2), None, train.x[:64], train.y[:64], progress=seen.append)
    assert [p.step for p in seen] == [1, 2, 3, 4] and {p.total for p in seen} == {4}
    assert [p.epoch for p in seen] == [1, 1, 2, 2] and seen[-1].fraction == 1.0

    class Stop(Exception):
        pass

    def cancel(p):
        if p.step == 2:
            raise Stop

    with pytest.raises(Stop):
        training.local_train(SPEC, HP, None, train.x, train.y, progress=cancel)


def test_deterministic_mode_is_restored(data):
    train, _ = data
    assert not torch.are_deterministic_algorithms_enabled()
    inside = []
    training.local_train(SPEC, dict(HP, epochs=1), None, train.x[:32], train.y[:32],
                         progress=lambda p: inside.append(torch.are_deterministic_algorithms_enabled()))
    assert inside == [True] and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("change, message", [
    ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam"),
    ({"epochs": 0}, "epochs must be an integer between 1"),
    ({"epochs": 2.0}, "epochs must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"learning_rate": -0.1}, "learning_rate must be a finite number > 0"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number > 0"),
    ({"seed": -1}, "seed must be an integer between 0"),
    ({"momentum": 0.9}, "unknown momentum"),
])
def test_bad_hyperparameters_are_refused(data, change, message):
    train, _ = data
    with pytest.raises(training.HyperparameterError, match=message):
        training.local_train(SPEC, dict(HP, **change), None, train.x, train.y)


def test_missing_hyperparameter_is_named(data):
    train, _ = data
    hp = dict(HP)
    del hp["seed"]
    with pytest.raises(training.HyperparameterError, match="missing seed"):
        training.local_train(SPEC, hp, None, train.x, train.y)


def test_bad_data_is_refused(data):
    train, _ = data
    with pytest.raises(training.TrainingError, match="8 features per sample but the model takes 64"):
        training.local_train(SPEC, HP, None, train.x[:, :8], train.y)
    with pytest.raises(training.TrainingError, match="label 10 is outside the classes 0 .. 9"):
        training.local_train(SPEC, HP, None, train.x, train.y + 1)
    with pytest.raises(training.TrainingError, match="float32"):
        training.evaluate(SPEC, models.state_of(models.build_model(SPEC, seed=0)), train.x.astype(float), train.y)


def test_divergence_is_reported(data):
    train, _ = data
    hp = dict(HP, optimizer="sgd", learning_rate=1e30)
    with pytest.raises(training.TrainingError, match="diverged; lower hyperparameters.learning_rate"):
        training.local_train(SPEC, hp, None, train.x, train.y)


def test_derive_seed_is_stable():
    assert training.derive_seed(42, "wf", 1, "node") == training.derive_seed(42, "wf", 1, "node")
    assert training.derive_seed(42, "wf", 1, "node") != training.derive_seed(42, "wf", 2, "node")
    assert 0 <= training.derive_seed(0) < 2**32
    # the derivation is part of the audit trail: sha256 of the labels joined by \x1f, first 4 bytes
    expected = int.from_bytes(hashlib.sha256(b"42\x1fwf\x1f1\x1fnode-a").digest()[:4], "big")
    assert training.derive_seed(42, "wf", 1, "node-a") == expected == 1475013421
