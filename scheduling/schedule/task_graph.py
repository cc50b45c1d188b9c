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


# A task's status names its dependents when it has at most this many (a local_train: its
# aggregate), so a report reads its own status and not the round's whole assignments record
# (~330 KB at 1,000 participants); a task with more (a round's preprocess, once per round) is
# looked up in the assignments.
FEW_DEPENDENTS = 16


def task_dependents(tasks: Mapping[str, Mapping]) -> dict[str, list[str]]:
    """task -> the tasks that take its output, in the round's task order."""
    dependents: dict[str, list[str]] = {t: [] for t in tasks}
    for task_id, task in tasks.items():
        for dep in task["fetch_dependency_outputs"]:
            dependents[dep].append(task_id)
    return dependents


def report_view(task: Mapping, dependents: list[str], workflow_id: str, round_number) -> dict:
    """What a task's status record carries so that its reports need no assignments record: its
    kind, its workflow and round (the lineage rule's), and its dependents when they are few."""
    view = {"kind": task["kind"], "workflow_id": workflow_id, "round": round_number}
    if len(dependents) <= FEW_DEPENDENTS:
        view["dependents"] = list(dependents)
    return view
