"""Update checks: which of a round's updates the aggregation may use at all, and why not.

Before any strategy weighs them, the aggregating node screens the updates; a rejected update
gets weight 0 in the round result, which names it with the reason (`rejected`), and the audit
screens the stored updates again with this same function and must find the same. Each reason
reads "update check NAME: why" (`reason`); `failed_update_check` tells such a reason from a
robust rule's (a Krum that did not choose an update): only the former counts against the
node's reputation (the schedule family's round_result rule). Checks (NAME):

    finite          always: an update holding NaN or an infinity is rejected (averaged, one such
                    update would make the global model NaN; before, it failed the round)
    max_norm_ratio  a workflow's `update_checks.max_norm_ratio` (> 0): an update that moved
                    further from the global model it started from than ratio x that model's
                    norm is rejected, ||local - start|| > ratio * ||start|| (L2 over every
                    parameter, float64, math.fsum: the same bits everywhere)
    min_accuracy    `update_checks.min_accuracy` in [0, 1]: an update whose model classifies
                    less than that share of the held-out split correctly is rejected (the
                    caller passes `accuracy`: models.exact_predictions, so the audit's count
                    is the aggregator's on any machine)

When the checks reject every update, the round keeps the model it started from as its global
model (re-serialized for this round, as a Krum-family short round does, fl/strategies/krum.py),
every participant weighs 0 and is named in `rejected`, a server optimizer's state is carried over
unchanged, and a DP round adds no noise (fl/dp_round.py `kept_start_record`). The workflow goes
on: the next round trains from that model. `weights_sum_fits` is the schedule family's rule for
such a result's weights (summing to 0), which the audit applies too.

Pure and deterministic: no torch import at module level (the workflow rules read `PARAMETERS`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

from .strategies.base import WEIGHT_TOLERANCE, ClientUpdate, Number

# The workflow definition's optional `update_checks` map: field -> bounds (read by the workflow
# rules and the JSON schema, like a strategy's parameters).
PARAMETERS = {"max_norm_ratio": Number(low=1e-6, high=1e6), "min_accuracy": Number(low=0, high=1)}
MAX_REASON_CHARS = 200  # what the schedule family accepts per rejected node
CHECK_REASON = "update check "  # how every reason `screen` gives begins


def reason(check: str, why: str) -> str:
    """A rejected update's reason for failing update check `check` ("finite", a PARAMETERS name)."""
    return f"{CHECK_REASON}{check}: {why}"[:MAX_REASON_CHARS]


def failed_update_check(why: str) -> bool:
    """Whether a round result's rejection reason is an update check's (it counts in the node's
    reputation), not a robust rule's choice among valid updates (it does not)."""
    return isinstance(why, str) and why.startswith(CHECK_REASON)


def weights_sum_fits(total: float, participants: Sequence[str], rejected: Mapping[str, str]) -> bool:
    """Whether a round result's aggregation_weights summing to `total` fit: 1 within
    WEIGHT_TOLERANCE, or exactly 0 when every participant is rejected (nothing was aggregated:
    the round kept the model it started from)."""
    if abs(total - 1.0) <= WEIGHT_TOLERANCE:
        return True
    return total == 0 and bool(participants) and all(node in rejected for node in participants)


def flat(state: Mapping):
    """Every parameter of a state, float64, in one numpy vector (the state's order)."""
    import numpy as np

    return np.concatenate([t.detach().numpy().astype(np.float64).ravel() for t in state.values()])


def squared_norm(vector) -> float:
    """sum of squares, correctly rounded (math.fsum): the same bits on every machine."""
    return math.fsum((vector * vector).tolist())


def held_out_accuracy(definition: Mapping) -> Callable[[Mapping], float]:
    """state -> the share of the workflow's held-out split its model classifies right, counted
    with models.exact_predictions (the same count on every machine and thread count)."""
    import torch

    from .datasets import held_out
    from .models import exact_predictions

    test = held_out(definition["data"])
    labels = torch.as_tensor(test.y)

    def accuracy(state: Mapping) -> float:
        right = int((exact_predictions(definition["model"], state, test.x) == labels).sum())
        return right / len(labels)

    return accuracy


def screen(updates: Sequence[ClientUpdate], checks: Mapping[str, Any] | None,
           start_state: Mapping | None = None,
           accuracy: Callable[[Mapping], float] | None = None) -> tuple[list[ClientUpdate], dict[str, str]]:
    """(the updates kept, in the given order; node -> why rejected). start_state: the global
    model the round trained from, needed only when `checks` bound the update's norm; accuracy:
    state -> its share of the held-out split classified right, needed only with min_accuracy."""
    import numpy as np

    checks = checks or {}
    floor = checks.get("min_accuracy")
    if floor is not None and accuracy is None:
        raise ValueError("update_checks.min_accuracy needs the held-out split to score updates on")
    ratio = checks.get("max_norm_ratio")
    start = None
    if ratio is not None:
        if start_state is None:
            raise ValueError("update_checks.max_norm_ratio needs the global model the round started from")
        start = flat(start_state)
        bound = ratio * math.sqrt(squared_norm(start))
    kept, rejected = [], {}
    for update in updates:
        values = flat(update.state)
        if not np.isfinite(values).all():
            rejected[update.node] = reason("finite", "holds NaN or infinite values")
            continue
        if start is not None:
            moved = math.sqrt(squared_norm(values - start))
            if moved > bound:
                rejected[update.node] = reason("max_norm_ratio", f"moved {moved:.6g} from the global model, more "
                                               f"than max_norm_ratio {ratio:g} x its norm ({bound:.6g})")
                continue
        if floor is not None:
            scored = accuracy(update.state)
            if scored < floor:
                rejected[update.node] = reason("min_accuracy", f"scored accuracy {scored:.4f} on the held-out split, "
                                                               f"below min_accuracy {floor:g}")
                continue
        kept.append(update)
    return kept, rejected
