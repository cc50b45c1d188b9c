"""trustmesh-federation's rules: pure functions of a payload, the records read and the block time
(federation.py describes the family). The handler (federation_handler.py) reads, calls them in
order and writes; each refusal is an InvalidTransaction saying what to do."""

from __future__ import annotations

import math
from typing import Any, Mapping

from trustmesh.fl import privacy_block
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.processor import InvalidTransaction

from . import definition, events, layout
from .common import HEX64, IDENTIFIER, require_int, require_match

FAMILY_NAME = layout.FEDERATION_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.FEDERATION_NS

ACTIONS = ("open_round", "submit", "close_round")

COLLECTING, READY, TIMEOUT = "collecting", "ready", "timeout"
FINISHED = (READY, TIMEOUT)

EVENT_ROUND_OPENED = events.ROUND_OPENED
EVENT_SUBMISSION_ACCEPTED = events.SUBMISSION_ACCEPTED
EVENT_ROUND_READY = events.ROUND_READY
EVENT_ROUND_TIMEOUT = events.ROUND_TIMEOUT

MAX_ROUNDS = definition.MAX_ROUNDS  # a workflow's rounds (federation.rounds) bound its round index record
MAX_SAMPLES = 10**12
MAX_METADATA_BYTES = 1024
MAX_METADATA_STRING = 256
MAX_METADATA_LIST = 32
_INT64 = (-(2**63), 2**63 - 1)

FIELDS = {
    "open_round": frozenset({"action", "workflow_id", "round", "noise_commitment"}),
    "submit": frozenset({"action", "schedule_id", "digest", "samples", "metadata"}),
    "close_round": frozenset({"action", "schedule_id"}),
}


# --------------------------------------------------------------------------- payload fields


def schedule_id_of(body: Mapping) -> str:
    return require_match(body, "schedule_id", HEX64, "a schedule_id (64 lowercase hex)")


def _check_metadata_scalar(key: str, value: Any) -> None:
    if value is None or isinstance(value, (bool, str, int, float)):
        if isinstance(value, str) and len(value) > MAX_METADATA_STRING:
            raise InvalidTransaction(
                f"metadata value {key!r} is {len(value)} characters; the limit is {MAX_METADATA_STRING}: "
                f"raw data never goes on chain, store it off-chain and send its sha256 as 'digest'"
            )
        if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
            raise InvalidTransaction(f"metadata value {key!r} must fit in a signed 64-bit integer")
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidTransaction(f"metadata value {key!r} must be a finite number, got {value}")
        return
    if isinstance(value, (bytes, bytearray)):
        raise InvalidTransaction(
            f"metadata value {key!r} is bytes: raw data never goes on chain; store the blob off-chain "
            f"and send its sha256 as 'digest'"
        )
    raise InvalidTransaction(
        f"metadata value {key!r} must be a string, number, boolean, null or a list of those; "
        f"got {type(value).__name__}"
    )


def parse_metadata(value: Any) -> dict:
    """A small flat map: identifier keys, scalar or list-of-scalar values, <= 1 KiB encoded."""
    if not isinstance(value, dict):
        raise InvalidTransaction(f"payload field 'metadata' must be a map, got {type(value).__name__}")
    size = len(cbor.encode(value))
    if size > MAX_METADATA_BYTES:
        raise InvalidTransaction(
            f"metadata is {size} bytes encoded; the limit is {MAX_METADATA_BYTES}: keep it to small "
            f"descriptive fields, blobs go off-chain under their sha256"
        )
    for key, item in value.items():
        if not isinstance(key, str) or not IDENTIFIER.match(key):
            raise InvalidTransaction(
                f"metadata key {str(key)[:80]!r} must be an identifier (1-64 of A-Z a-z 0-9 . _ -)"
            )
        if isinstance(item, list):
            if len(item) > MAX_METADATA_LIST:
                raise InvalidTransaction(
                    f"metadata value {key!r} is a list of {len(item)} items; the limit is {MAX_METADATA_LIST}"
                )
            for element in item:
                _check_metadata_scalar(key, element)
        else:
            _check_metadata_scalar(key, item)
    return dict(value)


# --------------------------------------------------------------------------- open_round


def open_round_request(body: Mapping) -> tuple[str, int]:
    """(workflow_id, round number) of an open_round payload."""
    workflow_id = require_match(body, "workflow_id", IDENTIFIER, "a workflow id (identifier)")
    return workflow_id, require_int(body, "round", 1, MAX_ROUNDS)


def admit_opener(body: Mapping, workflow_id: str, workflow: Any, signer: str, number: int) -> tuple[dict, str | None]:
    """(federation config, noise commitment or None): the workflow is federated, the signer is its
    coordinator, the round is within its rounds and its privacy budget."""
    if workflow is None:
        raise InvalidTransaction(f"unknown workflow {workflow_id!r}: deploy it before opening rounds")
    config = definition.federation_config(workflow_id, workflow)
    if signer != config["coordinator"]:
        raise InvalidTransaction(
            f"only the coordinator of workflow {workflow_id!r} ({config['coordinator']}) may open its "
            f"rounds; this transaction is signed by {signer}"
        )
    if number > config["rounds"]:
        raise InvalidTransaction(
            f"workflow {workflow_id!r} has {config['rounds']} round(s); round {number} is beyond them"
        )
    return config, _noise_commitment(body, workflow_id, workflow["definition"], number)


