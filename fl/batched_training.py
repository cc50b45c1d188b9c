"""Many clients' local_train of one round in one pass, each result bit-identical to local_train.

A compute node given many local_train tasks of a round trains clients that share the model spec,
the hyperparameters and the starting state, each on its own data with its own shuffle seed.
Alone, each task pays for its own model build, checks and optimizer, and every optimizer step
is ~7 small tensor ops per parameter tensor: with 100 digits shards of ~14 samples, those
overheads are most of the time.

How, in lockstep: every client's parameters live in one row of a flat buffer [clients, L]
(each tensor's slot 64-byte aligned, as a fresh tensor is). Step t runs each client's forward
and backward alone, on its own batch, through the one model whose parameters are pointed at that
client's row; its gradients are copied into the same row of a gradient buffer. Then one
optimizer step (torch's own functional Adam / SGD, the code torch.optim runs) updates the rows
of every client still training, as one tensor per buffer: clients are sorted by step count, so
those are a prefix of the rows. Elementwise optimizer math gives each element the same bits
whatever tensor it is part of; the matmuls, reductions and their shapes are each client's own.

Why not torch.func.vmap over stacked parameters (or one block-diagonal model): a batched matmul
does not sum in the order of the client's own; measured on torch 2.13 CPU, 2 threads,
vmap(F.linear) differs from F.linear per client (batch 5, 64 -> 64: max |diff| 9.5e-6) and a
bmm weight gradient differs from the per-client mm (32 x 32 -> 10, 17 x 64 -> 10). Clients with
different sample counts would also need padded batches, which change the loss's reduction.
Bits decide the audit, so those are out (see bench/bench_batched_training.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.optim import adam as _adam, sgd as _sgd

from .models import ModelSpecError, build_model, check_seed, load_state, state_of
from .training import (OPTIMIZERS, HyperparameterError, Progress, TrainingError, TrainResult, _deterministic,
                       _evaluate_model, _tensors, check_hyperparameters, local_train)

ALIGN = 16  # floats: 64 bytes, the CPU allocator's alignment, so each client's tensors sit as a fresh one would
MAX_BUFFER_BYTES = 256 * 2**20  # per chunk of clients trained together (4 buffers of [clients, L] floats)


class Client(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    seed: int  # the shuffle seed local_train takes (the compute node's derive_seed(...))


ManyProgress = Callable[[int, Progress], None]  # (client index, its progress)


# --------------------------------------------------------------------------- optimizer steps
# name -> (group settings the lockstep step reproduces, step over flat buffers). A name missing
# here, or an optimizer whose settings differ, takes the plain path (plain_reason).

_ADAM = {"betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "amsgrad": False, "maximize": False,
         "foreach": None, "capturable": False, "differentiable": False, "fused": None,
         "decoupled_weight_decay": False}
_SGD = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False, "maximize": False,
        "foreach": None, "differentiable": False, "fused": None}


def _adam_step(group, params, grads, state, step):
    m, v = state
    beta1, beta2 = group["betas"]
    # foreach=False: what torch.optim.Adam runs for CPU tensors (_single_tensor_adam)
    _adam.adam([params], [grads], [m], [v], [], [step], foreach=False, capturable=False, differentiable=False,
               fused=None, has_complex=False, decoupled_weight_decay=False, amsgrad=False, beta1=beta1,
               beta2=beta2, lr=group["lr"], weight_decay=0, eps=group["eps"], maximize=False)


def _sgd_step(group, params, grads, state, step):
    _sgd.sgd([params], [grads], [None], foreach=False, fused=None, weight_decay=0, momentum=0,
             lr=group["lr"], dampening=0, nesterov=False, maximize=False)


STEPPERS: dict[str, tuple[dict, int, Callable]] = {"adam": (_ADAM, 2, _adam_step), "sgd": (_SGD, 0, _sgd_step)}


def plain_reason(model_spec: Mapping, hyperparameters: Mapping, count: int) -> str | None:
    """Why `count` trainings of this spec and these hyperparameters must run one by one through
    local_train, or None when local_train_many trains them together. Invalid inputs also answer
    a reason: local_train then reports them exactly as it does for a single task."""
    if count < 2:
        return "a single training: nothing to share"
    try:
        hp = check_hyperparameters(hyperparameters)
        model = build_model(model_spec, seed=hp["seed"])
    except (ModelSpecError, TrainingError) as exc:
        return f"invalid inputs: {exc}"
    if any(True for _ in model.buffers()):
        return "the model has buffers, which its forward pass may change"
    name = hp["optimizer"]
    if name not in STEPPERS:
        return f"no lockstep step for optimizer {name!r}"
    probe = OPTIMIZERS[name]([torch.zeros(1, requires_grad=True)], 1.0).param_groups[0]
    expected, _, _ = STEPPERS[name]
    if any(probe.get(k) != v for k, v in expected.items()) or set(probe) - {"params", "lr"} != set(expected):
        return f"optimizer {name!r} is built with settings the lockstep step does not reproduce"
    return None


# --------------------------------------------------------------------------- training


@dataclass
class _Run:
    """One client in the lockstep: its data, shuffle, parameter rows and running figures."""

    index: int
    xt: torch.Tensor
    yt: torch.Tensor
    generator: torch.Generator
    total: int                # optimizer steps it takes
    row: int = 0              # its row in the chunk's buffers
    params: list = field(default_factory=list)  # views into the parameter buffer, model order
    grads: list = field(default_factory=list)   # views into the gradient buffer
    order: Any = None
    epoch: int = 0
    batch: int = 0
    loss_sum: float = 0.0
    correct_sum: float = 0.0
    epochs: list = field(default_factory=list)
    batches: list = field(default_factory=list)
    failed: Exception | None = None

    @property
    def n(self) -> int:
        return int(self.yt.shape[0])


def local_train_many(model_spec: Mapping, hyperparameters: Mapping, global_state: Mapping | None,
                     clients: Sequence[Client], *, proximal_mu: float = 0.0, start_loss: bool = False,
                     progress: ManyProgress | None = None) -> list[TrainResult | Exception]:
    """local_train(model_spec, hyperparameters, global_state, c.x, c.y, seed=c.seed, ...) for every
    client c, bit for bit. Where local_train raises a TrainingError for a client (its data, its
    seed, divergence; or hyperparameters, alike for all) that error stands in the client's place
    and the others train on; a spec or global state that does not fit raises, as local_train does."""
    reason = plain_reason(model_spec, hyperparameters, len(clients))
    if reason is not None:
        return [_plain(model_spec, hyperparameters, global_state, c, i, proximal_mu, start_loss, progress)
                for i, c in enumerate(clients)]
    hp = check_hyperparameters(hyperparameters)
    model = build_model(model_spec, seed=hp["seed"])
    if global_state is not None:
        load_state(model, model_spec, global_state)
    results: list[TrainResult | Exception | None] = [None] * len(clients)
    runs = []
    for i, client in enumerate(clients):
        try:
            runs.append(_prepare(model_spec, hp, client, i))
        except TrainingError as exc:
            results[i] = exc
    runs.sort(key=lambda r: -r.total)  # stable: rows still training are always a prefix
    params = list(model.parameters())
    slots = [-(-p.numel() // ALIGN) * ALIGN for p in params]
    per_row = 4 * 4 * sum(slots)  # params, grads and two optimizer states, float32
    chunk = max(1, MAX_BUFFER_BYTES // per_row)
    with _deterministic():
        befores = {r.index: _evaluate_model(model, r.xt, r.yt)["loss"] for r in runs} if start_loss else {}
        for first in range(0, len(runs), chunk):
            _train_chunk(model, hp, runs[first:first + chunk], slots, proximal_mu, progress)
        for run in runs:
            results[run.index] = run.failed or _finish(model, run, befores)
    return results


def _plain(spec, hp, state, client, index, proximal_mu, start_loss, progress):
    report = None if progress is None else (lambda p: progress(index, p))
    try:
        return local_train(spec, hp, state, client.x, client.y, seed=client.seed, proximal_mu=proximal_mu,
                           start_loss=start_loss, progress=report)
    except TrainingError as exc:
        return exc


def _prepare(spec, hp, client: Client, index: int) -> _Run:
    try:
        check_seed(client.seed)
    except ModelSpecError as exc:
        raise HyperparameterError(f"local_train seed: {exc}") from None
    xt, yt = _tensors(spec, client.x, client.y)
    n = int(yt.shape[0])
    total = math.ceil(n / hp["batch_size"]) * hp["epochs"]
    return _Run(index, xt, yt, torch.Generator().manual_seed(client.seed), total)


def _point(params, views) -> None:
    """Make the model's parameters `views` (one client's rows): same module, that client's weights."""
    for p, v in zip(params, views):
        p.data = v


