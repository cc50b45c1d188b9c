"""Signed transactions and batches, built the way a Sawtooth 1.2 validator checks them."""

from __future__ import annotations

import hashlib
import secrets
from typing import Iterable, Sequence

from . import protos as pb
from .signing import PrivateKey


def make_transaction(
    signer: PrivateKey,
    family_name: str,
    family_version: str,
    payload: bytes,
    inputs: Iterable[str],
    outputs: Iterable[str],
    *,
    dependencies: Iterable[str] = (),
    batcher_public_key: str | None = None,
    nonce: str | None = None,
) -> "pb.Transaction":
    """One transaction; the batcher defaults to the signer (the usual single-client case)."""
    signer_public_key = signer.public_key().as_hex()
    header = pb.TransactionHeader(
        family_name=family_name,
        family_version=family_version,
        inputs=list(inputs),
        outputs=list(outputs),
        dependencies=list(dependencies),
        nonce=nonce if nonce is not None else secrets.token_hex(16),
        payload_sha512=hashlib.sha512(payload).hexdigest(),
        signer_public_key=signer_public_key,
        batcher_public_key=batcher_public_key or signer_public_key,
    )
    header_bytes = header.SerializeToString()
    return pb.Transaction(header=header_bytes, header_signature=signer.sign(header_bytes), payload=payload)


def make_batch(signer: PrivateKey, transactions: Sequence["pb.Transaction"]) -> "pb.Batch":
    header = pb.BatchHeader(
        signer_public_key=signer.public_key().as_hex(),
        transaction_ids=[t.header_signature for t in transactions],
    )
    header_bytes = header.SerializeToString()
    return pb.Batch(header=header_bytes, header_signature=signer.sign(header_bytes), transactions=list(transactions))


def make_batch_list(batches: Iterable["pb.Batch"]) -> "pb.BatchList":
    return pb.BatchList(batches=list(batches))