def _noise_commitment(body: Mapping, workflow_id: str, stored: Mapping, number: int) -> str | None:
    """open_round's privacy rules: the round fits the budget (privacy_block.planned_rounds), and
    carries noise_commitment exactly when the aggregator adds the noise (where "server")."""
    block = definition.privacy(stored)
    if block is not None and number > privacy_block.planned_rounds(stored):
        spent = privacy_block.epsilon_after(block, number)
        raise InvalidTransaction(
            f"round {number} of workflow {workflow_id!r} would spend epsilon {spent:.4g} (delta {block['delta']:g}), "
            f"above its privacy.epsilon_budget {block['epsilon_budget']:g}: the privacy budget is exhausted and "
            f"the workflow ends with round {number - 1}"
        )
    if block is None or block["where"] != "server":
        if "noise_commitment" in body:
            raise InvalidTransaction(f"workflow {workflow_id!r} adds no server-side noise; leave noise_commitment out")
        return None
    if "noise_commitment" not in body:
        raise InvalidTransaction(
            f"workflow {workflow_id!r} has privacy where \"server\": open_round must carry noise_commitment, the "
            f"sha256 of the round's noise seed, so the noise is fixed before any update exists"
        )
    return require_match(body, "noise_commitment", HEX64, "the sha256 (64 lowercase hex) of the round's noise seed")


def next_round(workflow_id: str, number: int, index: Mapping | None) -> tuple[dict, str | None]:
    """(the workflow's round index, the previous round's schedule_id or None): rounds go up by one."""
    index = index or {"rounds": {}, "latest": 0}
    latest = index["latest"]
    if number != latest + 1:
        if number <= latest:
            raise InvalidTransaction(
                f"round {number} of workflow {workflow_id!r} was already opened (schedule_id "
                f"{index['rounds'].get(str(number))}); the next round is {latest + 1}"
            )
        raise InvalidTransaction(
            f"rounds go up by one: the next round of workflow {workflow_id!r} is {latest + 1}, not {number}"
        )
    return index, index["rounds"].get(str(latest)) if latest else None


def missing_round_inputs(number: int, address: str, previous_id: str | None) -> InvalidTransaction:
    """What to say when open_round did not list the round addresses it reads."""
    return InvalidTransaction(
        f"open_round of round {number} must list in its inputs the new round's address "
        f"{address}" + (f" and the previous round's {layout.round_address(previous_id)} "
                        f"(schedule_id {previous_id}; make_open_round_transaction(..., "
                        f"previous_schedule_id=...))" if previous_id else "")
    )


def check_can_open(workflow_id: str, number: int, schedule_id: str, index: Mapping, previous_id: str | None,
                   found: Mapping[str, Any]) -> None:
    """The new round does not exist yet; the previous one (if any) is ready or timed out."""
    if layout.round_address(schedule_id) in found:
        raise InvalidTransaction(f"round {schedule_id} already exists; it cannot be opened twice")
    latest = index["latest"]
    if latest:
        previous = found.get(layout.round_address(previous_id)) if previous_id else None
        if previous is None:
            raise InvalidTransaction(f"round {latest} of workflow {workflow_id!r} ({previous_id}) is missing from state")
        if previous["status"] not in FINISHED:
            raise InvalidTransaction(
                f"round {latest} of workflow {workflow_id!r} ({previous_id}) is still {previous['status']}; "
                f"it must be ready or timeout (close_round after its timeout) before round {number} opens"
            )


def new_round(schedule_id: str, workflow_id: str, workflow: Mapping, number: int, signer: str, config: Mapping,
              commitment: str | None, now: int) -> dict:
    """The round's core (federation_records.py): its lists live in the roster and member records."""
    version = workflow.get("version")
    return {
        "schedule_id": schedule_id,
        "workflow_id": workflow_id,
        "workflow_version": version if isinstance(version, (int, str)) and not isinstance(version, bool) else None,
        "round": number,
        "coordinator": signer,
        "expected": len(config["participants"]),
        "submitted": 0,
        "min_nodes_required": config["min_nodes_required"],
        "round_timeout": config["round_timeout"],
        "round_start": now,
        "status": COLLECTING,
        **({"noise_commitment": commitment} if commitment else {}),
    }


def new_members(schedule_id: str, config: Mapping) -> dict[str, dict]:
    """The records open_round writes beside the core: the roster, and one empty member record per
    expected node (expected, not submitted yet)."""
    nodes = list(config["participants"])
    return {layout.round_roster_address(schedule_id): {"expected_nodes": nodes},
            **{layout.round_member_address(schedule_id, n): {} for n in nodes}}


