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

State (a round in three kinds of record, so a submit reads and writes a few hundred bytes
whatever the round's size; federation_records.py):

    round_address(schedule_id)                 the round's core, rewritten by every submit
        {schedule_id, workflow_id, workflow_version, round, coordinator,
         expected: count of expected nodes, submitted: count so far,
         min_nodes_required, round_timeout, round_start,
         status: "collecting" | "ready" | "timeout"[, noise_commitment][, reason]}
    round_roster_address(schedule_id)          written once, by open_round
        {expected_nodes: [keys in the workflow's order]}
    round_member_address(schedule_id, node)    one per expected node, under round_members_prefix
        {} (expected, not submitted yet; written by open_round), then
        {digest, samples, metadata, position (1-based arrival order)} (written by its submit)
    workflow_rounds_address(workflow_id)
        {rounds: {"1": schedule_id, ...}, latest: int}

A submit reads the core and the signer's member record (none: not an expected node; not empty:
it already submitted) and writes both; the roster and every member are read once per round, when
it becomes ready or times out (the event names submitted_nodes). Readers get the round assembled
in one shape (federation_records.assemble; reader.FederationReader.round):
{...core but the counts, expected_nodes, submissions: {node: {digest, samples, metadata}},
submitted_nodes: [keys in arrival order]}. Transactions that read a whole round list
federation_records.round_inputs(schedule_id) (the core, the roster, the members' prefix).

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

The family in parts: federation_rules.py (names, limits, the rules: pure), federation_handler.py
(the processor), federation_client.py (payloads, transactions, decoders), federation_records.py
(a round's records and their assembled shape); a workflow's
federation section is read through definition.federation_config. Every name callers used from
this module before is importable from here.
"""

from __future__ import annotations

from . import layout
from .definition import federation_config  # noqa: F401
from .federation_client import (  # noqa: F401
    decode_round, decode_workflow_rounds, make_close_round_payload, make_close_round_transaction,
    make_open_round_payload, make_open_round_transaction, make_submit_payload, make_submit_transaction,
    open_round_addresses,
)
from .federation_handler import FederationHandler  # noqa: F401
from .federation_rules import (  # noqa: F401
    ACTIONS, COLLECTING, EVENT_ROUND_OPENED, EVENT_ROUND_READY, EVENT_ROUND_TIMEOUT, EVENT_SUBMISSION_ACCEPTED,
    FAMILY_NAME, FAMILY_VERSION, FINISHED, MAX_METADATA_BYTES, MAX_METADATA_LIST, MAX_METADATA_STRING, MAX_ROUNDS,
    MAX_SAMPLES, NAMESPACE, READY, TIMEOUT, parse_metadata,
)

schedule_id_for = layout.schedule_id_for
