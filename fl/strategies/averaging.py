"""The weighted average every strategy ends in, reproducible bit for bit so an auditor can
recompute a global model from the stored updates and the weights on chain
(`weighted_average(states, weights)`):

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
from typing import Mapping, Sequence

import torch

from .base import WEIGHT_TOLERANCE, ClientUpdate, StrategyError


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


# --------------------------------------------------------------------------- robust rules' machinery
# Each is exact or correctly rounded elementwise, so every machine computes the same bits:
# float64 sorts and selections, sums accumulated one row at a time or with math.fsum.


def stacked(updates: Sequence[ClientUpdate], name: str) -> torch.Tensor:
    """Parameter `name` of every update, float64, one row per update (in the given order)."""
    return torch.stack([u.state[name].to(torch.float64) for u in updates])


def sum_rows(rows: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ... in that order, one IEEE add per element each (no tree reduction)."""
    acc = torch.zeros(rows.shape[1:], dtype=torch.float64)
    for row in rows:
        acc = torch.add(acc, row)
    return acc


def median_rows(rows: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median of the rows (the mean of the two middle values for an even count)."""
    ordered = torch.sort(rows, dim=0).values
    n = rows.shape[0]
    if n % 2:
        return ordered[n // 2]
    return torch.div(torch.add(ordered[n // 2 - 1], ordered[n // 2]), 2.0)


def squared_distances(updates: Sequence[ClientUpdate]) -> list[list[float]]:
    """d[i][j] = ||state_i - state_j||^2 over every parameter, correctly rounded (math.fsum)."""
    from trustmesh.fl.screening import flat, squared_norm

    vectors = [flat(u.state) for u in updates]
    n = len(vectors)
    d = [[0.0] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            d[i][j] = d[j][i] = squared_norm(vectors[i] - vectors[j])
    return d


def krum_scores(updates: Sequence[ClientUpdate], f: int) -> list[float]:
    """Krum's score of each update (Blanchard et al. 2017): the sum of its squared distances to
    its n - f - 2 nearest others (at least one)."""
    d = squared_distances(updates)
    n = len(updates)
    nearest = max(1, n - f - 2)
    return [math.fsum(sorted(d[i][j] for j in range(n) if j != i)[:nearest]) for i in range(n)]


def krum_order(updates: Sequence[ClientUpdate], f: int) -> list[int]:
    """Indices of the updates, best Krum score first (ties: the earlier, i.e. smaller node key)."""
    scores = krum_scores(updates, f)
    return sorted(range(len(updates)), key=lambda i: (scores[i], i))


def kept(updates: Sequence[ClientUpdate], weights: Mapping[str, float]) -> list[ClientUpdate]:
    """The updates a rule kept: those with a weight above 0, in the given order."""
    chosen = [u for u in updates if weights.get(u.node, 0) > 0]
    if not chosen:
        raise StrategyError("every weight is 0: no update is left to combine")
    return chosen


def state_of_rows(updates: Sequence[ClientUpdate], combine_rows) -> OrderedDict:
    """For each parameter: combine_rows(float64 rows of the updates) cast to float32 once."""
    return OrderedDict((name, combine_rows(stacked(updates, name)).to(torch.float32)) for name in updates[0].state)
