"""Canonical CBOR payloads: one byte string per value, so every validator hashes the same bytes.

Canonical here is RFC 8949 §4.2.1 core deterministic encoding (shortest integers and floats,
definite lengths, map keys sorted by their encoded bytes) as cbor2 writes it with
``canonical=True``. Decoding insists the input is already canonical: a payload that
re-encodes differently is refused, so two encodings of one value can never both be signed.
"""

from __future__ import annotations

from typing import Any

import cbor2

MAX_PAYLOAD_BYTES = 256 * 1024  # larger data belongs off-chain, named by its sha256


class PayloadError(ValueError):
    """A payload that is not canonical CBOR of the expected shape; the message says why."""


def encode(value: Any) -> bytes:
    try:
        return cbor2.dumps(value, canonical=True)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise PayloadError(f"value cannot be encoded as CBOR: {exc}") from None


def decode(data: bytes, *, max_bytes: int = MAX_PAYLOAD_BYTES) -> Any:
    if len(data) > max_bytes:
        raise PayloadError(f"payload is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise PayloadError("payload is empty; expected canonical CBOR")
    try:
        value = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise PayloadError(f"payload is not valid CBOR: {exc}") from None
    try:
        again = cbor2.dumps(value, canonical=True)
    except Exception:
        raise PayloadError("payload holds a CBOR value that has no canonical form here") from None
    if again != data:
        raise PayloadError("payload is CBOR but not canonical (RFC 8949 deterministic encoding)")
    return value


def decode_record(data: bytes, *, max_bytes: int) -> Any:
    """A state record these families wrote (with encode): decoded without decode()'s canonical
    re-encoding check, which is for what a signer sends. State holds only what processors wrote
    through encode(), and a round record of a thousand submissions is re-read on every one of
    them: the check would double the cost of each read. Malformed bytes still raise PayloadError."""
    if len(data) > max_bytes:
        raise PayloadError(f"record is {len(data)} bytes; the limit is {max_bytes}")
    try:
        return cbor2.loads(data)
    except Exception as exc:  # cbor2 raises several types for malformed input
        raise PayloadError(f"record is not valid CBOR: {exc}") from None
