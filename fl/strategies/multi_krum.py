"""Multi-Krum (Blanchard et al. 2017): the m updates with the best Krum scores, averaged by
their sample counts; the others get weight 0 (rejected). m = 1 is Krum. Its guarantee needs
n >= 2f + 3 updates, and m of them chosen while f may be Byzantine, n >= m + f: at least
max(2f + 3, m + f) (`least`), checked against federation.min_nodes_required at deploy time."""

from __future__ import annotations

from .base import Integer, sample_shares
from .krum import Byzantine


class MultiKrum(Byzantine):
    name = "multi_krum"
    parameters = {"f": Integer(low=0, high=1000), "m": Integer(low=1, high=1000)}
    chosen_by = "not among the m updates with the lowest Krum scores"
    lowered = "f or m"

    @classmethod
    def least(cls, params):
        f, m = params["f"], params["m"]
        return max(2 * f + 3, m + f), "max(2f + 3, m + f)"

    def _choose(self, updates):
        from .averaging import krum_order

        chosen = {updates[i].node for i in krum_order(updates, self.f)[:self.m]}
        shares = sample_shares([u for u in updates if u.node in chosen])
        return {u.node: shares.get(u.node, 0.0) for u in updates}
