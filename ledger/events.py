"""Block-by-block event subscriber for a Sawtooth 1.2 validator.

The validator sends one CLIENT_EVENTS message (an EventList) per committed block, holding the
events of that block the subscription matches, always including `sawtooth/block-commit` when it
is subscribed. We therefore always subscribe to it: its attributes (block_id, block_num,
previous_block_id) tell which block a list belongs to, and let us resume exactly where the caller
left off after a validator restart (last_known_block_ids makes the validator replay what we missed).

The validator going away is waited out: the connection reconnects with backoff and says once on
stderr `waiting for the validator at tcp://… (down 3 s)` (ledger/messaging.py), and the
subscription resumes from the last block delivered. Only a first contact can be bounded
(first_contact=seconds): a command pointed at the wrong address should say so, not wait.

Guarantee to the caller: blocks come in chain order, none twice, none skipped. A block whose parent
is not the last one delivered means something was lost; we drop it and resubscribe from the last
delivered block so the validator replays the missing ones.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import protos as pb
from trustmesh.outage import Outage

from .messaging import BadEndpoint, ConnectionLost, ValidatorConnection
from .next_link import next_link

LOGGER = logging.getLogger(__name__)

BLOCK_COMMIT = "sawtooth/block-commit"
STATE_DELTA = "sawtooth/state-delta"
NULL_BLOCK_ID = "0000000000000000"  # as a last known block id: replay every block since genesis

_MSG = pb.Message


class EventSubscriptionError(Exception):
    """The validator refused the subscription."""

    def __init__(self, status: int, response_message: str = ""):
        name = pb.ClientEventsSubscribeResponse.Status.Name(status)
        super().__init__(f"event subscription refused: {name}" + (f": {response_message}" if response_message else ""))
        self.status = status
        self.response_message = response_message


class InvalidFilterError(EventSubscriptionError):
    """A filter of the subscription is invalid (e.g. a bad regular expression)."""


class UnknownBlockError(EventSubscriptionError):
    """None of the last known block ids is in the validator's chain: no gap-free resume possible."""


class SubscriberClosed(Exception):
    """next_block() on a subscriber that was closed."""


class ValidatorUnreachable(ConnectionError):
    """No validator answered within first_contact seconds of start()."""


@dataclass
class BlockEvents:
    """The events of one committed block, the block-commit event included."""

    block_id: str
    block_num: int
    state_root_hash: str
    previous_block_id: str
    events: list = field(default_factory=list)  # list[pb.Event], in the order the validator sent

    def of_type(self, event_type: str) -> list:
        return [e for e in self.events if e.event_type == event_type]


# -- subscription builders ---------------------------------------------------------------------

def event_filter(key: str, match_string: str, filter_type: int = pb.EventFilter.SIMPLE_ANY) -> "pb.EventFilter":
    """filter_type: pb.EventFilter.SIMPLE_ANY / SIMPLE_ALL / REGEX_ANY / REGEX_ALL."""
    return pb.EventFilter(key=key, match_string=match_string, filter_type=filter_type)


def event_subscription(event_type: str, filters: Iterable = ()) -> "pb.EventSubscription":
    """filters: pb.EventFilter or (key, match_string[, filter_type]) tuples; an event must pass all."""
    built = [f if isinstance(f, pb.EventFilter) else event_filter(*f) for f in filters]
    return pb.EventSubscription(event_type=event_type, filters=built)


def block_commit_subscription() -> "pb.EventSubscription":
    return pb.EventSubscription(event_type=BLOCK_COMMIT)


def state_delta_subscription(address_prefixes: Iterable[str] = ()) -> "pb.EventSubscription":
    """State changes under any of the prefixes (all addresses when none are given)."""
    if isinstance(address_prefixes, str):
        raise TypeError("address_prefixes must be a list of prefixes, not a single string")
    prefixes = list(address_prefixes)
    if not prefixes:
        return pb.EventSubscription(event_type=STATE_DELTA)
    # The validator uses re.search, so anchor; one alternation because filters are ANDed.
    pattern = "^(?:" + "|".join(re.escape(p) for p in prefixes) + ")"
    return event_subscription(STATE_DELTA, [event_filter("address", pattern, pb.EventFilter.REGEX_ANY)])


def _as_subscription(item) -> "pb.EventSubscription":
    if isinstance(item, pb.EventSubscription):
        return item
    event_type, filters = item
    return event_subscription(event_type, filters)


