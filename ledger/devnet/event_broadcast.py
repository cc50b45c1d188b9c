"""Events a committed block produces, and who has asked for them.

Mirrors Sawtooth 1.2's event subsystem: every block yields `sawtooth/block-commit`, a squashed
`sawtooth/state-delta` (last change per address, newest first) and the events processors added,
each passed through the subscriber's filters. Events are derived from the block and its stored
receipts, so catching a subscriber up after a restart produces exactly what it would have seen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from .. import protos as pb

BLOCK_COMMIT = "sawtooth/block-commit"
STATE_DELTA = "sawtooth/state-delta"


class InvalidFilter(ValueError):
    pass


@dataclass(frozen=True)
class Filter:
    key: str
    match: str
    kind: int
    regex: "re.Pattern | None" = None

    @classmethod
    def from_proto(cls, proto: "pb.EventFilter") -> "Filter":
        kind = proto.filter_type
        if kind not in (pb.EventFilter.SIMPLE_ANY, pb.EventFilter.SIMPLE_ALL,
                        pb.EventFilter.REGEX_ANY, pb.EventFilter.REGEX_ALL):
            raise InvalidFilter(f"unknown filter type {kind}")
        regex = None
        if kind in (pb.EventFilter.REGEX_ANY, pb.EventFilter.REGEX_ALL):
            try:
                regex = re.compile(proto.match_string)
            except re.error as exc:
                raise InvalidFilter(f"invalid regular expression {proto.match_string!r}: {exc}") from None
        return cls(proto.key, proto.match_string, kind, regex)

    def matches(self, event: "pb.Event") -> bool:
        values = [a.value for a in event.attributes if a.key == self.key]
        if self.kind == pb.EventFilter.SIMPLE_ANY:
            return self.match in values
        if self.kind == pb.EventFilter.SIMPLE_ALL:
            return all(v == self.match for v in values)
        if self.kind == pb.EventFilter.REGEX_ANY:
            return any(self.regex.search(v) for v in values)
        return all(self.regex.search(v) for v in values)


@dataclass(frozen=True)
class Subscription:
    event_type: str
    filters: tuple[Filter, ...] = ()

    @classmethod
    def from_proto(cls, proto: "pb.EventSubscription") -> "Subscription":
        return cls(proto.event_type, tuple(Filter.from_proto(f) for f in proto.filters))

    def matches(self, event: "pb.Event") -> bool:
        return event.event_type == self.event_type and all(f.matches(event) for f in self.filters)


def block_commit_event(block: "pb.Block") -> "pb.Event":
    header = pb.BlockHeader.FromString(block.header)
    attrs = [
        ("block_id", block.header_signature),
        ("block_num", str(header.block_num)),
        ("state_root_hash", header.state_root_hash),
        ("previous_block_id", header.previous_block_id),
    ]
    return pb.Event(
        event_type=BLOCK_COMMIT, attributes=[pb.Event.Attribute(key=k, value=v) for k, v in attrs]
    )


def state_delta_event(receipts: Iterable["pb.TransactionReceipt"]) -> "pb.Event":
    seen: set[str] = set()
    changes = []
    for receipt in reversed(list(receipts)):
        for change in reversed(receipt.state_changes):
            if change.address not in seen:
                seen.add(change.address)
                changes.append(change)
    return pb.Event(
        event_type=STATE_DELTA,
        attributes=[pb.Event.Attribute(key="address", value=c.address) for c in changes],
        data=pb.StateChangeList(state_changes=changes).SerializeToString(),
    )


def events_for_block(
    block: "pb.Block", receipts: list["pb.TransactionReceipt"], subscriptions: Iterable[Subscription]
) -> list["pb.Event"]:
    subs = list(subscriptions)
    events: list[pb.Event] = []
    if any(s.event_type == BLOCK_COMMIT for s in subs):
        commit = block_commit_event(block)
        if any(s.matches(commit) for s in subs):
            events.append(commit)
    for receipt in receipts:
        events.extend(e for e in receipt.events if any(s.matches(e) for s in subs))
    if any(s.event_type == STATE_DELTA for s in subs):
        delta = state_delta_event(receipts)
        if any(s.matches(delta) for s in subs):
            events.append(delta)
    return events


@dataclass
class Subscriber:
    """One connection's subscriptions; it hears live blocks once its catch-up is sent."""

    identity: bytes
    subscriptions: tuple[Subscription, ...]
    last_known_block_num: int | None
    listening: bool = False
    backlog: list = field(default_factory=list)  # live blocks that arrive during catch-up
