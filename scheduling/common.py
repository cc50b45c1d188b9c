"""What every federation family shares: payload parsing, state records, field checks, events.

Handlers raise InvalidTransaction with a message a person can act on for every bad input; any
other exception would surface as an INTERNAL_ERROR and be retried, which a bad payload must
never cause.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Iterable, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.block_info import CONFIG_ADDRESS, block_info_address, latest_block_timestamp, read_block_info_config
from trustmesh.ledger.processor import AuthorizationError, InvalidTransaction

from . import layout

HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
PUBLIC_KEY = re.compile(r"\A0[23][0-9a-f]{64}\Z")
IDENTIFIER = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_PAYLOAD_BYTES = 64 * 1024  # definitions and digests only; blobs live off-chain
MAX_RECORD_BYTES = 10 * 1024 * 1024  # a state record as read back (a round of 10,000 is well inside)


def shown(value: Any, limit: int = 80) -> str:
    """A value for an error message: bounded, and safe for integers too long to print."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except ValueError:  # a huge integer inside a container
        return f"a {type(value).__name__} too large to show"
    return text if len(text) <= limit else text[:limit] + "…"


def check_fields(body: Mapping, allowed: Iterable[str], where: str = "payload") -> None:
    """Refuse unknown fields, so a typo or a smuggled field never passes silently."""
    allowed = frozenset(allowed)
    unknown = sorted(shown(k) for k in body if k not in allowed)  # keys may be any CBOR type
    if unknown:
        raise InvalidTransaction(
            f"{where} has unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
        )


def signer_of(transaction) -> str:
    return transaction.header.signer_public_key


def parse_payload(transaction, actions: Iterable[str]) -> tuple[str, dict]:
    """Decode a canonical-CBOR map {"action": ..., ...}; return (action, the map)."""
    try:
        body = cbor.decode(transaction.payload, max_bytes=MAX_PAYLOAD_BYTES)
    except cbor.PayloadError as exc:
        raise InvalidTransaction(str(exc)) from None
    if not isinstance(body, dict):
        raise InvalidTransaction("payload must be a CBOR map with an 'action' field")
    action = body.get("action")
    allowed = sorted(actions)
    if action not in allowed:
        raise InvalidTransaction(f"action must be one of {', '.join(allowed)}; got {shown(action)}")
    return action, body


def require(body: Mapping, name: str, kind: type | tuple, *, where: str = "payload") -> Any:
    """A present field of the given type (bool is never accepted as int)."""
    if name not in body:
        raise InvalidTransaction(f"{where} lacks the required field {name!r}")
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise InvalidTransaction(f"{where} field {name!r} must be {_names(kinds)}, not a boolean")
    if not isinstance(value, kinds):
        raise InvalidTransaction(f"{where} field {name!r} must be {_names(kinds)}, got {type(value).__name__}")
    return value


def require_match(body: Mapping, name: str, pattern: re.Pattern, what: str, *, where: str = "payload") -> str:
    value = require(body, name, str, where=where)
    if not pattern.match(value):
        raise InvalidTransaction(f"{where} field {name!r} must be {what}; got {shown(value)}")
    return value


def require_int(body: Mapping, name: str, low: int, high: int, *, where: str = "payload") -> int:
    value = require(body, name, int, where=where)
    if not low <= value <= high:
        raise InvalidTransaction(f"{where} field {name!r} must be between {low} and {high}; got {shown(value)}")
    return value


def _names(kinds) -> str:
    names = {str: "a string", int: "an integer", float: "a number", dict: "a map", list: "a list",
             bytes: "bytes", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


async def _stored(context, address: str) -> bytes | None:
    """The bytes stored at `address`, or None where nothing is."""
    return (await context.get_state([address])).get(address)


async def read_record(context, address: str) -> dict | None:
    """A state record written by these families, or None where nothing is stored."""
    data = await _stored(context, address)
    return None if data is None else cbor.decode_record(data, max_bytes=MAX_RECORD_BYTES)


_LOOKED_AT: "OrderedDict[bytes, Any]" = OrderedDict()  # stored bytes -> decoded, for read_record_to_look_at
_LOOKED_AT_KEPT = 8


async def read_record_to_look_at(context, address: str) -> Mapping | None:
    """read_record for a rule that only looks at the record and never changes it: the same
    stored bytes are decoded once for every transaction that reads them. A round's result (~150 KB
    at 1,000 participants) is read by the lineage rule of each of the next round's 1,000 reports.
    Deterministic: what comes back depends on the stored bytes alone."""
    data = await _stored(context, address)
    if data is None:
        return None
    record = _LOOKED_AT.get(data)
    if record is None:
        record = _LOOKED_AT[data] = cbor.decode_record(data, max_bytes=MAX_RECORD_BYTES)
        while len(_LOOKED_AT) > _LOOKED_AT_KEPT:
            _LOOKED_AT.popitem(last=False)
    return record


async def read_records(context, addresses: list[str]) -> dict[str, dict]:
    found = await context.get_state(addresses)
    return {a: cbor.decode_record(v, max_bytes=MAX_RECORD_BYTES) for a, v in found.items()}


async def write_records(context, records: Mapping[str, Any]) -> None:
    await context.set_state({a: cbor.encode(r) for a, r in records.items()})


async def chain_time(context) -> int:
    """Agreed time of the block being built (BlockInfo); never this machine's clock. A
    transaction that forgot BLOCK_INFO_NS in its inputs is told so."""
    try:
        timestamp = await latest_block_timestamp(context)
    except AuthorizationError:
        raise InvalidTransaction(
            f"this action reads the agreed block time (BlockInfo): list the namespace "
            f"{layout.BLOCK_INFO_NS} in the transaction's inputs (the make_*_transaction helpers do)"
        ) from None
    if timestamp is None:
        raise InvalidTransaction(
            "no BlockInfo on chain: the validator must inject BlockInfo (batch injector block_info) "
            "for round clocks and deadlines"
        )
    return timestamp


CLOCK_CONFIG_ADDRESS = CONFIG_ADDRESS  # chain_time's first read: a rule may prefetch it with its own


async def prefetch(context, addresses: list[str]) -> None:
    """Read `addresses` in one request where the context can (the processor's Context: each
    request is a round trip through the validator); a context that cannot, e.g. a dict in a
    test, is read as the rule goes."""
    ahead = getattr(context, "prefetch", None)
    if ahead is not None and addresses:
        await ahead(addresses)


async def clock_address(context) -> list[str]:
    """chain_time's second read (the head's BlockInfo), to prefetch with a rule's next reads;
    none where the config is missing or not readable (chain_time then says why)."""
    try:
        config = await read_block_info_config(context)
    except AuthorizationError:
        return []
    return [] if config is None else [block_info_address(config.latest_block)]


async def emit(context, event_type: str, **attributes: Any) -> None:
    await context.add_event(event_type, [(k, str(v)) for k, v in sorted(attributes.items())])
