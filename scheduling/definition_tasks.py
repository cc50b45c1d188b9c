"""The task graph of a workflow definition: its rules (check_tasks: 1..MAX_TASKS tasks with
unique identifier ids, known kinds, known dependencies, no cycle) and its order (topological_order,
closures), which the schedule family expands into a round's task instances."""

from __future__ import annotations

from typing import Any

from .definition_fields import DefinitionError, choice, fields, identifier, items

TASK_KINDS = ("local_train", "aggregate", "evaluate", "preprocess")
MAX_TASKS = 64


def check_tasks(tasks: Any, path: str) -> list[dict]:
    items(tasks, path, 1, MAX_TASKS)
    where: dict[str, int] = {}
    for i, task in enumerate(tasks):
        tpath = f"{path}[{i}]"
        fields(task, tpath, ("id", "kind", "depends_on"))
        task_id = identifier(task["id"], f"{tpath}.id")
        choice(task["kind"], f"{tpath}.kind", TASK_KINDS)
        deps = items(task["depends_on"], f"{tpath}.depends_on", 0, MAX_TASKS)
        seen: set[str] = set()
        for j, dep in enumerate(deps):
            identifier(dep, f"{tpath}.depends_on[{j}]")
            if dep in seen:
                raise DefinitionError(f"{tpath}.depends_on lists {dep!r} twice; name each dependency once")
            seen.add(dep)
        if task_id in where:
            raise DefinitionError(
                f"{tpath}.id {task_id!r} is already the id of {path}[{where[task_id]}]; task ids must be unique"
            )
        where[task_id] = i
    for i, task in enumerate(tasks):
        for dep in task["depends_on"]:
            if dep not in where:
                raise DefinitionError(
                    f"{path}[{i}] ({task['id']!r}) depends on unknown task {dep!r}; "
                    f"known tasks: {', '.join(sorted(where))}"
                )
    cycle = find_cycle(tasks)
    if cycle:
        raise DefinitionError(
            f"{path} form a cycle: {' -> '.join(cycle)}; the tasks must form a DAG "
            f"(a task may not depend on itself, directly or through others)"
        )
    return tasks


def find_cycle(tasks: list[dict]) -> list[str] | None:
    """The first dependency cycle in list order, as a closed path of task ids, or None."""
    deps = {t["id"]: t["depends_on"] for t in tasks}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in deps:
        if root in state:
            continue
        path = [root]
        iters = [iter(deps[root])]
        state[root] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(deps[nxt]))
    return None


def topological_order(tasks: list[dict]) -> list[dict]:
    """Checked tasks (check_tasks) as {id, kind, depends_on} copies in a stable topological order:
    wave by wave, each wave the tasks whose dependencies are all placed, in definition order."""
    pending = [{"id": t["id"], "kind": t["kind"], "depends_on": list(t["depends_on"])} for t in tasks]
    ordered: list[dict] = []
    placed: set[str] = set()
    while pending:
        ready = [t for t in pending if all(d in placed for d in t["depends_on"])]
        ordered += ready
        placed.update(t["id"] for t in ready)
        pending = [t for t in pending if t["id"] not in placed]
    return ordered


def closures(ordered: list[dict]) -> tuple[dict[str, set[str]], dict[str, int]]:
    """Transitive dependencies and depth (longest chain below) of every task, in topological order."""
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
