"""`trustmesh-rewards` 1.0: accounts, a workflow's escrow, and payments released by final rounds.

Money model (double entry, no mint): every unit comes into being as the escrow of a workflow
owner, booked against the owner's own account, which may go below zero by what it escrowed (a
debt the owner settles with the platform off chain; no key can create units for itself or for
anyone else). So at every block

    sum(all account balances) + sum(all escrows' remaining) == 0

and the audit checks it. A balance above zero is what a key has earned and may transfer; only
an escrow can take an account below zero.

Actions (canonical-CBOR map {"action": ..., ...}; unknown fields are refused):

  escrow    {workflow_id}
      Only the workflow's owner (trustmesh-workflow record), once per workflow, and only for a
      workflow whose definition has a `rewards` block (fl/rewards_block.py). The escrow holds the
      block's `total`, booked against the owner's account; it keeps the block's terms as they
      were, so a later workflow update cannot change what rounds pay.
  settle    {schedule_id[, payouts]}
      Anyone. Pays the round's `per_round` out of its workflow's escrow by
      rewards_block.split: data contributors by the aggregation weight the round result used,
      compute nodes by tasks done (the node each done task status names), the fee to
      fee_account; a data pot with nobody to pay stays in the escrow (the rule says how much).
      Only when the round result exists and is `final`; once per round; only while the escrow
      still holds per_round and was not refunded. payouts (optional): what the sender
      expects, {key: {data|compute|fee: amount}}; it must equal the rule's payouts exactly, so a
      claim for a key the round does not pay is refused by name.
  refund    {workflow_id}
      Only the workflow's owner, once, after the workflow ended: its last planned round
      (privacy_block.planned_rounds) is final or timed out, or the workflow went quiet (a run
      stopped early, a round stuck in ready): for round_timeout seconds of block time after the
      last moment any of its unfinished rounds (and its latest round) was due to move: the end
      of its collecting window, a task's deadline, a task's last report (`quiet_since`). A
      coordinator that keeps reassigning late tasks keeps its workflow going. Every final round
      must be settled first (while the escrow can pay it), so an owner cannot take back what
      its participants earned. Moves the escrow's remaining back to the owner's account; a
      round that becomes final after that is paid nothing.
  transfer  {recipient, amount}
      From the signer's account to recipient (a public key, not the signer), 1 <= amount <=
      the signer's balance: nobody sends more than they hold.

Records (canonical CBOR):
  account_address(key)        {key, balance}
  escrow_address(workflow)    {workflow_id, owner, terms: {rewards block}, total, remaining, paid,
                               settled: {round: schedule_id}[, refunded]}
  settlement_address(sid)     {schedule_id, workflow_id, round, amount, payouts: {key: {pot: amount}}}

Events: trustmesh/escrow-funded, trustmesh/round-settled, trustmesh/escrow-refunded,
trustmesh/transferred. Only refund reads the block time (BlockInfo), to tell a workflow that went
quiet; a settlement is a function of the round's records only.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from trustmesh.fl import privacy_block, rewards_block
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction
from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction, TransactionHandler

from . import definition, events, layout
from .common import (
    MAX_RECORD_BYTES,
    HEX64, IDENTIFIER, PUBLIC_KEY, chain_time, check_fields, emit, parse_payload, read_records, require_int,
    require_match, shown, signer_of, write_records,
)
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


# --------------------------------------------------------------------------- rules (pure)


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


def _account(records: Mapping[str, Any], key: str) -> dict:
    return dict(records.get(layout.account_address(key)) or {"key": key, "balance": 0})


def _credit(accounts: dict[str, dict], key: str, amount: int) -> None:
    account = accounts.setdefault(key, {"key": key, "balance": 0})
    balance = account["balance"] + amount
    if abs(balance) > MAX_BALANCE:
        raise InvalidTransaction(f"account {key} would hold {balance}, beyond the limit {MAX_BALANCE}")
    account["balance"] = balance


# --------------------------------------------------------------------------- handler


class RewardsHandler(TransactionHandler):
    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, body = parse_payload(transaction, ACTIONS)
        check_fields(body, FIELDS[action])
        signer = signer_of(transaction)
        try:
            await getattr(self, "_" + action)(body, signer, context)
        except AuthorizationError as exc:
            raise InvalidTransaction(
                f"{action} reads or writes an address its transaction does not list ({exc}); build it with "
                f"make_{action}_transaction, which lists them") from None

    async def _escrow(self, body: dict, signer: str, context) -> None:
        workflow_id = require_match(body, "workflow_id", IDENTIFIER, "a workflow identifier")
        w_addr, e_addr, a_addr = (layout.workflow_address(workflow_id), layout.escrow_address(workflow_id),
                                  layout.account_address(signer))
        found = await read_records(context, [w_addr, e_addr, a_addr])
        stored = found.get(w_addr)
        if stored is None:
            raise InvalidTransaction(f"workflow {workflow_id!r} is not deployed; deploy it (with a rewards block) first")
        owner = stored.get("owner")
        if signer != owner:
            raise InvalidTransaction(f"only the owner of workflow {workflow_id!r} ({owner}) may escrow its budget; "
                                     f"this transaction is signed by {signer}")
        terms = definition.rewards(definition.stored_definition(workflow_id, stored))
        if not isinstance(terms, dict):
            raise InvalidTransaction(f"workflow {workflow_id!r} has no rewards block; add one (fl/rewards_block.py) "
                                     f"with a workflow update before escrowing")
        if found.get(e_addr) is not None:
            raise InvalidTransaction(f"workflow {workflow_id!r} already has an escrow of {found[e_addr]['total']}; "
                                     f"a workflow is funded once")
        total = terms["total"]
        accounts = {signer: _account(found, signer)}
        _credit(accounts, signer, -total)
        escrow = {"workflow_id": workflow_id, "owner": owner, "terms": {k: terms[k] for k in rewards_block.TERMS
                                                                         if k in terms},
                  "total": total, "remaining": total, "paid": 0, "settled": {}}
        await write_records(context, {e_addr: escrow, a_addr: accounts[signer]})
        await emit(context, events.ESCROW_FUNDED, workflow_id=workflow_id, owner=owner, amount=total)

    async def _settle(self, body: dict, signer: str, context) -> None:
        schedule_id = require_match(body, "schedule_id", HEX64, "64 lowercase hex (a round's schedule_id)")
        r_addr, res_addr, s_addr = (layout.round_address(schedule_id), layout.round_result_address(schedule_id),
                                    layout.settlement_address(schedule_id))
        found = await read_records(context, [r_addr, res_addr, s_addr])
        record = found.get(r_addr)
        if record is None:
            raise InvalidTransaction(f"unknown schedule_id {schedule_id}: no round was opened with it")
        workflow_id, number = record["workflow_id"], record["round"]
        if found.get(s_addr) is not None:
            raise InvalidTransaction(f"round {number} of workflow {workflow_id!r} was already settled "
                                     f"({found[s_addr]['amount']} paid); a round is paid once")
        result = found.get(res_addr)
        if result is None or not result.get("final"):
            why = "has no round result yet" if result is None else "has a result that is not final yet (evaluation pending)"
            raise InvalidTransaction(f"round {number} of workflow {workflow_id!r} {why}; escrow is released only "
                                     f"by a final round result")
        e_addr = layout.escrow_address(workflow_id)
        escrow = (await read_records(context, [e_addr])).get(e_addr)
        if escrow is None:
            raise InvalidTransaction(f"workflow {workflow_id!r} has no escrow; its owner escrows the rewards "
                                     f"budget first (action escrow)")
        if escrow.get("refunded"):
            raise InvalidTransaction(f"the escrow of workflow {workflow_id!r} was refunded to its owner; it pays nothing more")
        terms = escrow["terms"]
        if escrow["remaining"] < terms["per_round"]:
            raise InvalidTransaction(
                f"the escrow of workflow {workflow_id!r} holds {escrow['remaining']}, less than the {terms['per_round']} "
                f"a round pays: the budget ({escrow['total']}) is spent")
        a_addr = layout.assignments_address(schedule_id)
        assignments = (await read_records(context, [a_addr])).get(a_addr)
        task_ids = sorted((assignments or {}).get("tasks", {}))
        status_addrs = {layout.task_status_address(schedule_id, t): t for t in task_ids}
        statuses = {status_addrs[a]: r for a, r in (await read_records(context, list(status_addrs))).items()}
        payouts = round_paid(terms, result, assignments, statuses)
        if "payouts" in body:
            check_claim(body["payouts"], payouts, number)
        amount = rewards_block.total_of(payouts)
        addresses = {k: layout.account_address(k) for k in payouts}
        stored_accounts = await read_records(context, list(addresses.values()))
        accounts = {k: _account(stored_accounts, k) for k in payouts}
        for key, parts in sorted(payouts.items()):
            _credit(accounts, key, sum(parts.values()))
        escrow = {**escrow, "remaining": escrow["remaining"] - amount, "paid": escrow["paid"] + amount,
                  "settled": {**escrow["settled"], str(number): schedule_id}}
        settlement = {"schedule_id": schedule_id, "workflow_id": workflow_id, "round": number, "amount": amount,
                      "payouts": payouts}
        await write_records(context, {e_addr: escrow, s_addr: settlement,
                                      **{addresses[k]: a for k, a in accounts.items()}})
        await emit(context, events.ROUND_SETTLED, schedule_id=schedule_id, workflow_id=workflow_id, round=number,
                   amount=amount, payees=",".join(sorted(payouts)), remaining=escrow["remaining"])

    async def _refund(self, body: dict, signer: str, context) -> None:
        workflow_id = require_match(body, "workflow_id", IDENTIFIER, "a workflow identifier")
        w_addr, e_addr, i_addr = (layout.workflow_address(workflow_id), layout.escrow_address(workflow_id),
                                  layout.workflow_rounds_address(workflow_id))
        found = await read_records(context, [w_addr, e_addr, i_addr])
        escrow = found.get(e_addr)
        if escrow is None:
            raise InvalidTransaction(f"workflow {workflow_id!r} has no escrow to refund")
        if signer != escrow["owner"]:
            raise InvalidTransaction(f"only the owner of workflow {workflow_id!r} ({escrow['owner']}) may take back "
                                     f"its escrow; this transaction is signed by {signer}")
        if escrow.get("refunded"):
            raise InvalidTransaction(f"the escrow of workflow {workflow_id!r} was already refunded")
        stored = definition.stored_definition(workflow_id, found.get(w_addr))
        index = found.get(i_addr) or {"rounds": {}}
        sids = {int(n): sid for n, sid in index.get("rounds", {}).items()}
        rounds = await read_records(context, [layout.round_address(s) for s in sids.values()])
        results = await read_records(context, [layout.round_result_address(s) for s in sids.values()])
        settled = await read_records(context, [layout.settlement_address(s) for s in sids.values()])
        by_sid = lambda records, f: {s: records[f(s)] for s in sids.values() if f(s) in records}  # noqa: E731
        rounds, results = by_sid(rounds, layout.round_address), by_sid(results, layout.round_result_address)
        why = workflow_ended(workflow_id, stored, index, rounds, results)
        if why is not None:  # not over: has it gone quiet? (the round clocks and task deadlines)
            watched = {sid: await self._statuses(context, sid) for sid in rounds_to_watch(index, rounds, results)}
            why = workflow_ended(workflow_id, stored, index, rounds, results, watched, await chain_time(context))
        if why is not None:
            raise InvalidTransaction(why + "; the escrow returns to the owner when the workflow ends")
        if escrow["remaining"] >= escrow["terms"]["per_round"]:
            for number, sid in sorted(sids.items()):
                if (results.get(sid) or {}).get("final") and layout.settlement_address(sid) not in settled:
                    raise InvalidTransaction(f"round {number} of workflow {workflow_id!r} is final but not settled; "
                                             f"settle it (schedule_id {sid}) before the refund: its participants "
                                             f"earned it")
        amount = escrow["remaining"]
        a_addr = layout.account_address(signer)
        accounts = {signer: _account(await read_records(context, [a_addr]), signer)}
        _credit(accounts, signer, amount)
        escrow = {**escrow, "remaining": 0, "refunded": amount}
        await write_records(context, {e_addr: escrow, a_addr: accounts[signer]})
        await emit(context, events.ESCROW_REFUNDED, workflow_id=workflow_id, owner=signer, amount=amount)

    @staticmethod
    async def _statuses(context, schedule_id: str) -> list[dict]:
        """A round's task statuses (none before it is assigned)."""
        a_addr = layout.assignments_address(schedule_id)
        assignments = (await read_records(context, [a_addr])).get(a_addr) or {}
        addresses = [layout.task_status_address(schedule_id, t) for t in sorted(assignments.get("tasks", {}))]
        found = await read_records(context, addresses)
        return [found[a] for a in addresses if a in found]

    async def _transfer(self, body: dict, signer: str, context) -> None:
        recipient = require_match(body, "recipient", PUBLIC_KEY, "a compressed public key (66 hex)")
        amount = require_int(body, "amount", 1, MAX_BALANCE)
        if recipient == signer:
            raise InvalidTransaction("recipient is the signer: a transfer moves units to another key")
        addresses = [layout.account_address(signer), layout.account_address(recipient)]
        found = await read_records(context, addresses)
        accounts = {signer: _account(found, signer), recipient: _account(found, recipient)}
        if accounts[signer]["balance"] < amount:
            raise InvalidTransaction(f"account {signer} holds {accounts[signer]['balance']}; it cannot send {amount}")
        _credit(accounts, signer, -amount)
        _credit(accounts, recipient, amount)
        await write_records(context, {layout.account_address(k): a for k, a in accounts.items()})
        await emit(context, events.TRANSFERRED, sender=signer, recipient=recipient, amount=amount)


