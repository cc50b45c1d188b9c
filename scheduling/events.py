"""Every event the five families emit: its name and the attributes it carries.

Attributes are strings (Sawtooth event attributes); together they suffice to rebuild the
off-chain caches (stores/federation_cache.py) and to follow a workflow (trustmesh run) without
reading state. Subscribers filter on these names; `ATTRIBUTES` is what each one carries
(tests/test_events.py checks every emitted event against it).
"""

from __future__ import annotations

import json
from typing import Any

# trustmesh-workflow
WORKFLOW_DEPLOYED = "trustmesh/workflow-deployed"
WORKFLOW_UPDATED = "trustmesh/workflow-updated"
# trustmesh-peer
PEER_REGISTERED = "trustmesh/peer-registered"
PEER_UPDATED = "trustmesh/peer-updated"
# trustmesh-federation
ROUND_OPENED = "trustmesh/round-opened"
SUBMISSION_ACCEPTED = "trustmesh/submission-accepted"
ROUND_READY = "trustmesh/round-ready"
ROUND_TIMEOUT = "trustmesh/round-timeout"
# trustmesh-schedule
TASK_ASSIGNED = "trustmesh/task-assigned"
ROUND_SCHEDULED = "trustmesh/round-scheduled"
TASK_RUNNING = "trustmesh/task-running"
TASK_DONE = "trustmesh/task-done"
TASK_FAILED = "trustmesh/task-failed"
TASK_REASSIGNED = "trustmesh/task-reassigned"
ROUND_RESULT = "trustmesh/round-result"
ROUND_FINALIZED = "trustmesh/round-finalized"
NOISE_REVEALED = "trustmesh/noise-revealed"
TASK_DROPPED = "trustmesh/task-dropped"
# trustmesh-rewards
ESCROW_FUNDED = "trustmesh/escrow-funded"
ROUND_SETTLED = "trustmesh/round-settled"
ESCROW_REFUNDED = "trustmesh/escrow-refunded"
TRANSFERRED = "trustmesh/transferred"

_TASK = ("schedule_id", "task_id", "node", "attempt", "kind")
_PEER = ("node", "name", "encryption_public_key", "cpu_cores", "memory_mb", "revision")
_FINISHED = ("schedule_id", "workflow_id", "round", "submissions", "submitted_nodes")

# name -> (attributes always present, attributes present only sometimes)
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    WORKFLOW_DEPLOYED: (("workflow_id", "version", "owner"), ()),
    WORKFLOW_UPDATED: (("workflow_id", "version", "owner"), ()),
    PEER_REGISTERED: (_PEER, ("accelerator",)),
    PEER_UPDATED: (_PEER, ("accelerator",)),
    ROUND_OPENED: (("schedule_id", "workflow_id", "workflow_version", "round", "coordinator", "expected_nodes",
                    "min_nodes_required", "round_timeout", "round_start"), ()),
    SUBMISSION_ACCEPTED: (("schedule_id", "workflow_id", "round", "node", "digest", "samples", "metadata",
                           "position"), ()),
    ROUND_READY: ((*_FINISHED, "reason"), ()),
    ROUND_TIMEOUT: ((*_FINISHED, "min_nodes_required"), ("reason",)),
    TASK_ASSIGNED: ((*_TASK, "workflow_id"), ()),
    ROUND_SCHEDULED: (("schedule_id", "workflow_id", "round", "tasks", "nodes"), ()),
    TASK_RUNNING: (_TASK, ()),
    TASK_DONE: ((*_TASK, "output_digest"), ("metrics",)),  # metrics: as the status records them
    TASK_FAILED: (_TASK, ()),
    TASK_REASSIGNED: ((*_TASK, "previous_node", "previous_status"), ()),
    ROUND_RESULT: (("schedule_id", "workflow_id", "round", "global_model_digest", "participants"), ()),
    ROUND_FINALIZED: (("schedule_id", "workflow_id", "round", "global_model_digest"), ()),
    NOISE_REVEALED: (("schedule_id", "workflow_id", "round"), ()),
    TASK_DROPPED: ((*_TASK, "workflow_id"), ()),
    ESCROW_FUNDED: (("workflow_id", "owner", "amount"), ()),
    ROUND_SETTLED: (("schedule_id", "workflow_id", "round", "amount", "payees", "remaining"), ()),
    ESCROW_REFUNDED: (("workflow_id", "owner", "amount"), ()),
    TRANSFERRED: (("sender", "recipient", "amount"), ()),
}

TASK_STATUS_EVENTS = {"running": TASK_RUNNING, "done": TASK_DONE, "failed": TASK_FAILED}


def json_attribute(value: Any) -> str:
    """A structured attribute (a submission's metadata, a report's metrics) as canonical JSON."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
