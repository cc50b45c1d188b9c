"""local_train_many: every client's result bit for bit what local_train gives it alone."""

import numpy as np
import pytest
import torch

from trustmesh.fl import batched_training as bt
from trustmesh.fl import training
from trustmesh.fl.datasets import load_digits

DIGITS = {"type": "mlp", "input_dim": 64, "hidden": [64, 32], "num_classes": 10}
# Odd widths: tensors whose sizes are no multiple of a SIMD vector or the row alignment.
ODD = {"type": "mlp", "input_dim": 5, "hidden": [7, 3], "num_classes": 3}
LINEAR = {"type": "mlp", "input_dim": 64, "hidden": [], "num_classes": 10}  # logistic regression
HP = {"epochs": 3, "batch_size": 16, "learning_rate": 0.01, "optimizer": "adam", "seed": 42}


@pytest.fixture(autouse=True)
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def clients_for(spec, sizes, offset=0):
    """Clients with their own data and seeds; digits rows for digits-shaped specs."""
    rng = np.random.default_rng(offset + 1)
    digits = load_digits()
    out = []
    for i, n in enumerate(sizes):
        if spec["input_dim"] == 64:
            rows = rng.choice(len(digits.y), size=n, replace=False)
            x, y = digits.x[rows], digits.y[rows]
        else:
            x = rng.normal(size=(n, spec["input_dim"])).astype(np.float32)
            y = rng.integers(0, spec["num_classes"], size=n).astype(np.int64)
        out.append(bt.Client(x, y, training.derive_seed(HP["seed"], 3, f"node-{offset + i}")))
    return out


def alone(spec, hp, state, clients, **options):
    results = []
    for c in clients:
        try:
            results.append(training.local_train(spec, hp, state, c.x, c.y, seed=c.seed, **options))
        except training.TrainingError as exc:
            results.append(exc)
    return results


def assert_identical(expected, got):
    assert len(expected) == len(got)
    for a, b in zip(expected, got):
        if isinstance(a, Exception):
            assert type(b) is type(a) and str(b) == str(a)
            continue
        assert list(b.state) == list(a.state)
        for name in a.state:
            assert b.state[name].dtype == a.state[name].dtype
            assert torch.equal(b.state[name], a.state[name]), name
        assert b.samples == a.samples
        assert b.metrics == a.metrics  # floats compared exactly, per-batch lists included


SIZES = [40, 7, 16, 33, 1, 25]  # 7 and 1 are fewer than the batch size; 16 exactly one batch


@pytest.mark.parametrize("threads_", [1, 2])
@pytest.mark.parametrize("spec", [DIGITS, ODD, LINEAR], ids=["digits-mlp", "odd-mlp", "linear"])
@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_many_equal_each_alone(spec, optimizer, threads_):
    torch.set_num_threads(threads_)
    hp = dict(HP, optimizer=optimizer)
    clients = clients_for(spec, SIZES)
    start = training.initial_state(spec, 9)  # a global model other than the seeded one
    assert bt.plain_reason(spec, hp, len(clients)) is None  # the lockstep path, not the fallback
    assert_identical(alone(spec, hp, start, clients), bt.local_train_many(spec, hp, start, clients))


@pytest.mark.parametrize("spec", [DIGITS, ODD], ids=["digits-mlp", "odd-mlp"])
def test_fedprox_and_start_loss_from_the_seeded_model(spec):
    # proximal_mu and start_loss: the options strategies pass (FedProx, q-FedAvg). DP clipping
    # and noise are applied to the trained state afterwards (dp_round.client_update), not here.
    clients = clients_for(spec, SIZES, offset=10)
    options = {"proximal_mu": 0.5, "start_loss": True}
    expected = alone(spec, HP, None, clients, **options)
    assert all("start_loss" in r.metrics for r in expected)
    assert_identical(expected, bt.local_train_many(spec, HP, None, clients, **options))


def test_progress_is_reported_per_client_as_alone():
    clients = clients_for(ODD, [9, 3, 20])
    expected = []
    for i, c in enumerate(clients):
        training.local_train(ODD, HP, None, c.x, c.y, seed=c.seed, progress=lambda p, i=i: expected.append((i, p)))
    got = []
    bt.local_train_many(ODD, HP, None, clients, progress=lambda i, p: got.append((i, p)))
    assert sorted(got, key=lambda e: (e[0], e[1].step)) == expected


def test_one_clients_bad_data_or_divergence_fails_only_that_client():
    clients = clients_for(ODD, [12, 30, 8, 20])
    wrong_labels = bt.Client(clients[1].x, np.full(30, 7, dtype=np.int64), clients[1].seed)
    # huge inputs: SGD's first step blows the weights up, the second loss is NaN
    diverging = bt.Client(np.full((8, 5), 1e30, dtype=np.float32), clients[2].y, clients[2].seed)
    mixed = [clients[0], wrong_labels, diverging, clients[3], bt.Client(clients[0].x, clients[0].y, -1)]
    hp = dict(HP, optimizer="sgd")
    expected = alone(ODD, hp, None, mixed)
    assert [type(r).__name__ for r in expected] == ["TrainResult", "TrainingError", "TrainingError",
                                                    "TrainResult", "HyperparameterError"]
    assert "diverged" in str(expected[2])
    assert_identical(expected, bt.local_train_many(ODD, hp, None, mixed))


