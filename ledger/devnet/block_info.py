"""Sawtooth 1.2's `block_info` family: the validator-side injector and the state transition.

Every block the dev validator builds starts with one batch holding one `block_info` 1.0
transaction that records the *previous* block (the chain head being built on) plus the time the
new block was built. The handler keeps the last `target_count` (+1) of those records in state:

    00b10c01 + 62 zeros            BlockInfoConfig (latest_block, oldest_block, target_count, sync_tolerance)
    00b10c00 + {block_num:062x}    BlockInfo of that block

Other families read them (declare `NAMESPACE` in the transaction's inputs) to learn the agreed
time of the block they run in: `latest_block_timestamp(context)`, in ledger/block_info.py, the
processor side (re-exported here).

Wire format, addresses, header fields and validation rules follow sawtooth-core 1-2
(validator/.../block_info_injector.py, families/block_info), so state roots match a real network.

Determinism: the reference handler also rejects a timestamp more than `sync_tolerance` seconds
ahead of the *validating node's wall clock*. Whether a block passes that check depends on when it
is validated, so `BlockInfoHandler()` leaves it out and stays a pure function of payload and
state. The check only ever goes from invalid to valid as time passes, so it belongs where a block
is first accepted, not in replay: call `check_timestamp_not_ahead(...)` there (or, for exact
reference behaviour, build the handler with `clock=time.time` and accept the non-determinism).
"""

from __future__ import annotations

import hashlib
import re
from typing import Callable

from google.protobuf.message import DecodeError

from trustmesh.ledger import protos as pb
from trustmesh.ledger.block_info import check_u64 as _check_u64
from trustmesh.ledger.block_info import (BLOCK_INFO_NAMESPACE, CONFIG_ADDRESS, DEFAULT_SYNC_TOLERANCE,  # noqa: F401 (re-exported)
                                        DEFAULT_TARGET_COUNT, FAMILY_NAME, FAMILY_VERSION, NAMESPACE, NULL_BLOCK_ID,
                                        BlockInfoStateError, block_info_address, latest_block_timestamp,
                                        read_block_info, read_block_info_config, read_latest_block_info)
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.processor import InvalidTransaction, TransactionHandler
from trustmesh.ledger.signing import PrivateKey

_SIGNATURE_HEX = re.compile(r"[0-9a-fA-F]{128}")  # the reference's hex::decode takes both cases
_PUBLIC_KEY_HEX = re.compile(r"[0-9a-fA-F]{66}")


# --------------------------------------------------------------------------- injector


def block_info_of(previous_block: "pb.Block", timestamp: int) -> "pb.BlockInfo":
    """The BlockInfo the next block records about `previous_block`, stamped `timestamp`."""
    _check_u64("timestamp", timestamp)
    header = pb.BlockHeader.FromString(previous_block.header)
    return pb.BlockInfo(
        block_num=header.block_num,
        previous_block_id=header.previous_block_id,
        signer_public_key=header.signer_public_key,
        header_signature=previous_block.header_signature,
        timestamp=timestamp,
    )


def make_block_info_batch(
    signer: PrivateKey,
    previous_block: "pb.Block",
    timestamp: int,
    *,
    target_count: int = 0,
    sync_tolerance: int = 0,
) -> "pb.Batch":
    """The batch to put first in the block built on `previous_block` (the current chain head).

    `timestamp` is the validator's clock in whole Unix seconds when it starts the block. Like the
    reference injector we leave target_count/sync_tolerance at 0 ("unchanged"; the handler then
    uses 256/300 for a fresh chain), so the payload bytes are the reference's; pass non-zero
    values only to change the stored config.
    """
    _check_u64("target_count", target_count)
    _check_u64("sync_tolerance", sync_tolerance)
    payload = pb.BlockInfoTxn(
        block=block_info_of(previous_block, timestamp),
        target_count=target_count,
        sync_tolerance=sync_tolerance,
    ).SerializeToString()
    public_key = signer.public_key().as_hex()
    header = pb.TransactionHeader(
        family_name=FAMILY_NAME,
        family_version=FAMILY_VERSION,
        inputs=[CONFIG_ADDRESS, BLOCK_INFO_NAMESPACE],
        outputs=[CONFIG_ADDRESS, BLOCK_INFO_NAMESPACE],
        dependencies=[],
        nonce="",  # the reference sets none: the id is fixed by the previous block and time
        payload_sha512=hashlib.sha512(payload).hexdigest(),
        signer_public_key=public_key,
        batcher_public_key=public_key,
    ).SerializeToString()
    transaction = pb.Transaction(header=header, header_signature=signer.sign(header), payload=payload)
    return make_batch(signer, [transaction])


# --------------------------------------------------------------------------- handler


def check_timestamp_not_ahead(timestamp: int, sync_tolerance: int, now: float) -> None:
    """The reference's clock rule: a block may not claim a time beyond now + sync_tolerance."""
    now = int(now)  # the reference compares whole seconds
    if now + sync_tolerance < timestamp:
        raise InvalidTransaction(
            f"block timestamp {timestamp} is more than the sync tolerance of {sync_tolerance}s "
            f"ahead of this node's clock ({now}); fix the clock of the node that built the block "
            f"or of this node"
        )


