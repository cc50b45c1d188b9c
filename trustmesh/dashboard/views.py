"""What the dashboard and `trustmesh workflow list / show` show, read from the chain.

Everything comes from one chain head at a time (`read_snapshot`): the REST API lists whole
record kinds under their address prefixes (workflows, rounds, assignments, round results, node
loads, peers and their liveness, BlockInfo), a few paged calls however many workflows there
are. A round's task statuses are read on demand (`round_detail`). Off the chain: heartbeats in
Redis (who is alive now, and names) and the local network's network.json (restarts, names).

Every function here returns plain JSON-able dicts: the JSON API serves them as they are.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.rest_client import RestClient
from trustmesh.scheduling import federation_records, layout, peers as peer_rules
from trustmesh.scheduling.common import MAX_RECORD_BYTES
from trustmesh.scheduling.reader import expand

LOGGER = logging.getLogger(__name__)

BLOCK_INFO_PREFIX = layout.BLOCK_INFO_NS + "00"
RATE_WINDOW = 60  # seconds of chain time the block rate is measured over


class ViewError(Exception):
    """A page or record that does not exist (or a request that makes no sense); status: HTTP."""

    def __init__(self, message: str, status: int = 404):
        super().__init__(message)
        self.status = status


def short(value: Any, n: int = 16) -> str:
    return f"{value[:n]}…" if isinstance(value, str) and len(value) > n else str(value)


# ------------------------------------------------------------------------------ the snapshot


@dataclass
class Snapshot:
    """Every record the pages need, read at one chain head."""

    head_id: str
    block_num: int
    state_root: str
    workflows: dict[str, dict] = field(default_factory=dict)     # workflow_id -> record
    rounds: dict[str, dict] = field(default_factory=dict)        # schedule_id -> round record
    assignments: dict[str, dict] = field(default_factory=dict)   # schedule_id -> assignments
    results: dict[str, dict] = field(default_factory=dict)       # schedule_id -> round result
    loads: dict[str, dict] = field(default_factory=dict)         # node key -> load record
    balances: dict[str, int] = field(default_factory=dict)       # public key -> trustmesh-rewards balance
    peers: dict[str, dict] = field(default_factory=dict)         # compute node key -> registry record
    last_seen: dict[str, int] = field(default_factory=dict)      # compute node key -> chain time
    block_times: dict[int, int] = field(default_factory=dict)    # block number -> BlockInfo timestamp
    read_at: float = 0.0                                         # wall clock of the read

    def rounds_of(self, workflow_id: str) -> dict[int, dict]:
        return {r["round"]: r for r in self.rounds.values() if r.get("workflow_id") == workflow_id}

    @property
    def chain_time(self) -> int | None:
        """The agreed time of the newest block with a BlockInfo (None without BlockInfo)."""
        return self.block_times[max(self.block_times)] if self.block_times else None


def _decode(address: str, data: bytes) -> Any:
    try:
        return cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
    except Exception as exc:  # one bad record must not hide the others
        LOGGER.warning("record at %s is not canonical CBOR (%s); left out", address, exc)
        return None


async def _listed(rest: RestClient, prefix: str, head: str) -> list[tuple[str, Any]]:
    found = []
    async for address, data in rest.list_state(prefix, head=head):
        value = _decode(address, data)
        if value is not None:
            found.append((address, value))
    return found


async def read_snapshot(rest: RestClient) -> Snapshot:
    """The chain head and every record kind the views read, all at that head."""
    head = await rest.head()
    head_id = head["header_signature"]
    header = head.get("header", {})
    snap = Snapshot(head_id, int(header.get("block_num", 0)), header.get("state_root_hash", ""), read_at=time.time())
    for _, record in await _listed(rest, layout.WORKFLOW_NS + layout.WORKFLOW_RECORD, head_id):
        if isinstance(record, dict) and "workflow_id" in record:
            snap.workflows[record["workflow_id"]] = expand(record)  # a participant group's members listed
    cores = [r for _, r in await _listed(rest, layout.FEDERATION_NS + layout.ROUND_RECORD, head_id)
             if isinstance(r, dict) and isinstance(r.get("schedule_id"), str)]
    rosters = dict(await _listed(rest, layout.FEDERATION_NS + layout.ROUND_ROSTER, head_id))
    members = dict(await _listed(rest, layout.FEDERATION_NS + layout.ROUND_MEMBER, head_id))
    for core in cores:  # each round with its lists (federation_records.assemble)
        sid = core["schedule_id"]
        roster = rosters.get(layout.round_roster_address(sid))
        roster = roster if isinstance(roster, dict) else None
        snap.rounds[sid] = federation_records.assemble(core, roster, federation_records.members_of(sid, roster, members))
    # not the whole namespace: task statuses (kind 01) are many, and read per round
    for kind, into, key in ((layout.ASSIGNMENTS, snap.assignments, "schedule_id"),
                            (layout.ROUND_RESULT, snap.results, "schedule_id"),
                            (layout.NODE_LOAD, snap.loads, "node")):
        for _, record in await _listed(rest, layout.SCHEDULE_NS + kind, head_id):
            if isinstance(record, dict) and key in record:
                into[record[key]] = record
    for address, record in await _listed(rest, layout.PEER_NS, head_id):
        kind = address[6:8]
        if kind == layout.PEER_RECORD and isinstance(record, dict) and "node" in record:
            snap.peers[record["node"]] = record
        elif kind == layout.PEER_LIVENESS and isinstance(record, dict):
            seen = peer_rules.last_seen_of(record)
            if seen is not None and "node" in record:
                snap.last_seen[record["node"]] = seen
    for _, record in await _listed(rest, layout.ACCOUNT_PREFIX, head_id):
        if isinstance(record, dict) and "key" in record:
            snap.balances[record["key"]] = record.get("balance")
    from trustmesh.ledger import protos as pb

    async for address, data in rest.list_state(BLOCK_INFO_PREFIX, head=head_id):
        try:
            info = pb.BlockInfo.FromString(data)
        except Exception:  # noqa: BLE001 - a foreign record under the prefix: not ours to judge
            continue
        snap.block_times[info.block_num] = info.timestamp
    return snap


# ------------------------------------------------------------------------------ names


def node_names(snap: Snapshot, heartbeats: Mapping[str, Mapping] | None = None,
               network: Mapping | None = None) -> dict[str, str]:
    """node key -> the name people use ("compute-1", "iot-3"), from every source that says one."""
    names: dict[str, str] = {}
    for service, info in ((network or {}).get("services") or {}).items():
        if isinstance(info, Mapping) and info.get("node"):
            names[info["node"]] = service
    for key, info in (heartbeats or {}).items():
        if isinstance(info, Mapping) and isinstance(info.get("name"), str):
            names.setdefault(key, info["name"])
    for key, record in snap.peers.items():
        if isinstance(record.get("name"), str):
            names[key] = record["name"]
    return names


def named(key: str, names: Mapping[str, str]) -> dict:
    return {"key": key, "name": names.get(key) or short(key)}


# ------------------------------------------------------------------------------ workflows


def _evaluation(result: Mapping | None) -> dict:
    evaluations = (result or {}).get("evaluations") or {}
    first = next(iter(evaluations.values()), {}) if isinstance(evaluations, Mapping) else {}
    return (first or {}).get("metrics") or {}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def epsilon_of(result: Mapping | None) -> float | None:
    """privacy.epsilon of a round result, where DP is on."""
    privacy = (result or {}).get("privacy")
    return _number(privacy.get("epsilon")) if isinstance(privacy, Mapping) else None


def planned_rounds(definition: Mapping) -> int:
    """The rounds a federated workflow runs: federation.rounds, or fewer when its privacy budget
    allows fewer (fl/privacy_block.py; the accountant's answer is cached per block)."""
    fed = definition.get("federation") or {}
    if "privacy" not in definition:
        return fed.get("rounds", 0)
    return _planned(json.dumps(definition["privacy"], sort_keys=True), fed.get("rounds", 0))


@functools.lru_cache(maxsize=64)
def _planned(block: str, rounds: int) -> int:
    from trustmesh.fl import privacy_block

    try:
        return privacy_block.allowed_rounds(json.loads(block), rounds)
    except Exception as exc:  # noqa: BLE001 - an older or newer block: show federation.rounds
        LOGGER.warning("cannot work out the rounds the privacy block %s allows (%s)", block, exc)
        return rounds


def _budget_ended(snap: Snapshot, definition: Mapping, rounds: list[dict]) -> bool:
    """Whether the privacy budget ended the workflow after these rounds (all over): one more
    within federation.rounds would pass it, given the multipliers the rounds recorded
    (privacy_block.budget_exhausted)."""
    if "privacy" not in definition:
        return False
    from trustmesh.fl import privacy_block

    recorded = privacy_block.recorded_multipliers({r["number"]: snap.results.get(r["schedule_id"]) for r in rounds})
    try:
        return privacy_block.budget_exhausted(definition, len(rounds), recorded)
    except Exception as exc:  # noqa: BLE001 - an older or newer block: no budget state
        LOGGER.warning("cannot tell whether the privacy budget of %s ended it (%s)", definition.get("workflow_id"), exc)
        return False


def round_phase(record: Mapping, assignments: Mapping | None, result: Mapping | None) -> str:
    """collecting | timeout | ready | training | aggregated | final."""
    if result is not None:
        return "final" if result.get("final") else "aggregated"
    if record.get("status") == "ready" and assignments is not None:
        return "training"
    return str(record.get("status", "unknown"))


def round_row(snap: Snapshot, record: Mapping, names: Mapping[str, str]) -> dict:
    """One round as the workflow page and `workflow show` list it."""
    sid = record["schedule_id"]
    result = snap.results.get(sid)
    assignments = snap.assignments.get(sid)
    evaluation = _evaluation(result)
    weights = (result or {}).get("aggregation_weights") or {}
    rejected = (result or {}).get("rejected") or {}
    return {
        "number": record["round"],
        "schedule_id": sid,
        "phase": round_phase(record, assignments, result),
        "status": record.get("status"),
        "expected": len(record.get("expected_nodes") or []),
        "submitted": len(record.get("submitted_nodes") or []),
        "included": sum(1 for w in weights.values() if _number(w)),
        "rejected": {names.get(k) or short(k): v for k, v in rejected.items()} if isinstance(rejected, Mapping)
        else {},
        "tasks": len((assignments or {}).get("order") or []),
        "accuracy": _number(evaluation.get("accuracy")),
        "loss": _number(evaluation.get("loss")),
        "train_loss": _number(((result or {}).get("metrics") or {}).get("loss")),
        "train_accuracy": _number(((result or {}).get("metrics") or {}).get("accuracy")),
        "epsilon": epsilon_of(result),
        "global_model": (result or {}).get("global_model_digest"),
        "round_start": record.get("round_start"),
        "recorded_at": (result or {}).get("recorded_at"),
        "finalized_at": (result or {}).get("finalized_at"),
    }


def workflow_row(snap: Snapshot, workflow_id: str, names: Mapping[str, str]) -> dict:
    """A workflow as the list shows it: state, rounds done / total, strategy, participants."""
    record = snap.workflows.get(workflow_id)
    if record is None:
        raise ViewError(f"workflow {workflow_id!r} is not on chain at block {snap.block_num}")
    definition = record.get("definition") or {}
    fed = definition.get("federation")
    rounds = [round_row(snap, r, names) for _, r in sorted(snap.rounds_of(workflow_id).items())]
    total = planned_rounds(definition) if fed else 0
    configured = fed.get("rounds") if fed else 0
    final = sum(r["phase"] == "final" for r in rounds)
    over = sum(r["phase"] in ("final", "timeout") for r in rounds)
    last = rounds[-1] if rounds else None
    if not fed:
        state = "single-node"
    elif rounds and over == len(rounds) and _budget_ended(snap, definition, rounds):
        total = len(rounds)  # the recorded epsilon may have ended it before the planned rounds
        timed_out = f", {total - final} round(s) timed out" if final < total else ""
        spent = next((r["epsilon"] for r in reversed(rounds) if r["epsilon"] is not None), 0.0)
        state = (f"budget exhausted (epsilon {spent:.4g} of "
                 f"{definition['privacy']['epsilon_budget']:g} spent after {total} of {configured} rounds{timed_out})")
    elif total is not None and over >= total:
        state = "finished" if final == total else f"finished, {total - final} round(s) timed out"
    elif last is None:
        state = "waiting for round 1"
    else:
        state = f"round {last['number']} {last['phase']}"
    latest_scored = next((r for r in reversed(rounds) if r["accuracy"] is not None), None)
    return {
        "workflow_id": workflow_id,
        "name": definition.get("name"),
        "version": record.get("version"),
        "owner": record.get("owner"),
        "federated": bool(fed),
        "state": state,
        "rounds_done": final,
        "rounds_total": total,
        "rounds_configured": configured,
        "strategy": definition.get("strategy"),
        "update_checks": definition.get("update_checks"),
        "privacy": definition.get("privacy"),
        "secure_aggregation": definition.get("secure_aggregation"),
        "train_on": (fed or {}).get("train_on", "compute") if fed else None,
        "participants": [named(k, names) for k in (fed or {}).get("participant_nodes", [])],
        "coordinator": named(fed["coordinator_node"], names) if fed and fed.get("coordinator_node") else None,
        "accuracy": latest_scored["accuracy"] if latest_scored else None,
        "epsilon": next((r["epsilon"] for r in reversed(rounds) if r["epsilon"] is not None), None),
    }


def workflows(snap: Snapshot, names: Mapping[str, str]) -> list[dict]:
    return [workflow_row(snap, wid, names) for wid in sorted(snap.workflows)]


def workflow_detail(snap: Snapshot, workflow_id: str, names: Mapping[str, str]) -> dict:
    """The workflow page: its row, every round, the definition."""
    row = workflow_row(snap, workflow_id, names)
    record = snap.workflows[workflow_id]
    rounds = [round_row(snap, r, names) for _, r in sorted(snap.rounds_of(workflow_id).items())]
    fed = (record.get("definition") or {}).get("federation") or {}
    return {**row, "description": (record.get("definition") or {}).get("description"),
            "expected_nodes": fed.get("expected_nodes"), "min_nodes_required": fed.get("min_nodes_required"),
            "round_timeout": fed.get("round_timeout"), "definition": record.get("definition"),
            "rounds": rounds, "block": snap.block_num, "head": snap.head_id}


async def round_detail(rest: RestClient, snap: Snapshot, workflow_id: str, number: int,
                       names: Mapping[str, str], blocks: Mapping | None = None) -> dict:
    """The round page: the on-chain record, the result, each task's node, timings and attempts.
    blocks: what the live follower saw (schedule_id -> {event: block number}, and
    (schedule_id, task_id) -> {status: block number}); empty before it caught up."""
    if workflow_id not in snap.workflows:
        raise ViewError(f"workflow {workflow_id!r} is not on chain at block {snap.block_num}")
    record = snap.rounds_of(workflow_id).get(number)
    if record is None:
        raise ViewError(f"workflow {workflow_id!r} has no round {number} at block {snap.block_num}")
    sid = record["schedule_id"]
    result = snap.results.get(sid)
    assignments = snap.assignments.get(sid)
    from trustmesh.scheduling.reader import FederationReader

    reader = FederationReader(rest, snap.head_id)
    tasks = []
    for task_id in (assignments or {}).get("order") or []:
        task = assignments["tasks"][task_id]
        status = await reader.task_status(sid, task_id) or {}
        history = status.get("history") or []
        started = next((h["at"] for h in history if h.get("status") == "assigned"), None)
        ended = next((h["at"] for h in reversed(history) if h.get("status") in ("done", "failed")), None)
        metrics = status.get("metrics") or {}
        tasks.append({
            "task_id": task_id, "kind": task.get("kind"), "node": named(status.get("node") or task.get("node"), names),
            "data_owner": named(task["data_owner"], names) if task.get("data_owner") else None,
            "status": status.get("status", "assigned"), "attempt": status.get("attempt", task.get("attempt")),
            "deadline": status.get("deadline", task.get("deadline")),
            "assigned_at": started, "ended_at": ended,
            "chain_seconds": ended - started if started is not None and ended is not None else None,
            "task_seconds": _number(metrics.get("task_seconds")),
            "compute_seconds": _number(metrics.get("compute_seconds")),
            "output_digest": status.get("output_digest"), "base_model_digest": status.get("base_model_digest"),
            "reason": status.get("reason"),
            "history": [{**h, "node": named(h["node"], names)} if h.get("node") else dict(h) for h in history],
            "block": ((blocks or {}).get((sid, task_id)) or {}),
        })
    weights = (result or {}).get("aggregation_weights") or {}
    submissions = record.get("submissions") or {}
    rejected = (result or {}).get("rejected") or {}
    participants = []
    for key in dict.fromkeys([*record.get("expected_nodes", []), *submissions]):
        sub = submissions.get(key)
        participants.append({**named(key, names), "submitted": sub is not None,
                             "digest": (sub or {}).get("digest"), "samples": (sub or {}).get("samples"),
                             "weight": _number(weights.get(key)), "rejected": rejected.get(key)})
    row = round_row(snap, record, names)
    return {
        **row, "workflow_id": workflow_id, "coordinator": named(record.get("coordinator", ""), names),
        "workflow_version": record.get("workflow_version"), "min_nodes_required": record.get("min_nodes_required"),
        "round_timeout": record.get("round_timeout"),
        "participants": participants,
        "result": result, "privacy": (result or {}).get("privacy"),
        "server_state_digest": (result or {}).get("server_state_digest"),
        "reported_by": named(result["reported_by"], names) if result and result.get("reported_by") else None,
        "evaluations": (result or {}).get("evaluations"),
        "tasks": tasks, "blocks": dict((blocks or {}).get(sid) or {}),
        "block": snap.block_num, "head": snap.head_id,
        "rounds_total": ((snap.workflows[workflow_id].get("definition") or {}).get("federation") or {}).get("rounds"),
    }


# ------------------------------------------------------------------------------ nodes and chain


def reliability(load: Mapping | None) -> float:
    """The schedule family's reliability, (done + 1) / (done + missed + 1)."""
    done = int((load or {}).get("done", 0))
    missed = int((load or {}).get("missed", 0))
    return (done + 1) / (done + missed + 1)


def _load(load: Mapping | None) -> dict:
    load = load or {}
    return {"queue": load.get("queue", 0), "done": load.get("done", 0), "missed": load.get("missed", 0),
            "rejected": load.get("rejected", 0), "last_missed": load.get("last_missed"),
            "reliability": reliability(load)}


def nodes(snap: Snapshot, heartbeats: Mapping[str, Mapping] | None, network: Mapping | None,
          names: Mapping[str, str], *, heartbeat_error: str | None = None) -> dict:
    """Compute nodes (the peer registry) and IoT nodes (the workflows' participants), with
    liveness on chain (compute nodes' heartbeat transactions) and in Redis (every node's beat)."""
    services = (network or {}).get("services") or {}
    by_key = {s["node"]: (name, s) for name, s in services.items() if isinstance(s, Mapping) and s.get("node")}
    now = snap.chain_time
    beats = heartbeats or {}

    def common(key: str) -> dict:
        _, service = by_key.get(key, (None, {}))
        beat = beats.get(key)
        return {**named(key, names), "heartbeat": None if heartbeats is None else beat is not None,
                "heartbeat_info": beat, "load": _load(snap.loads.get(key)),
                "restarts": service.get("restarts") if service else None, "balance": snap.balances.get(key),
                "process": ("up" if service.get("running", True) else "down") if service else None,
                "attack": (beat or {}).get("attack") or (service or {}).get("attack")}

    compute = []
    for key, record in sorted(snap.peers.items(), key=lambda kv: names.get(kv[0], kv[0])):
        seen = snap.last_seen.get(key)
        compute.append({**common(key), "resources": record.get("resources"), "revision": record.get("revision"),
                        "last_seen": seen, "seen_ago": now - seen if now is not None and seen is not None else None,
                        "live_on_chain": peer_rules.is_live(seen, now) if now is not None else None})
    iot_keys: dict[str, dict] = {}
    for wid, record in sorted(snap.workflows.items()):
        fed = (record.get("definition") or {}).get("federation") or {}
        for key in fed.get("participant_nodes", []):
            entry = iot_keys.setdefault(key, {"workflows": [], "coordinates": []})
            entry["workflows"].append(wid)
            if fed.get("coordinator_node") == key:
                entry["coordinates"].append(wid)
    for key, info in beats.items():
        if isinstance(info, Mapping) and info.get("role") == "iot":
            iot_keys.setdefault(key, {"workflows": [], "coordinates": []})
    for key, (_, service) in by_key.items():
        if service.get("kind") == "iot":
            iot_keys.setdefault(key, {"workflows": [], "coordinates": []})
    submitted: dict[str, int] = {}
    for record in snap.rounds.values():
        for key in record.get("submitted_nodes") or []:
            submitted[key] = submitted.get(key, 0) + 1
    iot = [{**common(key), **entry, "submissions": submitted.get(key, 0)}
           for key, entry in sorted(iot_keys.items(), key=lambda kv: _natural(names.get(kv[0], kv[0])))
           if key not in snap.peers]
    return {"compute": compute, "iot": iot, "chain_time": now, "liveness_seconds": peer_rules.LIVENESS_SECONDS,
            "heartbeat_error": heartbeat_error, "block": snap.block_num}


def _natural(text: str) -> tuple:
    head, _, tail = text.rpartition("-")
    return (head, int(tail)) if tail.isdigit() else (text, 0)


def block_rate(block_times: Mapping[int, int], window: int = RATE_WINDOW) -> float | None:
    """Blocks per minute over the last `window` seconds of chain time (BlockInfo timestamps)."""
    if len(block_times) < 2:
        return None
    latest = max(block_times.values())
    recent = [n for n, t in block_times.items() if t > latest - window]
    return 60.0 * len(recent) / window


def chain(snap: Snapshot, *, endpoints: Mapping[str, str | None] | None = None,
          observed: Mapping | None = None, pending: Mapping | None = None) -> dict:
    """The chain head, the block rate and the pending batches (pending.PendingBatches.view)."""
    latest_time = snap.chain_time
    return {"block": snap.block_num, "head": snap.head_id, "state_root": snap.state_root,
            "chain_time": latest_time,
            "head_age": max(0.0, snap.read_at - latest_time) if latest_time is not None else None,
            "blocks_per_minute": block_rate(snap.block_times),
            "observed": dict(observed or {}), "pending_batches": (pending or {}).get("total"),
            "pending": dict(pending) if pending is not None else None,
            "endpoints": {k: v for k, v in (endpoints or {}).items() if v}}
