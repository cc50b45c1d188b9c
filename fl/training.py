"""Local training and evaluation of one model on one node's data.

Determinism: the starting model is either the given global state or `build_model(spec,
seed=hyperparameters.seed)` (so every node of round 1 starts from the same model); batches come
from `torch.randperm` on a private Generator seeded with `seed` (default hyperparameters.seed;
the compute node passes `derive_seed(...)` so nodes and rounds shuffle differently). Nothing
draws from the global RNG, and deterministic algorithms are enforced while training. Same
inputs, same seeds, same torch build and thread count -> bit-identical states.

Metrics of local_train (a plain dict):

    loss, accuracy      the *trained* model evaluated on the node's own data (what PerfFedAvg
                        weighs by; the last epoch's running figures mix weights of many steps)
    samples, steps      training samples, optimizer steps taken
    train_loss, train_accuracy   running figures of the last epoch
    epochs              [{epoch, loss, accuracy}]  per epoch, sample-weighted over its batches
    batches             [{epoch, batch, size, loss, accuracy}]  per optimizer step

`scalar_metrics` keeps the flat numbers (what fits a task report on chain).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .datasets import DataError, check_arrays
from .models import ModelSpecError, build_model, check_seed, load_state, model_type, state_of

EVAL_BATCH = 4096
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 65_536
HYPERPARAMETERS = ("epochs", "batch_size", "learning_rate", "optimizer", "seed")

# One entry per optimizer name of the workflow schema: name -> (parameters, learning rate) -> optimizer.
OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
}


class TrainingError(ValueError):
    """Training cannot start or did not converge to finite numbers; the message says why."""


class HyperparameterError(TrainingError):
    """Hyperparameters outside the workflow rules."""


@dataclass(frozen=True)
class Progress:
    """Reported after every optimizer step; raise from the callback to cancel training."""

    step: int          # 1-based, over the whole run
    total: int         # steps the run will take
    epoch: int         # 1-based
    epochs: int
    loss: float        # of the step's batch
    accuracy: float    # of the step's batch

    @property
    def fraction(self) -> float:
        return self.step / self.total


class TrainResult(NamedTuple):
    state: OrderedDict   # name -> float32 tensor, model state_dict order
    samples: int
    metrics: dict


ProgressCallback = Callable[[Progress], None]


# --------------------------------------------------------------------------- checks


def check_hyperparameters(hp: Any) -> dict:
    """The hyperparameters if they follow the workflow rules, else HyperparameterError."""
    if not isinstance(hp, Mapping):
        raise HyperparameterError(f"hyperparameters must be a map, got {type(hp).__name__}")
    unknown = sorted(str(k) for k in hp if k not in HYPERPARAMETERS)
    missing = [k for k in HYPERPARAMETERS if k not in hp]
    if unknown or missing:
        raise HyperparameterError(
            f"hyperparameters take exactly {', '.join(HYPERPARAMETERS)}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(unknown)}" if unknown else "")
        )
    for name, high in (("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
        value = hp[name]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise HyperparameterError(f"hyperparameters.{name} must be an integer between 1 and {high}; got {value!r}")
    lr = hp["learning_rate"]
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise HyperparameterError(f"hyperparameters.learning_rate must be a finite number > 0; got {lr!r}")
    if hp["optimizer"] not in OPTIMIZERS:
        raise HyperparameterError(
            f"hyperparameters.optimizer must be one of {', '.join(OPTIMIZERS)}; got {hp['optimizer']!r}"
        )
    try:
        check_seed(hp["seed"], "hyperparameters.seed")
    except ModelSpecError as exc:
        raise HyperparameterError(str(exc)) from None
    return dict(hp)


def derive_seed(base: int, *parts: Any) -> int:
    """A 32-bit seed from a base seed and labels (round, node key, ...), stable everywhere."""
    text = "\x1f".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def _tensors(spec: Mapping, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        check_arrays(x, y, input_dim=spec.get("input_dim"), num_classes=spec.get("num_classes"),
                     source="training data")
    except DataError as exc:
        raise TrainingError(str(exc)) from None
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))


def use_threads(count: int) -> None:
    """Train with ``count`` threads. torch's default is one per core, right for a node alone on
    its machine; nodes sharing one (the local network) each take their share instead: two
    compute nodes at two threads each on two cores made every round ~3x slower."""
    if count < 1:
        raise TrainingError(f"thread count must be at least 1, got {count}")
    torch.set_num_threads(count)


# deterministic algorithms are a process-wide switch: turn it on while any run is active and
# restore the caller's setting afterwards, safely when runs overlap in threads.
_det_lock = threading.Lock()
_det_depth = 0
_det_saved = (False, False)


@contextlib.contextmanager
def _deterministic():
    global _det_depth, _det_saved
    with _det_lock:
        if _det_depth == 0:
            _det_saved = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
            torch.use_deterministic_algorithms(True)
        _det_depth += 1
    try:
        yield
    finally:
        with _det_lock:
            _det_depth -= 1
            if _det_depth == 0:
                torch.use_deterministic_algorithms(_det_saved[0], warn_only=_det_saved[1])


# --------------------------------------------------------------------------- training


def initial_state(model_spec: Mapping, seed: int) -> OrderedDict:
    """The weights round 1 trains from: the model built from the spec with hyperparameters.seed."""
    return state_of(build_model(model_spec, seed=seed))


def local_train(model_spec: Mapping, hyperparameters: Mapping, global_state: Mapping | None,
                x: np.ndarray, y: np.ndarray, *, progress: ProgressCallback | None = None,
                seed: int | None = None, proximal_mu: float = 0.0, start_loss: bool = False) -> TrainResult:
    """Train from `global_state` (or a fresh seeded model) on (x, y); see module docstring.
    proximal_mu > 0 adds FedProx's (mu / 2) * ||w - w_start||^2 to the objective (the reported
    loss stays the cross-entropy). start_loss: also report the starting model's loss on (x, y)
    before any step (metrics["start_loss"], what q-FedAvg weighs by)."""
    model_type(model_spec)
    hp = check_hyperparameters(hyperparameters)
    shuffle_seed = hp["seed"] if seed is None else seed
    try:
        check_seed(shuffle_seed)
    except ModelSpecError as exc:
        raise HyperparameterError(f"local_train seed: {exc}") from None
    xt, yt = _tensors(model_spec, x, y)
    n = int(yt.shape[0])

    model = build_model(model_spec, seed=hp["seed"])
    if global_state is not None:
        load_state(model, model_spec, global_state)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    optimizer = OPTIMIZERS[hp["optimizer"]](model.parameters(), float(hp["learning_rate"]))
    generator = torch.Generator().manual_seed(shuffle_seed)
    batch_size = hp["batch_size"]
    per_epoch = math.ceil(n / batch_size)
    total = per_epoch * hp["epochs"]
    epochs, batches = [], []
    step = 0
    before = {}

    with _deterministic():
        if start_loss:
            before["start_loss"] = _evaluate_model(model, xt, yt)["loss"]
        model.train()
        for epoch in range(1, hp["epochs"] + 1):
            order = torch.randperm(n, generator=generator)
            loss_sum = correct_sum = 0.0
            for batch, start in enumerate(range(0, n, batch_size), 1):
                idx = order[start:start + batch_size]
                xb, yb = xt[idx], yt[idx]
                optimizer.zero_grad(set_to_none=True)
                logits = model(xb)
                loss = F.cross_entropy(logits, yb)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {loss.item()} at epoch {epoch}, batch {batch}: training diverged; "
                        f"lower hyperparameters.learning_rate (now {hp['learning_rate']})"
                    )
                objective = loss
                if anchor is not None:
                    drift = sum(torch.sum((p - a) ** 2) for p, a in zip(model.parameters(), anchor))
                    objective = loss + (proximal_mu / 2) * drift
                objective.backward()
                optimizer.step()
                step += 1
                size = int(yb.shape[0])
                batch_loss = loss.item()
                batch_correct = int((logits.detach().argmax(1) == yb).sum())
                loss_sum += batch_loss * size
                correct_sum += batch_correct
                batches.append({"epoch": epoch, "batch": batch, "size": size, "loss": batch_loss,
                                "accuracy": batch_correct / size})
                if progress is not None:
                    progress(Progress(step, total, epoch, hp["epochs"], batch_loss, batch_correct / size))
            epochs.append({"epoch": epoch, "loss": loss_sum / n, "accuracy": correct_sum / n})

        state = state_of(model)
        bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
        if bad:
            raise TrainingError(
                f"training left non-finite parameters in {', '.join(bad)}; lower hyperparameters.learning_rate"
            )
        final = _evaluate_model(model, xt, yt)

    metrics = {
        "loss": final["loss"], "accuracy": final["accuracy"], "samples": n, "steps": step,
        "train_loss": epochs[-1]["loss"], "train_accuracy": epochs[-1]["accuracy"],
        "epochs": epochs, "batches": batches, **before,
    }
    return TrainResult(state, n, metrics)


def scalar_metrics(metrics: Mapping) -> dict[str, float | int]:
    """The flat numeric entries of a metrics dict (per-epoch / per-batch lists left out)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


# --------------------------------------------------------------------------- evaluation


def evaluate(model_spec: Mapping, state: Mapping, x: np.ndarray, y: np.ndarray) -> dict:
    """{accuracy, loss (mean cross-entropy), samples} of `state` on (x, y)."""
    xt, yt = _tensors(model_spec, x, y)
    model = build_model(model_spec, seed=0)
    load_state(model, model_spec, state)
    with _deterministic():
        return _evaluate_model(model, xt, yt)


def _evaluate_model(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    loss_sum, correct, n = 0.0, 0, int(y.shape[0])
    with torch.no_grad():
        for start in range(0, n, EVAL_BATCH):
            logits = model(x[start:start + EVAL_BATCH])
            target = y[start:start + EVAL_BATCH]
            loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    model.train()
    return {"accuracy": correct / n, "loss": loss_sum / n, "samples": n}
