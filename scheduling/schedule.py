"""`trustmesh-schedule` 1.0: task assignment, task status, node load and round results.

One family, so that a task's completion and its node's queue length change in one transaction.

Actions (canonical-CBOR map {"action": ..., ...}; unknown fields are refused):

  assign        {schedule_id, deadline_seconds?}
      The round (trustmesh-federation) must be "ready" and not yet assigned; anyone may send it.
      Expands the workflow's task DAG into task instances: one per submitted node for each
      local_train task (task_id "<task>:<node key[:16]>", input = that submission's digest), one
      for each aggregate / evaluate / preprocess task. An instance's fetch_dependency_outputs
      lists every instance of every task it depends on *transitively*. local_train instances go
      to the submitting IoT node itself when federation.train_on == "iot"; everything else goes
      to registered compute nodes (trustmesh-peer index) by `rank_nodes` (below), among the
      *responsive* ones (`responsive`: seen on chain within peers.LIVENESS_SECONDS of chain time,
      and no deadline missed since) when any is, else among all registered ones (their tasks
      wait for them to return).
  report        {schedule_id, task_id, status: running|done|failed, output_digest?, metrics?,
                 attempt?, reason?, base_model_digest?}
      Only the task's current node; statuses only move forward (assigned -> running ->
      done|failed, assigned -> done|failed); done needs output_digest and every
      fetch_dependency_output done. done: node queue -1, done +1. failed: queue -1, missed +1.
      Lineage: a local_train done report names in base_model_digest the global model it trained
      from, and that must be the one `starting_model` (below) decides for its round: the model
      of the latest earlier round that has a round result, every round in between having timed
      out. base_model_digest is absent when training started from the initial weights (no
      earlier round has a model); it belongs to local_train done reports only.
  reassign      {schedule_id, task_id}
      Anyone, once chain time is past the task's deadline and the task is not done (and, for a
      task that is not failed, once its dependencies are done: a task waiting for inputs cannot
      be late), or at any time after it failed. The next node by `rank_nodes` among the
      *responsive* registered compute nodes other than the node that missed (which gets missed
      +1, queue -1, last_missed = chain time): a node not seen on chain (heartbeat, register,
      update) within peers.LIVENESS_SECONDS of chain time, or seen last before a deadline it
      missed, is never chosen, nor is the node that missed. A *failed* task goes back to its
      own node only when that node is responsive and no other node is. With no responsive
      candidate the transaction is refused ("no live compute node to take task ...; it
      stays with ..."): the task keeps its node and attempt, and the coordinator tries again
      later. local_train on an IoT node's own data (train_on "iot") cannot move: the same IoT
      node gets a new attempt, as it is no compute node and sends no heartbeats.
  round_result  {schedule_id, global_model_digest, participants, aggregation_weights, metrics,
                 task_id?, rejected?, server_state_digest?}
      From the node of the (final) aggregate task, after that task reported done with the same
      digest. rejected: {participant: reason} for updates the update checks refused
      (fl/screening.py); each has weight 0 and one more `rejected` in its node load record
      (reputation: a participant whose updates keep being refused shows it). server_state_digest: the sha256 of the state a
      server optimizer (fl/strategies/fedopt.py) leaves for the next round. Both are stored in
      the result only when present. privacy: what a DP round spent and used (PRIVACY_FIELDS;
      epsilon required). The round is final once the result exists and every evaluate instance
      is done, whichever comes last.
  reveal_noise  {schedule_id, noise_seed}
      From the round's coordinator, once every local_train of the round is done: the seed whose
      sha256 it committed to when opening the round (federation noise_commitment), so the
      aggregator's DP noise was fixed before any update existed. Stored at
      noise_seed_address(sid) {schedule_id, noise_seed, revealed_at}; event trustmesh/noise-revealed.

Deadlines (chain time, BlockInfo): a task without dependencies gets chain_time +
deadline_seconds; a task with dependencies first gets chain_time + deadline_seconds * (1 + its
depth) as an estimate, and chain_time + deadline_seconds again when its last dependency is done.

Scoring (integers and exact fractions only, so every validator ranks alike):

    points      = clamp(cpu_cores, 1, 256) + clamp(memory_mb // 1024, 0, 1024)
    reliability = (done + 1) / (done + missed + 1)
    score       = points * reliability / (queue + 1)

Only nodes whose queue is at most the smallest queue among the candidates + MAX_QUEUE_SKEW are
eligible (so an idle node is never passed over for long), highest score first, ties broken by
sha256(schedule_id + node key) ascending. Assign updates the simulated queues after every
instance, so one transaction spreads its instances.

Records (canonical CBOR):
  assignments_address(sid)  {schedule_id, workflow_id, round, train_on, deadline_seconds,
                              order: [task_id, ...] (topological; canonical CBOR sorts map keys),
                              tasks: {task_id: {kind, task, node, inputs, fetch_dependency_outputs,
                                                deadline, attempt[, data_owner, samples]}}}
  task_status_address(sid, task_id)
                            {schedule_id, task_id, status, node, attempt, deadline, history:
                              [{status, node, attempt, at[, output_digest | reason]}]
                              [, output_digest, base_model_digest, metrics, reason]}
  node_load_address(key)    {node, queue, done, missed[, last_missed][, rejected]}  (last_missed:
                            chain time of its latest missed deadline; rejected: how many of its
                            updates round results left out as rejected)
  round_result_address(sid) {schedule_id, workflow_id, round, aggregate_task, global_model_digest,
                              participants, aggregation_weights, metrics, reported_by,
                              recorded_at, final[, rejected][, server_state_digest][, finalized_at, evaluations:
                              {task_id: {output_digest, metrics}}]}

Events: trustmesh/task-assigned, trustmesh/round-scheduled, trustmesh/task-running,
trustmesh/task-done, trustmesh/task-failed, trustmesh/task-reassigned, trustmesh/round-result,
trustmesh/round-finalized.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Awaitable, Callable, Iterable, Mapping

from trustmesh.fl import screening
from trustmesh.fl.strategies.base import WEIGHT_TOLERANCE  # sum(weights) - 1 allowed: the strategies' own
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_transaction
from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction, TransactionHandler

from . import events, layout, peers, secagg_rules
from .common import (
    check_fields,
    HEX64,
    PUBLIC_KEY,
    chain_time,
    emit,
    parse_payload,
    read_record,
    read_records,
    require,
    require_int,
    require_match,
    shown,
    signer_of,
    write_records,
)

FAMILY_NAME = layout.SCHEDULE_FAMILY
FAMILY_VERSION = layout.VERSION
NAMESPACE = layout.SCHEDULE_NS

ACTIONS = ("assign", "report", "reassign", "round_result", "reveal_noise", "secagg_keys", "secagg_shares",
           "secagg_unmask")
TASK_KINDS = ("local_train", "aggregate", "evaluate", "preprocess")
REPORT_STATUSES = ("running", "done", "failed")
DEFAULT_DEADLINE_SECONDS = 300
MAX_DEADLINE_SECONDS = 7 * 24 * 3600
MAX_QUEUE_SKEW = 2
MAX_METRICS = 32
MAX_REASON_CHARS = 500
MAX_REJECT_REASON_CHARS = screening.MAX_REASON_CHARS  # per rejected update in a round result
# a round result's optional `privacy` record (fl/dp_round.py writes it; the audit recomputes it)
PRIVACY_FIELDS = ("epsilon", "delta", "noise_multiplier", "clipping_norm", "noise_std", "clipped",
                  "next_clipping_norm")

# prefixes that cover every record of one kind (inputs/outputs of transactions whose exact
# addresses depend on state the client has not read)
TASK_STATUS_PREFIX = NAMESPACE + layout.TASK_STATUS
NODE_LOAD_PREFIX = NAMESPACE + layout.NODE_LOAD

TASK_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,199}\Z")
METRIC_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.:/-]{0,63}\Z")

_FIELDS = {
    "assign": ({"schedule_id"}, {"deadline_seconds"}),
    "report": ({"schedule_id", "task_id", "status"},
               {"output_digest", "metrics", "attempt", "reason", "base_model_digest"}),
    "reassign": ({"schedule_id", "task_id"}, set()),
    "round_result": (
        {"schedule_id", "global_model_digest", "participants", "aggregation_weights", "metrics"},
        {"task_id", "rejected", "server_state_digest", "privacy"},
    ),
    "reveal_noise": ({"schedule_id", "noise_seed"}, set()),
    "secagg_keys": ({"schedule_id", "c_pk", "s_pk"}, set()),
    "secagg_shares": ({"schedule_id", "self_commitment", "sealed", "digests"}, set()),
    "secagg_unmask": ({"schedule_id", "shares"}, set()),
}
_RANK = {"assigned": 0, "running": 1, "done": 2, "failed": 2}


# --------------------------------------------------------------------------- scoring


def _clamp_int(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return low
    return max(low, min(high, int(value)))


def resource_points(peer: Mapping | None) -> int:
    """cpu cores (1..256) + whole GiB of memory (0..1024), from a trustmesh-peer record."""
    resources = peer.get("resources") if isinstance(peer, Mapping) else None
    if not isinstance(resources, Mapping):
        resources = {}
    cores = _clamp_int(resources.get("cpu_cores"), 1, 256)
    memory_gib = _clamp_int(resources.get("memory_mb"), 0, 1 << 30) // 1024
    return cores + min(memory_gib, 1024)


def empty_load(node: str) -> dict:
    return {"node": node, "queue": 0, "done": 0, "missed": 0}


def responsive(last_seen: int | None, load: Mapping, now: int) -> bool:
    """A node may be given work at chain time `now`: it is live (peers.is_live: seen on chain
    within LIVENESS_SECONDS) and has not missed a deadline since it was last seen. A node that
    died just after a heartbeat still looks live for a while; the deadline it misses then takes
    it out of the pool until it shows itself again (heartbeat, register or update), so a late
    task never bounces back to it."""
    if not peers.is_live(last_seen, now):
        return False
    missed_at = load.get("last_missed")
    return not (isinstance(missed_at, int) and missed_at >= last_seen)


def node_score(points: int, load: Mapping) -> Fraction:
    """points * (done + 1) / ((done + missed + 1) * (queue + 1)), exactly."""
    done, missed, queue = (max(0, int(load.get(k, 0))) for k in ("done", "missed", "queue"))
    return Fraction(points * (done + 1), (done + missed + 1) * (queue + 1))


def tie_break(schedule_id: str, node: str) -> str:
    return hashlib.sha256((schedule_id + node).encode()).hexdigest()


def rank_nodes(schedule_id: str, candidates: Mapping[str, int], loads: Mapping[str, Mapping]) -> list[str]:
    """Eligible candidates (queue within MAX_QUEUE_SKEW of the least loaded), best first.

    candidates: node key -> resource points; loads: node key -> node load record.
    """
    if not candidates:
        return []
    queue = {n: max(0, int(loads.get(n, {}).get("queue", 0))) for n in candidates}
    limit = min(queue.values()) + MAX_QUEUE_SKEW
    eligible = [n for n in candidates if queue[n] <= limit]
    return sorted(eligible, key=lambda n: (-node_score(candidates[n], loads.get(n, empty_load(n))),
                                           tie_break(schedule_id, n)))


# --------------------------------------------------------------------------- payload checks


def _check_fields(action: str, body: Mapping) -> None:
    required, optional = _FIELDS[action]
    check_fields(body, required | optional | {"action"}, where=f"payload of action {action!r}")


def _number(value: Any) -> bool:
    """A finite metric: floats that are not NaN/inf, and integers a float can hold."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return abs(value) <= 2**53
    return isinstance(value, float) and math.isfinite(value)


