"""trustmesh-schedule's rules for task reports (with the lineage check of a local_train done report)
and round results, and what makes a round final."""

from __future__ import annotations

import math
from typing import Any, Mapping

from trustmesh.fl.strategies.base import WEIGHT_TOLERANCE  # sum(weights) - 1 allowed: the strategies' own
from trustmesh.fl.screening import failed_update_check, weights_sum_fits  # which rejections count; the weights' sum
from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction

from .. import events, federation_records, layout
from ..common import (CLOCK_CONFIG_ADDRESS, HEX64, PUBLIC_KEY, chain_time, clock_address, emit, prefetch, read_record,
                      read_record_to_look_at, require, require_int, require_match, shown, write_records)
from .spec import MAX_REASON_CHARS, REPORT_STATUSES, SETTLED, _RANK
from ..staged_writes import StagedWrites
from .checks import (_contributions, _metrics, _number, _privacy, _rejected, _schedule_id, _task_id, by_position,
                     reports_in)
from .task_graph import _final_aggregates
from .lineage import LineageUnknown, lineage_problem, starting_model


class ReportRules:
    """A ScheduleHandler's report and round_result rules (the handler's shared reads come with it)."""

    # -- report ----------------------------------------------------------------------------

    async def _report(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        task_id = _task_id(body)
        status = require(body, "status", str)
        if status not in REPORT_STATUSES:
            raise InvalidTransaction(f"payload field 'status' must be one of {', '.join(REPORT_STATUSES)}; got {status[:40]!r}")
        digest = None
        if status == "done":
            digest = require_match(body, "output_digest", HEX64, "the sha256 (64 lowercase hex) of the task's output")
        elif "output_digest" in body:
            raise InvalidTransaction(f"output_digest belongs to a 'done' report only, not to {status!r}")
        metrics = _metrics(body, "metrics") if "metrics" in body else None
        reason = None
        if "reason" in body:
            if status != "failed":
                raise InvalidTransaction(f"reason belongs to a 'failed' report only, not to {status!r}")
            reason = require(body, "reason", str)
            if len(reason) > MAX_REASON_CHARS:
                raise InvalidTransaction(
                    f"payload field 'reason' is {len(reason)} characters; at most {MAX_REASON_CHARS} "
                    f"(longer logs belong off-chain)"
                )
        base = None
        if "base_model_digest" in body:
            if status != "done":
                raise InvalidTransaction(f"base_model_digest belongs to a local_train 'done' report only, not to {status!r}")
            base = require_match(body, "base_model_digest", HEX64,
                                 "the sha256 (64 lowercase hex) of the global model the task trained from")

        tasks = RoundTasks(self, context, schedule_id)
        # A report's reads in three round trips through the validator, not seven: what it names
        # (its status, its node's load, the clock's config), then what those name (see below).
        status_address = layout.task_status_address(schedule_id, task_id)
        await prefetch(context, [status_address, layout.node_load_address(signer), CLOCK_CONFIG_ADDRESS])
        current = await read_record(context, status_address)
        if current is not None and status == "done":  # its dependents, its lineage's index, the clock
            ahead = [layout.task_status_address(schedule_id, d) for d in current.get("dependents") or ()]
            if current.get("kind") == "local_train" and int(current.get("round", 1)) > 1:
                ahead.append(layout.workflow_rounds_address(str(current.get("workflow_id"))))
            await prefetch(context, ahead + await clock_address(context))
        if current is not None and "kind" in current and "unsettled_inputs" in current:
            task = {"kind": current["kind"]}  # what its status says (task_graph.report_view) is all a report needs
        else:  # an unknown task (the assignments say so), or a status from before report_view
            task = await tasks.entry(task_id)
            current = (await self._statuses(context, schedule_id, [task_id]))[task_id]
        if signer != current["node"]:
            raise InvalidTransaction(
                f"task {task_id!r} is assigned to node {current['node']} (attempt {current['attempt']}); "
                f"only that node may report it, not {signer}"
            )
        if base is not None and task["kind"] != "local_train":
            raise InvalidTransaction(
                f"base_model_digest belongs to a local_train 'done' report only; task {task_id!r} is of kind {task['kind']!r}"
            )
        if "attempt" in body:
            attempt = require_int(body, "attempt", 1, 1 << 31)
            if attempt != current["attempt"]:
                raise InvalidTransaction(
                    f"task {task_id!r} is in attempt {current['attempt']}; this report is for attempt {attempt}"
                )
        previous = current["status"]
        if previous == "dropped":
            raise InvalidTransaction(f"task {task_id!r} was dropped past its deadline; its round went on without it")
        if previous == "done":
            raise InvalidTransaction(f"task {task_id!r} is already done; a task is reported done once")
        if previous == "failed":
            raise InvalidTransaction(
                f"task {task_id!r} failed in attempt {current['attempt']}; it must be reassigned before it is reported again"
            )
        if _RANK[status] <= _RANK[previous]:
            raise InvalidTransaction(f"task {task_id!r} is already {previous!r}; statuses only move forward")

        if status == "done":
            if await self._unsettled_inputs(context, schedule_id, task, current, {}):
                waiting = await self._waiting_for(context, schedule_id, await tasks.entry(task_id))
                shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
                raise InvalidTransaction(f"task {task_id!r} cannot be done before its dependencies: {shown} not done yet")
            if task["kind"] == "local_train":
                await self._check_lineage(context, current if "round" in current else await tasks.record(), task_id,
                                          base)

        now = await chain_time(context)
        entry = {"status": status, "node": signer, "attempt": current["attempt"], "at": now}
        current["status"] = status
        if digest is not None:
            current["output_digest"] = entry["output_digest"] = digest
        if base is not None:
            current["base_model_digest"] = base
        if metrics is not None:
            current["metrics"] = metrics
        if reason is not None:
            current["reason"] = entry["reason"] = reason
        current["history"].append(entry)
        writes: dict[str, Any] = {layout.task_status_address(schedule_id, task_id): current}

        if status in ("done", "failed"):
            load = (await self._loads(context, [signer]))[signer]
            load["queue"] = max(0, int(load.get("queue", 0)) - 1)
            counter = "done" if status == "done" else "missed"
            load[counter] = int(load.get(counter, 0)) + 1
            writes[layout.node_load_address(signer)] = load

        if status == "done":
            await self._start_dependents(context, tasks, schedule_id, task_id, current, now, writes)
            finalized = None
            if task["kind"] == "evaluate":
                result = await read_record(context, layout.round_result_address(schedule_id))
                if result is not None and not result.get("final"):
                    assignments = await tasks.record()
                    statuses = await self._statuses(context, schedule_id, _evaluates(assignments))
                    finalized = self._finalize(result, assignments, {**statuses, task_id: current}, now)
                    if finalized is not None:
                        writes[layout.round_result_address(schedule_id)] = finalized

        await write_records(context, writes)
        event = {"schedule_id": schedule_id, "task_id": task_id, "node": signer,
                 "attempt": current["attempt"], "kind": task["kind"]}
        if digest is not None:
            event["output_digest"] = digest
        if status == "done" and metrics is not None:  # so a follower has the done status without reading it
            event["metrics"] = events.json_attribute(metrics)
        await emit(context, events.TASK_STATUS_EVENTS[status], **event)
        if status == "done" and finalized is not None:
            await self._emit_finalized(context, finalized)

    # -- report_many -------------------------------------------------------------------------

    async def _report_many(self, body: dict, signer: str, context) -> None:
        """Each report applied in order as a report transaction of its own would be, each seeing
        what the earlier ones wrote, and all written together: the trainings of one round that a
        node made together pass the validator as one transaction, not one each."""
        reports = reports_in(body)
        schedule_id = reports[0]["schedule_id"]
        # every status the reports read first, in one round trip (each report's own prefetch then finds them)
        await prefetch(context, [layout.task_status_address(schedule_id, r["task_id"]) for r in reports]
                       + [layout.node_load_address(signer), CLOCK_CONFIG_ADDRESS])
        staged = StagedWrites(context)
        for position, report in enumerate(reports):
            try:
                await self._report(report, signer, staged)
            except InvalidTransaction as exc:
                raise InvalidTransaction(f"report {position + 1} of {len(reports)} (task {report['task_id']!r}): "
                                         f"{exc.message}", exc.extended_data) from None
        await staged.commit()

    async def _unsettled_inputs(self, context, schedule_id: str, task: Mapping, status: Mapping,
                                known: Mapping[str, Mapping]) -> int:
        """How many of a task's inputs are not settled yet: its status record counts them down
        (so a report reads its own dependents, never every task of the round); a record written
        before that count existed is counted from its inputs' statuses (`known` first)."""
        if "unsettled_inputs" in status:
            return int(status["unsettled_inputs"])
        deps = task["fetch_dependency_outputs"]
        found = {**await self._statuses(context, schedule_id, [d for d in deps if d not in known]), **known}
        return sum(found[d]["status"] not in SETTLED for d in deps)

    async def _waiting_for(self, context, schedule_id: str, task: Mapping) -> list[str]:
        """The task's inputs not settled yet, by name (to say which, when refusing)."""
        statuses = await self._statuses(context, schedule_id, task["fetch_dependency_outputs"])
        return [d for d in task["fetch_dependency_outputs"] if statuses[d]["status"] not in SETTLED]

    async def _start_dependents(self, context, tasks: "RoundTasks", schedule_id: str, task_id: str, current: dict,
                                now: int, writes: dict) -> None:
        """Task `task_id` settled (done, or dropped; `current` its new status): each task that
        takes its output has one unsettled input fewer, and one whose inputs are now all settled
        gets its deadline from now (their writes added to `writes`; the assignments record, which
        keeps every task's deadline for the coordinator, is read and written only then)."""
        dependents = current.get("dependents")
        if dependents is None:  # many of them (a preprocess), or a status from before report_view
            dependents = [t for t, other in (await tasks.record())["tasks"].items()
                          if task_id in other["fetch_dependency_outputs"]]
        statuses = await self._statuses(context, schedule_id, dependents)
        changed = False
        for other_id in dependents:
            other_status = statuses[other_id]
            other = None if "unsettled_inputs" in other_status else await tasks.entry(other_id)
            left = await self._unsettled_inputs(context, schedule_id, other, other_status, {task_id: current})
            if "unsettled_inputs" in other_status:
                left = other_status["unsettled_inputs"] = left - 1
                writes[layout.task_status_address(schedule_id, other_id)] = other_status
            if left == 0 and other_status["status"] in ("assigned", "running"):
                assignments = await tasks.record()
                deadline = now + int(assignments["deadline_seconds"])
                assignments["tasks"][other_id]["deadline"] = deadline
                other_status["deadline"] = deadline
                writes[layout.task_status_address(schedule_id, other_id)] = other_status
                changed = True
        if changed:
            writes[layout.assignments_address(schedule_id)] = await tasks.record()

    @staticmethod
    async def _check_lineage(context, assignments: Mapping, task_id: str, base: str | None) -> None:
        """The lineage rule (`starting_model`) for a local_train reported done from `base`. It
        reads the workflow's rounds index and the earlier rounds' results and records, which the
        report declares as inputs (StartingModel.inputs)."""
        async def read(address: str) -> Mapping | None:
            try:
                return await read_record_to_look_at(context, address)
            except AuthorizationError:
                raise InvalidTransaction(
                    f"the lineage rule of task {task_id!r} reads {address} (the workflow's rounds index, or an "
                    f"earlier round's result or record), which this report does not declare as an input; build "
                    f"it with make_report_transaction(..., starting_model=reader.starting_model(...))"
                ) from None

        round_number = int(assignments["round"])
        try:
            start = await starting_model(read, str(assignments["workflow_id"]), round_number)
        except LineageUnknown as exc:
            raise InvalidTransaction(
                f"task {task_id!r} of round {round_number} cannot be done before the model it starts from is "
                f"decided: {exc} (and did not time out)"
            ) from None
        problem = lineage_problem(task_id, base, start)
        if problem is not None:
            raise InvalidTransaction(
                f"round {round_number} {problem}; a local_train trains from the latest earlier round's global "
                f"model and names it in base_model_digest (absent for the initial weights)"
            )

    @staticmethod
    def _finalize(result: dict, assignments: Mapping, statuses: Mapping[str, Mapping], now: int) -> dict | None:
        """The result made final, or None while some evaluate instance is not done (statuses:
        at least the evaluate instances')."""
        evaluates = _evaluates(assignments)
        if any(statuses[t]["status"] != "done" for t in evaluates):
            return None
        result = dict(result)
        result["final"] = True
        result["finalized_at"] = now
        result["evaluations"] = {
            t: {"output_digest": statuses[t].get("output_digest"), "metrics": statuses[t].get("metrics", {})}
            for t in evaluates
        }
        return result

    @staticmethod
    async def _emit_finalized(context, result: Mapping) -> None:
        await emit(context, events.ROUND_FINALIZED, schedule_id=result["schedule_id"],
                   workflow_id=result["workflow_id"], round=result["round"],
                   global_model_digest=result["global_model_digest"])

    # -- round_result ----------------------------------------------------------------------

    async def _round_result(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        round_ = await federation_records.read_round(context, schedule_id) or {}
        body = by_position(body, round_.get("submitted_nodes") or [])
        digest = require_match(body, "global_model_digest", HEX64, "the sha256 (64 lowercase hex) of the global model")
        participants = require(body, "participants", list)
        if not participants:
            raise InvalidTransaction("payload field 'participants' is empty; name the nodes whose updates were aggregated")
        for node in participants:
            if not isinstance(node, str) or not PUBLIC_KEY.match(node):
                raise InvalidTransaction(f"payload field 'participants': {shown(node)} is not a node public key")
        if len(set(participants)) != len(participants):
            raise InvalidTransaction("payload field 'participants' names a node twice")
        weights = require(body, "aggregation_weights", dict)
        if set(weights) != set(participants):
            missing = sorted(set(participants) - set(weights))
            extra = sorted(shown(k) for k in set(weights) - set(participants))
            raise InvalidTransaction(
                "aggregation_weights must cover exactly the participants"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; not participants: {', '.join(extra)}" if extra else "")
            )
        for node in participants:
            w = weights[node]
            if not _number(w) or w < 0:
                raise InvalidTransaction(f"aggregation weight of {node} must be a finite number >= 0, got {shown(w)}")
        rejected = _rejected(body, weights)
        total = math.fsum(weights[n] for n in sorted(participants))
        if not weights_sum_fits(total, participants, rejected):  # 0 only when the checks rejected every update
            raise InvalidTransaction(f"aggregation_weights sum to {total!r}; they must sum to 1 (within {WEIGHT_TOLERANCE})")
        metrics = _metrics(body, "metrics", required=("accuracy", "loss"))
        private = {"privacy": _privacy(body)} if "privacy" in body else {}
        if "contributions" in body:
            private["contributions"] = _contributions(body, weights)
        server_state = {}
        if "server_state_digest" in body:
            server_state["server_state_digest"] = require_match(
                body, "server_state_digest", HEX64, "the sha256 (64 lowercase hex) of the server optimizer's state")

        assignments = await self._assignments(context, schedule_id)
        tasks = assignments["tasks"]
        if "task_id" in body:
            aggregate_id = _task_id(body)
            self._task(assignments, schedule_id, aggregate_id)
            if tasks[aggregate_id]["kind"] != "aggregate":
                raise InvalidTransaction(f"task {aggregate_id!r} is a {tasks[aggregate_id]['kind']} task, not an aggregate task")
        else:
            finals = _final_aggregates(assignments)
            if not finals:
                raise InvalidTransaction(f"schedule {schedule_id!r} has no aggregate task, so it has no round result")
            if len(finals) > 1:
                raise InvalidTransaction(
                    f"schedule {schedule_id!r} has several final aggregate tasks ({', '.join(finals)}); "
                    f"name the one that produced the global model in task_id"
                )
            aggregate_id = finals[0]
        if await read_record(context, layout.round_result_address(schedule_id)) is not None:
            raise InvalidTransaction(f"the result of round {schedule_id!r} is already recorded; it is recorded once")
        statuses = await self._statuses(context, schedule_id, [aggregate_id, *_evaluates(assignments)])
        aggregate = statuses[aggregate_id]
        if signer != aggregate["node"]:
            raise InvalidTransaction(
                f"only node {aggregate['node']}, assigned the aggregate task {aggregate_id!r} "
                f"(attempt {aggregate['attempt']}), may record the round result, not {signer}"
            )
        if aggregate["status"] != "done":
            raise InvalidTransaction(
                f"aggregate task {aggregate_id!r} is {aggregate['status']!r}; report it done with the "
                f"global model's digest before recording the round result"
            )
        if aggregate.get("output_digest") != digest:
            raise InvalidTransaction(
                f"global_model_digest {digest} differs from the output_digest {aggregate.get('output_digest')} "
                f"that aggregate task {aggregate_id!r} reported done"
            )
        submitted = set(round_.get("submissions") or {})
        outsiders = [n for n in participants if n not in submitted]
        if outsiders:
            raise InvalidTransaction(
                f"participants {', '.join(outsiders)} did not submit to round {schedule_id!r}; "
                f"participants must be a subset of the round's submitted nodes"
            )

        now = await chain_time(context)
        result = {
            "schedule_id": schedule_id, "workflow_id": assignments["workflow_id"], "round": assignments["round"],
            "aggregate_task": aggregate_id, "global_model_digest": digest, "participants": list(participants),
            "aggregation_weights": dict(weights), "metrics": metrics, "reported_by": signer,
            "recorded_at": now, "final": False, **({"rejected": rejected} if rejected else {}), **server_state,
            **private,
        }
        final = self._finalize(result, assignments, statuses, now)
        writes = {layout.round_result_address(schedule_id): final or result}
        refused = sorted(n for n, why in rejected.items() if failed_update_check(why))  # not a Krum's choice
        for node, load in (await self._loads(context, refused)).items():  # their reputation
            writes[layout.node_load_address(node)] = {**load, "rejected": load.get("rejected", 0) + 1}
        await write_records(context, writes)
        await emit(context, events.ROUND_RESULT, schedule_id=schedule_id, workflow_id=result["workflow_id"],
                   round=result["round"], global_model_digest=digest, participants=len(participants))
        if final is not None:
            await self._emit_finalized(context, final)


class RoundTasks:
    """A round's assignments record for one report: read at most once, and only when the task's
    status does not say what the report needs (task_graph.report_view)."""

    def __init__(self, rules, context, schedule_id: str, record: dict | None = None):
        """record: the assignments, when the caller has read them already."""
        self._rules, self._context, self._schedule_id = rules, context, schedule_id
        self._record = record

    async def record(self) -> dict:
        if self._record is None:
            self._record = await self._rules._assignments(self._context, self._schedule_id)
        return self._record

    async def entry(self, task_id: str) -> dict:
        """The task's entry in the assignments (InvalidTransaction naming the round's tasks if none)."""
        return self._rules._task(await self.record(), self._schedule_id, task_id)


def _evaluates(assignments: Mapping) -> list[str]:
    return [t for t, a in assignments["tasks"].items() if a["kind"] == "evaluate"]