def parse_payload(payload: bytes) -> "pb.BlockInfoTxn":
    """Decode and check a BlockInfoTxn as the reference's payload.rs does."""
    try:
        txn = pb.BlockInfoTxn.FromString(payload)
    except DecodeError as exc:
        raise InvalidTransaction(f"block_info payload is not a BlockInfoTxn protobuf: {exc}") from None
    block = txn.block
    if not (_SIGNATURE_HEX.fullmatch(block.previous_block_id) or block.previous_block_id == NULL_BLOCK_ID):
        raise InvalidTransaction(
            f"invalid previous_block_id {block.previous_block_id!r}: expected a 128-hex-character "
            f"block id or {NULL_BLOCK_ID!r} for the genesis block"
        )
    if not _PUBLIC_KEY_HEX.fullmatch(block.signer_public_key):
        raise InvalidTransaction(
            f"invalid signer_public_key {block.signer_public_key!r}: expected a 66-hex-character "
            f"compressed public key"
        )
    if not _SIGNATURE_HEX.fullmatch(block.header_signature):
        raise InvalidTransaction(
            f"invalid header_signature {block.header_signature!r}: expected the 128-hex-character block id"
        )
    return txn


class BlockInfoHandler(TransactionHandler):
    """handler.rs of sawtooth-core 1-2, check for check and write for write. Emits no events."""

    family_name = FAMILY_NAME
    family_versions = [FAMILY_VERSION]
    namespaces = [NAMESPACE]

    def __init__(self, clock: Callable[[], float] | None = None):
        # None (the default) keeps apply() deterministic; see the module docstring.
        self._clock = clock

    async def apply(self, transaction: "pb.TpProcessRequest", context) -> None:
        txn = parse_payload(transaction.payload)
        # Rebuilt field by field (as the reference's structs do) so unknown fields in the payload
        # never reach state and the stored bytes match the reference's.
        block = pb.BlockInfo(
            block_num=txn.block.block_num,
            previous_block_id=txn.block.previous_block_id,
            signer_public_key=txn.block.signer_public_key,
            header_signature=txn.block.header_signature,
            timestamp=txn.block.timestamp,
        )
        config = await read_block_info_config(context)

        if config is None:  # first block_info transaction of the chain
            config = pb.BlockInfoConfig(
                latest_block=block.block_num,
                oldest_block=block.block_num,
                target_count=txn.target_count or DEFAULT_TARGET_COUNT,
                sync_tolerance=txn.sync_tolerance or DEFAULT_SYNC_TOLERANCE,
            )
            self._check_clock(block.timestamp, config.sync_tolerance)
        else:
            if txn.target_count:
                config.target_count = txn.target_count
            if txn.sync_tolerance:
                config.sync_tolerance = txn.sync_tolerance
            expected = config.latest_block + 1
            if block.block_num != expected:
                raise InvalidTransaction(
                    f"block_num is {block.block_num}, but the next block after the latest one in "
                    f"block_info state ({config.latest_block}) is {expected}; the BlockInfo must "
                    f"describe the current chain head"
                )
            self._check_clock(block.timestamp, config.sync_tolerance)
            previous = await read_block_info(context, config.latest_block)
            if previous is None:
                raise BlockInfoStateError(
                    f"config and state out of sync: latest block {config.latest_block} not found in state"
                )
            if previous.block_num != config.latest_block:
                raise BlockInfoStateError(
                    f"config and state out of sync: entry for block {config.latest_block} "
                    f"holds block {previous.block_num}"
                )
            if block.previous_block_id != previous.header_signature:
                raise InvalidTransaction(
                    f"previous_block_id {block.previous_block_id} does not match the id of block "
                    f"{previous.block_num} stored in state ({previous.header_signature}); the "
                    f"BlockInfo must extend the stored chain"
                )
            if block.timestamp < previous.timestamp:  # equal is allowed, as in the reference
                raise InvalidTransaction(
                    f"timestamp {block.timestamp} is earlier than the previous block's "
                    f"{previous.timestamp}; block timestamps may not go backwards"
                )

        await _store(context, config, block)

    def _check_clock(self, timestamp: int, sync_tolerance: int) -> None:
        if self._clock is not None:
            check_timestamp_not_ahead(timestamp, sync_tolerance, self._clock())


async def _store(context, config: "pb.BlockInfoConfig", block: "pb.BlockInfo") -> None:
    """Prune beyond target_count, then write the config and the new BlockInfo (state.rs)."""
    oldest = config.oldest_block
    deletes = []
    # The reference keeps target_count + 1 entries: it prunes while the span exceeds target_count.
    while block.block_num - oldest > config.target_count:
        deletes.append(block_info_address(oldest))
        oldest += 1
    config.oldest_block = oldest
    config.latest_block = block.block_num

    if deletes:
        deleted = await context.delete_state(deletes)
        if len(deleted) != len(deletes):
            raise BlockInfoStateError(
                f"expected to prune {len(deletes)} old BlockInfo entries, state deleted {len(deleted)}"
            )
    await context.set_state(
        {
            CONFIG_ADDRESS: config.SerializeToString(),
            block_info_address(block.block_num): block.SerializeToString(),
        }
    )