def with_round(index: Mapping, number: int, schedule_id: str) -> dict:
    """The round index once round `number` is open."""
    return {"rounds": {**index["rounds"], str(number): schedule_id}, "latest": number}


def round_opened(record: Mapping, expected_nodes: list[str]) -> dict:
    """Attributes of trustmesh/round-opened."""
    return dict(
        workflow_id=record["workflow_id"], round=record["round"], schedule_id=record["schedule_id"],
        coordinator=record["coordinator"], expected_nodes=",".join(expected_nodes),
        min_nodes_required=record["min_nodes_required"], round_timeout=record["round_timeout"],
        round_start=record["round_start"],
        workflow_version="" if record["workflow_version"] is None else record["workflow_version"],
    )


# --------------------------------------------------------------------------- submit


def submit_request(body: Mapping) -> tuple[str, str, int, dict]:
    """(schedule_id, digest, samples, metadata) of a submit payload."""
    schedule_id = schedule_id_of(body)
    digest = require_match(body, "digest", HEX64, "the sha256 of the off-chain blob as 64 lowercase hex")
    samples = require_int(body, "samples", 1, MAX_SAMPLES)
    return schedule_id, digest, samples, parse_metadata(body["metadata"]) if "metadata" in body else {}


def _where(record: Mapping, schedule_id: str) -> str:
    return f"round {record['round']} of workflow {record['workflow_id']!r} ({schedule_id})"


def check_submitter(record: Mapping, member: Mapping | None, schedule_id: str, signer: str) -> None:
    """An expected node (it has a member record) that has not submitted yet (the record is empty),
    to a round (its core) still collecting."""
    where = _where(record, schedule_id)
    if member is None:
        raise InvalidTransaction(
            f"signer {signer} is not an expected node of {where}; only its participant_nodes may submit"
        )
    if member:
        raise InvalidTransaction(
            f"node {signer} already submitted to {where} (digest {member.get('digest')}); "
            f"one submission per node per round"
        )
    if record["status"] != COLLECTING:
        raise InvalidTransaction(f"{where} is {record['status']}; it no longer accepts submissions")


def accept_submission(record: Mapping, schedule_id: str, signer: str, submission: Mapping,
                      now: int) -> tuple[dict, dict]:
    """(the round's core counting the submission, the signer's member record holding it
    {digest, samples, metadata, position}); ready once every expected node submitted. Past its
    timeout a round is closed in effect: a late submission must not change whether close_round
    finds it ready or timed out."""
    deadline = record["round_start"] + record["round_timeout"]
    if now >= deadline:
        raise InvalidTransaction(
            f"{_where(record, schedule_id)} passed its round_timeout {now - deadline} s ago; it no longer accepts "
            f"submissions (send close_round)"
        )
    position = record["submitted"] + 1
    record = {**record, "submitted": position}
    if position == record["expected"]:
        record["status"] = READY
    return record, {**dict(submission), "position": position}


def submission_accepted(record: Mapping, signer: str, member: Mapping) -> dict:
    """Attributes of trustmesh/submission-accepted."""
    return dict(
        schedule_id=record["schedule_id"], node=signer, digest=member["digest"], samples=member["samples"],
        metadata=events.json_attribute(member["metadata"]),
        workflow_id=record["workflow_id"], round=record["round"], position=member["position"],
    )


# --------------------------------------------------------------------------- close_round


def close(record: Mapping, schedule_id: str, now: int) -> dict:
    """A collecting round (its core) past its timeout: ready with >= min_nodes_required submissions, else timeout."""
    where = _where(record, schedule_id)
    if record["status"] != COLLECTING:
        raise InvalidTransaction(f"{where} is already {record['status']}; only a collecting round can be closed")
    deadline = record["round_start"] + record["round_timeout"]
    if now < deadline:
        raise InvalidTransaction(
            f"{where} cannot be closed yet: {deadline - now} s remain until its timeout (chain time "
            f"{deadline} = round_start {record['round_start']} + round_timeout {record['round_timeout']}; "
            f"chain time now {now}); send close_round again after that"
        )
    enough = record["submitted"] >= record["min_nodes_required"]
    return {**record, "status": READY if enough else TIMEOUT}


def finished(record: Mapping, reason: str) -> tuple[str, dict]:
    """(event type, attributes) of a round that became ready or timed out (the assembled round,
    federation_records.assemble: its submitted_nodes in arrival order)."""
    common = dict(
        schedule_id=record["schedule_id"], workflow_id=record["workflow_id"], round=record["round"],
        submissions=len(record["submitted_nodes"]), submitted_nodes=",".join(record["submitted_nodes"]),
    )
    if record["status"] == READY:
        return EVENT_ROUND_READY, dict(reason=reason, **common)
    return EVENT_ROUND_TIMEOUT, dict(min_nodes_required=record["min_nodes_required"], **common,
                                     **({"reason": record["reason"]} if "reason" in record else {}))
