"""trustmesh-schedule payload and transaction builders, and the record decoder (the clients' side)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction

from .. import layout
from ..common import MAX_RECORD_BYTES
from ..federation_records import round_inputs
from .spec import FAMILY_NAME, FAMILY_VERSION, NODE_LOAD_PREFIX, TASK_STATUS_PREFIX
from .lineage import StartingModel


def _encode(action: str, fields: Mapping[str, Any]) -> bytes:
    return cbor.encode({"action": action, **{k: v for k, v in fields.items() if v is not None}})


def _transaction(signer, payload: bytes, inputs: list[str], outputs: list[str], **kwargs):
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, inputs, outputs, **kwargs)


def assign_payload(schedule_id: str, deadline_seconds: int | None = None) -> bytes:
    return _encode("assign", {"schedule_id": schedule_id, "deadline_seconds": deadline_seconds})


def report_fields(task_id: str, status: str, *, output_digest: str | None = None,
                  metrics: Mapping[str, float] | None = None, attempt: int | None = None,
                  reason: str | None = None, base_model_digest: str | None = None) -> dict:
    """One report's fields but its schedule_id (what a report_many lists); those left None are
    left out. base_model_digest: a local_train done report's starting model; None for the initial
    weights and for every other report."""
    fields = {"task_id": task_id, "status": status, "output_digest": output_digest,
              "metrics": dict(metrics) if metrics is not None else None, "attempt": attempt, "reason": reason,
              "base_model_digest": base_model_digest}
    return {k: v for k, v in fields.items() if v is not None}


def report_payload(schedule_id: str, task_id: str, status: str, **fields) -> bytes:
    return _encode("report", {"schedule_id": schedule_id, **report_fields(task_id, status, **fields)})


def report_many_payload(schedule_id: str, reports: Sequence[Mapping[str, Any]]) -> bytes:
    """reports: report_fields(...) of each, in the order the rule applies them."""
    return _encode("report_many", {"schedule_id": schedule_id, "reports": [dict(r) for r in reports]})


def reassign_payload(schedule_id: str, task_id: str) -> bytes:
    return _encode("reassign", {"schedule_id": schedule_id, "task_id": task_id})


# Above this, a round result names its participants by position (checks.by_position): the keyed
# form of a thousand participants does not fit the family's 64 KiB payload.
KEYED_RESULT_MAX_BYTES = 48 * 1024


def round_result_payload(schedule_id: str, global_model_digest: str, participants: list[str],
                         aggregation_weights: Mapping[str, float], metrics: Mapping[str, float], *,
                         task_id: str | None = None, rejected: Mapping[str, str] | None = None,
                         server_state_digest: str | None = None, privacy: Mapping | None = None,
                         contributions: Mapping[str, float] | None = None,
                         submitted: Sequence[str] | None = None) -> bytes:
    """rejected: participants whose update the update checks refused (weight 0), with why; left
    out when none was. server_state_digest: what a server optimizer leaves for the next round.
    submitted: the round's submitted_nodes; with it, a result too large keyed by node names each
    participant by its position there instead (the record written is the same)."""
    fields = {
        "schedule_id": schedule_id, "global_model_digest": global_model_digest,
        "participants": list(participants), "aggregation_weights": dict(aggregation_weights),
        "metrics": dict(metrics), "task_id": task_id, "rejected": dict(rejected) if rejected else None,
        "server_state_digest": server_state_digest, "privacy": dict(privacy) if privacy else None,
        "contributions": dict(contributions) if contributions else None,
    }
    keyed = _encode("round_result", fields)
    if submitted is None or len(keyed) <= KEYED_RESULT_MAX_BYTES:
        return keyed
    position = {node: i for i, node in enumerate(submitted)}
    return _encode("round_result", {
        **fields, "participants": [position[n] for n in participants],
        "aggregation_weights": [aggregation_weights[n] for n in participants],
        "rejected": {position[n]: why for n, why in rejected.items()} if rejected else None,
        "contributions": [contributions[n] for n in participants] if contributions else None,
    })


def _secagg_transaction(signer, action: str, schedule_id: str, workflow_id: str, fields: Mapping, *, writes: bool,
                        **kwargs):
    """Reads the round, the workflow, every participant's secagg record, assignments and task
    statuses; writes the signer's own secagg record."""
    own = layout.secagg_address(schedule_id, signer.public_key().as_hex())
    inputs = [*round_inputs(schedule_id), layout.workflow_address(workflow_id), layout.SECAGG_PREFIX,
              layout.assignments_address(schedule_id), TASK_STATUS_PREFIX]
    return _transaction(signer, _encode(action, {"schedule_id": schedule_id, **fields}), inputs,
                        [own] if writes else [], **kwargs)


