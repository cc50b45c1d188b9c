"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"), the base of
FedAvgM, FedAdagrad, FedAdam and FedYogi (each in its own file).

The round combines the updates with FedAvg's sample-weighted average, as the round result's
weights record; that average is not the global model itself. Its difference from the model the
round trained from, delta = average - start, is a pseudo-gradient that a server optimizer applies:

    global = start + move(delta, state)

with state (momentum m, second moment v) carried from round to round in a blob the round result
names (server_state_digest; fl/server_state.py). State starts at zero, as Flower's does. Every
operation is one correctly rounded float64 operation per element (torch.mul / add / sub / div /
sqrt, never a fused one), and the global model is cast to float32 once at the end: the audit
recomputes round r + 1 from round r's stored state bit for bit.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import ClassVar, Mapping

from .base import Strategy, StrategyError, sample_shares


class ServerOptimizer(Strategy):
    """Unnamed: not a strategy itself. Subclasses set `slots` and implement `_move`."""

    uses_start = True
    keeps_state = True
    slots: ClassVar[tuple[str, ...]] = ("m",)

    def _weights(self, updates):
        return sample_shares(updates)

    def step(self, combined, start, previous: Mapping | None, updates=()):
        import torch

        previous = previous or {}
        if previous and set(previous) != set(self.slots):
            raise StrategyError(f"{self.name}'s server state holds {sorted(previous)}, not {list(self.slots)}")
        kept = {slot: OrderedDict() for slot in self.slots}
        state = OrderedDict()
        for name, tensor in combined.items():
            base = start[name].to(torch.float64)
            delta = torch.sub(tensor.to(torch.float64), base)
            old = {}
            for slot in self.slots:
                value = (previous.get(slot) or {}).get(name) if previous else torch.zeros_like(delta)
                if value is None or value.shape != delta.shape or value.dtype != torch.float64:
                    raise StrategyError(f"{self.name}'s server state has no float64 {slot} of shape "
                                        f"{list(delta.shape)} for parameter {name}")
                old[slot] = value
            move, new = self._move(delta, old)
            for slot in self.slots:
                kept[slot][name] = new[slot]
            state[name] = torch.add(base, move).to(torch.float32)
        return state, kept

    def _move(self, delta, old: Mapping) -> tuple:
        """(the step added to the start, the new slot values) for one parameter."""
        raise NotImplementedError


class Adaptive(ServerOptimizer):
    """FedAdagrad, FedAdam and FedYogi: m = beta_1 m + (1 - beta_1) delta, a second moment v of
    their own, and  move = eta m / (sqrt(v) + tau)."""

    slots = ("m", "v")

    def _move(self, delta, old):
        import torch

        beta_1 = getattr(self, "beta_1", 0.0)
        m = torch.add(torch.mul(old["m"], beta_1), torch.mul(delta, 1.0 - beta_1))
        v = self._second_moment(old["v"], torch.mul(delta, delta))
        move = torch.mul(torch.div(m, torch.add(torch.sqrt(v), self.tau)), self.eta)
        return move, {"m": m, "v": v}

    def _second_moment(self, v, squared):
        raise NotImplementedError
