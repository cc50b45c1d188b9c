"""trustmesh-rewards' payloads, transactions (with the addresses each action reads and writes)
and record decoder, for nodes, commands and tests (the family: rewards.py)."""

from __future__ import annotations

from typing import Iterable, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction

from . import layout
from .common import MAX_RECORD_BYTES
from .rewards_rules import FAMILY_NAME, FAMILY_VERSION


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
