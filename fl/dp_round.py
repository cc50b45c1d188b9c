"""One DP-FedAvg round (a workflow's `privacy` block, fl/privacy_block.py) as the aggregating
compute node runs it and `trustmesh audit` redoes it, from fl/privacy.py's pieces.

where "server"  the aggregator clips each update's delta from the round's starting model to the
                clipping norm, takes their unweighted mean, adds Gaussian noise of std z*C/n
                drawn from the round's noise seed (committed by the coordinator when it opened
                the round, revealed once every update was fixed), and applies it to the start.
                Anyone holding the revealed seed, the starting model and the updates recomputes
                the global model bit for bit; the noise protects the model given to those who
                do not hold the updates (outside the consortium).
where "client"  each participant's trainer clips its own delta and adds noise of std
                z*C/sqrt(min_nodes_required) before the update leaves it (client_update), from
                a seed of its own that is never stored: revealing it would undo the noise for
                whoever aggregates. The aggregator takes the unweighted mean of what it gets.

Adaptive clipping (server only): round r clips at the norm the round its starting model came
from chose (`next_clipping_norm` in that round result's `privacy`; the block's clipping_norm for
the first), and records the next one from the noisy count of unclipped updates.

The round result's weights are 1/n for each update used (the mean is unweighted) and its
`privacy` record says what was spent and used (scheduling/schedule/spec.py PRIVACY_FIELDS).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from . import privacy, privacy_block
from .strategies.base import ClientUpdate


def noise_label(workflow_id: str, round_number: int, use: str) -> str:
    """Keeps each use of one seed apart: "server" (the model's noise), "clip-count"."""
    return f"{workflow_id}/{round_number}/{use}"


def clipping_norm(block: Mapping, previous_next: float | None) -> float:
    """The norm round r clips at: fixed, or the one the round before chose (adaptive)."""
    if block["clipping"] == "adaptive" and previous_next is not None:
        return float(previous_next)
    return float(block["clipping_norm"])


def client_update(block: Mapping, start_state: Mapping, local_state: Mapping, clients: int):
    """What a participant sends under where "client": start + clipped delta + its own noise."""
    state, _norm = privacy.client_update(start_state, local_state, clipping_norm=block["clipping_norm"],
                                         noise_multiplier=block["noise_multiplier"], clients=clients,
                                         seed=privacy.new_seed(), label="client")
    return state


def privacy_record(block: Mapping, round_number: int, norm: float) -> dict:
    """What every DP round result records: epsilon spent once it is released, and what it used."""
    return {"epsilon": privacy_block.epsilon_after(block, round_number), "delta": block["delta"],
            "noise_multiplier": block["noise_multiplier"], "clipping_norm": norm}


def aggregate(block: Mapping, start_state: Mapping, updates: Sequence[ClientUpdate], *, workflow_id: str,
              round_number: int, seed: bytes | None, norm: float):
    """(global state, weights node -> 1/n, privacy record) for the round's updates."""
    nodes = sorted(u.node for u in updates)
    weights = {node: 1.0 / len(nodes) for node in nodes}
    record = privacy_record(block, round_number, norm)
    states = {u.node: u.state for u in updates}
    if block["where"] == "client":
        return privacy.uniform_mean(states), weights, record
    if seed is None:
        raise privacy.PrivacyError("server-side noise needs the round's revealed noise seed")
    z = block["noise_multiplier"]
    adaptive = block["clipping"] == "adaptive"
    if adaptive:  # part of the noise budget goes to the clipped count
        z = privacy.adaptive_noise_multiplier(z, block["count_noise_std"])
    result = privacy.dp_fedavg(start_state, states, clipping_norm=norm, noise_multiplier=z, seed=seed,
                               label=noise_label(workflow_id, round_number, "server"))
    record.update(noise_std=result.noise_std, clipped=sum(1 for n in result.norms.values() if n > norm))
    if adaptive:
        fraction = privacy.unclipped_fraction(result.norms, norm, block["count_noise_std"], seed,
                                              label=noise_label(workflow_id, round_number, "clip-count"))
        record["next_clipping_norm"] = privacy.next_clipping_norm(
            norm, fraction, target_quantile=block["target_quantile"], learning_rate=block["clipping_learning_rate"])
    return result.state, weights, record
