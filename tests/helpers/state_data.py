"""Deterministic state addresses and values for the Merkle-Radix and state-store tests."""

from __future__ import annotations

import hashlib


def addr(tag: str) -> str:
    """A 70-hex state address derived from `tag`."""
    return hashlib.sha512(tag.encode()).hexdigest()[:70]


def val(tag: str, n: int) -> bytes:
    """n bytes derived from `tag`."""
    return (hashlib.sha512(tag.encode()).digest() * (n // 64 + 1))[:n]
