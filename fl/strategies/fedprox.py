"""FedProx (Li et al. 2020): FedAvg's weights, and a proximal term in local training,

    local objective = cross-entropy + (mu / 2) * ||w - w_global||^2

which keeps each participant's model near the global one it started from (heterogeneous data,
uneven amounts of local work). mu = 0 trains exactly as FedAvg does."""

from __future__ import annotations

from .base import Number, Strategy, sample_shares


class FedProx(Strategy):
    name = "fedprox"
    parameters = {"mu": Number(low=0, high=100)}

    def _weights(self, updates):
        return sample_shares(updates)

    def training_options(self) -> dict:
        return {"proximal_mu": self.mu}
