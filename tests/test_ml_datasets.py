"""Data: digits, stratified hold-out split, IID / Dirichlet partitions, .npz format, canary."""

import base64
import io
import json
import pathlib
import zipfile

import numpy as np
import pytest

from trustmesh.fl import datasets as ds

WORKFLOW = pathlib.Path(__file__).resolve().parents[1] / "workflows" / "federated-digits.json"


@pytest.fixture(scope="module")
def digits():
    return ds.load_digits()


def assert_partition(parts, n, num_nodes):
    assert len(parts) == num_nodes
    assert all(len(p) >= 1 for p in parts)
    assert all(np.all(np.diff(p) > 0) for p in parts)       # sorted, no repeats within a node
    joined = np.concatenate(parts)
    assert len(joined) == n and np.array_equal(np.sort(joined), np.arange(n))  # disjoint + cover


# --------------------------------------------------------------------------- digits and split


def test_digits_are_scaled_to_unit_range(digits):
    assert digits.x.shape == (1797, 64) and digits.x.dtype == np.float32
    assert digits.y.dtype == np.int64 and set(np.unique(digits.y)) == set(range(10))
    assert digits.x.min() == 0.0 and digits.x.max() == 1.0
    assert np.array_equal(digits.x * 16, np.round(digits.x * 16))  # exactly k / 16


def test_split_is_stratified_disjoint_and_seeded(digits):
    train, test = ds.split_train_test(digits, 0.2, seed=7)
    assert len(test) == round(0.2 * 1797) and len(train) + len(test) == 1797
    for label in range(10):
        total = np.sum(digits.y == label)
        assert abs(np.sum(test.y == label) - 0.2 * total) <= 1
    again_train, again_test = ds.split_train_test(digits, 0.2, seed=7)
    assert np.array_equal(again_test.x, test.x) and np.array_equal(again_train.y, train.y)
    other_train, other_test = ds.split_train_test(digits, 0.2, seed=8)
    assert not np.array_equal(other_test.x, test.x)


def test_split_indices_do_not_overlap():
    x = np.arange(40, dtype=np.float32).reshape(20, 2)  # row i holds 2i, 2i+1: identifies itself
    y = np.repeat(np.arange(4, dtype=np.int64), 5)
    train, test = ds.split_train_test(ds.Dataset(x, y), 0.4, seed=1)
    ids = np.concatenate([train.x[:, 0], test.x[:, 0]]) // 2
    assert sorted(ids.tolist()) == list(range(20)) and len(test) == 8
    assert all(np.sum(test.y == c) == 2 for c in range(4))


@pytest.mark.parametrize("fraction, message", [
    (0.0, "strictly between 0 and 1"), (1.0, "strictly between 0 and 1"), ("0.2", "strictly between"),
    (0.0001, "both need at least one"),
])
def test_split_refuses_bad_fractions(digits, fraction, message):
    with pytest.raises(ds.DataError, match=message):
        ds.split_train_test(digits, fraction, seed=0)


def test_split_refuses_when_no_class_can_be_split():
    data = ds.Dataset(np.zeros((3, 2), np.float32), np.array([0, 1, 2], np.int64))
    with pytest.raises(ds.DataError, match="no class"):
        ds.split_train_test(data, 0.4, seed=0)


# --------------------------------------------------------------------------- partitions


def test_iid_partition_is_balanced_and_reproducible():
    parts = ds.iid_partition(1438, 10, seed=3)
    assert_partition(parts, 1438, 10)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, ds.iid_partition(1438, 10, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, ds.iid_partition(1438, 10, seed=4)))


def test_dirichlet_partition_covers_and_is_reproducible(digits):
    spec = {"kind": "dirichlet", "alpha": 0.5, "seed": 7}
    parts = ds.partition(digits.y, 10, spec)
    assert_partition(parts, len(digits), 10)
    again = ds.partition(digits.y, 10, dict(spec))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = ds.partition(digits.y, 10, dict(spec, seed=8))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_skew_is_measurable(digits):
    y = digits.y
    skew = lambda parts: ds.label_skew([y[p] for p in parts])  # noqa: E731
    iid = skew(ds.iid_partition(len(y), 10, seed=7))
    strong = skew(ds.dirichlet_partition(y, 10, 0.1, seed=7))
    medium = skew(ds.dirichlet_partition(y, 10, 0.5, seed=7))
    mild = skew(ds.dirichlet_partition(y, 10, 100.0, seed=7))
    assert iid < 0.15 and mild < 0.15
    assert medium > iid + 0.2
    assert strong > medium
    # with alpha 0.5 some node misses at least two classes entirely
    counts = [np.bincount(y[p], minlength=10) for p in ds.dirichlet_partition(y, 10, 0.5, seed=7)]
    assert any(np.sum(c == 0) >= 2 for c in counts)


def test_tiny_shares_still_give_every_node_a_sample():
    y = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5], dtype=np.int64)
    for seed in range(20):
        parts = ds.dirichlet_partition(y, 10, 0.01, seed=seed)
        assert_partition(parts, len(y), 10)
    parts = ds.dirichlet_partition(np.zeros(3, np.int64), 3, 1e-6, seed=0)
    assert_partition(parts, 3, 3)


