"""PerfFedAvg: the sample share blended with the accuracy share,

    weight_i = alpha * samples_i / sum(samples) + (1 - alpha) * acc_i / sum(acc)

acc_i is metrics["accuracy"] of node i's update on its own data, in [0, 1]. alpha = 1 is FedAvg
exactly (the accuracy term is skipped, not multiplied by 0); alpha = 0 weighs by accuracy alone.
If every accuracy is 0 the accuracy share is undefined: it falls back to the sample share, so
the weights equal FedAvg's for any alpha.
"""

from __future__ import annotations

import math
from typing import Mapping

from .base import ClientUpdate, Number, Strategy, StrategyError, sample_shares


class PerfFedAvg(Strategy):
    name = "perf_fedavg"
    parameters = {"alpha": Number(low=0, high=1)}

    def _weights(self, updates):
        by_samples = sample_shares(updates)
        if self.alpha == 1.0:
            return by_samples
        accuracy = {u.node: _accuracy(u) for u in updates}
        total = math.fsum(accuracy[u.node] for u in updates)
        if total == 0.0:
            return by_samples  # documented fallback: no accuracy signal at all
        alpha, rest = self.alpha, 1.0 - self.alpha
        return {u.node: alpha * by_samples[u.node] + rest * (accuracy[u.node] / total) for u in updates}


def _accuracy(update: ClientUpdate) -> float:
    value = update.metrics.get("accuracy") if isinstance(update.metrics, Mapping) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 <= value <= 1:
        raise StrategyError(
            f"perf_fedavg needs metrics['accuracy'] in [0, 1] for every update; node {update.node} "
            f"reported {value!r}"
        )
    return float(value)