def _block_of(event_list: "pb.EventList") -> BlockEvents | None:
    for event in event_list.events:
        if event.event_type == BLOCK_COMMIT:
            attrs = {a.key: a.value for a in event.attributes}
            return BlockEvents(
                block_id=attrs.get("block_id", ""),
                block_num=int(attrs.get("block_num", "-1")),
                state_root_hash=attrs.get("state_root_hash", ""),
                previous_block_id=attrs.get("previous_block_id", ""),
                events=list(event_list.events),
            )
    return None


_CLOSED = object()


class EventSubscriber:
    """Async iterator of BlockEvents, one per committed block, resuming across validator restarts."""

    def __init__(
        self,
        url: str,
        subscriptions: Sequence,
        *,
        last_known_block_ids: Sequence[str] = (),
        first_contact: float | None = None,
        outage: Outage | None = None,
    ):
        """first_contact: seconds start() tries before giving up (ValidatorUnreachable; a host
        that does not resolve: BadEndpoint at once); None waits as long as it takes. Once
        subscribed, outages are always waited out. outage: the validator's announcer (shared)."""
        self.url = url
        self.first_contact = first_contact
        subs = [_as_subscription(s) for s in subscriptions]
        # Catch-up and gap detection need every block's commit event, unfiltered.
        if not any(s.event_type == BLOCK_COMMIT and not s.filters for s in subs):
            subs.insert(0, block_commit_subscription())
        self.subscriptions = subs
        self._initial_known = list(last_known_block_ids)
        self._anchor: str | None = None  # chain head at first subscription, when nothing else is known
        self._conn = ValidatorConnection(url, on_message=self._on_message, on_reconnect=self._on_reconnect,
                                         outage=outage)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._last: BlockEvents | None = None  # last block handed to the queue
        self._lock = asyncio.Lock()
        self._subscribed_generation: int | None = None
        self._resubscribing = False
        self._tasks: set[asyncio.Task] = set()
        self._closing = asyncio.Event()
        self._closed = False

    @property
    def last_block_id(self) -> str | None:
        """Id of the last block delivered (what a later subscriber should resume from)."""
        return self._last.block_id if self._last else None

    def _resume_ids(self) -> list[str]:
        if self._last:
            return [self._last.block_id]
        return list(self._initial_known) or ([self._anchor] if self._anchor else [])

    async def _chain_head_id(self) -> str | None:
        """The head when we first subscribe: a resume point even before any block arrives."""
        request = pb.ClientBlockListRequest(paging=pb.ClientPagingControls(limit=1))
        reply = await self._conn.request(_MSG.CLIENT_BLOCK_LIST_REQUEST, request)
        response = pb.ClientBlockListResponse.FromString(reply.content)
        if response.status == pb.ClientBlockListResponse.OK and response.blocks:
            return response.blocks[0].header_signature
        return None

    # -- subscribing -------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and subscribe; raises EventSubscriptionError when the validator refuses,
        BadEndpoint for a malformed URL and, with first_contact, ValidatorUnreachable."""
        await self._conn.start()
        try:
            if self.first_contact is None:
                await self._subscribe()
            else:
                await self._check_host()
                try:
                    await asyncio.wait_for(self._subscribe(), self.first_contact)
                except asyncio.TimeoutError:
                    raise ValidatorUnreachable(f"nothing answers at {self.url} (tried for "
                                               f"{self.first_contact:g} s)") from None
        except BaseException:
            self._closed = True
            await self._conn.close()
            raise

    async def _check_host(self) -> None:
        """ZMQ retries a host that does not resolve for ever, without a word: look it up once."""
        scheme, _, rest = self.url.partition("://")
        if scheme != "tcp":
            return
        host = rest.rpartition(":")[0].strip("[]")
        if not host or host == "*":
            return
        try:
            await asyncio.get_running_loop().getaddrinfo(host, None)
        except socket.gaierror as exc:
            raise BadEndpoint(f"the validator endpoint {self.url} names host {host!r}, which does not resolve "
                              f"({exc.strerror})") from None

    async def _subscribe(self, force: bool = False) -> None:
        """Subscribe on the current link (again if `force`); retried when the link drops."""
        async with self._lock:
            while (generation := await next_link(self._conn, self._closing, lambda: self._closed)) is not None:
                if not force and self._subscribed_generation == generation:
                    return
                if not self._resume_ids():
                    try:
                        self._anchor = await self._chain_head_id()
                    except ConnectionLost:
                        continue
                known = self._resume_ids()
                request = pb.ClientEventsSubscribeRequest(
                    subscriptions=self.subscriptions, last_known_block_ids=known
                )
                try:
                    reply = await self._conn.request(_MSG.CLIENT_EVENTS_SUBSCRIBE_REQUEST, request)
                except ConnectionLost:
                    continue
                response = pb.ClientEventsSubscribeResponse.FromString(reply.content)
                Status = pb.ClientEventsSubscribeResponse
                if response.status == Status.INVALID_FILTER:
                    raise InvalidFilterError(response.status, response.response_message)
                if response.status == Status.UNKNOWN_BLOCK:
                    raise UnknownBlockError(response.status, response.response_message)
                if response.status != Status.OK:
                    raise EventSubscriptionError(response.status, response.response_message)
                LOGGER.info("subscribed to events at %s (resuming after %s)", self.url, known or "now")
                self._subscribed_generation = generation
                return
            raise SubscriberClosed("subscriber closed")

    async def _on_reconnect(self) -> None:
        # A restarted validator forgot us; resuming from the last delivered block replays the gap.
        await self._resubscribe(force=False)

    async def _resubscribe(self, force: bool) -> None:
        self._resubscribing = True
        try:
            await self._subscribe(force=force)
        except SubscriberClosed:
            pass
        except EventSubscriptionError as exc:
            LOGGER.error("resubscribing at %s failed: %s", self.url, exc)
            self._queue.put_nowait(exc)  # the caller sees it after the blocks already delivered
        finally:
            self._resubscribing = False

    # -- receiving ---------------------------------------------------------------------------

    async def _on_message(self, message: "pb.Message") -> None:
        # No await before the block is queued: messages are handled in the order they arrived.
        if message.message_type != _MSG.CLIENT_EVENTS:
            LOGGER.debug("ignoring unsolicited %s", pb.message_type_name(message.message_type))
            return
        block = _block_of(pb.EventList.FromString(message.content))
        if block is None:
            LOGGER.warning("dropped an event list without a %s event", BLOCK_COMMIT)
            return
        self._accept(block)

    def _accept(self, block: BlockEvents) -> None:
        # Each delivered block's parent is the one delivered before it, so a replayed block
        # (its parent delivered long ago) can never pass: no duplicates, no holes.
        last = self._last
        if last is None and block.block_id in self._initial_known:
            return  # the caller already has it
        if last is None:
            # The first block must follow what the caller said it knows, if it said anything.
            follows = not self._initial_known or block.previous_block_id in self._initial_known
        else:
            follows = block.previous_block_id == last.block_id
        if not follows:
            if last is not None and block.block_num <= last.block_num:
                LOGGER.debug("dropped block %s (num %d): already past it", block.block_id[:16], block.block_num)
                return  # a replay (or a fork we cannot follow; the next block reveals it)
            if not self._resubscribing:
                LOGGER.warning("block %s (num %d) does not follow %s: resubscribing to replay the gap",
                               block.block_id[:16], block.block_num, last.block_id[:16] if last else "-")
                self._resubscribing = True  # at once, so the next stray block does not start another
                self._spawn(self._resubscribe(force=True))
            return
        self._last = block
        self._queue.put_nowait(block)

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def next_block(self) -> BlockEvents:
        """The next block's events; raises EventSubscriptionError if resuming failed."""
        item = await self._queue.get()
        if item is _CLOSED or isinstance(item, Exception):
            self._queue.put_nowait(item)  # keep raising for later calls too
            if item is _CLOSED:
                raise SubscriberClosed("subscriber closed")
            raise item
        return item

    def __aiter__(self) -> "EventSubscriber":
        return self

    async def __anext__(self) -> BlockEvents:
        try:
            return await self.next_block()
        except SubscriberClosed:
            raise StopAsyncIteration from None

    # -- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Unsubscribe (best effort, 1 s) and close the connection."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._subscribed_generation is not None and self._conn.connected.is_set():
            try:
                await self._conn.request(
                    _MSG.CLIENT_EVENTS_UNSUBSCRIBE_REQUEST, pb.ClientEventsUnsubscribeRequest(), timeout=1.0
                )
            except (asyncio.TimeoutError, ConnectionLost):
                LOGGER.info("no answer to unsubscribe from %s", self.url)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._conn.close()
        self._queue.put_nowait(_CLOSED)

    async def __aenter__(self) -> "EventSubscriber":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