def _metrics(body: Mapping, name: str, *, required: Iterable[str] = ()) -> dict:
    metrics = require(body, name, dict)
    if len(metrics) > MAX_METRICS:
        raise InvalidTransaction(f"payload field {name!r} holds {len(metrics)} entries; at most {MAX_METRICS}")
    for key, value in metrics.items():
        if not isinstance(key, str) or not METRIC_NAME.match(key):
            raise InvalidTransaction(
                f"payload field {name!r}: metric names are 1-64 characters of letters, digits, "
                f"'_', '.', ':', '/', '-'; got {str(key)[:80]!r}"
            )
        if not _number(value):
            raise InvalidTransaction(f"payload field {name!r}: metric {key!r} must be a finite number, got {shown(value)}")
    missing = [k for k in required if k not in metrics]
    if missing:
        raise InvalidTransaction(f"payload field {name!r} lacks the metric(s) {', '.join(missing)}")
    return metrics


def _schedule_id(body: Mapping) -> str:
    return require_match(body, "schedule_id", HEX64, "a schedule_id (64 lowercase hex, layout.schedule_id_for)")


def _task_id(body: Mapping) -> str:
    return require_match(body, "task_id", TASK_ID, "a task instance id from the round's assignments")


# --------------------------------------------------------------------------- DAG expansion


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