def _train_chunk(model, hp, runs: list[_Run], slots, proximal_mu, progress) -> None:
    params = list(model.parameters())
    anchor = [p.detach().clone() for p in params] if proximal_mu > 0 else None
    width = sum(slots)
    flat = torch.zeros(len(runs), width)
    grads = torch.zeros(len(runs), width)
    name = hp["optimizer"]
    settings, states, stepper = STEPPERS[name]
    group = {**settings, "lr": float(hp["learning_rate"])}
    state = [torch.zeros(len(runs), width) for _ in range(states)]
    step_count = torch.tensor(0.0)  # torch.optim's per-parameter "step"; equal for every row in lockstep
    offsets = np.cumsum([0, *slots])
    originals = [p.data for p in params]
    for row, run in enumerate(runs):
        run.row = row
        for p, start in zip(params, offsets):
            flat[row, start:start + p.numel()].copy_(p.detach().reshape(-1))
        run.params = [flat[row, s:s + p.numel()].view_as(p) for p, s in zip(params, offsets)]
        run.grads = [grads[row, s:s + p.numel()].view_as(p) for p, s in zip(params, offsets)]
    batch_size, epochs = hp["batch_size"], hp["epochs"]
    model.train()
    try:
        for t in range(1, runs[0].total + 1 if runs else 1):
            active = [r for r in runs if r.total >= t]
            for run in active:
                if run.failed is None:
                    _forward_backward(model, params, run, batch_size, anchor, proximal_mu, hp)
            with torch.no_grad():
                stepper(group, flat[:len(active)], grads[:len(active)], [s[:len(active)] for s in state], step_count)
            for run in active:
                if run.failed is not None:
                    continue
                last = run.batches[-1]
                if progress is not None:
                    progress(run.index, Progress(t, run.total, run.epoch, epochs, last["loss"], last["accuracy"]))
                if run.batch * batch_size >= run.n:  # the epoch's last batch
                    run.epochs.append({"epoch": run.epoch, "loss": run.loss_sum / run.n,
                                       "accuracy": run.correct_sum / run.n})
    finally:
        _point(params, originals)


