"""Which task events an IoT node's own training follows (train_on "iot"), apart from the trainer
itself (local_training.py): an IoT host subscribes with these for all its trainers, and a host or
node that never trains must not load torch, which the trainer needs."""

from __future__ import annotations

from trustmesh.ledger.events import event_subscription
from trustmesh.scheduling import events

# A node's own task events: its local_train assignments (filtered by node); the others concern
# every trainer alike (what can make a task runnable, or end its round).
OWN_TASK_EVENTS = (events.TASK_ASSIGNED, events.TASK_REASSIGNED)
SHARED_TASK_EVENTS = (events.TASK_DONE, events.TASK_DROPPED, events.ROUND_RESULT, events.ROUND_TIMEOUT)


def subscriptions(node: str | None) -> list:
    """Only this node's own local_train assignments, plus what can make them runnable; node None:
    every node's local_train assignments (an IoT host's one stream for all its trainers)."""
    mine = ([("node", node)] if node is not None else []) + [("kind", "local_train")]
    return ([event_subscription(e, mine) for e in OWN_TASK_EVENTS]
            + [event_subscription(e) for e in SHARED_TASK_EVENTS])
