"""FedYogi (Reddi et al. 2021): FedAdam with Yogi's additive second moment, which grows or
shrinks v by at most (1 - beta_2) delta^2 per round,

    v = v - (1 - beta_2) delta^2 sign(v - delta^2)       (fedopt.py)."""

from __future__ import annotations

from .fedadam import ADAPTIVE_PARAMETERS
from .fedopt import Adaptive


class FedYogi(Adaptive):
    name = "fedyogi"
    parameters = ADAPTIVE_PARAMETERS

    def _second_moment(self, v, squared):
        import torch

        change = torch.mul(torch.mul(squared, 1.0 - self.beta_2), torch.sign(torch.sub(v, squared)))
        return torch.sub(v, change)
