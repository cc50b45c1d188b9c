"""Contribution scores by a truncated Monte Carlo approximation of Shapley values (in the manner of
GTG-Shapley, Liu et al. 2022): what each participant's update added to the round's model.

The value of a set S of updates is the held-out accuracy of their sample-weighted FedAvg (the
round's starting model for the empty set), counted with models.exact_predictions, so every
machine gets the same number. For each of `permutations` orders of the updates, drawn from a
seed the chain fixes (the round's schedule id), each update's marginal value is what adding it
to those before it changes; once the running value is within TRUNCATION of the full set's, the
rest of that order adds 0 (the later updates have little left to add). A score is the mean of an
update's marginals. Everything is deterministic, so `trustmesh audit` recomputes the scores and
compares them exactly; the rewards rule pays the data pot by them (negative scores count as 0).
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np

from .strategies.base import ClientUpdate, sample_shares

TRUNCATION = 0.001  # accuracy: a difference no test split of a few hundred samples can resolve


def scores(updates: Sequence[ClientUpdate], start_state: Mapping, accuracy, *, seed: bytes,
           permutations: int) -> dict[str, float]:
    """node -> its approximate Shapley value. accuracy: state -> held-out accuracy
    (screening.held_out_accuracy)."""
    from .strategies.averaging import weighted_average

    ordered = sorted(updates, key=lambda u: u.node)
    nodes = [u.node for u in ordered]
    by_node = {u.node: u for u in ordered}
    known: dict[frozenset, float] = {frozenset(): accuracy(start_state)}

    def value(members: frozenset) -> float:
        if members not in known:
            chosen = [by_node[n] for n in sorted(members)]
            known[members] = accuracy(weighted_average({u.node: u.state for u in chosen}, sample_shares(chosen)))
        return known[members]

    full = value(frozenset(nodes))
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(hashlib.sha256(b"trustmesh-shapley" + seed).digest(), "big")))
    totals = {n: 0.0 for n in nodes}
    for _ in range(permutations):
        members, before = frozenset(), value(frozenset())
        for index in rng.permutation(len(nodes)).tolist():
            if abs(full - before) <= TRUNCATION:
                break  # the rest of this order adds nothing measurable
            members = members | {nodes[index]}
            after = value(members)
            totals[nodes[index]] += after - before
            before = after
    return {n: totals[n] / permutations for n in nodes}
