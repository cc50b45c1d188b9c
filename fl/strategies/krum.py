"""Krum (Blanchard et al. 2017): the one update closest to its neighbours becomes the global model.

Each update's score is the sum of its squared distances to its n - f - 2 nearest other updates;
the lowest score wins (ties: the smaller node key). The round result gives it weight 1 and every
other update weight 0 (rejected). Tolerates f Byzantine updates among n >= 2f + 3, so a workflow
whose rounds may be ready with fewer (federation.min_nodes_required) is refused at deploy time.

`Byzantine` holds what Krum, Multi-Krum and Bulyan share, including a round the update checks
(fl/screening.py) left short: when fewer updates pass them than the rule's guarantee needs
(`least`), the rule does not run on them. The round keeps the model it started from as its global
model (`step`), every update that passed the checks weighs the same and none is rejected by the
rule (it chose nobody), and the aggregating node logs `shortfall`. The workflow goes on: the next
round trains from that model, as after a round that timed out. The audit redoes the same.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

from .base import Integer, Strategy


class Byzantine(Strategy):
    """A rule for f Byzantine updates that needs at least `factor` * f + 3 of them in a round
    (unnamed: not a strategy itself)."""

    factor: ClassVar[int] = 2
    chosen_by: ClassVar[str] = "another update had a lower Krum score"
    lowered: ClassVar[str] = "f"  # what a deploy refusal suggests lowering
    robust = True
    uses_start = True  # a short round (see the module docstring) keeps the model it started from

    @classmethod
    def least(cls, params: Mapping) -> tuple[int, str]:
        """(the fewest updates a round needs for the guarantee, that rule as a formula)."""
        return cls.factor * params["f"] + 3, f"{cls.factor}f + 3"

    @classmethod
    def federation_problem(cls, spec, federation):
        needs, formula = cls.least(spec)
        smallest = federation.get("min_nodes_required", 1)
        if smallest < needs:
            return (f"tolerating f = {spec['f']} Byzantine updates takes at least {formula} = {needs} updates in "
                    f"every round, but federation.min_nodes_required is {smallest}; raise it to {needs} (with "
                    f"enough participants) or lower {cls.lowered}")
        return None

    def shortfall(self, n):
        needs, formula = self.least(self.spec())
        if n >= needs:
            return None
        return (f"{self.name} with f = {self.f} needs at least {formula} = {needs} updates and {n} passed the "
                f"update checks: the round keeps the model it started from")

    def _weights(self, updates):
        if self.shortfall(len(updates)):
            return {u.node: 1.0 / len(updates) for u in updates}  # all took part; none was chosen
        return self._choose(updates)

    def _choose(self, updates) -> dict[str, float]:
        """The rule itself, on enough updates for its guarantee."""
        raise NotImplementedError

    def rejections(self, weights):
        if self.shortfall(len(weights)):
            return {}
        why = f"{self.name} (f = {self.f}) did not choose it: {self.chosen_by}"
        return {node: why for node, weight in weights.items() if weight == 0}


class Krum(Byzantine):
    name = "krum"
    parameters = {"f": Integer(low=0, high=1000)}

    def _choose(self, updates):
        from .averaging import krum_order

        best = updates[krum_order(updates, self.f)[0]].node
        return {u.node: 1.0 if u.node == best else 0.0 for u in updates}
