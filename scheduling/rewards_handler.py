"""trustmesh-rewards' processor: reads a transaction's inputs, applies rewards_rules, writes the
records and emits the events (the family: rewards.py)."""

from __future__ import annotations

from trustmesh.fl import rewards_block
from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction, TransactionHandler

from . import definition, events, layout
from .common import (
    HEX64, IDENTIFIER, PUBLIC_KEY, chain_time, check_fields, emit, parse_payload, read_records, require_int,
    require_match, signer_of, write_records,
)
from .rewards_rules import (
    ACTIONS, FAMILY_NAME, FAMILY_VERSION, FIELDS, MAX_BALANCE, NAMESPACE, account_of, check_claim, credit, over,
    round_paid, rounds_to_watch, workflow_ended,
)


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
        accounts = {signer: account_of(found, signer)}
        credit(accounts, signer, -total)
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
        accounts = {k: account_of(stored_accounts, k) for k in payouts}
        for key, parts in sorted(payouts.items()):
            credit(accounts, key, sum(parts.values()))
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
        accounts = {signer: account_of(await read_records(context, [a_addr]), signer)}
        credit(accounts, signer, amount)
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
        accounts = {signer: account_of(found, signer), recipient: account_of(found, recipient)}
        if accounts[signer]["balance"] < amount:
            raise InvalidTransaction(f"account {signer} holds {accounts[signer]['balance']}; it cannot send {amount}")
        credit(accounts, signer, -amount)
        credit(accounts, recipient, amount)
        await write_records(context, {layout.account_address(k): a for k, a in accounts.items()})
        await emit(context, events.TRANSFERRED, sender=signer, recipient=recipient, amount=amount)
