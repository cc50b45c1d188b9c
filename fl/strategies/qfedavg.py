"""q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning"): participants whose
data the global model fits worst weigh more, by the q-th power of their loss.

Each participant reports F_k, the loss of the model the round trained from on its own data,
before training (metrics start_loss; training_options asks local_train for it). With
L = 1 / learning_rate and dw_k = L (start - w_k):

    h_k = q F_k^(q-1) ||dw_k||^2 + L F_k^q,     global = start - sum_k F_k^q dw_k / sum_k h_k

computed here as its equal  start + s (average - start)  where `average` is the mean of the
updates with the round result's weights F_k^q / sum F^q and s = L sum F^q / sum h. F_k gets
1e-10 added (a loss of 0 with q < 1). q = 0 is the unweighted mean of the updates. Scalars are
Python floats summed with math.fsum, norms from screening (exactly rounded): the audit, reading
F_k from the reports on chain, recomputes the same bits.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from .base import ClientUpdate, Number, Strategy, StrategyError

LOSS_FLOOR = 1e-10


def _start_loss(update: ClientUpdate) -> float:
    value = update.metrics.get("start_loss") if hasattr(update.metrics, "get") else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise StrategyError(f"qfedavg needs metrics['start_loss'] >= 0 (the loss before training) for every "
                            f"update; node {update.node} reported {value!r}")
    return float(value) + LOSS_FLOOR


class QFedAvg(Strategy):
    name = "qfedavg"
    parameters = {"q": Number(low=0, high=50), "learning_rate": Number(low=1e-6, high=10)}
    uses_start = True

    def training_options(self) -> dict:
        return {"start_loss": True}

    def _weights(self, updates):
        powers = {u.node: _start_loss(u) ** self.q for u in updates}
        total = math.fsum(powers.values())
        return {node: power / total for node, power in powers.items()}

    def step(self, combined, start, previous=None, updates=()):
        import torch

        from trustmesh.fl.screening import flat, squared_norm

        if not updates:
            raise StrategyError("qfedavg's step needs the round's updates")
        lipschitz = 1.0 / self.learning_rate
        base = flat(start)
        powers, h = [], []
        for update in updates:
            loss = _start_loss(update)
            moved = squared_norm(base - flat(update.state)) * (lipschitz * lipschitz)
            powers.append(loss ** self.q)
            h.append(self.q * loss ** (self.q - 1) * moved + lipschitz * loss ** self.q)
        scale = lipschitz * math.fsum(powers) / math.fsum(h)
        state = OrderedDict()
        for name, tensor in combined.items():
            origin = start[name].to(torch.float64)
            state[name] = torch.add(origin, torch.mul(torch.sub(tensor.to(torch.float64), origin), scale)).to(torch.float32)
        return state, None