def test_large_groups_train_in_chunks_alike(monkeypatch):
    clients = clients_for(ODD, [5, 11, 17, 2, 9])
    monkeypatch.setattr(bt, "MAX_BUFFER_BYTES", 1)  # one client per chunk
    assert_identical(alone(ODD, HP, None, clients), bt.local_train_many(ODD, HP, None, clients))


def test_plain_reason_decides_the_path(monkeypatch):
    assert bt.plain_reason(DIGITS, HP, 2) is None
    assert bt.plain_reason(DIGITS, dict(HP, optimizer="sgd"), 50) is None
    assert "single" in bt.plain_reason(DIGITS, HP, 1)
    assert "invalid" in bt.plain_reason(DIGITS, dict(HP, epochs=0), 5)
    assert "invalid" in bt.plain_reason({"type": "cnn"}, HP, 5)
    # An optimizer the workflow rules could add, or settings the lockstep step does not copy:
    monkeypatch.setitem(training.OPTIMIZERS, "adam", lambda params, lr: torch.optim.Adam(params, lr=lr, amsgrad=True))
    assert "settings" in bt.plain_reason(DIGITS, HP, 5)
    monkeypatch.setitem(training.OPTIMIZERS, "rmsprop", lambda params, lr: torch.optim.RMSprop(params, lr=lr))
    assert "no lockstep step" in bt.plain_reason(DIGITS, dict(HP, optimizer="rmsprop"), 5)
    # ... and local_train_many then trains them one by one, still giving what local_train gives.
    hp = dict(HP, optimizer="rmsprop")
    clients = clients_for(ODD, [6, 13])
    assert_identical(alone(ODD, hp, None, clients), bt.local_train_many(ODD, hp, None, clients))


def test_shared_inputs_that_do_not_check_fail_as_alone():
    clients = clients_for(ODD, [6, 13])
    with pytest.raises(training.HyperparameterError, match="epochs"):
        training.local_train(ODD, dict(HP, epochs=0), None, clients[0].x, clients[0].y)
    assert all(isinstance(r, training.HyperparameterError) and "epochs" in str(r)
               for r in bt.local_train_many(ODD, dict(HP, epochs=0), None, clients))


# --------------------------------------------------------------------------- compute node tasks


def test_a_nodes_local_trains_of_a_round_run_together_as_alone(tmp_path):
    """compute-node/tasks.py: run_local_trains gives each task the blob digest and report that
    run_task gives it alone; a task whose data blob does not verify fails alone, as before."""
    import asyncio
    import hashlib

    from trustmesh.compute_node.tasks import TaskContext, TaskInputError, TaskOutcome, run_local_trains, run_task
    from trustmesh.fl.datasets import dump_npz, federated_digits
    from trustmesh.scheduling.schedule import StartingModel
    from trustmesh.scheduling.workflow import load_definition
    from trustmesh.stores.data_bundle import seal_bundle
    from trustmesh.stores.data_envelope import load_or_create_keypair
    from trustmesh.stores.blobs import BlobStore
    from trustmesh.stores.redis_client import client
    from trustmesh.stores.servers import RedisServer

    from helpers.family_scenario import _WORKFLOWS

    definition = load_definition(_WORKFLOWS / "federated-digits.json")
    definition["hyperparameters"]["epochs"] = 2
    shards = federated_digits(definition["data"], 6).shards
    key, public = load_or_create_keypair(tmp_path / "node.x25519")
    node, sid = "ab" * 33, "cd" * 32
    owners = [f"{i:02d}" * 33 for i in range(len(shards))]

    async def scenario(url):
        redis = client(url)
        blobs = BlobStore(redis)
        tasks = {}
        for i, (owner, shard) in enumerate(zip(owners, shards)):
            digest = await blobs.put(seal_bundle(dump_npz(shard), {node: public}, schedule_id=sid, sender=owner))
            tasks[f"train-{i}"] = {"kind": "local_train", "data_owner": owner, "inputs": [digest],
                                   "fetch_dependency_outputs": ["preprocess"]}
        tasks["train-2"]["inputs"] = [hashlib.sha256(b"never stored").hexdigest()]  # lost: waits, alone
        corrupt = await blobs.put(b"not a bundle")
        tasks["train-4"]["inputs"] = [corrupt]  # stored but no bundle: fails, alone
        assignments = {"schedule_id": sid, "workflow_id": "w", "round": 3, "tasks": tasks}
        ctx = TaskContext(node, key, None, blobs)  # no reader: the round's inputs are all cached
        ctx.rounds.put(sid, {"assignments": assignments, "definition": definition,
                             "global_model": (None, (), StartingModel("w", 3, None))})
        together = await run_local_trains(ctx, sid, list(tasks))
        for task_id in tasks:
            try:
                alone = await run_task(ctx, sid, task_id)
            except Exception as exc:  # noqa: BLE001
                alone = exc
            got = together[task_id]
            assert type(got) is type(alone), task_id
            if isinstance(alone, TaskOutcome):
                assert (got.output_digest, got.metrics, got.dependencies, got.starting_model) == \
                       (alone.output_digest, alone.metrics, alone.dependencies, alone.starting_model)
            else:
                assert str(got) == str(alone)
        assert isinstance(together["train-4"], TaskInputError)
        assert sum(isinstance(o, TaskOutcome) for o in together.values()) == 4
        await redis.aclose()

    with RedisServer() as server:
        asyncio.run(scenario(server.url))
