"""FedTrimmedAvg (Yin et al. 2018): per coordinate, drop the floor(beta * n) smallest and the as
many largest values, and average the rest.

beta in [0, 0.49]: beta = 0 is the plain mean of the updates (not sample-weighted). Every update
takes part with weight 1/n in the round result; which values a coordinate dropped depends on the
coordinate, so no node is rejected as a whole.
"""

from __future__ import annotations

import math

from .base import Number, Strategy


class FedTrimmedAvg(Strategy):
    name = "trimmed_mean"
    parameters = {"beta": Number(low=0, high=0.49)}

    def _weights(self, updates):
        return {u.node: 1.0 / len(updates) for u in updates}

    def combine(self, updates, weights):
        from .averaging import kept, state_of_rows, sum_rows

        chosen = kept(updates, weights)
        cut = math.floor(self.beta * len(chosen))

        def trimmed(rows):
            import torch

            middle = torch.sort(rows, dim=0).values[cut:len(chosen) - cut]
            return torch.div(sum_rows(middle), float(len(middle)))

        return state_of_rows(chosen, trimmed)
