"""trustmesh-federation 1.0: federation rounds and the iot-data submissions to them.

Actions (canonical CBOR map {"action", ...}; unknown fields are refused):

    open_round   {workflow_id, round[, noise_commitment]}    signer: the workflow's coordinator_node
    submit       {schedule_id, digest, samples[, metadata]}  signer: one of the round's expected nodes
    close_round  {schedule_id}                               signer: anyone, once the round timed out;
                                                             or a ready, securely aggregated round whose
                                                             unmask step stalled below its threshold
                                                             (secagg_rules.unmask_stalled): timeout, with
                                                             the reason in the record and the event

Rounds of a workflow are numbered 1, 2, ... up to its federation `rounds`, or fewer when its
privacy budget allows fewer (fl/privacy_block.planned_rounds: a round whose epsilon would pass
privacy.epsilon_budget is refused); a round opens only when the previous one is finished (ready
or timeout). With privacy where "server" the coordinator commits to the round's noise seed as it
opens it (noise_commitment, sha256 of the seed): the aggregator's noise is fixed before any
update exists, and the seed is revealed once every update is in (trustmesh-schedule reveal_noise). Its id is derived, not drawn:
`schedule_id = layout.schedule_id_for(workflow_id, round, coordinator)`.

The round clock is the agreed block time (BlockInfo, `common.chain_time`): every action lists
`layout.BLOCK_INFO_NS` in its inputs. A round accepts submissions while it is collecting and
its round_timeout has not passed; after that only close_round decides ready or timeout.

State:

    round_address(schedule_id)
        {schedule_id, workflow_id, workflow_version, round, coordinator,
         expected_nodes: [keys], min_nodes_required, round_timeout, round_start,
         status: "collecting" | "ready" | "timeout",
         submissions: {node key: {digest, samples, metadata}},
         submitted_nodes: [keys in arrival order][, noise_commitment][, reason]}
    workflow_rounds_address(workflow_id)
        {rounds: {"1": schedule_id, ...}, latest: int}

Status: collecting -> ready when the last expected node submits (same transaction), or when
close_round runs after round_start + round_timeout with >= min_nodes_required submissions;
collecting -> timeout when close_round finds fewer.

Events (string attributes; enough to rebuild the Redis cache of rounds and submissions):

    trustmesh/round-opened          workflow_id, round, schedule_id, coordinator, expected_nodes
                                    (comma-separated), min_nodes_required, round_timeout,
                                    round_start, workflow_version
    trustmesh/submission-accepted   schedule_id, node, digest, samples, metadata (canonical JSON),
                                    workflow_id, round, position (1-based arrival order)
    trustmesh/round-ready           schedule_id, workflow_id, round, reason ("all-submitted" |
                                    "closed"), submissions (count), submitted_nodes (comma-separated)
    trustmesh/round-timeout         schedule_id, workflow_id, round, submissions, min_nodes_required,
                                    submitted_nodes

Blobs (encrypted data, model updates) never come here: only their sha256 (`digest`), the sample
count and a small metadata map (<= 1 KiB encoded, scalars or short lists of scalars, no bytes).
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction
from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction, TransactionHandler

from trustmesh.fl import privacy_block

from . import events, layout, secagg_rules
from .common import (
    check_fields,
    HEX64,
    IDENTIFIER,
    PUBLIC_KEY,
    chain_time,
    emit,
    parse_payload,
    read_records,
    require,
    require_int,
    require_match,
    signer_of,
    write_records,
)

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

MAX_ROUNDS = 10_000             # bounds the workflow's round index record
MAX_PARTICIPANTS = 1_000        # bounds a round record (each submission <= ~1.2 KiB)
MAX_ROUND_TIMEOUT = 366 * 24 * 3600
MAX_SAMPLES = 10**12
MAX_METADATA_BYTES = 1024
MAX_METADATA_STRING = 256
MAX_METADATA_LIST = 32
_INT64 = (-(2**63), 2**63 - 1)

_FIELDS = {
    "open_round": frozenset({"action", "workflow_id", "round", "noise_commitment"}),
    "submit": frozenset({"action", "schedule_id", "digest", "samples", "metadata"}),
    "close_round": frozenset({"action", "schedule_id"}),
}

schedule_id_for = layout.schedule_id_for


# --------------------------------------------------------------------------- checks


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


def _noise_commitment(body: Mapping, workflow_id: str, definition: Mapping, number: int) -> str | None:
    """open_round's privacy rules: the round fits the budget (privacy_block.planned_rounds), and
    carries noise_commitment exactly when the aggregator adds the noise (where "server")."""
    block = definition.get("privacy")
    if block is not None and number > privacy_block.planned_rounds(definition):
        spent = privacy_block.epsilon_after(block, number)
        raise InvalidTransaction(
            f"round {number} of workflow {workflow_id!r} would spend epsilon {spent:.4g} (delta {block['delta']:g}), "
            f"above its privacy.epsilon_budget {block['epsilon_budget']:g}: the privacy budget is exhausted and "
            f"the workflow ends with round {number - 1}"
        )
    wanted = block is not None and block["where"] == "server"
    if not wanted:
        if "noise_commitment" in body:
            raise InvalidTransaction(f"workflow {workflow_id!r} adds no server-side noise; leave noise_commitment out")
        return None
    if "noise_commitment" not in body:
        raise InvalidTransaction(
            f"workflow {workflow_id!r} has privacy where \"server\": open_round must carry noise_commitment, the "
            f"sha256 of the round's noise seed, so the noise is fixed before any update exists"
        )
    return require_match(body, "noise_commitment", HEX64, "the sha256 (64 lowercase hex) of the round's noise seed")


def federation_config(workflow_id: str, record: Any) -> dict:
    """The checked federation section of a stored workflow record."""
    if not isinstance(record, dict) or not isinstance(record.get("definition"), dict):
        raise InvalidTransaction(f"workflow {workflow_id!r} is stored without a definition map; redeploy it")
    federation = record["definition"].get("federation")
    if federation is None:
        raise InvalidTransaction(
            f"workflow {workflow_id!r} is a single-node workflow (its definition has no 'federation' "
            f"section); rounds exist only for federated workflows"
        )
    where = f"workflow {workflow_id!r} definition.federation"
    if not isinstance(federation, dict):
        raise InvalidTransaction(f"{where} must be a map; redeploy the workflow")
    coordinator = require_match(federation, "coordinator_node", PUBLIC_KEY, "a 66-hex public key", where=where)
    participants = require(federation, "participant_nodes", list, where=where)
    if not 1 <= len(participants) <= MAX_PARTICIPANTS:
        raise InvalidTransaction(f"{where} field 'participant_nodes' must list 1 to {MAX_PARTICIPANTS} node keys")
    for key in participants:
        if not isinstance(key, str) or not PUBLIC_KEY.match(key):
            raise InvalidTransaction(f"{where} field 'participant_nodes' holds {str(key)[:80]!r}, not a 66-hex public key")
    if len(set(participants)) != len(participants):
        raise InvalidTransaction(f"{where} field 'participant_nodes' lists a node twice")
    expected = federation.get("expected_nodes", len(participants))
    if isinstance(expected, list):
        expected_ok = sorted(expected) == sorted(participants)
    else:
        expected_ok = isinstance(expected, int) and not isinstance(expected, bool) and expected == len(participants)
    if not expected_ok:
        raise InvalidTransaction(
            f"{where} field 'expected_nodes' ({str(expected)[:80]}) does not match participant_nodes "
            f"({len(participants)} nodes); every participant is expected in every round"
        )
    return {
        "coordinator": coordinator,
        "participants": list(participants),
        "min_nodes_required": require_int(federation, "min_nodes_required", 1, len(participants), where=where),
        "round_timeout": require_int(federation, "round_timeout", 1, MAX_ROUND_TIMEOUT, where=where),
        "rounds": require_int(federation, "rounds", 1, MAX_ROUNDS, where=where),
    }


# --------------------------------------------------------------------------- handler


class FederationHandler(TransactionHandler):
    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, body = parse_payload(transaction, ACTIONS)
        check_fields(body, _FIELDS[action])
        signer = signer_of(transaction)
        if action == "open_round":
            await self._open_round(body, signer, context)
        elif action == "submit":
            await self._submit(body, signer, context)
        else:
            await self._close_round(body, context)

    # -- open_round --------------------------------------------------------------------------

    async def _open_round(self, body: dict, signer: str, context) -> None:
        workflow_id = require_match(body, "workflow_id", IDENTIFIER, "a workflow id (identifier)")
        number = require_int(body, "round", 1, MAX_ROUNDS)

        workflow_address = layout.workflow_address(workflow_id)
        index_address = layout.workflow_rounds_address(workflow_id)
        found = await read_records(context, [workflow_address, index_address])
        workflow = found.get(workflow_address)
        if workflow is None:
            raise InvalidTransaction(f"unknown workflow {workflow_id!r}: deploy it before opening rounds")
        config = federation_config(workflow_id, workflow)

        if signer != config["coordinator"]:
            raise InvalidTransaction(
                f"only the coordinator of workflow {workflow_id!r} ({config['coordinator']}) may open its "
                f"rounds; this transaction is signed by {signer}"
            )
        if number > config["rounds"]:
            raise InvalidTransaction(
                f"workflow {workflow_id!r} has {config['rounds']} round(s); round {number} is beyond them"
            )
        commitment = _noise_commitment(body, workflow_id, workflow["definition"], number)

        index = found.get(index_address) or {"rounds": {}, "latest": 0}
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
        schedule_id = layout.schedule_id_for(workflow_id, number, signer)
        address = layout.round_address(schedule_id)
        previous_id = index["rounds"].get(str(latest)) if latest else None
        wanted = [address] + ([layout.round_address(previous_id)] if previous_id else [])
        try:
            rounds_found = await read_records(context, wanted)
        except AuthorizationError:
            raise InvalidTransaction(
                f"open_round of round {number} must list in its inputs the new round's address "
                f"{address}" + (f" and the previous round's {layout.round_address(previous_id)} "
                                f"(schedule_id {previous_id}; make_open_round_transaction(..., "
                                f"previous_schedule_id=...))" if previous_id else "")
            ) from None
        if address in rounds_found:
            raise InvalidTransaction(f"round {schedule_id} already exists; it cannot be opened twice")
        if latest:
            previous = rounds_found.get(layout.round_address(previous_id)) if previous_id else None
            if previous is None:
                raise InvalidTransaction(
                    f"round {latest} of workflow {workflow_id!r} ({previous_id}) is missing from state"
                )
            if previous["status"] not in FINISHED:
                raise InvalidTransaction(
                    f"round {latest} of workflow {workflow_id!r} ({previous_id}) is still {previous['status']}; "
                    f"it must be ready or timeout (close_round after its timeout) before round {number} opens"
                )

        version = workflow.get("version")
        record = {
            "schedule_id": schedule_id,
            "workflow_id": workflow_id,
            "workflow_version": version if isinstance(version, (int, str)) and not isinstance(version, bool) else None,
            "round": number,
            "coordinator": signer,
            "expected_nodes": config["participants"],
            "min_nodes_required": config["min_nodes_required"],
            "round_timeout": config["round_timeout"],
            "round_start": await chain_time(context),
            "status": COLLECTING,
            "submissions": {},
            "submitted_nodes": [],
            **({"noise_commitment": commitment} if commitment else {}),
        }
        rounds = dict(index["rounds"])
        rounds[str(number)] = schedule_id
        await write_records(context, {address: record, index_address: {"rounds": rounds, "latest": number}})
        await emit(
            context, EVENT_ROUND_OPENED,
            workflow_id=workflow_id, round=number, schedule_id=schedule_id, coordinator=signer,
            expected_nodes=",".join(record["expected_nodes"]), min_nodes_required=record["min_nodes_required"],
            round_timeout=record["round_timeout"], round_start=record["round_start"],
            workflow_version="" if record["workflow_version"] is None else record["workflow_version"],
        )

    # -- submit ------------------------------------------------------------------------------

    async def _submit(self, body: dict, signer: str, context) -> None:
        schedule_id = require_match(body, "schedule_id", HEX64, "a schedule_id (64 lowercase hex)")
        digest = require_match(body, "digest", HEX64, "the sha256 of the off-chain blob as 64 lowercase hex")
        samples = require_int(body, "samples", 1, MAX_SAMPLES)
        metadata = parse_metadata(body["metadata"]) if "metadata" in body else {}

        record = await _read_round(context, schedule_id)
        where = f"round {record['round']} of workflow {record['workflow_id']!r} ({schedule_id})"
        if signer not in record["expected_nodes"]:
            raise InvalidTransaction(
                f"signer {signer} is not an expected node of {where}; only its participant_nodes may submit"
            )
        if signer in record["submissions"]:
            raise InvalidTransaction(
                f"node {signer} already submitted to {where} (digest {record['submissions'][signer]['digest']}); "
                f"one submission per node per round"
            )
        if record["status"] != COLLECTING:
            raise InvalidTransaction(f"{where} is {record['status']}; it no longer accepts submissions")
        # Past its timeout a round is closed in effect: a late submission must not change
        # whether close_round finds it ready or timed out.
        deadline = record["round_start"] + record["round_timeout"]
        now = await chain_time(context)
        if now >= deadline:
            raise InvalidTransaction(
                f"{where} passed its round_timeout {now - deadline} s ago; it no longer accepts "
                f"submissions (send close_round)"
            )

        submissions = dict(record["submissions"])
        submissions[signer] = {"digest": digest, "samples": samples, "metadata": metadata}
        record = {**record, "submissions": submissions, "submitted_nodes": [*record["submitted_nodes"], signer]}
        complete = len(record["submitted_nodes"]) == len(record["expected_nodes"])
        if complete:
            record["status"] = READY
        await write_records(context, {layout.round_address(schedule_id): record})
        await emit(
            context, EVENT_SUBMISSION_ACCEPTED,
            schedule_id=schedule_id, node=signer, digest=digest, samples=samples,
            metadata=json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False),
            workflow_id=record["workflow_id"], round=record["round"], position=len(record["submitted_nodes"]),
        )
        if complete:
            await _emit_finished(context, record, reason="all-submitted")

    # -- close_round -------------------------------------------------------------------------

    async def _close_round(self, body: dict, context) -> None:
        schedule_id = require_match(body, "schedule_id", HEX64, "a schedule_id (64 lowercase hex)")
        record = await _read_round(context, schedule_id)
        where = f"round {record['round']} of workflow {record['workflow_id']!r} ({schedule_id})"
        now = await chain_time(context)
        if record["status"] == READY and await _aggregates_securely(context, record):
            # its unmask step stalled below the threshold: it ends as timeout, saying why
            reason = await secagg_rules.unmask_stalled(context, record, now)
            record = {**record, "status": TIMEOUT, "reason": reason}
            await write_records(context, {layout.round_address(schedule_id): record})
            await _emit_finished(context, record, reason=reason)
            return
        if record["status"] != COLLECTING:
            raise InvalidTransaction(f"{where} is already {record['status']}; only a collecting round can be closed")
        deadline = record["round_start"] + record["round_timeout"]
        if now < deadline:
            raise InvalidTransaction(
                f"{where} cannot be closed yet: {deadline - now} s remain until its timeout (chain time "
                f"{deadline} = round_start {record['round_start']} + round_timeout {record['round_timeout']}; "
                f"chain time now {now}); send close_round again after that"
            )
        enough = len(record["submitted_nodes"]) >= record["min_nodes_required"]
        record = {**record, "status": READY if enough else TIMEOUT}
        await write_records(context, {layout.round_address(schedule_id): record})
        await _emit_finished(context, record, reason="closed")


async def _aggregates_securely(context, record: Mapping) -> bool:
    try:
        workflow = await read_records(context, [layout.workflow_address(record["workflow_id"])])
    except AuthorizationError:
        return False  # a plain close_round does not list the workflow: not a secure round's close
    stored = workflow.get(layout.workflow_address(record["workflow_id"])) or {}
    return "secure_aggregation" in (stored.get("definition") or {})


async def _read_round(context, schedule_id: str) -> dict:
    address = layout.round_address(schedule_id)
    record = (await read_records(context, [address])).get(address)
    if record is None:
        raise InvalidTransaction(
            f"unknown schedule_id {schedule_id}: no round was opened with it (the coordinator opens "
            f"rounds with open_round; schedule_id = schedule_id_for(workflow_id, round, coordinator))"
        )
    return record


async def _emit_finished(context, record: dict, *, reason: str) -> None:
    common = dict(
        schedule_id=record["schedule_id"], workflow_id=record["workflow_id"], round=record["round"],
        submissions=len(record["submitted_nodes"]), submitted_nodes=",".join(record["submitted_nodes"]),
    )
    if record["status"] == READY:
        await emit(context, EVENT_ROUND_READY, reason=reason, **common)
    else:
        await emit(context, EVENT_ROUND_TIMEOUT, min_nodes_required=record["min_nodes_required"], **common,
                   **({"reason": record["reason"]} if "reason" in record else {}))


# --------------------------------------------------------------------------- readers


async def read_round(context, schedule_id: str) -> dict | None:
    """A round record, or None (inside a handler: round_address(schedule_id) in inputs)."""
    address = layout.round_address(schedule_id)
    return (await read_records(context, [address])).get(address)


def decode_round(data: bytes | None) -> dict | None:
    """A round record as stored (e.g. RestClient.get_state(round_address(...)))."""
    return None if data is None else cbor.decode(data, max_bytes=10 * 1024 * 1024)


def decode_workflow_rounds(data: bytes | None) -> dict:
    """A workflow's round index as stored; {"rounds": {}, "latest": 0} when none was opened."""
    return {"rounds": {}, "latest": 0} if data is None else cbor.decode(data, max_bytes=10 * 1024 * 1024)


