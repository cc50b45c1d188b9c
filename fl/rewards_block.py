"""A workflow definition's `rewards` block, and the one rule that splits a round's payment.

    {"total": T, "per_round": A, "data_share": d, "compute_share": c, "fee_share": f
     [, "fee_account": public key (required when f > 0)]
     [, "score": "weight" | "shapley", "permutations": P (with shapley)]}

The data pot goes by the aggregation weight the round result used ("weight", the default), or by
the contribution scores the aggregator computed and the round result records (`contributions`,
fl/shapley.py: truncated Monte Carlo Shapley values over P orders; negative scores count as 0,
and so does the score of an update the aggregation gave weight 0: a robust strategy's rejection
pays nothing under either score).

Amounts are whole units (integers, no fractions anywhere); shares are basis points and
d + c + f == 10000. The owner escrows T (trustmesh-rewards `escrow`); every round whose result
is final pays at most A out of it (`settle`) while the escrow still holds A; what is left goes
back to the owner (`refund`) once the workflow has ended. T >= A, so at least one round is paid; a
budget for fewer rounds than the workflow runs pays the first ones only. A round pays less than A
only when its data pot has nobody to pay (every weight 0): that pot, and the fee on it, stay in
the escrow for the owner.

`split` is the rule, read by the rewards processor and by the audit alike: pure Python,
integers and exact fractions only, so every validator pays the same amounts to the same keys.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Mapping

from .strategies.base import Integer

BASIS_POINTS = 10_000
MAX_AMOUNT = 10**15
NUMBERS = {
    "total": Integer(low=1, high=MAX_AMOUNT),
    "per_round": Integer(low=1, high=MAX_AMOUNT),
    "data_share": Integer(low=0, high=BASIS_POINTS),
    "compute_share": Integer(low=0, high=BASIS_POINTS),
    "fee_share": Integer(low=0, high=BASIS_POINTS),
}
OPTIONAL = ("fee_account", "score", "permutations")
SCORES = ("weight", "shapley")
PERMUTATIONS = Integer(low=1, high=1000)
TERMS = (*NUMBERS, *OPTIONAL)  # what an escrow record keeps of the block (the terms it was funded on)


def problem(block: Mapping, definition: Mapping) -> str | None:
    """Why a block whose fields are each valid cannot work in this definition, or None."""
    if not isinstance(definition.get("federation"), Mapping):
        return "rewards pay the participants and compute nodes of a federation; a definition without federation has none"
    shares = block["data_share"] + block["compute_share"] + block["fee_share"]
    if shares != BASIS_POINTS:
        return (f"data_share + compute_share + fee_share must be {BASIS_POINTS} basis points (100 %); "
                f"they are {shares}")
    if block["per_round"] > block["total"]:
        return f"per_round {block['per_round']} is more than total {block['total']}: the escrow could not pay one round"
    if block["fee_share"] > 0 and "fee_account" not in block:
        return "fee_share is above 0: name the fee_account (a public key) that receives it"
    if block["fee_share"] == 0 and "fee_account" in block:
        return "fee_account receives fee_share, which is 0; leave fee_account out or give it a share"
    if block.get("score", "weight") == "shapley":
        if "permutations" not in block:
            return "score shapley needs permutations, how many orders of the updates it averages over (e.g. 20)"
        if definition.get("secure_aggregation") or definition.get("privacy"):
            return ("score shapley evaluates each update on its own, which secure aggregation and differential privacy "
                    "exist to prevent; use score weight")
        if (definition.get("data") or {}).get("dataset") != "digits":
            return "score shapley scores updates on a held-out split every node derives alike, which only digits has"
    elif "permutations" in block:
        return "permutations belongs to score shapley; leave it out"
    return None


def apportion(amount: int, weights: Mapping[str, Fraction]) -> dict[str, int]:
    """`amount` split over keys in proportion to non-negative exact weights, summing to `amount`
    exactly: each key gets the floor of its share, and the units left over go one each to the
    largest remainders, ties to the smaller key. Keys with weight 0 get nothing (and are left out)."""
    total = sum(weights.values(), Fraction(0))
    if amount <= 0 or total <= 0:
        return {}
    exact = {k: amount * w / total for k, w in weights.items() if w > 0}
    paid = {k: int(v) for k, v in exact.items()}  # floor: v >= 0
    left = amount - sum(paid.values())
    for key in sorted(exact, key=lambda k: (-(exact[k] - paid[k]), k))[:left]:
        paid[key] += 1
    return {k: v for k, v in paid.items() if v > 0}


def data_weights(terms: Mapping, result: Mapping) -> dict[str, float]:
    """What the data pot is split by for a round result: its aggregation weights, or (score
    shapley) its contribution scores, negative ones as 0 and those of an update the aggregation
    gave weight 0 (rejected, or screened out by a robust strategy) as 0."""
    weights = {k: w for k, w in (result.get("aggregation_weights") or {}).items() if _number(w) and w >= 0}
    if terms.get("score", "weight") == "shapley":
        scores = result.get("contributions") or {}
        return {k: max(0.0, float(v)) if weights.get(k, 0) > 0 else 0.0 for k, v in scores.items() if _number(v)}
    return weights


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def split(terms: Mapping, aggregation_weights: Mapping[str, float], tasks_done: Mapping[str, int]) -> dict[str, dict[str, int]]:
    """One round's payment: {key: {"data"|"compute"|"fee": amount}}, summing to at most per_round.

    fee     = per_round * fee_share // 10000, to fee_account
    compute = per_round * compute_share // 10000, over the nodes by tasks done (the node each done
              task status names; a task moved away from a node pays only the node that finished it)
    data    = the rest, over the participants by the aggregation weight the round result used
              (exact: a float is a binary fraction), so a rejected update (weight 0) earns nothing
    A compute pot with no task done goes to the data pot. A data pot with nobody to pay (every
    weight 0) is not paid: it stays in the escrow and returns to the owner at refund. The fee is
    fee_share of what the round pays out, so it shrinks with an unpaid data pot, to
    fee * compute // (data + compute), and never takes a pot it is not a share of."""
    amount = terms["per_round"]
    fee = amount * terms["fee_share"] // BASIS_POINTS
    compute = amount * terms["compute_share"] // BASIS_POINTS
    data = amount - fee - compute
    data_weights = {k: Fraction(w) for k, w in aggregation_weights.items()}
    task_weights = {k: Fraction(n) for k, n in tasks_done.items()}
    if sum(task_weights.values(), Fraction(0)) <= 0:
        data, compute = data + compute, 0
    if sum(data_weights.values(), Fraction(0)) <= 0 and data + compute > 0:
        fee, data = fee * compute // (data + compute), 0
    payouts: dict[str, dict[str, int]] = {}
    for pot, paid in (("data", apportion(data, data_weights)), ("compute", apportion(compute, task_weights)),
                      ("fee", {terms["fee_account"]: fee} if fee > 0 else {})):
        for key, value in paid.items():
            payouts.setdefault(key, {})[pot] = value
    return payouts


def total_of(payouts: Mapping[str, Mapping[str, int]]) -> int:
    return sum(v for parts in payouts.values() for v in parts.values())


def schema() -> dict:
    return {"type": "object", "additionalProperties": False, "required": list(NUMBERS),
            "properties": {**{name: bounds.schema() for name, bounds in NUMBERS.items()},
                           "fee_account": {"$ref": "#/$defs/public_key"}, "score": {"enum": list(SCORES)},
                           "permutations": PERMUTATIONS.schema()}}
