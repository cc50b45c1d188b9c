"""A workflow's task DAG expanded into one round's task instances, and the aggregates it ends in
(pure)."""

from __future__ import annotations

import re
from typing import Any, Mapping

from trustmesh.ledger.processor import InvalidTransaction

from .spec import TASK_KINDS


def _workflow_tasks(workflow_id: str, definition: Any) -> list[dict]:
    """The definition's tasks in a stable topological order (definition order among the ready)."""
    where = f"workflow {workflow_id!r}"
    tasks = definition.get("tasks") if isinstance(definition, Mapping) else None
    if not isinstance(tasks, list) or not tasks:
        raise InvalidTransaction(f"{where} has no task list in its definition; deploy a workflow with tasks")
    by_id: dict[str, dict] = {}
    for task in tasks:
        if not isinstance(task, Mapping):
            raise InvalidTransaction(f"{where}: every task must be a map")
        tid = task.get("id")
        if not isinstance(tid, str) or not re.match(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z", tid):
            raise InvalidTransaction(f"{where}: task id {str(tid)[:80]!r} is not a plain identifier")
        if tid in by_id:
            raise InvalidTransaction(f"{where}: task id {tid!r} appears twice")
        if task.get("kind") not in TASK_KINDS:
            raise InvalidTransaction(f"{where}: task {tid!r} has kind {task.get('kind')!r}; one of {', '.join(TASK_KINDS)}")
        deps = task.get("depends_on", [])
        if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
            raise InvalidTransaction(f"{where}: depends_on of task {tid!r} must be a list of task ids")
        by_id[tid] = {"id": tid, "kind": task["kind"], "depends_on": list(dict.fromkeys(deps))}
    for tid, task in by_id.items():
        unknown = [d for d in task["depends_on"] if d not in by_id]
        if unknown:
            raise InvalidTransaction(f"{where}: task {tid!r} depends on unknown task(s) {', '.join(map(repr, unknown))}")
    ordered: list[dict] = []
    placed: set[str] = set()
    pending = list(by_id.values())
    while pending:
        ready = [t for t in pending if all(d in placed for d in t["depends_on"])]
        if not ready:
            raise InvalidTransaction(
                f"{where}: depends_on edges form a cycle among {', '.join(repr(t['id']) for t in pending)}"
            )
        for task in ready:
            ordered.append(task)
            placed.add(task["id"])
        pending = [t for t in pending if t["id"] not in placed]
    return ordered


def _closures(ordered: list[dict]) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Transitive dependencies and depth (longest chain below) of every task."""
    closure: dict[str, set[str]] = {}
    depth: dict[str, int] = {}
    for task in ordered:
        deps: set[str] = set()
        level = 0
        for dep in task["depends_on"]:
            deps.add(dep)
            deps |= closure[dep]
            level = max(level, depth[dep] + 1)
        closure[task["id"]] = deps
        depth[task["id"]] = level
    return closure, depth


def _final_aggregates(assignments: Mapping) -> list[str]:
    """Aggregate instances no other aggregate instance depends on: the round's global model."""
    tasks = assignments["tasks"]
    aggregates = [t for t in assignments.get("order", sorted(tasks)) if tasks[t]["kind"] == "aggregate"]
    inner = {d for t in aggregates for d in tasks[t]["fetch_dependency_outputs"]}
    return [t for t in aggregates if t not in inner]
