"""Bulyan (El Mhamdi et al. 2018): Krum chooses theta = n - 2f updates one at a time (each time
among those left); then, per coordinate, the beta = theta - 2f chosen values closest to their
median are averaged. Tolerates f Byzantine updates among n >= 4f + 3 (checked against
federation.min_nodes_required at deploy time), so beta >= 3. The chosen updates get weight
1/theta in the round result, the others 0 (rejected)."""

from __future__ import annotations

from .base import Integer
from .krum import Byzantine


class Bulyan(Byzantine):
    name = "bulyan"
    parameters = {"f": Integer(low=0, high=1000)}
    factor = 4
    chosen_by = "not among the n - 2f updates Krum chose in turn"

    def _choose(self, updates):
        from .averaging import krum_order

        theta = len(updates) - 2 * self.f
        left, chosen = list(updates), []
        while len(chosen) < theta:
            best = left[krum_order(left, self.f)[0]]
            chosen.append(best.node)
            left.remove(best)
        return {u.node: (1.0 / theta if u.node in chosen else 0.0) for u in updates}

    def combine(self, updates, weights):
        from .averaging import kept, median_rows, state_of_rows, sum_rows

        if self.shortfall(len(weights)):  # `step` keeps the starting model instead
            return super().combine(updates, weights)
        chosen = kept(updates, weights)
        beta = len(chosen) - 2 * self.f

        def closest_to_median(rows):
            import torch

            distance = torch.abs(torch.sub(rows, median_rows(rows)))
            nearest = torch.argsort(distance, dim=0, stable=True)[:beta]
            return torch.div(sum_rows(torch.gather(rows, 0, nearest)), float(beta))

        return state_of_rows(chosen, closest_to_median)
