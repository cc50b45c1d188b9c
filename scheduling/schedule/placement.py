"""Which compute node gets a task: resource points, load, liveness and the ranking (pure)."""

from __future__ import annotations

import hashlib
import heapq
import math
from fractions import Fraction
from typing import Any, Mapping

from .. import peers
from .spec import MAX_QUEUE_SKEW


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


def capacity(points: int, load: Mapping) -> Fraction:
    """What a node can take on at once: its score with an empty queue (points * reliability)."""
    return node_score(points, {**load, "queue": 0})


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


def spread_trainings(schedule_id: str, candidates: Mapping[str, int], loads: Mapping[str, Mapping],
                     count: int) -> list[str]:
    """The nodes of a round's `count` local_train instances, in order: each goes to the node
    holding the fewest of them per unit of capacity (ties by tie_break), so they are split in
    proportion to capacity.

    Not by queue, as the round's other tasks are: a round trains from the previous round's model,
    so what a node still queues for earlier rounds of the workflow is done before any of these
    can start. By queue, the node busy with the last round's trainings got none of this round's
    (10 of 10 on the other node at ten participants), and the round trained on one core of two.
    """
    weight = {n: capacity(p, loads.get(n, empty_load(n))) for n, p in candidates.items()}
    # (per unit of capacity what the node would hold with the next one, tie-break, node, that count)
    heap = [(1 / weight[n], tie_break(schedule_id, n), n, 1) for n in candidates]
    heapq.heapify(heap)
    order = []
    for _ in range(count if heap else 0):
        _, tie, node, held = heapq.heappop(heap)
        order.append(node)
        heapq.heappush(heap, ((held + 1) / weight[node], tie, node, held + 1))
    return order
