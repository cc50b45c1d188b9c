"""trustmesh-federation on the client: payloads, addresses, signed transactions, decoding records."""

from __future__ import annotations

from typing import Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction

from . import layout
from .common import MAX_RECORD_BYTES
from .federation_records import round_inputs
from .federation_rules import FAMILY_NAME, FAMILY_VERSION



def decode_round(data: bytes | None) -> dict | None:
    """A round's core as stored (e.g. RestClient.get_state(round_address(...))); the round with its
    lists is reader.FederationReader.round (federation_records.assemble)."""
    return None if data is None else cbor.decode(data, max_bytes=MAX_RECORD_BYTES)


def decode_workflow_rounds(data: bytes | None) -> dict:
    """A workflow's round index as stored; {"rounds": {}, "latest": 0} when none was opened."""
    return {"rounds": {}, "latest": 0} if data is None else cbor.decode(data, max_bytes=MAX_RECORD_BYTES)


def make_open_round_payload(workflow_id: str, round_number: int, noise_commitment: str | None = None) -> bytes:
    body = {"action": "open_round", "workflow_id": workflow_id, "round": round_number}
    if noise_commitment is not None:
        body["noise_commitment"] = noise_commitment
    return cbor.encode(body)


def make_submit_payload(schedule_id: str, digest: str, samples: int, metadata: Mapping | None = None) -> bytes:
    body = {"action": "submit", "schedule_id": schedule_id, "digest": digest, "samples": samples}
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return cbor.encode(body)


def make_close_round_payload(schedule_id: str) -> bytes:
    return cbor.encode({"action": "close_round", "schedule_id": schedule_id})


def open_round_addresses(workflow_id: str, round_number: int, coordinator: str,
                         previous_schedule_id: str | None = None) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of open_round. The previous round's id defaults to the one this
    coordinator would have opened; pass it when the workflow's coordinator changed in between.
    It writes the round's core, its roster and its members (under their prefix)."""
    schedule_id = layout.schedule_id_for(workflow_id, round_number, coordinator)
    index = layout.workflow_rounds_address(workflow_id)
    inputs = [layout.workflow_address(workflow_id), index, layout.round_address(schedule_id)]
    if round_number > 1:
        if previous_schedule_id is None:
            previous_schedule_id = layout.schedule_id_for(workflow_id, round_number - 1, coordinator)
        inputs.append(layout.round_address(previous_schedule_id))
    inputs.append(layout.BLOCK_INFO_NS)
    return inputs, [layout.round_address(schedule_id), index, layout.round_roster_address(schedule_id),
                     layout.round_members_prefix(schedule_id)]


def make_open_round_transaction(signer, workflow_id: str, round_number: int, *,
                                previous_schedule_id: str | None = None, noise_commitment: str | None = None,
                                **kwargs):
    """Open round `round_number` of a workflow; the signer must be its coordinator_node.
    The new round's id is schedule_id_for(workflow_id, round_number, signer's public key).
    noise_commitment: with privacy where "server", sha256 of the round's noise seed."""
    inputs, outputs = open_round_addresses(workflow_id, round_number, signer.public_key().as_hex(),
                                           previous_schedule_id)
    payload = make_open_round_payload(workflow_id, round_number, noise_commitment)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, inputs, outputs, **kwargs)


def make_submit_transaction(signer, schedule_id: str, digest: str, samples: int,
                            metadata: Mapping | None = None, **kwargs):
    """Submit the signer's contribution (sha256 of the off-chain blob, sample count) to a round.
    Writes the round's core and the signer's member record; reads those, and the roster and the
    other members only when it is the last submission (the round-ready event names them all)."""
    address = layout.round_address(schedule_id)
    member = layout.round_member_address(schedule_id, signer.public_key().as_hex())
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, make_submit_payload(schedule_id, digest, samples, metadata),
                            [*round_inputs(schedule_id), layout.BLOCK_INFO_NS], [address, member], **kwargs)


def make_close_round_transaction(signer, schedule_id: str, *, secure_workflow: str | None = None, **kwargs):
    """Close a round whose timeout passed (any signer): ready with enough submissions, else timeout.
    secure_workflow: the workflow of a ready, securely aggregated round whose unmask step stalled
    (its reads: the workflow, the round's assignments, task statuses and secagg records)."""
    address = layout.round_address(schedule_id)
    inputs = [*round_inputs(schedule_id), layout.BLOCK_INFO_NS]
    if secure_workflow is not None:
        inputs += [layout.workflow_address(secure_workflow), layout.assignments_address(schedule_id),
                   layout.SCHEDULE_NS + layout.TASK_STATUS, layout.SECAGG_PREFIX]
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, make_close_round_payload(schedule_id),
                            inputs, [address], **kwargs)
