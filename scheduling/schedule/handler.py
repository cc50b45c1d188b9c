"""The trustmesh-schedule transaction handler, and its assign and reassign rules."""

from __future__ import annotations

import asyncio
from typing import Any, Iterable, Mapping

from trustmesh.ledger.processor import InvalidTransaction, TransactionHandler

from .. import definition as definitions
from .. import events, federation_records, layout, peers
from ..common import chain_time, emit, parse_payload, read_record, read_records, require_int, signer_of, write_records
from .spec import ACTIONS, DEFAULT_DEADLINE_SECONDS, FAMILY_NAME, FAMILY_VERSION, MAX_DEADLINE_SECONDS, NAMESPACE, SETTLED
from .placement import empty_load, rank_nodes, resource_points, responsive, spread_trainings
from .private_rounds import PrivateRoundRules
from .reports import ReportRules
from .checks import _check_fields, _schedule_id, _task_id
from .task_graph import _closures, _workflow_tasks, report_view, task_dependents


class ScheduleHandler(ReportRules, PrivateRoundRules, TransactionHandler):
    """Reads a transaction's inputs, applies the rules (assign and reassign here; reports and
    results in reports.py; private rounds in private_rounds.py), writes."""

    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    async def apply(self, transaction, context) -> None:
        action, body = parse_payload(transaction, ACTIONS)
        _check_fields(action, body)
        signer = signer_of(transaction)
        await getattr(self, "_" + action)(body, signer, context)

    # -- shared reads ----------------------------------------------------------------------

    @staticmethod
    async def _assignments(context, schedule_id: str) -> dict:
        record = await read_record(context, layout.assignments_address(schedule_id))
        if record is None:
            raise InvalidTransaction(
                f"no tasks are assigned for schedule {schedule_id!r}; send 'assign' once its round is ready"
            )
        return record

    @staticmethod
    def _task(assignments: Mapping, schedule_id: str, task_id: str) -> dict:
        task = assignments["tasks"].get(task_id)
        if task is None:
            known = ", ".join(sorted(assignments["tasks"]))
            raise InvalidTransaction(f"schedule {schedule_id!r} has no task {task_id!r} (its tasks: {known})"[:1000])
        return task

    @staticmethod
    async def _statuses(context, schedule_id: str, task_ids: Iterable[str]) -> dict[str, dict]:
        ids = list(dict.fromkeys(task_ids))
        addresses = {layout.task_status_address(schedule_id, t): t for t in ids}
        found = await read_records(context, list(addresses))
        statuses = {addresses[a]: r for a, r in found.items()}
        missing = [t for t in ids if t not in statuses]
        if missing:  # written together with the assignments: only a broken state lacks them
            raise InvalidTransaction(f"schedule {schedule_id!r}: task status of {', '.join(missing)} is missing from state")
        return statuses

    @staticmethod
    async def _compute_nodes(context) -> dict[str, int]:
        """Registered compute nodes -> resource points (peer index order)."""
        index = await read_record(context, layout.PEER_INDEX_ADDRESS)
        keys = [k for k in index if isinstance(k, str)] if isinstance(index, list) else []
        if not keys:
            return {}
        records = await read_records(context, [layout.peer_address(k) for k in keys])
        return {k: resource_points(records[layout.peer_address(k)]) for k in keys if layout.peer_address(k) in records}

    @staticmethod
    async def _responsive(context, nodes: Iterable[str], loads: Mapping[str, Mapping], now: int) -> set[str]:
        """The nodes among `nodes` that may be given work now (`responsive`)."""
        seen = await peers.read_last_seen(context, nodes)
        return {n for n, last in seen.items() if responsive(last, loads.get(n) or {}, now)}

    @staticmethod
    async def _loads(context, nodes: Iterable[str]) -> dict[str, dict]:
        nodes = list(dict.fromkeys(nodes))
        found = await read_records(context, [layout.node_load_address(n) for n in nodes])
        return {n: dict(found.get(layout.node_load_address(n)) or empty_load(n)) for n in nodes}

    # -- assign ----------------------------------------------------------------------------

    async def _assign(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        deadline_seconds = DEFAULT_DEADLINE_SECONDS
        if "deadline_seconds" in body:
            deadline_seconds = require_int(body, "deadline_seconds", 1, MAX_DEADLINE_SECONDS)

        if await read_record(context, layout.assignments_address(schedule_id)) is not None:
            raise InvalidTransaction(f"schedule {schedule_id!r} is already assigned; a round is assigned once")
        round_ = await read_record(context, layout.round_address(schedule_id))  # its core: status, counts
        if round_ is None:
            raise InvalidTransaction(
                f"no round with schedule id {schedule_id!r} on chain; the coordinator opens it (trustmesh-federation)"
            )
        status = round_.get("status")
        if status != "ready":
            hint = {
                "collecting": f"it is still collecting submissions ({round_.get('submitted')} of "
                              f"{round_.get('expected')}); assign once it is ready",
                "timeout": "it timed out below min_nodes_required; it has nothing to train on",
            }.get(status, "only a ready round can be assigned")
            raise InvalidTransaction(f"round {schedule_id!r} is {status!r}, not 'ready': {hint}")
        workflow_id = round_.get("workflow_id")
        workflow = await read_record(context, layout.workflow_address(str(workflow_id)))
        if workflow is None:
            raise InvalidTransaction(f"round {schedule_id!r} names workflow {workflow_id!r}, which is not on chain")
        definition = workflow.get("definition") or {}
        ordered = _workflow_tasks(workflow_id, definition)
        train_on = definitions.train_on(definition, workflow_id)

        round_ = federation_records.assemble(round_, *await federation_records.read_members(context, schedule_id))
        submissions = round_.get("submissions") or {}
        arrival = [n for n in (round_.get("submitted_nodes") or []) if n in submissions]
        arrival += sorted(n for n in submissions if n not in arrival)
        if not arrival:
            raise InvalidTransaction(f"round {schedule_id!r} is ready but holds no submissions; nothing to train on")

        closure, depth = _closures(ordered)
        now = await chain_time(context)

        # instance skeletons, in topological order
        instances: dict[str, list[str]] = {}
        tasks: dict[str, dict] = {}
        for task in ordered:
            tid = task["id"]
            fetch = [i for dep in ordered if dep["id"] in closure[tid] for i in instances[dep["id"]]]
            deadline = now + deadline_seconds * (1 + depth[tid])
            if task["kind"] == "local_train":
                names = []
                for node in arrival:
                    instance = f"{tid}:{node[:16]}"
                    if instance in tasks:
                        raise InvalidTransaction(
                            f"round {schedule_id!r}: two submitting nodes share the key prefix {node[:16]!r}, "
                            f"so their task ids would collide; one of them must use another key"
                        )
                    submission = submissions[node] if isinstance(submissions[node], Mapping) else {}
                    tasks[instance] = {
                        "kind": "local_train", "task": tid, "node": None, "inputs": [submission.get("digest")],
                        "fetch_dependency_outputs": fetch, "deadline": deadline, "attempt": 1,
                        "data_owner": node, "samples": submission.get("samples"),
                    }
                    names.append(instance)
                instances[tid] = names
            else:
                tasks[tid] = {
                    "kind": task["kind"], "task": tid, "node": None, "inputs": [],
                    "fetch_dependency_outputs": fetch, "deadline": deadline, "attempt": 1,
                }
                instances[tid] = [tid]

        # choose nodes
        compute = await self._compute_nodes(context)
        needs_compute = [t for t, a in tasks.items() if not (a["kind"] == "local_train" and train_on == "iot")]
        if needs_compute and not compute:
            raise InvalidTransaction(
                f"no compute node is registered (trustmesh-peer index is empty), so the {len(needs_compute)} "
                f"task(s) of round {schedule_id!r} cannot be assigned; register a compute node first"
            )
        # Live nodes first: a node that stopped heartbeating would only make its tasks wait for a
        # deadline. With none live (nodes that do not heartbeat, or all down) every registered
        # node stays a candidate, and its tasks wait for it to come back.
        loads = await self._loads(context, list(compute) + [a["data_owner"] for a in tasks.values() if "data_owner" in a])
        live = await self._responsive(context, compute, loads, now)
        pool = {n: p for n, p in compute.items() if n in live} or compute
        trainings = [t for t, a in tasks.items() if a["kind"] == "local_train"] if train_on != "iot" else []
        spread = dict(zip(trainings, spread_trainings(schedule_id, pool, loads, len(trainings))))
        for task_id, assignment in tasks.items():
            if assignment["kind"] == "local_train" and train_on == "iot":
                node = assignment["data_owner"]
            elif task_id in spread:
                node = spread[task_id]
            else:
                node = rank_nodes(schedule_id, pool, loads)[0]
            assignment["node"] = node
            loads[node]["queue"] = int(loads[node].get("queue", 0)) + 1

        record = {
            "schedule_id": schedule_id, "workflow_id": workflow_id, "round": round_.get("round"),
            "train_on": train_on, "deadline_seconds": deadline_seconds, "order": list(tasks), "tasks": tasks,
        }
        writes: dict[str, Any] = {layout.assignments_address(schedule_id): record}
        dependents = task_dependents(tasks)
        for task_id, a in tasks.items():
            writes[layout.task_status_address(schedule_id, task_id)] = {
                "schedule_id": schedule_id, "task_id": task_id, "status": "assigned", "node": a["node"],
                "attempt": 1, "deadline": a["deadline"], "unsettled_inputs": len(a["fetch_dependency_outputs"]),
                "history": [{"status": "assigned", "node": a["node"], "attempt": 1, "at": now}],
                **report_view(a, dependents[task_id], workflow_id, round_.get("round")),
            }
        touched = {a["node"] for a in tasks.values()}
        for node in sorted(touched):
            writes[layout.node_load_address(node)] = loads[node]
        await write_records(context, writes)
        # All in flight at once instead of one round trip each: they are sent (and so recorded)
        # in this order all the same.
        await asyncio.gather(*(emit(context, events.TASK_ASSIGNED, schedule_id=schedule_id, task_id=task_id,
                                    node=a["node"], kind=a["kind"], attempt=1, workflow_id=workflow_id)
                               for task_id, a in tasks.items()))
        await emit(context, events.ROUND_SCHEDULED, schedule_id=schedule_id, workflow_id=workflow_id,
                   round=round_.get("round"), tasks=len(tasks), nodes=len(touched))

    # -- reassign --------------------------------------------------------------------------

    async def _reassign(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        task_id = _task_id(body)
        assignments = await self._assignments(context, schedule_id)
        task = self._task(assignments, schedule_id, task_id)
        deps = task["fetch_dependency_outputs"]
        statuses = await self._statuses(context, schedule_id, [task_id, *deps])
        current = statuses[task_id]
        now = await chain_time(context)
        if current["status"] == "done":
            raise InvalidTransaction(f"task {task_id!r} is done; a done task is never reassigned")
        if current["status"] == "dropped":
            raise InvalidTransaction(f"task {task_id!r} was dropped; its round went on without it")
        if current["status"] != "failed":
            waiting = [d for d in deps if statuses[d]["status"] not in SETTLED]
            if waiting:
                raise InvalidTransaction(
                    f"task {task_id!r} is waiting for its dependencies ({', '.join(waiting[:5])}"
                    f"{' ...' if len(waiting) > 5 else ''}); it cannot be late before they are done"
                )
            if now <= current["deadline"]:
                raise InvalidTransaction(
                    f"task {task_id!r} (attempt {current['attempt']}, node {current['node']}) is not overdue: "
                    f"its deadline is {current['deadline']}, chain time is {now}; reassign after the deadline"
                )

        missed = current["node"]
        loads = None
        if task["kind"] == "local_train" and assignments.get("train_on") == "iot":
            candidates = {task["data_owner"]: 1}  # the data never leaves its IoT node
        else:
            registered = await self._compute_nodes(context)
            if not registered:
                raise InvalidTransaction(
                    f"no compute node is registered (trustmesh-peer index is empty); task {task_id!r} cannot be reassigned"
                )
            loads = await self._loads(context, [*registered, missed])  # read once: liveness and ranking
            live = await self._responsive(context, registered, loads, now)
            candidates = {n: p for n, p in registered.items() if n in live and n != missed}
            if not candidates and current["status"] == "failed" and missed in live:
                # It said it failed and it is alive: with nobody else live, it tries again.
                candidates = {missed: registered[missed]}
            if not candidates:
                why = ("it failed there and" if current["status"] == "failed"
                       else "it missed its deadline there, so that node is not a candidate, and")
                raise InvalidTransaction(
                    f"no live compute node to take task {task_id!r}; it stays with {missed} (attempt "
                    f"{current['attempt']}): {why} no other of the {len(registered)} registered compute "
                    f"node(s) was seen on chain (heartbeat, register or update) within "
                    f"{peers.LIVENESS_SECONDS} s of chain time {now} without missing a deadline since; "
                    f"reassign it once one is live"
                )
        if loads is None:  # an IoT node's own local_train: its one candidate
            loads = await self._loads(context, [*candidates, missed])
        if current["status"] != "failed":  # a failure was already counted when it was reported
            loads[missed]["queue"] = max(0, int(loads[missed].get("queue", 0)) - 1)
            loads[missed]["missed"] = int(loads[missed].get("missed", 0)) + 1
            loads[missed]["last_missed"] = now  # out of the pool until it is seen again (`responsive`)
        node = rank_nodes(schedule_id, candidates, loads)[0]
        loads[node]["queue"] = int(loads[node].get("queue", 0)) + 1

        attempt = int(current["attempt"]) + 1
        deadline = now + int(assignments["deadline_seconds"])
        task.update(node=node, attempt=attempt, deadline=deadline)
        previous_status = current["status"]
        current.update(status="assigned", node=node, attempt=attempt, deadline=deadline)
        current.pop("reason", None)
        current.pop("metrics", None)
        current["history"].append({"status": "assigned", "node": node, "attempt": attempt, "at": now})
        writes: dict[str, Any] = {
            layout.assignments_address(schedule_id): assignments,
            layout.task_status_address(schedule_id, task_id): current,
        }
        for n in sorted({node, missed}):
            writes[layout.node_load_address(n)] = loads[n]
        await write_records(context, writes)
        await emit(context, events.TASK_REASSIGNED, schedule_id=schedule_id, task_id=task_id, node=node,
                   previous_node=missed, previous_status=previous_status, attempt=attempt, kind=task["kind"])
