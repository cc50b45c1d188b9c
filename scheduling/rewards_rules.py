"""trustmesh-rewards' names, limits and rules: pure functions of records (what a round pays,
whether a workflow has ended), no I/O; rewards_handler.py applies them, rewards.py documents the family."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from trustmesh.fl import privacy_block, rewards_block
from trustmesh.ledger.processor import InvalidTransaction

from . import layout
from .common import shown
from .schedule.spec import SETTLED

FAMILY_NAME = layout.REWARDS_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.REWARDS_NS
ACTIONS = ("escrow", "settle", "refund", "transfer")
FIELDS = {
    "escrow": frozenset({"action", "workflow_id"}),
    "settle": frozenset({"action", "schedule_id", "payouts"}),
    "refund": frozenset({"action", "workflow_id"}),
    "transfer": frozenset({"action", "recipient", "amount"}),
}
POTS = ("data", "compute", "fee")
MAX_BALANCE = 2**62  # far above any sum of escrows the block's bounds allow; keeps records int64


def round_paid(terms: Mapping, result: Mapping, assignments: Mapping | None,
               statuses: Mapping[str, Mapping]) -> dict[str, dict[str, int]]:
    """What a final round pays (rewards_block.split over the round's own records)."""
    done: dict[str, int] = {}
    for task_id in sorted((assignments or {}).get("tasks", {})):
        status = statuses.get(task_id) or {}
        if status.get("status") == "done" and isinstance(status.get("node"), str):
            done[status["node"]] = done.get(status["node"], 0) + 1
    return rewards_block.split(terms, rewards_block.data_weights(terms, result), done)


def check_claim(claimed: Any, payouts: Mapping[str, Mapping[str, int]], round_number: int) -> None:
    """A sender's expected payouts must be the rule's, key by key and pot by pot."""
    if not isinstance(claimed, dict):
        raise InvalidTransaction(f"payload field 'payouts' must be a map {{key: {{pot: amount}}}}, got {shown(claimed)}")
    for key in sorted(claimed, key=shown):
        if key not in payouts:
            raise InvalidTransaction(
                f"payouts pay {shown(key)}, which round {round_number} does not pay: it neither contributed an update "
                f"with weight above 0 nor finished a task of the round, nor is it the fee account")
    for key in sorted(payouts):
        if claimed.get(key) != payouts[key]:
            raise InvalidTransaction(
                f"payouts give {key} {shown(claimed.get(key))}; the rule pays it {dict(payouts[key])} in round "
                f"{round_number} (fl/rewards_block.split over the final round result and task statuses)")


def over(record: Mapping | None, result: Mapping | None) -> bool:
    """A round that can change no more: final, or timed out."""
    return (record or {}).get("status") == "timeout" or bool((result or {}).get("final"))


def quiet_since(record: Mapping, statuses: Iterable[Mapping]) -> int:
    """The last moment (block time) a round was due to move: the end of its collecting window,
    each unfinished task's deadline, each task's last report or reassignment."""
    moments = [record["round_start"] + record["round_timeout"]]
    for status in statuses:
        moments += [entry["at"] for entry in status.get("history", [])[-1:]]
        if status.get("status") not in SETTLED and isinstance(status.get("deadline"), int):
            moments.append(status["deadline"])
    return max(moments)


def rounds_to_watch(index: Mapping | None, rounds: Mapping[str, Mapping], results: Mapping[str, Mapping]) -> list[str]:
    """The schedule ids whose task statuses decide whether a workflow went quiet: its latest
    round and every round that is not over."""
    opened = {int(n): sid for n, sid in ((index or {}).get("rounds") or {}).items()}
    if not opened:
        return []
    latest = opened[max(opened)]
    return [sid for _, sid in sorted(opened.items()) if sid == latest or not over(rounds.get(sid), results.get(sid))]


def workflow_ended(workflow_id: str, stored_definition: Mapping, index: Mapping | None,
                   rounds: Mapping[str, Mapping], results: Mapping[str, Mapping],
                   statuses: Mapping[str, Iterable[Mapping]] | None = None, now: int | None = None) -> str | None:
    """Why the workflow has not ended yet, or None once its last planned round is final or timed
    out, or once it went quiet: `now` (block time) is round_timeout past the quiet_since of every
    round rounds_to_watch names (`statuses`: schedule_id -> that round's task statuses)."""
    last = privacy_block.planned_rounds(stored_definition)
    opened = (index or {}).get("rounds") or {}
    sid = opened.get(str(last))
    if sid is not None and over(rounds.get(sid), results.get(sid)):
        return None
    watched = {s: rounds[s] for s in rounds_to_watch(index, rounds, results) if s in rounds}
    if not watched:
        return f"workflow {workflow_id!r} has not ended: no round of it was opened yet"
    quiet = max(quiet_since(record, (statuses or {}).get(s, ())) for s, record in watched.items())
    stopped = quiet + max(record["round_timeout"] for record in watched.values())
    if now is not None and now >= stopped:
        return None
    why = (f"its last round ({last}) was not opened yet" if sid is None
           else f"its last round ({last}) is neither final nor timed out")
    if now is not None:
        why += (f", and it has not gone quiet: its rounds were due to move until block time {quiet}, so it counts "
                f"as stopped from {stopped} (round_timeout later); block time is {now}")
    return f"workflow {workflow_id!r} has not ended: {why}"


def account_of(records: Mapping[str, Any], key: str) -> dict:
    return dict(records.get(layout.account_address(key)) or {"key": key, "balance": 0})


def credit(accounts: dict[str, dict], key: str, amount: int) -> None:
    account = accounts.setdefault(key, {"key": key, "balance": 0})
    balance = account["balance"] + amount
    if abs(balance) > MAX_BALANCE:
        raise InvalidTransaction(f"account {key} would hold {balance}, beyond the limit {MAX_BALANCE}")
    account["balance"] = balance