def make_secagg_keys_transaction(signer, schedule_id: str, workflow_id: str, c_pk: str, s_pk: str, **kwargs):
    return _secagg_transaction(signer, "secagg_keys", schedule_id, workflow_id, {"c_pk": c_pk, "s_pk": s_pk},
                               writes=True, **kwargs)


def make_secagg_shares_transaction(signer, schedule_id: str, workflow_id: str, self_commitment: str,
                                   sealed: Mapping, digests: Mapping, **kwargs):
    return _secagg_transaction(signer, "secagg_shares", schedule_id, workflow_id,
                               {"self_commitment": self_commitment, "sealed": dict(sealed), "digests": dict(digests)},
                               writes=True, **kwargs)


def make_secagg_unmask_transaction(signer, schedule_id: str, workflow_id: str, shares: Mapping, **kwargs):
    return _secagg_transaction(signer, "secagg_unmask", schedule_id, workflow_id, {"shares": dict(shares)},
                               writes=True, **kwargs)


def make_drop_update_transaction(signer, schedule_id: str, task_id: str, workflow_id: str, **kwargs):
    """The coordinator drops a securely aggregated round's overdue local_train (private_rounds.py)."""
    assignments = layout.assignments_address(schedule_id)
    inputs = [layout.round_address(schedule_id), layout.workflow_address(workflow_id), assignments,
              TASK_STATUS_PREFIX, layout.BLOCK_INFO_NS]
    payload = _encode("drop_update", {"schedule_id": schedule_id, "task_id": task_id})
    return _transaction(signer, payload, inputs, [assignments, TASK_STATUS_PREFIX], **kwargs)


def reveal_noise_payload(schedule_id: str, noise_seed: str) -> bytes:
    return _encode("reveal_noise", {"schedule_id": schedule_id, "noise_seed": noise_seed})


def make_reveal_noise_transaction(signer, schedule_id: str, noise_seed: str, **kwargs):
    """Signed by the round's coordinator once every local_train of the round is done."""
    seed_address = layout.noise_seed_address(schedule_id)
    inputs = [layout.round_address(schedule_id), layout.assignments_address(schedule_id), TASK_STATUS_PREFIX,
              seed_address, layout.BLOCK_INFO_NS]
    return _transaction(signer, reveal_noise_payload(schedule_id, noise_seed), inputs, [seed_address], **kwargs)


def make_assign_transaction(signer, schedule_id: str, workflow_id: str, *, deadline_seconds: int | None = None,
                            **kwargs):
    """Reads the workflow, the round, the peer registry and its liveness records (PEER_NS), node
    loads and BlockInfo; writes assignments, task statuses and node loads."""
    assignments = layout.assignments_address(schedule_id)
    inputs = [layout.workflow_address(workflow_id), *round_inputs(schedule_id), layout.PEER_NS,
              assignments, NODE_LOAD_PREFIX, layout.BLOCK_INFO_NS]
    outputs = [assignments, TASK_STATUS_PREFIX, NODE_LOAD_PREFIX]
    return _transaction(signer, assign_payload(schedule_id, deadline_seconds), inputs, outputs, **kwargs)


def _report_addresses(signer, schedule_id: str, starting_models: Sequence[StartingModel | None]):
    """Inputs and outputs of reports by `signer` in one round: the records the rule writes, and
    those the lineage rule reads for each StartingModel."""
    node_load = layout.node_load_address(signer.public_key().as_hex())
    assignments = layout.assignments_address(schedule_id)
    result = layout.round_result_address(schedule_id)
    inputs = [assignments, TASK_STATUS_PREFIX, node_load, result, layout.BLOCK_INFO_NS]
    outputs = [assignments, TASK_STATUS_PREFIX, node_load, result]
    for model in starting_models:
        if model is not None:
            inputs += [a for a in model.inputs if a not in inputs]
    return inputs, outputs


