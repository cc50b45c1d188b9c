"""Checks of trustmesh-schedule payload fields (pure; InvalidTransaction saying what is wrong)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from trustmesh.ledger.processor import InvalidTransaction

from ..common import check_fields, HEX64, require, require_match, shown
from .spec import (MAX_METRICS, MAX_REJECT_REASON_CHARS, MAX_REPORTS_PER_TRANSACTION, METRIC_NAME, PRIVACY_FIELDS,
                   TASK_ID, _FIELDS)


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


def reports_in(body: Mapping) -> list[dict]:
    """A report_many's reports as the report bodies they stand for, in order: each is checked and
    applied as that report would be (the rule), and the audit reads each as one signed report."""
    schedule_id = _schedule_id(body)
    reports = require(body, "reports", list)
    if not 1 <= len(reports) <= MAX_REPORTS_PER_TRANSACTION:
        raise InvalidTransaction(f"payload field 'reports' holds {len(reports)} reports; a report_many carries "
                                 f"1 to {MAX_REPORTS_PER_TRANSACTION} (send more in several)")
    bodies, seen = [], set()
    for position, entry in enumerate(reports):
        if not isinstance(entry, dict):
            raise InvalidTransaction(f"payload field 'reports': entry {position} must be a map, got {shown(entry)}")
        if "schedule_id" in entry or "action" in entry:
            raise InvalidTransaction(f"payload field 'reports': entry {position} names its own schedule_id or "
                                     f"action; the report_many's schedule_id holds for all its reports")
        report = {"action": "report", "schedule_id": schedule_id, **entry}
        _check_fields("report", report)
        task_id = _task_id(report)
        if task_id in seen:
            raise InvalidTransaction(f"payload field 'reports': task {task_id!r} is reported twice; once per "
                                     f"report_many")
        seen.add(task_id)
        bodies.append(report)
    return bodies




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


def _contributions(body: Mapping, weights: Mapping[str, Any]) -> dict:
    """The round result's optional contribution scores (fl/shapley.py): a finite number for some
    of the participants; the rewards rule pays the data pot by them where a workflow asks."""
    scores = require(body, "contributions", dict)
    for node, value in scores.items():
        if node not in weights:
            raise InvalidTransaction(f"payload field 'contributions' names {shown(node)}, which is not a participant")
        if not _number(value):
            raise InvalidTransaction(f"the contribution of participant {node} must be a finite number, got {shown(value)}")
    return dict(scores)


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


def by_position(body: Mapping, submitted: Sequence[str]) -> Mapping:
    """A round_result payload in its positional form, as the keyed form the rules check.

    A round of a thousand participants cannot name them and their weights by key inside
    MAX_PAYLOAD_BYTES, so its result may name each participant by its position in the round's
    submitted_nodes (ints), give aggregation_weights and contributions as lists in the
    participants' order, and key rejected by position. The record written is the same either
    way. A keyed payload comes back as it is."""
    participants = body.get("participants")
    if not isinstance(participants, list) or not participants or not all(
            isinstance(p, int) and not isinstance(p, bool) for p in participants):
        return body
    keys = []
    for position in participants:
        if not 0 <= position < len(submitted):
            raise InvalidTransaction(f"payload field 'participants' holds position {shown(position)}; the round's "
                                     f"submitted_nodes has positions 0 to {len(submitted) - 1}")
        keys.append(submitted[position])
    keyed = dict(body, participants=keys)
    for name in ("aggregation_weights", "contributions"):
        if name not in body:
            continue
        values = body[name]
        if not isinstance(values, list) or len(values) != len(keys):
            raise InvalidTransaction(f"payload field {name!r} must list one value per participant ({len(keys)}) in "
                                     f"their order when participants are given by position, got {shown(values)}")
        keyed[name] = dict(zip(keys, values))
    if isinstance(body.get("rejected"), dict):
        rejected = {}
        for position, reason in body["rejected"].items():
            if not isinstance(position, int) or isinstance(position, bool) or not 0 <= position < len(submitted):
                raise InvalidTransaction(f"payload field 'rejected' holds {shown(position)}; with participants given "
                                         f"by position it is keyed by position too")
            rejected[submitted[position]] = reason
        keyed["rejected"] = rejected
    return keyed
