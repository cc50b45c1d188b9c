"""trustmesh-federation's processor: reads a transaction's inputs, applies federation_rules in
order, writes the records and emits the events."""

from __future__ import annotations

from typing import Mapping

from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction, TransactionHandler

from . import definition, layout, secagg_rules
from . import federation_records as records
from . import federation_rules as rules
from .common import (CLOCK_CONFIG_ADDRESS, chain_time, check_fields, emit, parse_payload, prefetch, read_records,
                     signer_of, write_records)


class FederationHandler(TransactionHandler):
    family_name = rules.FAMILY_NAME
    family_versions = [rules.FAMILY_VERSION]
    namespaces = [rules.NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, body = parse_payload(transaction, rules.ACTIONS)
        check_fields(body, rules.FIELDS[action])
        signer = signer_of(transaction)
        if action == "open_round":
            await self._open_round(body, signer, context)
        elif action == "submit":
            await self._submit(body, signer, context)
        else:
            await self._close_round(body, context)

    async def _open_round(self, body: dict, signer: str, context) -> None:
        workflow_id, number = rules.open_round_request(body)
        workflow_address = layout.workflow_address(workflow_id)
        index_address = layout.workflow_rounds_address(workflow_id)
        found = await read_records(context, [workflow_address, index_address])
        workflow = found.get(workflow_address)
        config, commitment = rules.admit_opener(body, workflow_id, workflow, signer, number)
        index, previous_id = rules.next_round(workflow_id, number, found.get(index_address))

        schedule_id = layout.schedule_id_for(workflow_id, number, signer)
        address = layout.round_address(schedule_id)
        wanted = [address] + ([layout.round_address(previous_id)] if previous_id else [])
        try:
            rounds_found = await read_records(context, wanted)
        except AuthorizationError:
            raise rules.missing_round_inputs(number, address, previous_id) from None
        rules.check_can_open(workflow_id, number, schedule_id, index, previous_id, rounds_found)

        record = rules.new_round(schedule_id, workflow_id, workflow, number, signer, config, commitment,
                                 await chain_time(context))
        await write_records(context, {address: record, index_address: rules.with_round(index, number, schedule_id),
                                      **rules.new_members(schedule_id, config)})
        await emit(context, rules.EVENT_ROUND_OPENED, **rules.round_opened(record, config["participants"]))

    async def _submit(self, body: dict, signer: str, context) -> None:
        """Reads and writes the round's core and the signer's member record only: the same few
        bytes for the first submission and the thousandth."""
        schedule_id, digest, samples, metadata = rules.submit_request(body)
        member_address = layout.round_member_address(schedule_id, signer)
        # the round's core, the member record and the clock's config in one round trip, not two
        await prefetch(context, [layout.round_address(schedule_id), member_address, CLOCK_CONFIG_ADDRESS])
        record, found = await _read_round(context, schedule_id, member_address)
        member = found.get(member_address)
        rules.check_submitter(record, member, schedule_id, signer)
        submission = {"digest": digest, "samples": samples, "metadata": metadata}
        record, member = rules.accept_submission(record, schedule_id, signer, submission, await chain_time(context))
        await write_records(context, {layout.round_address(schedule_id): record, member_address: member})
        await emit(context, rules.EVENT_SUBMISSION_ACCEPTED, **rules.submission_accepted(record, signer, member))
        if record["status"] == rules.READY:  # once per round: its members, for the event's submitted_nodes
            roster, members = await records.read_members(context, schedule_id)
            await _emit_finished(context, records.assemble(record, roster, {**members, signer: member}),
                                 "all-submitted")

    async def _close_round(self, body: dict, context) -> None:
        schedule_id = rules.schedule_id_of(body)
        record, _ = await _read_round(context, schedule_id)
        now = await chain_time(context)
        if record["status"] == rules.READY and await _aggregates_securely(context, record):
            # its unmask step stalled below the threshold: it ends as timeout, saying why
            roster, members = await records.read_members(context, schedule_id)
            reason = await secagg_rules.unmask_stalled(context, records.assemble(record, roster, members), now)
            record = {**record, "status": rules.TIMEOUT, "reason": reason}
            await write_records(context, {layout.round_address(schedule_id): record})
            await _emit_finished(context, records.assemble(record, roster, members), reason)
            return
        record = rules.close(record, schedule_id, now)  # refused early without reading the members
        roster, members = await records.read_members(context, schedule_id)
        await write_records(context, {layout.round_address(schedule_id): record})
        await _emit_finished(context, records.assemble(record, roster, members), "closed")


async def _aggregates_securely(context, record: Mapping) -> bool:
    address = layout.workflow_address(record["workflow_id"])
    try:
        workflow = await read_records(context, [address])
    except AuthorizationError:
        return False  # a plain close_round does not list the workflow: not a secure round's close
    stored = workflow.get(address) or {}
    return definition.secure_aggregation(stored.get("definition")) is not None


async def _read_round(context, schedule_id: str, *also: str) -> tuple[dict, dict]:
    """(the round's core, the records at `also` that exist), in one read."""
    address = layout.round_address(schedule_id)
    try:
        found = await read_records(context, [address, *also])
    except AuthorizationError:
        raise InvalidTransaction(
            f"list round {schedule_id}'s address {address}" + (f" and {', '.join(also)}" if also else "")
            + " in the transaction's inputs (the make_*_transaction helpers do; a submit lists the signer's "
            "member record)"
        ) from None
    record = found.pop(address, None)
    if record is None:
        raise InvalidTransaction(
            f"unknown schedule_id {schedule_id}: no round was opened with it (the coordinator opens "
            f"rounds with open_round; schedule_id = schedule_id_for(workflow_id, round, coordinator))"
        )
    return record, found


async def _emit_finished(context, record: dict, reason: str) -> None:
    event, attributes = rules.finished(record, reason)
    await emit(context, event, **attributes)
