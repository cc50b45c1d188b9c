"""One DP-FedAvg round (a workflow's `privacy` block, fl/privacy_block.py) as the aggregating
compute node runs it and `trustmesh audit` redoes it, from fl/privacy.py's pieces.

where "server"  the aggregator clips each update's delta from the round's starting model to the
                clipping norm, takes their unweighted mean, adds Gaussian noise of std z*C/n
                drawn from the round's noise seed (committed by the coordinator when it opened
                the round, revealed once every update was fixed), and applies it to the start.
                Anyone holding the revealed seed, the starting model and the updates recomputes
                the global model bit for bit.
where "client"  each participant's trainer clips its own delta and adds noise of std
                z*C/sqrt(min_nodes_required) before the update leaves it (client_update), from
                a seed of its own that is never stored: revealing it would undo the noise for
                whoever aggregates. The aggregator takes the unweighted mean of what it gets.

Threat model. The (epsilon, delta) guarantee is about what the noisy global models reveal of
one participant's data, and it holds only for someone who does not know the noise:
  - where "server": the seed is on chain once the round is over (that is what lets the audit
    recompute the model bit for bit), so whoever reads the chain and the global model can
    subtract the noise and get the exact mean of the clipped updates (tests/test_dp_round.py
    shows it). The guarantee covers those who get the models without the chain: models
    exported outside the consortium. The aggregator also sees every update in the clear.
  - against members who read the chain, or an aggregator not to be trusted, use where
    "client": each participant's noise comes from its own seed that nobody else ever learns;
    with secure_aggregation the aggregator sees only the noisy sum, not any update.
Either way the round result keeps per-participant values outside the guarantee on chain: each
local_train report's local loss, accuracy and sample count (the result publishes no clipped
count: under adaptive clipping only the next norm, computed from the noisy count, is recorded).

Adaptive clipping (server only): round r clips at the norm the round its starting model came
from chose (`next_clipping_norm` in that round result's `privacy`; the block's clipping_norm for
the first), and records the next one from the noisy count of unclipped updates.

The round result's weights are 1/n for each update used (the mean is unweighted) and its
`privacy` record says what was spent and used (scheduling/schedule/spec.py PRIVACY_FIELDS): the
round's noise multiplier (fewer noised updates than planned under where "client" lower it,
privacy_block.round_noise_multiplier) and the epsilon of every round so far composed at the
multipliers their results recorded (earlier_multipliers reads them from the chain).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

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


def privacy_record(block: Mapping, round_number: int, norm: float, *, averaged: int, planned: int,
                   earlier: Mapping[int, float] | None = None) -> dict:
    """What every DP round result records: the round's noise multiplier (averaged of `planned`
    noised updates), the epsilon of rounds 1..round_number composed (`earlier`: round -> the
    multiplier an earlier round recorded), delta and the clipping norm used."""
    z = privacy_block.round_noise_multiplier(block, averaged, planned)
    spent = privacy_block.epsilon_after(block, round_number, {**(earlier or {}), round_number: z})
    return {"epsilon": spent, "delta": block["delta"], "noise_multiplier": z, "clipping_norm": norm}


def kept_start_record(block: Mapping, round_number: int, norm: float, *, planned: int,
                      earlier: Mapping[int, float] | None = None) -> dict:
    """The privacy record of a round whose update checks rejected every update (fl/screening.py):
    it keeps its starting model and adds no noise, yet is accounted as a planned round (the
    block's multiplier, as a round that timed out counts): which updates the checks refused
    depends on the data and is on chain unnoised, so counting it is the safe bound. An adaptive
    clipping norm is carried over to the next round unchanged."""
    record = privacy_record(block, round_number, norm, averaged=planned, planned=planned, earlier=earlier)
    if block["clipping"] == "adaptive":
        record["next_clipping_norm"] = norm
    return record


async def earlier_multipliers(reader: Any, workflow_id: str, round_number: int) -> dict[int, float]:
    """round -> the noise multiplier its result recorded, for the rounds before `round_number`
    that have one (a round that timed out counts at the planned multiplier). `reader`: a
    scheduling.reader.FederationReader (rounds, round_result)."""
    index = await reader.rounds(workflow_id)
    sids = {number: index["rounds"].get(str(number)) for number in range(1, round_number)}
    results = {number: await reader.round_result(sid) if sid else None for number, sid in sids.items()}
    return privacy_block.recorded_multipliers(results)


def aggregate(block: Mapping, start_state: Mapping, updates: Sequence[ClientUpdate], *, workflow_id: str,
              round_number: int, seed: bytes | None, norm: float, planned: int,
              earlier: Mapping[int, float] | None = None):
    """(global state, weights node -> 1/n, privacy record) for the round's updates; `planned`:
    min_nodes_required, `earlier`: the multipliers earlier rounds recorded (privacy_record)."""
    nodes = sorted(u.node for u in updates)
    weights = {node: 1.0 / len(nodes) for node in nodes}
    record = privacy_record(block, round_number, norm, averaged=len(nodes), planned=planned, earlier=earlier)
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
    record["noise_std"] = result.noise_std  # no clipped count: only its noisy version is covered by epsilon
    if adaptive:
        fraction = privacy.unclipped_fraction(result.norms, norm, block["count_noise_std"], seed,
                                              label=noise_label(workflow_id, round_number, "clip-count"))
        record["next_clipping_norm"] = privacy.next_clipping_norm(
            norm, fraction, target_quantile=block["target_quantile"], learning_rate=block["clipping_learning_rate"])
    return result.state, weights, record

