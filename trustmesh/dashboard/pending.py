"""Pending batches: what the nodes wait for, confirmed against the REST API.

The Sawtooth REST API lists no pending batches (only /batch_statuses for ids one names), so
each node says in its heartbeat which of the batches it submitted are not final yet
(`RestClient.pending_summary()` under the heartbeat key "pending_batches":
{"count": n, "batches": [[batch_id, unix time of first submission], ...]}, the oldest first).
A heartbeat is a few seconds old when it is read, so every listed id is checked with one
POST /batch_statuses (answers cached briefly): a batch that became COMMITTED or INVALID since
the beat is not shown as pending. Works the same against the real sawtooth-rest-api.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

LOGGER = logging.getLogger(__name__)

STATUS_TTL = 2.0      # seconds a PENDING / UNKNOWN answer serves; final answers serve for good
MAX_REMEMBERED = 20_000  # statuses kept; beyond, the cache starts over
FINAL = ("COMMITTED", "INVALID")


def reported(beats: Mapping[str, Any] | None) -> dict[str, dict]:
    """node key -> {"count", "batches": [(batch_id, since)]} from the heartbeats that say any.
    A malformed entry (another version, a foreign writer) is left out, not fatal."""
    found: dict[str, dict] = {}
    for key, info in (beats or {}).items():
        entry = info.get("pending_batches") if isinstance(info, Mapping) else None
        if not isinstance(entry, Mapping):
            continue
        batches = []
        for item in entry.get("batches") or []:
            if (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], (int, float)) and not isinstance(item[1], bool)):
                batches.append((item[0], float(item[1])))
        count = entry.get("count")
        count = count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else len(batches)
        found[key] = {"count": max(count, len(batches)), "batches": batches}
    return found


class PendingBatches:
    """The pending batches of the live nodes, each listed id confirmed by the REST API."""

    def __init__(self, rest):
        self.rest = rest
        self._statuses: dict[str, tuple[str, float]] = {}  # batch id -> (status, monotonic time read)

    async def _confirm(self, ids: list[str]) -> str | None:
        """Read the statuses of `ids` not known fresh, in one call; the reason when it failed."""
        from trustmesh.ledger.rest_client import RestError

        now = time.monotonic()
        stale = [i for i in ids if i not in self._statuses or (self._statuses[i][0] not in FINAL
                                                                 and now - self._statuses[i][1] >= STATUS_TTL)]
        if not stale:
            return None
        try:
            answers = await self.rest.batch_statuses(stale)
        except (RestError, OSError) as exc:
            return f"not confirmed with the REST API ({exc})"
        if len(self._statuses) > MAX_REMEMBERED:
            self._statuses.clear()
        for answer in answers:
            if isinstance(answer, Mapping) and isinstance(answer.get("id"), str):
                self._statuses[answer["id"]] = (str(answer.get("status")), now)
        return None

    async def view(self, beats: Mapping[str, Any] | None, names: Mapping[str, str],
                   heartbeat_error: str | None = None) -> dict:
        """{"total", "nodes": [{key, name, count, oldest_seconds, batches: [{id, seconds, status}]}],
        "final_since_beat", "error"}; total None when the heartbeats cannot be read."""
        if beats is None:
            return {"total": None, "nodes": [], "final_since_beat": 0,
                    "error": heartbeat_error or "the heartbeats cannot be read"}
        said = reported(beats)
        error = await self._confirm(sorted({b for entry in said.values() for b, _ in entry["batches"]}))
        now = time.time()
        rows, total, final = [], 0, 0
        for key, entry in said.items():
            batches = []
            for batch_id, since in entry["batches"]:
                status = self._statuses.get(batch_id, (None, 0))[0] if error is None else None
                if status in FINAL:
                    final += 1
                    continue
                batches.append({"id": batch_id, "seconds": round(max(0.0, now - since), 1), "status": status})
            count = entry["count"] - (len(entry["batches"]) - len(batches))
            if count <= 0:
                continue
            total += count
            rows.append({"key": key, "name": names.get(key) or key[:16] + "…", "count": count,
                         "oldest_seconds": max((b["seconds"] for b in batches), default=None), "batches": batches})
        rows.sort(key=lambda r: (-r["count"], r["name"]))
        return {"total": total, "nodes": rows, "final_since_beat": final, "error": error}
