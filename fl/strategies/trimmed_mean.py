"""FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the floor(beta * n) smallest and the as
many largest values, and average the rest.

beta in [0, 0.49] (below 0.5, so at least one value is left to average). floor(beta * n) >= f
keeps f arbitrary updates from moving a coordinate beyond the honest values' range; a workflow
whose smallest round (federation.min_nodes_required) would trim nothing, a plain mean, is refused
at deploy time. Every update takes part with weight 1/n in the round result; which values a
coordinate dropped depends on the coordinate, so no node is rejected as a whole. A round the update
checks (fl/screening.py) leave too small to trim a value keeps the model it started from
(`shortfall`, as Krum's) instead of publishing a plain mean.
"""

from __future__ import annotations

import math

from .base import Number, Strategy


def trimmed(beta: float, n: int) -> int:
    """How many values a round of n updates drops at each end of a coordinate."""
    return math.floor(beta * n)


class FedTrimmedAvg(Strategy):
    name = "trimmed_mean"
    parameters = {"beta": Number(low=0, high=0.49)}
    robust = True
    uses_start = True  # a short round keeps the model it started from

    def shortfall(self, n):
        if trimmed(self.beta, n) >= 1:
            return None
        return (f"trimmed_mean with beta = {self.beta:g} trims floor(beta x {n}) = 0 values of the {n} updates that "
                f"passed the update checks: the round keeps the model it started from")

    @classmethod
    def federation_problem(cls, spec, federation):
        beta, smallest = spec["beta"], federation.get("min_nodes_required", 1)
        if trimmed(beta, smallest) >= 1:
            return None
        if beta <= 0:
            return "beta = 0 trims nothing: it is a plain mean; choose a beta above 0, or the fedavg strategy"
        needs = max(smallest, math.ceil(1 / beta) - 1)
        while trimmed(beta, needs) < 1:  # 1 / beta is rounded: the exact smallest n, counted as combine does
            needs += 1
        least_beta = math.ceil(10_000 / smallest) / 10_000  # 1 / smallest rounded up to 4 places
        other = f" or beta to {least_beta:g}" if least_beta <= cls.parameters["beta"].high else ""
        return (f"beta = {beta:g} trims floor(beta x {smallest}) = 0 values in a round of federation."
                f"min_nodes_required = {smallest} updates: a plain mean; raise min_nodes_required to {needs}{other}")

    def _weights(self, updates):
        return {u.node: 1.0 / len(updates) for u in updates}

    def combine(self, updates, weights):
        from .averaging import kept, state_of_rows, sum_rows

        chosen = kept(updates, weights)
        cut = trimmed(self.beta, len(chosen))

        def trimmed_rows(rows):
            import torch

            middle = torch.sort(rows, dim=0).values[cut:len(chosen) - cut]
            return torch.div(sum_rows(middle), float(len(middle)))

        return state_of_rows(chosen, trimmed_rows)
