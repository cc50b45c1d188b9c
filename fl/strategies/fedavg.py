"""FedAvg (McMahan et al. 2017): weight_i = samples_i / sum(samples)."""

from __future__ import annotations

from .base import Strategy, sample_shares


class FedAvg(Strategy):
    name = "fedavg"

    def _weights(self, updates):
        return sample_shares(updates)