def make_report_transaction(signer, schedule_id: str, task_id: str, status: str, *, output_digest: str | None = None,
                            metrics: Mapping[str, float] | None = None, attempt: int | None = None,
                            reason: str | None = None, starting_model: StartingModel | None = None, **kwargs):
    """Signed by the task's node (its load record is the signer's). A local_train done report
    passes the StartingModel it trained from (FederationReader.starting_model): its digest
    becomes base_model_digest, and the records the lineage rule reads become inputs."""
    inputs, outputs = _report_addresses(signer, schedule_id, [starting_model])
    payload = report_payload(schedule_id, task_id, status, output_digest=output_digest, metrics=metrics,
                             attempt=attempt, reason=reason,
                             base_model_digest=starting_model.digest if starting_model is not None else None)
    return _transaction(signer, payload, inputs, outputs, **kwargs)


def make_report_many_transaction(signer, schedule_id: str, reports: Sequence[Mapping[str, Any]], **kwargs):
    """Several reports of one round by one node, in one transaction (at most
    MAX_REPORTS_PER_TRANSACTION). reports: make_report_transaction's arguments after status, as a
    map with task_id and status; a local_train done report passes its starting_model likewise."""
    inputs, outputs = _report_addresses(signer, schedule_id, [r.get("starting_model") for r in reports])
    entries = []
    for r in reports:
        fields = {k: v for k, v in r.items() if k != "starting_model"}
        model = r.get("starting_model")
        entries.append(report_fields(base_model_digest=model.digest if model is not None else None, **fields))
    return _transaction(signer, report_many_payload(schedule_id, entries), inputs, outputs, **kwargs)


def make_reassign_transaction(signer, schedule_id: str, task_id: str, **kwargs):
    """Reads the assignments, task statuses, the peer registry *and its liveness records* (all of
    trustmesh-peer's namespace), node loads and BlockInfo; writes the assignments, the task's
    status and node loads."""
    assignments = layout.assignments_address(schedule_id)
    inputs = [assignments, TASK_STATUS_PREFIX, layout.PEER_NS, NODE_LOAD_PREFIX, layout.BLOCK_INFO_NS]
    outputs = [assignments, layout.task_status_address(schedule_id, task_id), NODE_LOAD_PREFIX]
    return _transaction(signer, reassign_payload(schedule_id, task_id), inputs, outputs, **kwargs)


def make_round_result_transaction(signer, schedule_id: str, global_model_digest: str, participants: list[str],
                                  aggregation_weights: Mapping[str, float], metrics: Mapping[str, float], *,
                                  task_id: str | None = None, rejected: Mapping[str, str] | None = None,
                                  server_state_digest: str | None = None, privacy: Mapping | None = None,
                                  contributions: Mapping[str, float] | None = None,
                                  submitted: Sequence[str] | None = None, **kwargs):
    """Signed by the node of the aggregate task. With rejected updates it also counts them in
    their nodes' load records (reputation), so it declares those. submitted: the round's
    submitted_nodes, so a large result can name participants by position (round_result_payload)."""
    result = layout.round_result_address(schedule_id)
    inputs = [layout.assignments_address(schedule_id), *round_inputs(schedule_id), TASK_STATUS_PREFIX,
              result, layout.BLOCK_INFO_NS]
    outputs = [result]
    if rejected:
        loads = [layout.node_load_address(node) for node in sorted(rejected)]
        inputs, outputs = inputs + loads, outputs + loads
    payload = round_result_payload(schedule_id, global_model_digest, participants, aggregation_weights, metrics,
                                   task_id=task_id, rejected=rejected, server_state_digest=server_state_digest,
                                   privacy=privacy, contributions=contributions, submitted=submitted)
    return _transaction(signer, payload, inputs, outputs, **kwargs)


def tasks_of_node(assignments: Mapping, node: str) -> list[str]:
    """Task ids of an assignments record currently held by `node`, in topological order."""
    tasks = assignments.get("tasks", {})
    return [t for t in assignments.get("order", sorted(tasks)) if tasks[t].get("node") == node]


def decode_record(data: bytes | None) -> dict | None:
    """Any record of this family as stored (e.g. RestClient.get_state(assignments_address(sid)))."""
    return None if data is None else cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
