"""The audit's payment re-check, and what `trustmesh rewards` / `trustmesh balance` read.

Every settlement of a workflow is recomputed from the round's own records (its final result's
aggregation weights or contribution scores, its task statuses) by the same rule the rewards
processor applies (fl/rewards_block.split via scheduling/rewards.round_paid), payouts and amount
alike (a round pays less than per_round when its data pot has nobody to pay); the escrow's paid and remaining must
add up; and over the whole rewards namespace the sum of all balances plus every escrow's
remaining must be 0 (no unit was created outside an escrow)."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from trustmesh.fl import rewards_block
from trustmesh.scheduling import layout, rewards
from trustmesh.scheduling.reader import FederationReader


async def read_state(reader: FederationReader, address: str) -> dict | None:
    return rewards.decode_record(await reader.rest.get_state(address, head=reader.head))


async def final_unsettled(reader: FederationReader, workflow_id: str) -> list[str]:
    """Schedule ids of the workflow's rounds that are final and not settled yet, in round order:
    what the escrow still owes before its owner may take the rest back."""
    rounds = ((await reader.rounds(workflow_id)) or {}).get("rounds") or {}
    return [sid for _, sid in sorted(rounds.items(), key=lambda kv: int(kv[0]))
            if ((await reader.round_result(sid)) or {}).get("final") and await reader.settlement(sid) is None]


async def workflow_rewards(reader: FederationReader, workflow_id: str) -> dict:
    """{escrow, rounds: [{round, schedule_id, status, settlement, expected}]} for a workflow; expected
    is what the rule pays for a final round (None otherwise)."""
    escrow = await read_state(reader, layout.escrow_address(workflow_id))
    index = await reader.rounds(workflow_id)
    rows = []
    for number in range(1, index["latest"] + 1):
        sid = index["rounds"].get(str(number))
        if sid is None:
            continue
        result = await reader.round_result(sid)
        settlement = await read_state(reader, layout.settlement_address(sid))
        expected = None
        if escrow is not None and result is not None and result.get("final"):
            assignments = await reader.assignments(sid)
            statuses = {t: s for t in sorted((assignments or {}).get("tasks", {}))
                        if (s := await reader.task_status(sid, t)) is not None}
            expected = rewards.round_paid(escrow["terms"], result, assignments, statuses)
        status = "final" if (result or {}).get("final") else (await reader.round(sid) or {}).get("status", "missing")
        rows.append({"round": number, "schedule_id": sid, "status": status, "settlement": settlement,
                     "expected": expected})
    return {"escrow": escrow, "rounds": rows}


async def all_balances(reader: FederationReader) -> tuple[dict[str, int], dict[str, int]]:
    """({key: balance}, {workflow_id: escrow remaining}) over the whole rewards namespace."""
    accounts, escrows = {}, {}
    async for address, value in reader.rest.list_state(layout.REWARDS_NS, head=reader.head):
        record = rewards.decode_record(value)
        if address.startswith(layout.ACCOUNT_PREFIX):
            accounts[record["key"]] = record["balance"]
        elif address.startswith(layout.ESCROW_PREFIX):
            escrows[record["workflow_id"]] = record["remaining"]
    return accounts, escrows


async def check_payments(check: Callable[[bool, str], Any], reader: FederationReader, workflow_id: str,
                         definition: Mapping) -> None:
    """Each problem through check(ok, problem); nothing to check for a workflow without rewards."""
    found = await workflow_rewards(reader, workflow_id)
    balances = await all_balances(reader) if found["escrow"] is not None else ({}, {})
    payment_checks(check, found, definition, *balances)


def payment_checks(check: Callable[[bool, str], Any], found: Mapping, definition: Mapping,
                   accounts: Mapping[str, int], escrows: Mapping[str, int]) -> None:
    """The checks of check_payments on what it read (workflow_rewards, all_balances): pure."""
    escrow = found["escrow"]
    settled = [row for row in found["rounds"] if row["settlement"] is not None]
    if escrow is None:
        check(not settled, f"rewards: {len(settled)} round(s) settled without an escrow")
        return
    block = definition.get("rewards") or {}
    check(escrow["terms"] == {k: block[k] for k in rewards_block.TERMS if k in block} or "rewards" not in definition,
          "rewards: the escrow's terms are not the workflow's rewards block")
    check(escrow["total"] == escrow["terms"]["total"], "rewards: the escrow holds another total than its terms")
    paid = 0
    for row in settled:
        where = f"rewards, round {row['round']}: "
        settlement = row["settlement"]
        if not check(row["status"] == "final", where + f"paid {settlement['amount']} but the round is {row['status']}"):
            continue
        check(settlement["payouts"] == row["expected"],
              where + f"paid {settlement['payouts']}; the rule pays {row['expected']}")
        owed = rewards_block.total_of(row["expected"] or {})  # per_round, less an unpaid data pot (split)
        check(settlement["amount"] == rewards_block.total_of(settlement["payouts"]) == owed,
              where + f"paid {settlement['amount']}; the rule pays {owed} of per_round {escrow['terms']['per_round']}")
        check(escrow["settled"].get(str(row["round"])) == row["schedule_id"],
              where + "the escrow does not record this settlement")
        paid += settlement["amount"]
    check(len(escrow["settled"]) == len(settled), "rewards: the escrow records settlements that are not on chain")
    check(escrow["paid"] == paid, f"rewards: the escrow says it paid {escrow['paid']}; its settlements add to {paid}")
    refunded = escrow.get("refunded", 0)
    check(escrow["remaining"] == escrow["total"] - paid - refunded,
          f"rewards: the escrow holds {escrow['remaining']}, not total {escrow['total']} - paid {paid} - refunded {refunded}")
    total = sum(accounts.values()) + sum(escrows.values())
    check(total == 0, f"rewards: all balances plus escrows add to {total}, not 0: units appeared or vanished")
