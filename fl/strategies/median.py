"""FedMedian (Yin et al. 2018): the coordinate-wise median of the updates.

Every update takes part with the same weight 1/n in the round result (the median ignores sample
counts: a node cannot buy influence with a large claimed sample count), and the global model is
the median of each parameter over the updates, the mean of the two middle values when n is
even. One attacker among n >= 3 cannot move any coordinate beyond the honest values' range.
"""

from __future__ import annotations

from .base import Strategy


class FedMedian(Strategy):
    name = "median"

    def _weights(self, updates):
        return {u.node: 1.0 / len(updates) for u in updates}

    def combine(self, updates, weights):
        from .averaging import kept, median_rows, state_of_rows

        return state_of_rows(kept(updates, weights), median_rows)
