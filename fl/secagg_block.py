"""A workflow definition's `secure_aggregation` block and who shares with whom in a round.

    {"protocol": "secagg+", "threshold": t, "neighbours": k}

Each participant's secrets are shared among its k neighbours (everybody when k >= participants - 1),
and any t of them rebuild one. Only with train_on "iot" (the update is masked where it was
trained, so no node but its owner ever holds it in the clear), FedAvg's sample weights (the
masked sum is sum n_i x_i), no update checks (they would need each update in the clear), and,
with privacy, noise added by the clients. The workflow rules and the schema read the fields
here; the schedule rules, the nodes, the aggregator and the audit read `neighbours` and the
unmask step's conditions (`wrong_share`, `too_few_uploads`, `short_of_shares`), written once here.
Pure Python (hashlib).
"""

from __future__ import annotations

import hashlib
from typing import Collection, Mapping, Sequence

from .strategies.base import Integer

PROTOCOLS = ("secagg+",)
NUMBERS = {"threshold": Integer(low=2, high=1000), "neighbours": Integer(low=2, high=1000)}


def problem(block: Mapping, definition: Mapping) -> str | None:
    """Why a block whose fields are each valid cannot work in this definition, or None."""
    federation = definition.get("federation")
    if not isinstance(federation, Mapping) or federation.get("train_on") != "iot":
        return ('needs federation.train_on "iot": each update is masked where it was trained, so only an '
                'IoT node that trains its own data keeps its update from every other node')
    strategy = (definition.get("strategy") or {"name": "fedavg"}).get("name")
    if strategy != "fedavg":
        return f"sums the updates with FedAvg's sample weights; leave strategy out or set it to fedavg, not {strategy!r}"
    if definition.get("update_checks"):
        return "update_checks need each update in the clear, which secure aggregation hides; leave them out"
    if (definition.get("privacy") or {}).get("where", "client") != "client":
        return 'with privacy, the noise must be added by the clients (privacy.where "client"): the aggregator sees only the sum'
    if block["neighbours"] % 2 and block["neighbours"] < _participants(federation) - 1:
        return "neighbours must be even (half on each side of a participant on the ring), or cover every other participant"
    smallest = federation.get("min_nodes_required", 1)
    holders = min(block["neighbours"], smallest - 1)
    if block["threshold"] > holders:
        return (f"threshold {block['threshold']} is more than the {holders} neighbours a participant has when a round "
                f"goes ahead with min_nodes_required {smallest} participants; lower it or raise min_nodes_required")
    return None


def neighbours(schedule_id: str, nodes: Sequence[str], k: int) -> dict[str, list[str]]:
    """node -> its k neighbours (sorted): the k/2 before and after it on a ring ordered by
    sha256(schedule_id, node); everybody else when k >= n - 1. Symmetric."""
    ring = sorted(set(nodes), key=lambda n: hashlib.sha256(f"{schedule_id}/{n}".encode()).digest())
    n = len(ring)
    if k >= n - 1:
        return {node: sorted(x for x in ring if x != node) for node in ring}
    if k < 2 or k % 2:
        raise ValueError(f"neighbours must be an even number of at least 2 (or >= participants - 1); got {k}")
    return {node: sorted({ring[(i + d) % n] for d in range(-(k // 2), k // 2 + 1) if d}) for i, node in enumerate(ring)}


def share_digest(share: bytes) -> str:
    """What a participant publishes of each share it seals: its sha256."""
    return hashlib.sha256(share).hexdigest()


def wrong_share(share: bytes, published: str | None, *, sender: str, holder: str, what: str) -> str | None:
    """Why the share `holder` reveals of `sender`'s `what` (self-mask, mask key) is refused, or None:
    it must hash to the digest `sender` published for it."""
    if published is not None and share_digest(share) == published:
        return None
    return (f"node {holder} revealed a share of {sender}'s {what} that is not the one {sender} gave it (its "
            f"sha256 differs from the published digest); it must reveal the share {sender} sealed for it")


def too_few_uploads(uploaded: int, threshold: int) -> str | None:
    """Why a round cannot be unmasked at all, or None: fewer than `threshold` participants
    uploaded, and a sum of so few would give away single updates (one upload is its own sum)."""
    if uploaded >= threshold:
        return None
    return (f"secure aggregation: only {uploaded} participant(s) uploaded a masked update, fewer than the threshold "
            f"{threshold}; a sum of so few would reveal single updates, so the round is not aggregated")


def revealed_by_sender(records: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
    """sender -> {holder: the share it revealed of sender's secret}, from the holders' on-chain
    records (node -> record with "revealed": {sender: share})."""
    revealed: dict[str, dict[str, str]] = {}
    for holder in sorted(records):
        for sender, share in ((records[holder] or {}).get("revealed") or {}).items():
            revealed.setdefault(sender, {})[holder] = share
    return revealed


def short_of_shares(participants: Sequence[str], revealed: Mapping[str, Collection],
                    threshold: int) -> list[tuple[int, str]]:
    """(shares revealed, participant) for every participant whose secret cannot be rebuilt yet,
    fewer than `threshold` of its shares revealed (revealed: sender -> its holders that revealed),
    fewest first. Empty: the unmask step is complete."""
    return sorted((len(revealed.get(node) or ()), node) for node in participants
                  if len(revealed.get(node) or ()) < threshold)


def schema() -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["protocol", *NUMBERS],
            "properties": {"protocol": {"enum": list(PROTOCOLS)},
                           **{name: bounds.schema() for name, bounds in NUMBERS.items()}}}


def _participants(federation: Mapping) -> int:
    """How many participants: those listed, or a participant group's size (its expected_nodes)."""
    listed = federation.get("participant_nodes")
    if isinstance(listed, list):
        return len(listed)
    expected = federation.get("expected_nodes")
    return expected if isinstance(expected, int) and not isinstance(expected, bool) else 0