# --------------------------------------------------------------------------- lineage


class LineageUnknown(LookupError):
    """An earlier round has neither a global model on chain nor timed out: the model a round's
    training starts from is not decided yet (rounds overlap: round r is assigned while r-1 trains)."""


@dataclass(frozen=True)
class StartingModel:
    """The global model round `round` of a workflow trains from, as `starting_model` decides it.

    digest        the previous global model's sha256; None for the initial weights
    source_round  the round that produced it (None with the initial weights)
    inputs        every state address the rule read to decide it, in order: a local_train done
                  report declares them (make_report_transaction), so the processor can read them
    server_state_digest  the server optimizer's state that round left with it (its round
                  result's server_state_digest), where the next step starts; None: fresh state
    next_clipping_norm  what adaptive DP clipping chose in that round (its result's privacy
                  record), the norm this round clips at; None: the workflow's own
    """

    workflow_id: str
    round: int
    digest: str | None
    source_round: int | None = None
    inputs: tuple[str, ...] = ()
    server_state_digest: str | None = None
    next_clipping_norm: float | None = None

    @classmethod
    def of_previous_round(cls, workflow_id: str, round_number: int, schedule_id: str, digest: str,
                          server_state_digest: str | None = None,
                          next_clipping_norm: float | None = None) -> "StartingModel":
        """Round `round_number - 1` (schedule_id) has the global model `digest`: what the rule
        reads to find it. A node that reported that model itself knows it before it commits."""
        return cls(workflow_id, round_number, digest, round_number - 1,
                   (layout.workflow_rounds_address(workflow_id), layout.round_result_address(schedule_id)),
                   server_state_digest, next_clipping_norm)


