"""Reading Sawtooth 1.2's `block_info` state: the agreed time of the block a transaction runs in.

The processor side of the block_info family (the validator side, its injector and state
transition, is ledger/devnet/block_info.py; a real network runs sawtooth's block-info-tp). The
state it reads:

    00b10c01 + 62 zeros            BlockInfoConfig (latest_block, oldest_block, target_count, sync_tolerance)
    00b10c00 + {block_num:062x}    BlockInfo of that block

A family that needs time declares `NAMESPACE` in its transactions' inputs and calls
`latest_block_timestamp(context)`: every validator computes the same value, unlike its clock.
"""

from __future__ import annotations

import inspect
from typing import Any

from google.protobuf.message import DecodeError

from trustmesh.ledger import protos as pb
from trustmesh.ledger.processor import InternalError

FAMILY_NAME = "block_info"
FAMILY_VERSION = "1.0"
NAMESPACE = "00b10c"
BLOCK_INFO_NAMESPACE = NAMESPACE + "00"
CONFIG_ADDRESS = NAMESPACE + "01" + "0" * 62
DEFAULT_TARGET_COUNT = 256
DEFAULT_SYNC_TOLERANCE = 60 * 5  # seconds
NULL_BLOCK_ID = "0000000000000000"  # previous_block_id of the genesis block


class BlockInfoStateError(InternalError):
    """State under 00b10c is missing or undecodable where it must exist.

    An InternalError as in the reference: the validator's fault, not the transaction's.
    """


def check_u64(name: str, value: int) -> None:
    """Block numbers and the like are unsigned 64-bit integers on the wire."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < 1 << 64:
        raise ValueError(f"{name} must fit in an unsigned 64-bit integer, got {value}")


def block_info_address(block_num: int) -> str:
    """Where the BlockInfo of block `block_num` is stored."""
    check_u64("block_num", block_num)
    return f"{BLOCK_INFO_NAMESPACE}{block_num:062x}"


async def read_block_info_config(source: Any) -> "pb.BlockInfoConfig | None":
    """The stored BlockInfoConfig, or None before the first block_info transaction.

    `source` is a processor Context (anything with `get_state(addresses)`) or a bare
    `get(addresses) -> {address: bytes}` callable; either may be sync or async.
    """
    data = await _get_one(source, CONFIG_ADDRESS)
    if data is None:
        return None
    try:
        config = pb.BlockInfoConfig.FromString(data)
    except DecodeError:
        raise BlockInfoStateError(f"BlockInfoConfig at {CONFIG_ADDRESS} is not decodable") from None
    # Zero means "default" in the reference's reader too.
    return pb.BlockInfoConfig(
        latest_block=config.latest_block,
        oldest_block=config.oldest_block,
        target_count=config.target_count or DEFAULT_TARGET_COUNT,
        sync_tolerance=config.sync_tolerance or DEFAULT_SYNC_TOLERANCE,
    )


async def read_block_info(source: Any, block_num: int) -> "pb.BlockInfo | None":
    """The stored BlockInfo of `block_num`, or None if it was never stored or already pruned."""
    address = block_info_address(block_num)
    data = await _get_one(source, address)
    if data is None:
        return None
    try:
        return pb.BlockInfo.FromString(data)
    except DecodeError:
        raise BlockInfoStateError(f"BlockInfo of block {block_num} at {address} is not decodable") from None


async def read_latest_block_info(source: Any) -> "pb.BlockInfo | None":
    """BlockInfo of the chain head this block builds on; None if block_info never ran."""
    config = await read_block_info_config(source)
    if config is None:
        return None
    info = await read_block_info(source, config.latest_block)
    if info is None:
        raise BlockInfoStateError(f"config names block {config.latest_block} as latest, but its BlockInfo is missing")
    return info


async def latest_block_timestamp(source: Any) -> int | None:
    """The agreed time (Unix seconds) at which the current block was built.

    In a transaction of block N this is the timestamp the injector stamped at the start of
    block N, stored with the BlockInfo of block N-1. Every node computes the same value, unlike
    its own clock. None if the chain has no block_info yet (injector not enabled).
    """
    info = await read_latest_block_info(source)
    return None if info is None else info.timestamp


async def _get_one(source: Any, address: str) -> bytes | None:
    getter = getattr(source, "get_state", source)
    result = getter([address])
    if inspect.isawaitable(result):
        result = await result
    return result.get(address)