def _forward_backward(model, params, run: _Run, batch_size, anchor, proximal_mu, hp) -> None:
    """One client's step t up to its gradients, exactly as local_train's loop body runs it."""
    if run.batch * batch_size >= run.n or run.order is None:  # a new epoch
        run.epoch += 1
        run.batch, run.loss_sum, run.correct_sum = 0, 0.0, 0.0
        run.order = torch.randperm(run.n, generator=run.generator)
    start = run.batch * batch_size
    run.batch += 1
    idx = run.order[start:start + batch_size]
    xb, yb = run.xt[idx], run.yt[idx]
    _point(params, run.params)
    for p in params:
        p.grad = None
    logits = model(xb)
    loss = F.cross_entropy(logits, yb)
    if not torch.isfinite(loss):
        run.failed = TrainingError(
            f"the loss became {loss.item()} at epoch {run.epoch}, batch {run.batch}: training diverged; "
            f"lower hyperparameters.learning_rate (now {hp['learning_rate']})"
        )
        return
    objective = loss
    if anchor is not None:
        drift = sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchor))
        objective = loss + (proximal_mu / 2) * drift
    objective.backward()
    for g, p in zip(run.grads, params):
        g.copy_(p.grad)
    size = int(yb.shape[0])
    batch_loss = loss.item()
    batch_correct = int((logits.detach().argmax(1) == yb).sum())
    run.loss_sum += batch_loss * size
    run.correct_sum += batch_correct
    run.batches.append({"epoch": run.epoch, "batch": run.batch, "size": size, "loss": batch_loss,
                        "accuracy": batch_correct / size})


def _finish(model, run: _Run, befores) -> TrainResult | Exception:
    params = list(model.parameters())
    originals = [p.data for p in params]
    _point(params, run.params)
    try:
        state = state_of(model)
        bad = [name for name, t in state.items() if not torch.isfinite(t).all()]
        if bad:
            return TrainingError(
                f"training left non-finite parameters in {', '.join(bad)}; lower hyperparameters.learning_rate"
            )
        final = _evaluate_model(model, run.xt, run.yt)
    finally:
        _point(params, originals)
    before = {"start_loss": befores[run.index]} if run.index in befores else {}
    metrics = {
        "loss": final["loss"], "accuracy": final["accuracy"], "samples": run.n, "steps": len(run.batches),
        "train_loss": run.epochs[-1]["loss"], "train_accuracy": run.epochs[-1]["accuracy"],
        "epochs": run.epochs, "batches": run.batches, **before,
    }
    return TrainResult(state, run.n, metrics)
