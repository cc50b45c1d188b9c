"""Krum (Blanchard et al. 2017): the one update closest to its neighbours becomes the global model.

Each update's score is the sum of its squared distances to its n - f - 2 nearest other updates;
the lowest score wins (ties: the smaller node key). The round result gives it weight 1 and every
other update weight 0 (rejected). Tolerates f Byzantine updates among n >= 2f + 3, so a workflow
whose rounds may be ready with fewer (federation.min_nodes_required) is refused at deploy time.
"""

from __future__ import annotations

from typing import ClassVar

from .base import Integer, Strategy, StrategyError


def byzantine_problem(name: str, f: int, federation, *, needs: int, formula: str) -> str | None:
    """A rule for f Byzantine updates that needs at least `needs` updates per round."""
    smallest = federation.get("min_nodes_required", 1)
    if smallest < needs:
        return (f"tolerating f = {f} Byzantine updates takes at least {formula} = {needs} updates in every "
                f"round, but federation.min_nodes_required is {smallest}; raise it to {needs} (with enough "
                f"participants) or lower f")
    return None


def check_count(name: str, n: int, f: int, *, needs: int, formula: str) -> None:
    if n < needs:
        raise StrategyError(f"{name} with f = {f} needs at least {formula} = {needs} updates; this round has {n}")


class Byzantine(Strategy):
    """A rule for f Byzantine updates that needs at least `factor` * f + 3 of them in a round
    (unnamed: not a strategy itself)."""

    factor: ClassVar[int] = 2

    @classmethod
    def least(cls, f: int) -> tuple[int, str]:
        return cls.factor * f + 3, f"{cls.factor}f + 3"

    @classmethod
    def federation_problem(cls, spec, federation):
        needs, formula = cls.least(spec["f"])
        return byzantine_problem(cls.name, spec["f"], federation, needs=needs, formula=formula)

    def check_count(self, n: int) -> None:
        needs, formula = self.least(self.f)
        check_count(self.name, n, self.f, needs=needs, formula=formula)

    def rejections(self, weights):
        why = f"{self.name} (f = {self.f}) did not choose it: {self.chosen_by}"
        return {node: why for node, weight in weights.items() if weight == 0}

    chosen_by: ClassVar[str] = "another update had a lower Krum score"


class Krum(Byzantine):
    name = "krum"
    parameters = {"f": Integer(low=0, high=1000)}

    def _weights(self, updates):
        from .averaging import krum_order

        self.check_count(len(updates))
        best = updates[krum_order(updates, self.f)[0]].node
        return {u.node: 1.0 if u.node == best else 0.0 for u in updates}
