"""Sawtooth state addresses: 70 hex characters, the first 6 the family's namespace."""

from __future__ import annotations

import hashlib
import re

ADDRESS_LENGTH = 70
NAMESPACE_LENGTH = 6
_HEX = re.compile(r"\A[0-9a-f]*\Z")


def namespace(family_name: str) -> str:
    """First 6 hex characters of sha512(family name), Sawtooth's convention."""
    return hashlib.sha512(family_name.encode()).hexdigest()[:NAMESPACE_LENGTH]


def make_address(prefix: str, *parts: str) -> str:
    """prefix + sha512 of the joined parts, cut to a full 70-character address."""
    if not is_hex(prefix) or len(prefix) >= ADDRESS_LENGTH:
        raise ValueError(f"address prefix must be lowercase hex shorter than {ADDRESS_LENGTH}")
    digest = hashlib.sha512("/".join(parts).encode()).hexdigest()
    return prefix + digest[: ADDRESS_LENGTH - len(prefix)]


def is_hex(text: str) -> bool:
    return bool(_HEX.match(text))


def is_address(text: str) -> bool:
    return len(text) == ADDRESS_LENGTH and is_hex(text)


def is_address_prefix(text: str) -> bool:
    """Inputs/outputs may name a whole subtree: any lowercase hex prefix up to 70 chars."""
    return len(text) <= ADDRESS_LENGTH and is_hex(text)


def covers(prefixes, address: str) -> bool:
    return any(address.startswith(p) for p in prefixes)
