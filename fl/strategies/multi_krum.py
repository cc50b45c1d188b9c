"""Multi-Krum (Blanchard et al. 2017): the m updates with the best Krum scores, averaged by
their sample counts; the others get weight 0 (rejected). m = 1 is Krum. Needs n >= 2f + 3 and
m <= n - f, checked against federation.min_nodes_required at deploy time."""

from __future__ import annotations

from .base import Integer, sample_shares
from .krum import Byzantine, check_count


class MultiKrum(Byzantine):
    name = "multi_krum"
    parameters = {"f": Integer(low=0, high=1000), "m": Integer(low=1, high=1000)}
    chosen_by = "not among the m updates with the lowest Krum scores"

    @classmethod
    def federation_problem(cls, spec, federation):
        f, m = spec["f"], spec["m"]
        problem = super().federation_problem(spec, federation)
        smallest = federation.get("min_nodes_required", 1)
        if problem is None and m > smallest - f:
            problem = (f"m = {m} updates cannot be chosen while f = {f} may be Byzantine in a round of "
                       f"federation.min_nodes_required = {smallest} updates: m must be at most "
                       f"min_nodes_required - f = {smallest - f}")
        return problem

    def _weights(self, updates):
        from .averaging import krum_order

        n = len(updates)
        check_count(self.name, n, self.f, needs=max(2 * self.f + 3, self.m + self.f), formula="max(2f + 3, m + f)")
        chosen = {updates[i].node for i in krum_order(updates, self.f)[:self.m]}
        shares = sample_shares([u for u in updates if u.node in chosen])
        return {u.node: shares.get(u.node, 0.0) for u in updates}
