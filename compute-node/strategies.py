"""Aggregation strategies: how a round's local updates become the next global model.

Shaped like Flower's Strategy, reduced to what a round needs: a strategy turns the round's
`ClientUpdate`s into one weight per node (`weights`) and `aggregate` averages the states with
those weights. A new strategy is one subclass with a `name` (subclassing registers it) and a
`_weights` method (updates arrive checked and sorted by node); `strategy_from_spec` builds it from a workflow's `strategy` map.

Reproducible bit for bit, so an auditor can recompute a global model from the stored updates
and the weights on chain (`weighted_average(states, weights)`):

  * nodes are taken in sorted order of their keys, whatever order the updates arrived in;
  * weights are Python floats (IEEE-754 double); sums use math.fsum (exactly rounded, so
    independent of order);
  * each parameter is accumulated in float64 as  acc = acc + (w_node * float64(param))  with a
    separate multiply kernel and add kernel (never a fused multiply-add), so every elementwise
    operation is one correctly rounded IEEE operation on any machine;
  * the float64 sum is cast to float32 once, at the end (round to nearest even).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import torch

WEIGHT_TOLERANCE = 1e-9  # what the schedule family allows for sum(weights) - 1


class StrategyError(ValueError):
    """A strategy spec or a set of updates that cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class ClientUpdate:
    """One node's result of local training."""

    node: str                              # the node's public key (or name, off chain)
    state: Mapping[str, torch.Tensor]      # name -> float32 tensor
    samples: int                           # training samples behind the update
    metrics: Mapping[str, Any] = field(default_factory=dict)  # incl. "accuracy" on its own data