async def starting_model(read: Callable[[str], Awaitable[Mapping | None]], workflow_id: str,
                         round_number: int) -> StartingModel:
    """The lineage rule, one text for the processor, the nodes and the audit: round r trains from
    the global model of the latest earlier round that has a round result (its model is fixed then;
    evaluation only makes it final), provided every round in between timed out (it produced no
    model); when no earlier round has one, from the initial weights. LineageUnknown while an
    earlier round has neither.

    The initial weights are build_model(definition.model, seed=hyperparameters.seed) (training.py):
    decided by the definition alone, yet no digest of them exists on chain, and computing one in a
    processor would need torch there (and the same float bits from every validator's build). So
    they are named by their absence: digest None, the report carries no base_model_digest.

    read(address) -> the record stored there, or None: a processor reads through its context,
    clients through the REST API, tests from a dict. Round 1 reads nothing."""
    inputs: list[str] = []

    async def get(address: str) -> Mapping | None:
        inputs.append(address)
        return await read(address)

    if round_number > 1:
        index = (await get(layout.workflow_rounds_address(workflow_id)) or {}).get("rounds") or {}
        for number in range(round_number - 1, 0, -1):
            sid = index.get(str(number))
            result = await get(layout.round_result_address(sid)) if isinstance(sid, str) else None
            if result is not None and result.get("global_model_digest"):
                return StartingModel(workflow_id, round_number, result["global_model_digest"], number, tuple(inputs),
                                     result.get("server_state_digest"),
                                     (result.get("privacy") or {}).get("next_clipping_norm"))
            record = await get(layout.round_address(sid)) if isinstance(sid, str) else None
            if record is None or record.get("status") != "timeout":
                raise LineageUnknown(f"round {number} of {workflow_id!r} has no global model on chain yet")
    return StartingModel(workflow_id, round_number, None, None, tuple(inputs))


def _short(digest: str) -> str:
    return f"{digest[:16]}…"


def lineage_problem(task_id: str, base: str | None, start: StartingModel) -> str | None:
    """Why a local_train that trained from `base` (None: the initial weights) breaks the lineage
    rule, or None when `base` is the model `start` names."""
    if base == start.digest:
        return None
    trained = f"model {_short(base)}" if base is not None else "the initial weights"
    if start.digest is None:
        expected = f"round {start.round} starts from the initial weights (no earlier round has a global model)"
    else:
        expected = f"round {start.source_round}'s global model is {_short(start.digest)}"
        skipped = list(range(start.source_round + 1, start.round))
        if skipped:
            expected += (f" (round {skipped[0]} timed out)" if len(skipped) == 1
                         else f" (rounds {skipped[0]}-{skipped[-1]} timed out)")
    return f"task {task_id} trained from {trained} but {expected}"


