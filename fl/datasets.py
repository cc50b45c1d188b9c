"""Training data: the digits set, held-out test splits, partitions over nodes, user .npz files.

Everything here is a function of its arguments and seeds (numpy Generator(PCG64(seed)); numpy
is pinned, so streams are stable), and nothing is downloaded: digits ships inside scikit-learn.

User data format (.npz, as written by numpy.savez or `dump_npz`; no pickled objects):

    x   float32, shape [n, features], finite values (scale them yourself; digits uses [0, 1])
    y   int64,   shape [n], class labels 0 .. num_classes-1
    no other arrays; n >= 1

Partitions: a list with one sorted index array per node, disjoint, together covering every
sample given. Node i of a workflow is `federation.participant_nodes[i]`.

    iid         a seeded permutation cut into num_nodes nearly equal parts (sizes differ by <= 1)
    dirichlet   label skew (Hsu et al. 2019): for each class c, p_c ~ Dirichlet(alpha * 1_N) and
                the class's shuffled samples are cut by p_c (largest-remainder rounding). Small
                alpha -> each node sees few classes.
    tiny shares A draw can leave a node with no sample (likely with small alpha or few samples
                per node). Every node must hold at least one, so such a node takes one sample from
                the node that holds the most (lowest index on ties; the sample that node received
                last), repeated until none is empty. This moves at most num_nodes - 1 samples and
                keeps the skew elsewhere; we do not redraw, which could loop forever for tiny alpha.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import io
import json
import math
import pathlib
import secrets
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

MAX_SEED = 2**32 - 1
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
DIGITS_MAX_PIXEL = 16.0  # scikit-learn's digits are integers 0..16
NPZ_ARRAYS = ("x", "y")


class DataError(ValueError):
    """Data that cannot be used as given; the message says what to change."""


class PartitionError(DataError):
    """A partition that cannot be made (too few samples, bad spec)."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features x (float32 [n, features]) and labels y (int64 [n])."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self):
        check_arrays(self.x, self.y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> "Dataset":
        return Dataset(self.x[indices], self.y[indices])


# --------------------------------------------------------------------------- validation


def check_arrays(x: Any, y: Any, *, input_dim: int | None = None, num_classes: int | None = None,
                 source: str = "data") -> None:
    """Raise DataError unless x, y follow the data format (see module docstring)."""
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DataError(f"{source}: x and y must be numpy arrays; got {type(x).__name__} and {type(y).__name__}")
    if x.dtype != np.float32:
        raise DataError(f"{source}: x must be float32, got {x.dtype}; convert with x.astype(np.float32)")
    if x.ndim != 2:
        raise DataError(f"{source}: x must be 2-D [samples, features], got shape {list(x.shape)}")
    if y.dtype != np.int64:
        raise DataError(f"{source}: y must be int64 class labels, got {y.dtype}; convert with y.astype(np.int64)")
    if y.ndim != 1:
        raise DataError(f"{source}: y must be 1-D [samples], got shape {list(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{source}: x has {x.shape[0]} rows but y has {y.shape[0]} labels; they must match")
    if y.shape[0] == 0:
        raise DataError(f"{source}: holds no samples; at least one is needed")
    if input_dim is not None and x.shape[1] != input_dim:
        raise DataError(f"{source}: x has {x.shape[1]} features per sample but the model takes {input_dim}")
    if not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataError(f"{source}: x holds NaN or infinite values (first in row {bad}); clean or impute them")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        top = "" if num_classes is None else f" .. {num_classes - 1}"
        bad = int(y.min()) if y.min() < 0 else int(y.max())
        raise DataError(f"{source}: label {bad} is outside the classes 0{top}")


def _check_seed(seed: Any, field: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PartitionError(f"{field} must be an integer between 0 and {MAX_SEED}; got {seed!r}")
    return seed


def _rng(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


# --------------------------------------------------------------------------- sources


def load_digits() -> Dataset:
    """scikit-learn's 1797 8x8 digits, pixels scaled to [0, 1] (exactly: k / 16), labels 0..9.

    Read straight from the file scikit-learn ships (64 pixels then the label per row): importing
    sklearn costs each node process ~1.8 s of CPU, reading the file ~30 ms. Tests check it equals
    sklearn.datasets.load_digits."""
    found = importlib.util.find_spec("sklearn")
    path = pathlib.Path(next(iter(found.submodule_search_locations or ())), "datasets", "data", "digits.csv.gz")
    if path.exists():
        raw = np.loadtxt(path, delimiter=",")
        x, y = raw[:, :-1], raw[:, -1]
    else:  # a scikit-learn that keeps it elsewhere: ask it
        from sklearn.datasets import load_digits as _sklearn_digits

        x, y = _sklearn_digits(return_X_y=True)
    return Dataset((x / DIGITS_MAX_PIXEL).astype(np.float32), y.astype(np.int64))


def load_npz(source: str | bytes | BinaryIO, *, input_dim: int | None = None,
             num_classes: int | None = None) -> Dataset:
    """User data from a .npz path, its bytes or a binary file; checked against the format above.

    Pickled arrays are refused (allow_pickle=False): a data file must never run code.
    """
    name = source if isinstance(source, str) else "npz data"
    handle = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        loaded = np.load(handle, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{name}: is a single .npy array, not an .npz archive with arrays x and y")
        with loaded as npz:
            arrays = set(npz.files)
            missing = [a for a in NPZ_ARRAYS if a not in arrays]
            extra = sorted(arrays - set(NPZ_ARRAYS))
            if missing or extra:
                raise DataError(
                    f"{name}: an .npz data file holds exactly the arrays x and y"
                    + (f"; missing {', '.join(missing)}" if missing else "")
                    + (f"; unexpected {', '.join(extra)}" if extra else "")
                )
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{name}: not a readable .npz file without pickled objects ({exc})") from None
    check_arrays(x, y, input_dim=input_dim, num_classes=num_classes, source=name)
    return Dataset(x, y)


def dump_npz(data: Dataset) -> bytes:
    """The .npz bytes of `data`, identical for identical arrays (fixed zip timestamps)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in (("x", data.x), ("y", data.y)):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(info, buffer.getvalue())
    return out.getvalue()


# --------------------------------------------------------------------------- splits


def _largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Integers summing to `total`, each floor(quota) or one more; biggest remainders first."""
    base = np.floor(quotas).astype(np.int64)
    left = int(total - base.sum())
    order = np.argsort(-(quotas - base), kind="stable")  # stable: ties go to the lower index
    base[order[:max(0, left)]] += 1
    return base


def split_train_test(data: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Stratified, seeded hold-out split; round(test_fraction * n) test samples in total.

    Each class contributes in proportion to its size (largest remainder); a class with a single
    sample stays in training. Both parts keep the original sample order.
    """
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) \
            or not 0 < test_fraction < 1:
        raise DataError(f"test_fraction must be a number strictly between 0 and 1; got {test_fraction!r}")
    _check_seed(seed, "split seed")
    n = len(data)
    classes, counts = np.unique(data.y, return_counts=True)
    total = int(round(test_fraction * n))
    if total < 1 or total > n - 1:
        raise DataError(
            f"test_fraction {test_fraction} of {n} samples leaves {total} for testing and {n - total} for "
            f"training; both need at least one: use more data or another test_fraction"
        )
    splittable = np.where(counts >= 2, counts, 0)
    quotas = splittable * (total / max(1, splittable.sum()))
    per_class = np.minimum(_largest_remainder(quotas, min(total, int(splittable.sum()))), splittable - 1)
    per_class = np.maximum(per_class, 0)
    rng = _rng(seed)
    test = []
    for label, k in zip(classes, per_class):
        members = np.flatnonzero(data.y == label)
        test.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test))
    if test_idx.size == 0:
        raise DataError(
            f"cannot hold out a stratified test split: no class of the {n} samples has two members"
        )
    train_mask = np.ones(n, dtype=bool)
    train_mask[test_idx] = False
    return data.subset(np.flatnonzero(train_mask)), data.subset(test_idx)


# --------------------------------------------------------------------------- partitions


def _check_nodes(num_nodes: Any, n: int) -> int:
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise PartitionError(f"num_nodes must be an integer >= 1; got {num_nodes!r}")
    if n < num_nodes:
        raise PartitionError(
            f"cannot give each of {num_nodes} nodes at least one sample from {n} samples; "
            f"use fewer nodes or more data"
        )
    return num_nodes


def iid_partition(num_samples: int, num_nodes: int, seed: int) -> list[np.ndarray]:
    """A seeded permutation of range(num_samples) cut into num_nodes parts of near-equal size."""
    _check_nodes(num_nodes, num_samples)
    order = _rng(_check_seed(seed, "partition.seed")).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_nodes)]


def dirichlet_partition(y: np.ndarray, num_nodes: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Label-skewed parts: per class, shares drawn from Dirichlet(alpha); see module docstring."""
    _check_nodes(num_nodes, len(y))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"partition.alpha must be a finite number > 0; got {alpha!r}")
    rng = _rng(_check_seed(seed, "partition.seed"))
    parts: list[list[int]] = [[] for _ in range(num_nodes)]
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(num_nodes, float(alpha)))
        if not np.isfinite(shares).all() or shares.sum() <= 0:
            shares = np.eye(num_nodes)[rng.integers(num_nodes)]  # underflow at tiny alpha: one node
        counts = _largest_remainder(shares * len(members), len(members))
        for node, chunk in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            parts[node].extend(chunk.tolist())
    # Tiny shares: see "tiny shares" in the module docstring.
    for node in range(num_nodes):
        if not parts[node]:
            donor = max(range(num_nodes), key=lambda i: (len(parts[i]), -i))
            parts[node].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


PARTITIONERS: dict[str, Callable[[np.ndarray, int, Mapping], list[np.ndarray]]] = {
    "iid": lambda y, n, spec: iid_partition(len(y), n, spec["seed"]),
    "dirichlet": lambda y, n, spec: dirichlet_partition(y, n, spec["alpha"], spec["seed"]),
}
_PARTITION_FIELDS = {"iid": {"kind", "seed"}, "dirichlet": {"kind", "alpha", "seed"}}


def partition(y: np.ndarray, num_nodes: int, spec: Mapping) -> list[np.ndarray]:
    """Index arrays for num_nodes nodes per a workflow's data.partition spec."""
    if not isinstance(spec, Mapping) or spec.get("kind") not in PARTITIONERS:
        raise PartitionError(f"data.partition.kind must be one of {', '.join(PARTITIONERS)}; got {spec!r:.80}")
    fields = _PARTITION_FIELDS[spec["kind"]]
    if set(spec) != fields:
        raise PartitionError(
            f"data.partition of kind {spec['kind']!r} takes exactly the fields {', '.join(sorted(fields))}; "
            f"got {', '.join(sorted(map(str, spec)))}"
        )
    return PARTITIONERS[spec["kind"]](y, num_nodes, spec)


def label_skew(labels: list[np.ndarray]) -> float:
    """Mean total-variation distance between each node's label distribution and the pooled one.

    `labels` holds each node's y. 0 = every node sees the global class mix; towards 1 = every
    node sees classes the others do not.
    """
    pooled = np.concatenate(labels)
    classes = np.unique(pooled)
    overall = np.array([np.mean(pooled == c) for c in classes])
    distances = [0.5 * np.abs(np.array([np.mean(y == c) for c in classes]) - overall).sum() for y in labels]
    return float(np.mean(distances))


@dataclass(frozen=True, eq=False)
class FederatedData:
    train: Dataset
    test: Dataset
    shards: list[Dataset]  # shards[i] belongs to federation.participant_nodes[i]


def split_seed(data_spec: Mapping) -> int:
    """The test split's seed: data.partition.seed, or 0 without a partition (single node).

    Derived from the definition alone so every node and every auditor holds out the same samples.
    """
    part = data_spec.get("partition")
    return part["seed"] if isinstance(part, Mapping) and "seed" in part else 0


def held_out(data_spec: Mapping) -> Dataset:
    """The held-out test split of a digits workflow, the same on every node and for every
    auditor (evaluate tasks score on it; update_checks.min_accuracy screens with it)."""
    if not isinstance(data_spec, Mapping) or data_spec.get("dataset") != "digits":
        raise DataError("a shared held-out split exists only for data.dataset 'digits'")
    return _held_out(json.dumps(dict(data_spec), sort_keys=True))


@functools.lru_cache(maxsize=4)
def _held_out(data_spec: str) -> Dataset:  # ~80 ms to derive; every round of a workflow uses the same
    spec = json.loads(data_spec)
    return split_train_test(load_digits(), spec.get("test_fraction"), split_seed(spec))[1]


def federated_digits(data_spec: Mapping, num_nodes: int) -> FederatedData:
    """digits per a workflow's `data` spec: held-out test split, training split partitioned."""
    if not isinstance(data_spec, Mapping) or data_spec.get("dataset") != "digits":
        raise DataError(
            f"federated_digits needs data.dataset 'digits'; got {data_spec!r:.80}. npz data belongs to "
            f"its IoT node: load it there with load_npz"
        )
    train, test = split_train_test(load_digits(), data_spec.get("test_fraction"), split_seed(data_spec))
    spec = data_spec.get("partition") or {"kind": "iid", "seed": 0}
    shards = [train.subset(idx) for idx in partition(train.y, num_nodes, spec)]
    return FederatedData(train, test, shards)


# --------------------------------------------------------------------------- canary


@dataclass(frozen=True, eq=False)
class Canary:
    """A sample nobody could guess (random from the OS), to prove raw data never reaches a store.

    Put it into a node's data (`with_canary`), run a round, then scan every stored byte string
    with `found_in`: any hit means plaintext data leaked.
    """

    row: np.ndarray  # float32 [features], values in (0, 1)
    label: int

    def needles(self) -> list[bytes]:
        """Byte patterns the row leaves when stored raw, widened to float64, hex, base64 or as text."""
        raw = self.row.astype("<f4").tobytes()
        found = [raw, self.row.astype("<f8").tobytes(), raw.hex().encode(), raw.hex().upper().encode()]
        for shift in range(3):  # base64 of a longer buffer: the row can start at any of 3 phases
            encoded = base64.b64encode(b"\0" * shift + raw)
            found.append(encoded[4:-4])
        found.extend(repr(float(v)).encode() for v in self.row[:3])  # JSON / str() of tolist()
        return found

    def found_in(self, blob: bytes | str) -> bool:
        data = blob.encode() if isinstance(blob, str) else bytes(blob)
        return any(needle in data for needle in self.needles())


def make_canary(features: int = DIGITS_FEATURES, num_classes: int = DIGITS_CLASSES) -> Canary:
    """A fresh canary: values k / 2**24 with 24 random bits each, from the OS's entropy."""
    if features < 4:
        raise DataError(f"a canary needs at least 4 features to be unguessable; got {features}")
    values = [(secrets.randbits(24) | 1) / 2**24 for _ in range(features)]  # | 1: never 0
    return Canary(np.asarray(values, dtype=np.float32), secrets.randbelow(num_classes))


def with_canary(data: Dataset, canary: Canary) -> Dataset:
    """`data` with the canary appended as its last sample."""
    return Dataset(np.vstack([data.x, canary.row[None, :]]), np.append(data.y, np.int64(canary.label)))
