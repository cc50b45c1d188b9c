"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum,

    m = momentum * m + delta,   global = start + eta * m

where delta is the round's sample-weighted average minus the model it trained from (fedopt.py).
eta = 1 and momentum = 0 is FedAvg exactly."""

from __future__ import annotations

from .base import Number
from .fedopt import ServerOptimizer


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    parameters = {"eta": Number(low=1e-6, high=10), "momentum": Number(low=0, high=0.999)}

    def _move(self, delta, old):
        import torch

        m = torch.add(torch.mul(old["m"], self.momentum), delta)
        return torch.mul(m, self.eta), {"m": m}