@pytest.mark.parametrize("call, message", [
    (lambda y: ds.dirichlet_partition(y, 11, 0.5, 0), "cannot give each of 11 nodes"),
    (lambda y: ds.dirichlet_partition(y, 2, 0.0, 0), "alpha must be a finite number > 0"),
    (lambda y: ds.dirichlet_partition(y, 2, float("nan"), 0), "alpha must be a finite number > 0"),
    (lambda y: ds.iid_partition(10, 0, 0), "num_nodes must be an integer >= 1"),
    (lambda y: ds.iid_partition(10, 2, -1), "seed must be an integer"),
    (lambda y: ds.partition(y, 2, {"kind": "shards", "seed": 0}), "must be one of iid, dirichlet"),
    (lambda y: ds.partition(y, 2, {"kind": "iid", "seed": 0, "alpha": 1}), "exactly the fields kind, seed"),
    (lambda y: ds.partition(y, 2, {"kind": "dirichlet", "seed": 0}), "exactly the fields alpha, kind, seed"),
])
def test_partition_errors(call, message):
    with pytest.raises(ds.PartitionError, match=message):
        call(np.arange(10, dtype=np.int64) % 3)


def test_federated_digits_follows_the_workflow():
    spec = json.loads(WORKFLOW.read_text())["data"]
    fed = ds.federated_digits(spec, 10)
    assert len(fed.test) == 359 and sum(len(s) for s in fed.shards) == len(fed.train) == 1438
    assert np.array_equal(np.sort(np.concatenate([s.y for s in fed.shards])), np.sort(fed.train.y))
    with pytest.raises(ds.DataError, match="load_npz"):
        ds.federated_digits(dict(spec, dataset="npz"), 10)


# --------------------------------------------------------------------------- npz


def npz_bytes(**arrays):
    out = io.BytesIO()
    np.savez(out, **arrays)
    return out.getvalue()


def test_npz_round_trip_from_bytes_and_path(tmp_path, digits):
    small = digits.subset(np.arange(50))
    blob = ds.dump_npz(small)
    assert blob == ds.dump_npz(digits.subset(np.arange(50)))  # deterministic bytes
    loaded = ds.load_npz(blob, input_dim=64, num_classes=10)
    assert np.array_equal(loaded.x, small.x) and np.array_equal(loaded.y, small.y)
    path = tmp_path / "mine.npz"
    path.write_bytes(npz_bytes(x=small.x, y=small.y))  # numpy's own writer works too
    assert np.array_equal(ds.load_npz(str(path)).y, small.y)


X = np.zeros((4, 3), np.float32)
Y = np.array([0, 1, 2, 1], np.int64)


@pytest.mark.parametrize("arrays, kw, message", [
    ({"x": X}, {}, "missing y"),
    ({"x": X, "y": Y, "z": Y}, {}, "unexpected z"),
    ({"x": X.astype(np.float64), "y": Y}, {}, "x must be float32, got float64"),
    ({"x": X[0], "y": Y}, {}, r"x must be 2-D"),
    ({"x": X, "y": Y.astype(np.float32)}, {}, "y must be int64"),
    ({"x": X, "y": Y.reshape(2, 2)}, {}, "y must be 1-D"),
    ({"x": X, "y": Y[:3]}, {}, "x has 4 rows but y has 3 labels"),
    ({"x": X[:0], "y": Y[:0]}, {}, "no samples"),
    ({"x": X, "y": Y}, {"num_classes": 2}, r"label 2 is outside the classes 0 \.\. 1"),
    ({"x": X, "y": Y - 1}, {}, "label -1 is outside"),
    ({"x": X, "y": Y}, {"input_dim": 64}, "3 features per sample but the model takes 64"),
    ({"x": np.where(np.eye(4, 3) > 0, np.nan, 0).astype(np.float32), "y": Y}, {}, "NaN or infinite"),
])
def test_npz_validation_errors(arrays, kw, message):
    with pytest.raises(ds.DataError, match=message):
        ds.load_npz(npz_bytes(**arrays), **kw)


def test_npz_refuses_pickles_and_garbage(tmp_path):
    with pytest.raises(ds.DataError, match="pickled"):
        ds.load_npz(npz_bytes(x=np.array([{"evil": 1}], dtype=object), y=Y))
    with pytest.raises(ds.DataError, match="not a readable .npz"):
        ds.load_npz(b"definitely not a zip file")
    with pytest.raises(ds.DataError, match="no such file"):
        ds.load_npz(str(tmp_path / "absent.npz"))
    single = io.BytesIO()
    np.save(single, X)
    with pytest.raises(ds.DataError, match="single .npy array"):
        ds.load_npz(single.getvalue())


# --------------------------------------------------------------------------- canary


def test_canary_is_found_in_plaintext_encodings_only(digits):
    canary = ds.make_canary()
    assert canary.row.dtype == np.float32 and canary.row.shape == (64,)
    assert 0 < canary.row.min() and canary.row.max() < 1
    assert not np.array_equal(canary.row, ds.make_canary().row)
    data = ds.with_canary(digits.subset(np.arange(20)), canary)
    assert len(data) == 21 and data.y[-1] == canary.label
    raw = ds.dump_npz(data)
    assert canary.found_in(raw)
    assert canary.found_in(json.dumps({"x": data.x.tolist()}))
    assert canary.found_in(data.x.astype(np.float64).tobytes())
    for shift in range(3):
        assert canary.found_in(base64.b64encode(b"\1" * shift + raw))
    assert canary.found_in(raw.hex())
    assert not canary.found_in(ds.dump_npz(digits.subset(np.arange(20))))
    compressed = io.BytesIO()
    with zipfile.ZipFile(compressed, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("x", raw)
    assert not ds.make_canary().found_in(compressed.getvalue())


def test_digits_read_from_the_shipped_file_equal_sklearns_loader(digits):
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    assert np.array_equal(digits.x, (x / ds.DIGITS_MAX_PIXEL).astype(np.float32))
    assert np.array_equal(digits.y, y.astype(np.int64)) and digits.x.shape == (1797, 64)
    # and without importing scikit-learn, which costs each node process seconds of CPU
    code = "import sys; from trustmesh.fl import datasets; datasets.load_digits(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
