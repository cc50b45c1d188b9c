"""An IoT node's data for one round, sealed separately for every registered compute node.

Which compute node trains on a submission is decided on chain only after the round is ready, so
the IoT node seals its data for each registered compute node (data_envelope: X25519 + AES-GCM,
bound to the round and both node ids) and stores one bundle, whose sha256 is the digest it
submits. The assigned node opens only its own envelope. No store ever sees plaintext.

Bundle: canonical CBOR {"v": 1, "envelopes": {compute node key: envelope bytes}}.
"""

from __future__ import annotations

from typing import Mapping

from trustmesh.ledger import payload as cbor

from .data_envelope import EnvelopeError, open_envelope, seal

BUNDLE_VERSION = 1
MAX_BUNDLE_BYTES = 64 * 1024 * 1024


class BundleError(EnvelopeError):
    pass


def seal_bundle(data: bytes, recipients: Mapping[str, str], *, schedule_id: str, sender: str) -> bytes:
    """recipients: compute node key -> its X25519 public key (64 hex, from the peer registry)."""
    if not recipients:
        raise BundleError("no compute node is registered: nobody could open the data; register one first")
    envelopes = {node: seal(data, public_key, schedule_id=schedule_id, sender=sender, recipient=node)
                 for node, public_key in sorted(recipients.items())}
    return cbor.encode({"v": BUNDLE_VERSION, "envelopes": envelopes})


def open_bundle(bundle: bytes, private_key, *, node: str, schedule_id: str, sender: str) -> bytes:
    try:
        body = cbor.decode(bundle, max_bytes=MAX_BUNDLE_BYTES)
    except cbor.PayloadError as exc:
        raise BundleError(f"data bundle is malformed: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != BUNDLE_VERSION or not isinstance(body.get("envelopes"), dict):
        raise BundleError(f"not a version-{BUNDLE_VERSION} data bundle")
    envelope = body["envelopes"].get(node)
    if envelope is None:
        raise BundleError(
            f"the data bundle holds no envelope for compute node {node[:16]}…: it registered after the "
            f"IoT node {sender[:16]}… submitted; the task must go to a node that was registered then"
        )
    return open_envelope(envelope, private_key, schedule_id=schedule_id, sender=sender, recipient=node)
