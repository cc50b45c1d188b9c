"""A workflow's task DAG expanded into one round's task instances, and the aggregates it ends in
(pure). The DAG itself (its rules, its order, each task's transitive dependencies and depth) is
the definition's: scheduling/definition_tasks.py, read through definition.task_order."""

from __future__ import annotations

from typing import Mapping

from ..definition import closures as _closures  # noqa: F401  (transitive dependencies and depth)
from ..definition import task_order as _workflow_tasks  # noqa: F401  (the stored tasks, topologically)


def _final_aggregates(assignments: Mapping) -> list[str]:
    """Aggregate instances no other aggregate instance depends on: the round's global model."""
    tasks = assignments["tasks"]
    aggregates = [t for t in assignments.get("order", sorted(tasks)) if tasks[t]["kind"] == "aggregate"]
    inner = {d for t in aggregates for d in tasks[t]["fetch_dependency_outputs"]}
    return [t for t in aggregates if t not in inner]
