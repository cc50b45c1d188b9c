"""Checks a submitted batch must pass before it may wait for a block.

The same rules a Sawtooth 1.2 validator applies on receipt (structure and signature
verifiers), each failure named in words a client author can act on.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

from .. import protos as pb
from ..addressing import is_address_prefix
from ..signing import PublicKey, SigningError


class BatchRejected(ValueError):
    """The batch breaks a rule; str() says which, and which transaction if one is at fault."""

    def __init__(self, message: str, transaction_id: str = ""):
        super().__init__(message)
        self.transaction_id = transaction_id


@dataclass(frozen=True)
class Limits:
    max_transactions_per_batch: int = 1000
    max_payload_bytes: int = 1024 * 1024  # per transaction; bigger data goes off-chain


@dataclass(frozen=True)
class CheckedBatch:
    """A batch with its headers parsed once, so later stages never parse them again."""

    batch: "pb.Batch"
    header: "pb.BatchHeader"
    txn_headers: tuple

    @property
    def id(self) -> str:
        return self.batch.header_signature


@functools.lru_cache(maxsize=1024)
def _public_key(public_key_hex: str) -> "PublicKey | None":
    """Parsed once per signer: decompressing a secp256k1 point costs a sixth of a verify, and a
    client signs its batches and their transactions with the same few keys."""
    try:
        return PublicKey.from_hex(public_key_hex)
    except SigningError:
        return None


def _verify(public_key_hex: str, signature_hex: str, message: bytes) -> bool:
    key = _public_key(public_key_hex)
    return key is not None and key.verify(signature_hex, message)


def _parse(cls, data: bytes, what: str):
    try:
        return cls.FromString(data)
    except Exception:
        raise BatchRejected(f"{what} is not a valid {cls.__name__} protobuf") from None


def check_batch(batch: "pb.Batch", limits: Limits = Limits()) -> CheckedBatch:
    batch_id = batch.header_signature
    header_bytes = batch.header
    header = _parse(pb.BatchHeader, header_bytes, f"batch {batch_id[:16]} header")
    if not _verify(header.signer_public_key, batch_id, header_bytes):
        raise BatchRejected(f"batch {batch_id[:16]}: header_signature does not verify with signer_public_key")
    if not batch.transactions:
        raise BatchRejected(f"batch {batch_id[:16]} holds no transactions")
    if len(batch.transactions) > limits.max_transactions_per_batch:
        raise BatchRejected(
            f"batch {batch_id[:16]} holds {len(batch.transactions)} transactions; "
            f"the limit is {limits.max_transactions_per_batch}"
        )
    ids = list(header.transaction_ids)
    if len(ids) != len(set(ids)):
        raise BatchRejected(f"batch {batch_id[:16]} lists the same transaction twice")
    if ids != [t.header_signature for t in batch.transactions]:
        raise BatchRejected(
            f"batch {batch_id[:16]}: header transaction_ids do not match the transactions in order"
        )
    return CheckedBatch(batch, header, tuple(_check_transaction(t, header, limits) for t in batch.transactions))


def check_batches(batches, limits: Limits = Limits()) -> list:
    """check_batch for each: its CheckedBatch, or the BatchRejected it raised. Safe on a worker
    thread, where the signature checks (most of the cost) run without the GIL."""
    results = []
    for batch in batches:
        try:
            results.append(check_batch(batch, limits))
        except BatchRejected as exc:
            results.append(exc)
    return results


def _check_transaction(txn: "pb.Transaction", batch_header: "pb.BatchHeader", limits: Limits):
    txn_id = txn.header_signature
    short = txn_id[:16]
    header_bytes, payload = txn.header, txn.payload  # each read of a bytes field copies it
    header = _parse(pb.TransactionHeader, header_bytes, f"transaction {short} header")
    if not _verify(header.signer_public_key, txn_id, header_bytes):
        raise BatchRejected(f"transaction {short}: header_signature does not verify with signer_public_key", txn_id)
    if len(payload) > limits.max_payload_bytes:
        raise BatchRejected(
            f"transaction {short}: payload is {len(payload)} bytes; the limit is "
            f"{limits.max_payload_bytes} (store large data off-chain and put its sha256 on chain)",
            txn_id,
        )
    if hashlib.sha512(payload).hexdigest() != header.payload_sha512:
        raise BatchRejected(f"transaction {short}: payload does not match payload_sha512 (tampered or truncated)", txn_id)
    if header.batcher_public_key != batch_header.signer_public_key:
        raise BatchRejected(f"transaction {short}: batcher_public_key is not the batch's signer", txn_id)
    if not header.family_name or not header.family_version:
        raise BatchRejected(f"transaction {short}: family_name and family_version are required", txn_id)
    for field in ("inputs", "outputs"):
        for prefix in getattr(header, field):
            if not is_address_prefix(prefix):
                raise BatchRejected(
                    f"transaction {short}: {field} entry {prefix!r} is not a lowercase hex address prefix of at most 70 characters",
                    txn_id,
                )
    if any(not dep for dep in header.dependencies):
        raise BatchRejected(f"transaction {short}: empty dependency id", txn_id)
    return header