# --------------------------------------------------------------------------- client


def _encode(action: str, body: Mapping) -> bytes:
    return cbor.encode({"action": action, **body})


def escrow_payload(workflow_id: str) -> bytes:
    return _encode("escrow", {"workflow_id": workflow_id})


def settle_payload(schedule_id: str, payouts: Mapping | None = None) -> bytes:
    return _encode("settle", {"schedule_id": schedule_id, **({"payouts": payouts} if payouts is not None else {})})


def refund_payload(workflow_id: str) -> bytes:
    return _encode("refund", {"workflow_id": workflow_id})


def transfer_payload(recipient: str, amount: int) -> bytes:
    return _encode("transfer", {"recipient": recipient, "amount": amount})


def _transaction(signer, payload: bytes, inputs: Iterable[str], outputs: Iterable[str]):
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, list(inputs), list(outputs))


def make_escrow_transaction(signer, workflow_id: str):
    me = layout.account_address(signer.public_key().as_hex())
    e = layout.escrow_address(workflow_id)
    return _transaction(signer, escrow_payload(workflow_id), [layout.workflow_address(workflow_id), e, me], [e, me])


def make_settle_transaction(signer, schedule_id: str, workflow_id: str, payouts: Mapping | None = None):
    """Reads the round, its result, assignments and task statuses; pays accounts (any in the namespace)."""
    inputs = [layout.round_address(schedule_id), layout.round_result_address(schedule_id),
              layout.assignments_address(schedule_id), layout.SCHEDULE_NS + layout.TASK_STATUS,
              layout.escrow_address(workflow_id), layout.settlement_address(schedule_id), layout.ACCOUNT_PREFIX]
    outputs = [layout.escrow_address(workflow_id), layout.settlement_address(schedule_id), layout.ACCOUNT_PREFIX]
    return _transaction(signer, settle_payload(schedule_id, payouts), inputs, outputs)


def make_refund_transaction(signer, workflow_id: str):
    me = layout.account_address(signer.public_key().as_hex())
    e = layout.escrow_address(workflow_id)
    inputs = [layout.workflow_address(workflow_id), e, me, layout.FEDERATION_NS,
              layout.SCHEDULE_NS + layout.ROUND_RESULT, layout.SCHEDULE_NS + layout.ASSIGNMENTS,
              layout.SCHEDULE_NS + layout.TASK_STATUS, layout.REWARDS_NS + layout.SETTLEMENT, layout.BLOCK_INFO_NS]
    return _transaction(signer, refund_payload(workflow_id), inputs, [e, me])


def make_transfer_transaction(signer, recipient: str, amount: int):
    addresses = [layout.account_address(signer.public_key().as_hex()), layout.account_address(recipient)]
    return _transaction(signer, transfer_payload(recipient, amount), addresses, addresses)


def decode_record(data: bytes | None) -> dict | None:
    return None if data is None else cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
