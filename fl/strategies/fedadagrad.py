"""FedAdagrad (Reddi et al. 2021): v = v + delta^2, global = start + eta * delta / (sqrt(v) + tau)
(fedopt.py: delta, the float64 arithmetic and the state kept between rounds)."""

from __future__ import annotations

from .base import Number
from .fedopt import Adaptive


class FedAdagrad(Adaptive):
    name = "fedadagrad"
    parameters = {"eta": Number(low=1e-6, high=10), "tau": Number(low=1e-12, high=1)}

    def _second_moment(self, v, squared):
        import torch

        return torch.add(v, squared)
