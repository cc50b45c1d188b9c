"""FedAdam (Reddi et al. 2021): Adam on the server, without bias correction,

    m = beta_1 m + (1 - beta_1) delta,  v = beta_2 v + (1 - beta_2) delta^2,
    global = start + eta m / (sqrt(v) + tau)          (fedopt.py)."""

from __future__ import annotations

from .base import Number
from .fedopt import Adaptive

# Shared with FedYogi, which differs from FedAdam in the second moment only.
ADAPTIVE_PARAMETERS = {"eta": Number(low=1e-6, high=10), "beta_1": Number(low=0, high=0.999),
                       "beta_2": Number(low=0, high=0.99999), "tau": Number(low=1e-12, high=1)}


class FedAdam(Adaptive):
    name = "fedadam"
    parameters = ADAPTIVE_PARAMETERS

    def _second_moment(self, v, squared):
        import torch

        return torch.add(torch.mul(v, self.beta_2), torch.mul(squared, 1.0 - self.beta_2))