class Strategy:
    """Base class. Subclasses set `name` (and `parameters`, their spec fields) and implement `_weights`."""

    name: ClassVar[str] = ""
    parameters: ClassVar[tuple[str, ...]] = ()  # spec fields besides "name"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            if cls.name in STRATEGIES:
                raise TypeError(f"strategy {cls.name!r} is registered twice")
            STRATEGIES[cls.name] = cls

    @classmethod
    def from_spec(cls, spec: Mapping) -> "Strategy":
        return cls(**{p: spec[p] for p in cls.parameters})

    def spec(self) -> dict:
        return {"name": self.name, **{p: getattr(self, p) for p in self.parameters}}

    def weights(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """node -> weight >= 0, summing to 1 (within WEIGHT_TOLERANCE), in sorted node order."""
        return self._weights(check_updates(updates))

    def aggregate(self, updates: Sequence[ClientUpdate]) -> tuple[OrderedDict, dict[str, float]]:
        """(global state, weights): the weighted average of the updates' states."""
        ordered = check_updates(updates)
        weights = self._weights(ordered)
        return weighted_average({u.node: u.state for u in ordered}, weights), weights

    def _weights(self, updates: list[ClientUpdate]) -> dict[str, float]:
        """The strategy itself: `updates` are checked and sorted by node."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{p}={getattr(self, p)!r}' for p in self.parameters)})"


STRATEGIES: dict[str, type[Strategy]] = {}


# --------------------------------------------------------------------------- strategies


def _sample_shares(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    total = sum(u.samples for u in updates)  # integers: exact
    return {u.node: u.samples / total for u in updates}


class FedAvg(Strategy):
    """McMahan et al. 2017: weight_i = samples_i / sum(samples)."""

    name = "fedavg"

    def _weights(self, updates):
        return _sample_shares(updates)


class PerfFedAvg(Strategy):
    """Sample share blended with accuracy share:

        weight_i = alpha * samples_i / sum(samples) + (1 - alpha) * acc_i / sum(acc)

    acc_i is metrics["accuracy"] of node i's update on its own data, in [0, 1]. alpha = 1 is
    FedAvg exactly (the accuracy term is skipped, not multiplied by 0); alpha = 0 weighs by
    accuracy alone. If every accuracy is 0 the accuracy share is undefined: it falls back to
    the sample share, so the weights equal FedAvg's for any alpha.
    """

    name = "perf_fedavg"
    parameters = ("alpha",)

    def __init__(self, alpha: float):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
                or not 0 <= alpha <= 1:
            raise StrategyError(f"perf_fedavg alpha must be a number between 0 and 1; got {alpha!r}")
        self.alpha = float(alpha)

    def _weights(self, updates):
        by_samples = _sample_shares(updates)
        if self.alpha == 1.0:
            return by_samples
        accuracy = {u.node: _accuracy(u) for u in updates}
        total = math.fsum(accuracy[u.node] for u in updates)
        if total == 0.0:
            return by_samples  # documented fallback: no accuracy signal at all
        alpha, rest = self.alpha, 1.0 - self.alpha
        return {u.node: alpha * by_samples[u.node] + rest * (accuracy[u.node] / total) for u in updates}


def _accuracy(update: ClientUpdate) -> float:
    value = update.metrics.get("accuracy") if isinstance(update.metrics, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise StrategyError(
            f"perf_fedavg needs metrics['accuracy'] in [0, 1] for every update; node {update.node} "
            f"reported {value!r}"
        )
    return float(value)


# --------------------------------------------------------------------------- shared machinery


def strategy_from_spec(spec: Any) -> Strategy:
    """The strategy a workflow's `strategy` map names, e.g. {"name": "perf_fedavg", "alpha": 0.5}."""
    if not isinstance(spec, Mapping) or spec.get("name") not in STRATEGIES:
        raise StrategyError(f"strategy.name must be one of {', '.join(sorted(STRATEGIES))}; got {spec!r:.80}")
    cls = STRATEGIES[spec["name"]]
    allowed = {"name", *cls.parameters}
    if set(spec) != allowed:
        raise StrategyError(
            f"strategy {spec['name']!r} takes exactly the fields {', '.join(sorted(allowed))}; "
            f"got {', '.join(sorted(map(str, spec)))}"
        )
    return cls.from_spec(spec)


def check_updates(updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    """The updates sorted by node, after checking they can be averaged; else StrategyError."""
    if not updates:
        raise StrategyError("no updates to aggregate; a round needs at least one")
    seen: set[str] = set()
    for u in updates:
        if not isinstance(u, ClientUpdate):
            raise StrategyError(f"updates must be ClientUpdate objects, got {type(u).__name__}")
        if not isinstance(u.node, str) or not u.node:
            raise StrategyError(f"an update's node must be a non-empty string, got {u.node!r}")
        if u.node in seen:
            raise StrategyError(f"node {u.node} sent two updates; aggregate one per node")
        seen.add(u.node)
        if isinstance(u.samples, bool) or not isinstance(u.samples, int) or u.samples < 1:
            raise StrategyError(f"node {u.node}: samples must be an integer >= 1, got {u.samples!r}")
    ordered = sorted(updates, key=lambda u: u.node)
    _check_states({u.node: u.state for u in ordered})
    return ordered


def _check_states(states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    reference_node = next(iter(states))
    reference = states[reference_node]
    for node, state in states.items():
        if not isinstance(state, Mapping) or not state:
            raise StrategyError(f"node {node}: the update's state must be a non-empty map name -> tensor")
        if list(state) != list(reference):
            raise StrategyError(
                f"node {node}'s update has parameters {_names(state)}, node {reference_node}'s has "
                f"{_names(reference)}: they are not the same model"
            )
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
                raise StrategyError(f"node {node}: parameter {name} must be a float32 tensor")
            if tensor.shape != reference[name].shape:
                raise StrategyError(
                    f"node {node}: parameter {name} has shape {list(tensor.shape)}, node "
                    f"{reference_node}'s has {list(reference[name].shape)}"
                )
            if not torch.isfinite(tensor).all():
                raise StrategyError(f"node {node}: parameter {name} holds NaN or infinite values; leave this update out")


def _names(state: Mapping) -> str:
    names = list(state)
    return ", ".join(map(str, names[:6])) + (" ..." if len(names) > 6 else "")


def weighted_average(states: Mapping[str, Mapping[str, torch.Tensor]],
                     weights: Mapping[str, float]) -> OrderedDict:
    """sum_i weights[i] * states[i], computed as the module docstring says (auditors call this)."""
    if not states:
        raise StrategyError("no states to average")
    if set(states) != set(weights):
        raise StrategyError(
            f"weights name nodes {sorted(weights)} but states come from {sorted(states)}; they must match"
        )
    for node, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise StrategyError(f"weight of node {node} must be a finite number >= 0, got {w!r}")
    total = math.fsum(weights.values())
    if abs(total - 1.0) > WEIGHT_TOLERANCE:
        raise StrategyError(f"weights sum to {total!r}; they must sum to 1 (within {WEIGHT_TOLERANCE})")
    nodes = sorted(states)
    _check_states({n: states[n] for n in nodes})
    result = OrderedDict()
    for name in states[nodes[0]]:
        acc = torch.zeros(states[nodes[0]][name].shape, dtype=torch.float64)
        for node in nodes:
            term = torch.mul(states[node][name].to(torch.float64), float(weights[node]))
            acc = torch.add(acc, term)
        result[name] = acc.to(torch.float32)
    return result