# --------------------------------------------------------------------------- client


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
    coordinator would have opened; pass it when the workflow's coordinator changed in between."""
    schedule_id = layout.schedule_id_for(workflow_id, round_number, coordinator)
    index = layout.workflow_rounds_address(workflow_id)
    inputs = [layout.workflow_address(workflow_id), index, layout.round_address(schedule_id)]
    if round_number > 1:
        if previous_schedule_id is None:
            previous_schedule_id = layout.schedule_id_for(workflow_id, round_number - 1, coordinator)
        inputs.append(layout.round_address(previous_schedule_id))
    inputs.append(layout.BLOCK_INFO_NS)
    return inputs, [layout.round_address(schedule_id), index]


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
    """Submit the signer's contribution (sha256 of the off-chain blob, sample count) to a round."""
    address = layout.round_address(schedule_id)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, make_submit_payload(schedule_id, digest, samples, metadata),
                            [address, layout.BLOCK_INFO_NS], [address], **kwargs)


def make_close_round_transaction(signer, schedule_id: str, *, secure_workflow: str | None = None, **kwargs):
    """Close a round whose timeout passed (any signer): ready with enough submissions, else timeout.
    secure_workflow: the workflow of a ready, securely aggregated round whose unmask step stalled
    (its reads: the workflow, the round's assignments, task statuses and secagg records)."""
    address = layout.round_address(schedule_id)
    inputs = [address, layout.BLOCK_INFO_NS]
    if secure_workflow is not None:
        inputs += [layout.workflow_address(secure_workflow), layout.assignments_address(schedule_id),
                   layout.SCHEDULE_NS + layout.TASK_STATUS, layout.SECAGG_PREFIX]
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, make_close_round_payload(schedule_id),
                            inputs, [address], **kwargs)