# --------------------------------------------------------------------------- handler


class ScheduleHandler(TransactionHandler):
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
        round_ = await read_record(context, layout.round_address(schedule_id))
        if round_ is None:
            raise InvalidTransaction(
                f"no round with schedule id {schedule_id!r} on chain; the coordinator opens it (trustmesh-federation)"
            )
        status = round_.get("status")
        if status != "ready":
            submitted = len(round_.get("submissions") or {})
            hint = {
                "collecting": f"it is still collecting submissions ({submitted} of "
                              f"{round_.get('expected_nodes')}); assign once it is ready",
                "timeout": "it timed out below min_nodes_required; it has nothing to train on",
            }.get(status, "only a ready round can be assigned")
            raise InvalidTransaction(f"round {schedule_id!r} is {status!r}, not 'ready': {hint}")
        workflow_id = round_.get("workflow_id")
        workflow = await read_record(context, layout.workflow_address(str(workflow_id)))
        if workflow is None:
            raise InvalidTransaction(f"round {schedule_id!r} names workflow {workflow_id!r}, which is not on chain")
        definition = workflow.get("definition") or {}
        ordered = _workflow_tasks(workflow_id, definition)
        federation = definition.get("federation") if isinstance(definition, Mapping) else None
        train_on = (federation or {}).get("train_on", "compute") if isinstance(federation, Mapping) else "compute"
        if train_on not in ("compute", "iot"):
            raise InvalidTransaction(f"workflow {workflow_id!r}: federation.train_on must be 'compute' or 'iot', got {train_on!r}")

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
        for task_id, assignment in tasks.items():
            if assignment["kind"] == "local_train" and train_on == "iot":
                node = assignment["data_owner"]
            else:
                node = rank_nodes(schedule_id, pool, loads)[0]
            assignment["node"] = node
            loads[node]["queue"] = int(loads[node].get("queue", 0)) + 1

        record = {
            "schedule_id": schedule_id, "workflow_id": workflow_id, "round": round_.get("round"),
            "train_on": train_on, "deadline_seconds": deadline_seconds, "order": list(tasks), "tasks": tasks,
        }
        writes: dict[str, Any] = {layout.assignments_address(schedule_id): record}
        for task_id, a in tasks.items():
            writes[layout.task_status_address(schedule_id, task_id)] = {
                "schedule_id": schedule_id, "task_id": task_id, "status": "assigned", "node": a["node"],
                "attempt": 1, "deadline": a["deadline"],
                "history": [{"status": "assigned", "node": a["node"], "attempt": 1, "at": now}],
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

        assignments = await self._assignments(context, schedule_id)
        task = self._task(assignments, schedule_id, task_id)
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
        if previous == "done":
            raise InvalidTransaction(f"task {task_id!r} is already done; a task is reported done once")
        if previous == "failed":
            raise InvalidTransaction(
                f"task {task_id!r} failed in attempt {current['attempt']}; it must be reassigned before it is reported again"
            )
        if _RANK[status] <= _RANK[previous]:
            raise InvalidTransaction(f"task {task_id!r} is already {previous!r}; statuses only move forward")

        statuses = None
        if status == "done":
            statuses = await self._statuses(context, schedule_id, assignments["tasks"])
            waiting = [d for d in task["fetch_dependency_outputs"] if statuses[d]["status"] != "done"]
            if waiting:
                shown = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
                raise InvalidTransaction(f"task {task_id!r} cannot be done before its dependencies: {shown} not done yet")
            if task["kind"] == "local_train":
                await self._check_lineage(context, assignments, task_id, base)

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
            statuses[task_id] = current
            # tasks whose inputs are now complete: their deadline starts now
            changed = False
            for other_id, other in assignments["tasks"].items():
                if task_id not in other["fetch_dependency_outputs"]:
                    continue
                if statuses[other_id]["status"] not in ("assigned", "running"):
                    continue
                if all(statuses[d]["status"] == "done" for d in other["fetch_dependency_outputs"]):
                    deadline = now + int(assignments["deadline_seconds"])
                    other["deadline"] = deadline
                    other_status = statuses[other_id]
                    other_status["deadline"] = deadline
                    writes[layout.task_status_address(schedule_id, other_id)] = other_status
                    changed = True
            if changed:
                writes[layout.assignments_address(schedule_id)] = assignments
            finalized = None
            if task["kind"] == "evaluate":
                result = await read_record(context, layout.round_result_address(schedule_id))
                if result is not None and not result.get("final"):
                    finalized = self._finalize(result, assignments, statuses, now)
                    if finalized is not None:
                        writes[layout.round_result_address(schedule_id)] = finalized

        await write_records(context, writes)
        event = {"schedule_id": schedule_id, "task_id": task_id, "node": signer,
                 "attempt": current["attempt"], "kind": task["kind"]}
        if digest is not None:
            event["output_digest"] = digest
        await emit(context, events.TASK_STATUS_EVENTS[status], **event)
        if status == "done" and finalized is not None:
            await self._emit_finalized(context, finalized)

    @staticmethod
    async def _check_lineage(context, assignments: Mapping, task_id: str, base: str | None) -> None:
        """The lineage rule (`starting_model`) for a local_train reported done from `base`. It
        reads the workflow's rounds index and the earlier rounds' results and records, which the
        report declares as inputs (StartingModel.inputs)."""
        async def read(address: str) -> Mapping | None:
            try:
                return await read_record(context, address)
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
        """The result made final, or None while some evaluate instance is not done."""
        evaluates = [t for t, a in assignments["tasks"].items() if a["kind"] == "evaluate"]
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
        if current["status"] != "failed":
            waiting = [d for d in deps if statuses[d]["status"] != "done"]
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

    # -- round_result ----------------------------------------------------------------------

    async def _round_result(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
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
        total = math.fsum(weights[n] for n in sorted(participants))
        if abs(total - 1.0) > WEIGHT_TOLERANCE:
            raise InvalidTransaction(f"aggregation_weights sum to {total!r}; they must sum to 1 (within {WEIGHT_TOLERANCE})")
        metrics = _metrics(body, "metrics", required=("accuracy", "loss"))
        rejected = _rejected(body, weights)
        private = {"privacy": _privacy(body)} if "privacy" in body else {}
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
        statuses = await self._statuses(context, schedule_id, tasks)
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
        round_ = await read_record(context, layout.round_address(schedule_id)) or {}
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
        for node, load in (await self._loads(context, sorted(rejected))).items():  # their reputation
            writes[layout.node_load_address(node)] = {**load, "rejected": load.get("rejected", 0) + 1}
        await write_records(context, writes)
        await emit(context, events.ROUND_RESULT, schedule_id=schedule_id, workflow_id=result["workflow_id"],
                   round=result["round"], global_model_digest=digest, participants=len(participants))
        if final is not None:
            await self._emit_finalized(context, final)


    async def _trains_pending(self, context, schedule_id: str, assignments: Mapping) -> list[str]:
        """The round's local_train tasks not done yet: until there are none, updates may change."""
        trains = [t for t, task in assignments["tasks"].items() if task["kind"] == "local_train"]
        statuses = await self._statuses(context, schedule_id, trains)
        return sorted(t for t in trains if statuses[t]["status"] != "done")

    # -- secure aggregation (secagg_rules.py) -----------------------------------------------

    async def _secagg_keys(self, body: dict, signer: str, context) -> None:
        await secagg_rules.keys(body, signer, context, _schedule_id(body))

    async def _secagg_shares(self, body: dict, signer: str, context) -> None:
        await secagg_rules.shares(body, signer, context, _schedule_id(body))

    async def _secagg_unmask(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        assignments = await self._assignments(context, schedule_id)
        done = not await self._trains_pending(context, schedule_id, assignments)
        await secagg_rules.unmask(body, signer, context, schedule_id, done)

    # -- reveal_noise ----------------------------------------------------------------------

    async def _reveal_noise(self, body: dict, signer: str, context) -> None:
        schedule_id = _schedule_id(body)
        seed = require_match(body, "noise_seed", HEX64, "the round's noise seed (64 lowercase hex, 32 bytes)")
        round_ = await read_record(context, layout.round_address(schedule_id))
        if round_ is None:
            raise InvalidTransaction(f"no round with schedule id {schedule_id!r} on chain")
        commitment = round_.get("noise_commitment")
        if commitment is None:
            raise InvalidTransaction(f"round {schedule_id!r} has no noise commitment: its workflow adds no "
                                     f"server-side noise, so there is no seed to reveal")
        if signer != round_.get("coordinator"):
            raise InvalidTransaction(f"only the round's coordinator {round_.get('coordinator')}, who committed to "
                                     f"the seed, may reveal it; not {signer}")
        if hashlib.sha256(bytes.fromhex(seed)).hexdigest() != commitment:
            raise InvalidTransaction(f"noise_seed does not hash to the round's noise_commitment {commitment}; "
                                     f"reveal the seed committed when the round opened")
        if await read_record(context, layout.noise_seed_address(schedule_id)) is not None:
            raise InvalidTransaction(f"the noise seed of round {schedule_id!r} is already revealed")
        assignments = await self._assignments(context, schedule_id)
        pending = await self._trains_pending(context, schedule_id, assignments)
        if pending:
            raise InvalidTransaction(
                f"the noise seed is revealed once every update is fixed; local_train task(s) "
                f"{', '.join(pending)[:300]} of round {schedule_id!r} are not done yet")
        await write_records(context, {layout.noise_seed_address(schedule_id): {
            "schedule_id": schedule_id, "noise_seed": seed, "revealed_at": await chain_time(context)}})
        await emit(context, events.NOISE_REVEALED, schedule_id=schedule_id, workflow_id=assignments["workflow_id"],
                   round=assignments["round"])


# --------------------------------------------------------------------------- clients


def _privacy(body: Mapping) -> dict:
    """The round result's optional `privacy` record: numbers >= 0 under PRIVACY_FIELDS names."""
    record = require(body, "privacy", dict)
    for key, value in record.items():
        if key not in PRIVACY_FIELDS:
            raise InvalidTransaction(f"payload field 'privacy' has unknown field {shown(key)}; allowed: "
                                     f"{', '.join(PRIVACY_FIELDS)}")
        if not _number(value) or value < 0:
            raise InvalidTransaction(f"payload field 'privacy': {key} must be a finite number >= 0, got {shown(value)}")
    if "epsilon" not in record:
        raise InvalidTransaction("payload field 'privacy' lacks 'epsilon', the privacy spent once this round is released")
    return dict(record)


def _rejected(body: Mapping, weights: Mapping[str, Any]) -> dict[str, str]:
    """The round result's optional `rejected` map: participants whose update the update checks
    refused (fl/screening.py), each with weight 0 and a reason a person can read."""
    if "rejected" not in body:
        return {}
    rejected = require(body, "rejected", dict)
    if not rejected:
        raise InvalidTransaction("payload field 'rejected' is empty; leave it out when no update was rejected")
    for node, reason in rejected.items():
        if node not in weights:
            raise InvalidTransaction(f"payload field 'rejected' names {shown(node)}, which is not a participant")
        if weights[node] != 0:
            raise InvalidTransaction(f"participant {node} is rejected but has aggregation weight {shown(weights[node])}; "
                                     f"a rejected update weighs 0")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REJECT_REASON_CHARS:
            raise InvalidTransaction(f"the reason participant {node} was rejected must be a non-empty text of at most "
                                     f"{MAX_REJECT_REASON_CHARS} characters, got {shown(reason)}")
    return dict(rejected)


def _encode(action: str, fields: Mapping[str, Any]) -> bytes:
    return cbor.encode({"action": action, **{k: v for k, v in fields.items() if v is not None}})


def _transaction(signer, payload: bytes, inputs: list[str], outputs: list[str], **kwargs):
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, inputs, outputs, **kwargs)


def assign_payload(schedule_id: str, deadline_seconds: int | None = None) -> bytes:
    return _encode("assign", {"schedule_id": schedule_id, "deadline_seconds": deadline_seconds})


def report_payload(schedule_id: str, task_id: str, status: str, *, output_digest: str | None = None,
                   metrics: Mapping[str, float] | None = None, attempt: int | None = None,
                   reason: str | None = None, base_model_digest: str | None = None) -> bytes:
    """base_model_digest: a local_train done report's starting model; None (left out) for the
    initial weights and for every other report."""
    return _encode("report", {"schedule_id": schedule_id, "task_id": task_id, "status": status,
                              "output_digest": output_digest, "metrics": dict(metrics) if metrics is not None else None,
                              "attempt": attempt, "reason": reason, "base_model_digest": base_model_digest})


def reassign_payload(schedule_id: str, task_id: str) -> bytes:
    return _encode("reassign", {"schedule_id": schedule_id, "task_id": task_id})


def round_result_payload(schedule_id: str, global_model_digest: str, participants: list[str],
                         aggregation_weights: Mapping[str, float], metrics: Mapping[str, float], *,
                         task_id: str | None = None, rejected: Mapping[str, str] | None = None,
                         server_state_digest: str | None = None, privacy: Mapping | None = None) -> bytes:
    """rejected: participants whose update the update checks refused (weight 0), with why; left
    out when none was. server_state_digest: what a server optimizer leaves for the next round."""
    return _encode("round_result", {
        "schedule_id": schedule_id, "global_model_digest": global_model_digest,
        "participants": list(participants), "aggregation_weights": dict(aggregation_weights),
        "metrics": dict(metrics), "task_id": task_id, "rejected": dict(rejected) if rejected else None,
        "server_state_digest": server_state_digest, "privacy": dict(privacy) if privacy else None,
    })


def _secagg_transaction(signer, action: str, schedule_id: str, workflow_id: str, fields: Mapping, *, writes: bool,
                        **kwargs):
    """Reads the round, the workflow, every participant's secagg record, assignments and task
    statuses; writes the signer's own secagg record."""
    own = layout.secagg_address(schedule_id, signer.public_key().as_hex())
    inputs = [layout.round_address(schedule_id), layout.workflow_address(workflow_id), layout.SECAGG_PREFIX,
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
    inputs = [layout.workflow_address(workflow_id), layout.round_address(schedule_id), layout.PEER_NS,
              assignments, NODE_LOAD_PREFIX, layout.BLOCK_INFO_NS]
    outputs = [assignments, TASK_STATUS_PREFIX, NODE_LOAD_PREFIX]
    return _transaction(signer, assign_payload(schedule_id, deadline_seconds), inputs, outputs, **kwargs)


def make_report_transaction(signer, schedule_id: str, task_id: str, status: str, *, output_digest: str | None = None,
                            metrics: Mapping[str, float] | None = None, attempt: int | None = None,
                            reason: str | None = None, starting_model: StartingModel | None = None, **kwargs):
    """Signed by the task's node (its load record is the signer's). A local_train done report
    passes the StartingModel it trained from (FederationReader.starting_model): its digest
    becomes base_model_digest, and the records the lineage rule reads become inputs."""
    node_load = layout.node_load_address(signer.public_key().as_hex())
    assignments = layout.assignments_address(schedule_id)
    result = layout.round_result_address(schedule_id)
    inputs = [assignments, TASK_STATUS_PREFIX, node_load, result, layout.BLOCK_INFO_NS]
    outputs = [assignments, TASK_STATUS_PREFIX, node_load, result]
    base = None
    if starting_model is not None:
        base = starting_model.digest
        inputs += [a for a in starting_model.inputs if a not in inputs]
    payload = report_payload(schedule_id, task_id, status, output_digest=output_digest, metrics=metrics,
                             attempt=attempt, reason=reason, base_model_digest=base)
    return _transaction(signer, payload, inputs, outputs, **kwargs)


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
                                  **kwargs):
    """Signed by the node of the aggregate task. With rejected updates it also counts them in
    their nodes' load records (reputation), so it declares those."""
    result = layout.round_result_address(schedule_id)
    inputs = [layout.assignments_address(schedule_id), layout.round_address(schedule_id), TASK_STATUS_PREFIX,
              result, layout.BLOCK_INFO_NS]
    outputs = [result]
    if rejected:
        loads = [layout.node_load_address(node) for node in sorted(rejected)]
        inputs, outputs = inputs + loads, outputs + loads
    payload = round_result_payload(schedule_id, global_model_digest, participants, aggregation_weights, metrics,
                                   task_id=task_id, rejected=rejected, server_state_digest=server_state_digest,
                                   privacy=privacy)
    return _transaction(signer, payload, inputs, outputs, **kwargs)


def tasks_of_node(assignments: Mapping, node: str) -> list[str]:
    """Task ids of an assignments record currently held by `node`, in topological order."""
    tasks = assignments.get("tasks", {})
    return [t for t in assignments.get("order", sorted(tasks)) if tasks[t].get("node") == node]


def decode_record(data: bytes | None) -> dict | None:
    """Any record of this family as stored (e.g. RestClient.get_state(assignments_address(sid)))."""
    return None if data is None else cbor.decode(data, max_bytes=10 * 1024 * 1024)
