"""FedMedian (Yin et al. 2018): the coordinate-wise median of the updates.

Every update takes part with the same weight 1/n in the round result (the median ignores sample
counts: a node cannot buy influence with a large claimed sample count), and the global model is
the median of each parameter over the updates, the mean of the two middle values when n is
even. f arbitrary updates among n > 2f cannot move any coordinate beyond the honest values'
range; below 3 updates a round has no such f >= 1 (the median of two is their mean), so a
workflow whose rounds may be ready with fewer is refused at deploy time, and a round the update
checks (fl/screening.py) leave with fewer keeps the model it started from (`shortfall`, as Krum's).
"""

from __future__ import annotations

from .base import Strategy

LEAST = 3  # the fewest updates per round for which one arbitrary update is outvoted


class FedMedian(Strategy):
    name = "median"
    robust = True
    uses_start = True  # a short round keeps the model it started from

    def shortfall(self, n):
        if n >= LEAST:
            return None
        return (f"a median outvotes one arbitrary update only among at least {LEAST} updates and {n} passed the "
                f"update checks: the round keeps the model it started from")

    @classmethod
    def federation_problem(cls, spec, federation):
        smallest = federation.get("min_nodes_required", 1)
        if smallest < LEAST:
            return (f"a median outvotes one arbitrary update only among at least {LEAST} updates in every round "
                    f"(with 2 it is their mean), but federation.min_nodes_required is {smallest}; raise it to "
                    f"{LEAST} (with enough participants)")
        return None

    def _weights(self, updates):
        return {u.node: 1.0 / len(updates) for u in updates}

    def combine(self, updates, weights):
        from .averaging import kept, median_rows, state_of_rows

        return state_of_rows(kept(updates, weights), median_rows)
