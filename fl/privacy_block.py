"""A workflow definition's `privacy` block: its fields and their bounds, the rules across fields,
and what follows from it (the rounds its budget allows, the epsilon after each).

    {"mechanism": "dp-fedavg", "clipping": "fixed" | "adaptive", "clipping_norm", "noise_multiplier",
     "delta", "epsilon_budget", "where": "server" | "client"
     [, adaptive only: "target_quantile", "clipping_learning_rate", "count_noise_std"]}

The workflow rules (scheduling/workflow.py) and the JSON schema read the fields from here, as
they read strategies' parameters from their registry; the federation rules, the coordinator,
`trustmesh run` and the audit read `planned_rounds` and `epsilon_after` from here. Pure
Python: the accountant (dp-accounting, fl/privacy_accountant.py) needs no torch.

Accounting: one round is one Gaussian mechanism with noise multiplier z on the participants'
clipped updates (client-level DP). Who takes part in a round is not drawn at random, so no
amplification by sampling is claimed (sample rate 1). Every opened round counts, also one that
timed out without a model: epsilon after round r is epsilon(z, 1, r, delta), and a round whose
epsilon would pass the budget is not opened (the federation rules refuse it).
Where "client", each participant adds noise for min_nodes_required senders; a round that
averaged only k < m = min_nodes_required noised updates (one rejected as non-finite, an upload
dropped by secure aggregation) had noise multiplier z * sqrt(k / m) (round_noise_multiplier).
Its result records that multiplier and the epsilon of all rounds so far composed
(epsilon_after with the recorded multipliers), and the coordinator opens the next round only
if that composition plus one planned round stays within the budget (next_round_fits); it then
ends the workflow as "budget exhausted" (budget_exhausted). Budget comparisons are
privacy.within_budget's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from . import privacy
from .strategies.base import Number

CHOICES = {"mechanism": ("dp-fedavg",), "clipping": ("fixed", "adaptive"), "where": ("server", "client")}
NUMBERS = {
    "clipping_norm": Number(low=1e-6, high=1e6),      # C: every update's delta is clipped to L2 norm <= C
    "noise_multiplier": Number(low=1e-3, high=1e3),   # z: noise std z*C on the sum of clipped deltas
    "delta": Number(low=1e-15, high=0.1),
    "epsilon_budget": Number(low=1e-3, high=1e6),
}
ADAPTIVE = {  # Andrew et al. 2021; required with clipping "adaptive", refused otherwise
    "target_quantile": Number(low=0, high=1),
    "clipping_learning_rate": Number(low=1e-6, high=10),
    "count_noise_std": Number(low=1e-6, high=1e6),
}
SAMPLE_RATE = 1.0


def fields(privacy_block: Mapping) -> tuple[tuple[str, ...], Mapping[str, Number]]:
    """(the choice fields, the number fields with their bounds) this block must have."""
    numbers = dict(NUMBERS)
    if privacy_block.get("clipping") == "adaptive":
        numbers.update(ADAPTIVE)
    return tuple(CHOICES), numbers


def problem(privacy_block: Mapping, definition: Mapping) -> str | None:
    """Why a privacy block whose fields are each valid cannot work in this definition, or None."""
    strategy = (definition.get("strategy") or {"name": "fedavg"}).get("name")
    if strategy != "fedavg":
        return (f"mechanism dp-fedavg aggregates by its own rule (the unweighted mean of clipped "
                f"updates plus noise); leave strategy out or set it to fedavg, not {strategy!r}")
    federation = definition.get("federation")
    if not isinstance(federation, Mapping):
        return "privacy protects each participant of a federation; a definition without federation has none"
    z = privacy_block["noise_multiplier"]
    if privacy_block["where"] == "client" and definition.get("update_checks"):
        return ("update_checks cannot go with where: client: each participant's noise is sized for "
                "min_nodes_required noised updates, and every update a check rejects leaves less noise in the "
                "mean than the recorded epsilon assumes; drop update_checks or use where: server (the aggregator "
                "then adds the noise after the checks, for the updates kept)")
    if privacy_block["clipping"] == "adaptive":
        if privacy_block["where"] != "server":
            return ("clipping adaptive needs where: server (the clipped count it learns from is "
                    "each update's norm, which only the aggregator sees)")
        if privacy_block["count_noise_std"] <= z / 2:
            return (f"count_noise_std must be above noise_multiplier / 2 = {z / 2:g} (the updates' "
                    f"own noise makes up the rest of z); e.g. participants / 20")
    if allowed_rounds(privacy_block, 1) < 1:
        first = privacy.epsilon(z, SAMPLE_RATE, 1, privacy_block["delta"])
        return (f"one round already spends epsilon {first:.4g} (delta {privacy_block['delta']:g}), above "
                f"epsilon_budget {privacy_block['epsilon_budget']:g}; raise the budget or the noise_multiplier")
    return None


def allowed_rounds(privacy_block: Mapping, rounds: int) -> int:
    """How many of `rounds` rounds the budget allows (the first ones)."""
    return privacy.rounds_within(privacy_block["epsilon_budget"], privacy_block["noise_multiplier"], SAMPLE_RATE,
                                 privacy_block["delta"], max_rounds=rounds)


def planned_rounds(definition: Mapping) -> int:
    """The rounds a federated workflow runs: federation.rounds, or fewer when its privacy budget
    runs out first (then it ends as "budget exhausted")."""
    rounds = definition["federation"]["rounds"]
    block = definition.get("privacy")
    return rounds if block is None else allowed_rounds(block, rounds)


def round_noise_multiplier(privacy_block: Mapping, averaged: int, planned: int) -> float:
    """The noise multiplier a round had: the block's z, or z * sqrt(averaged / planned) where
    each of `planned` (min_nodes_required) participants noised its own update and only
    `averaged` of them were averaged (the noises' sum then has std z * C * sqrt(k / m))."""
    z = float(privacy_block["noise_multiplier"])
    if privacy_block["where"] != "client" or averaged >= planned:
        return z
    return z * math.sqrt(averaged / planned)


def recorded_multiplier(result: Mapping | None) -> float | None:
    """The noise multiplier a round result's privacy record says the round had, or None."""
    record = (result or {}).get("privacy")
    value = record.get("noise_multiplier") if isinstance(record, Mapping) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


def recorded_multipliers(results: Mapping[int, Mapping | None]) -> dict[int, float]:
    """round -> the noise multiplier its result recorded, for the rounds (round -> result or
    None) whose result records one: what epsilon_after composes."""
    found = {number: recorded_multiplier(result) for number, result in results.items()}
    return {number: z for number, z in found.items() if z is not None}


def multipliers(privacy_block: Mapping, round_number: int, recorded: Mapping[int, float] | None = None) -> list[float]:
    """The noise multiplier of each round 1..round_number: the one its result recorded
    (`recorded`: round -> multiplier), the planned z for rounds without one."""
    recorded = recorded or {}
    z = float(privacy_block["noise_multiplier"])
    return [float(recorded.get(number, z)) for number in range(1, round_number + 1)]


def epsilon_after(privacy_block: Mapping, round_number: int, recorded: Mapping[int, float] | None = None) -> float:
    """The epsilon (at the block's delta) spent once round `round_number` is released, its
    rounds composed at their recorded multipliers (the planned z where none is recorded)."""
    if not recorded:
        return privacy.epsilon(privacy_block["noise_multiplier"], SAMPLE_RATE, round_number, privacy_block["delta"])
    return privacy.epsilon_of_rounds(multipliers(privacy_block, round_number, recorded), SAMPLE_RATE,
                                     privacy_block["delta"])


def next_round_fits(privacy_block: Mapping, number: int, recorded: Mapping[int, float] | None = None) -> bool:
    """Whether round `number` may open: the recorded rounds before it plus it, planned, stay
    within epsilon_budget (privacy.within_budget)."""
    return privacy.within_budget(epsilon_after(privacy_block, number, recorded), privacy_block["epsilon_budget"])


def budget_exhausted(definition: Mapping, opened: int | None = None,
                     recorded: Mapping[int, float] | None = None) -> bool:
    """Whether the privacy budget, not federation.rounds, ends the workflow once `opened`
    rounds (default: the planned ones) were opened: a next round within federation.rounds
    would pass the budget, given the multipliers the rounds recorded."""
    block = definition.get("privacy")
    if block is None:
        return False
    opened = planned_rounds(definition) if opened is None else opened
    return opened < definition["federation"]["rounds"] and not next_round_fits(block, opened + 1, recorded)


def rounds_to_run(definition: Mapping, opened: int, recorded: Mapping[int, float] | None = None) -> int:
    """The rounds the workflow runs, seen after `opened` rounds: planned_rounds, or `opened`
    when the recorded rounds leave no budget for the next one."""
    planned = planned_rounds(definition)
    return opened if opened < planned and budget_exhausted(definition, opened, recorded) else planned


def schema() -> dict:
    """The JSON Schema of the block (draft 2020-12), made from the tables above."""
    properties: dict[str, Any] = {name: {"enum": list(options)} for name, options in CHOICES.items()}
    properties.update({name: bounds.schema() for name, bounds in {**NUMBERS, **ADAPTIVE}.items()})
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": [*CHOICES, *NUMBERS],
            "if": {"properties": {"clipping": {"const": "adaptive"}}},
            "then": {"required": list(ADAPTIVE)},
            "else": {"not": {"anyOf": [{"required": [name]} for name in ADAPTIVE]}}}
