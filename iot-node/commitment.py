"""What an IoT node submits when it trains on its own data (federation.train_on "iot").

Its data never leaves the node, not even sealed. It stores a small commitment blob instead and
submits that blob's sha256, so the round's record, preprocess's availability check and the audit
work as for a data bundle. When it trains, the node checks that its data is still the data it
committed to: the update the chain records was trained on what the submission promised.

Blob: canonical CBOR {"v": 1, "format": "local-commitment-v1", "schedule_id", "node", "samples",
"data_sha256"} (sha256 of the node's npz bytes). No data, so nothing to encrypt.
"""

from __future__ import annotations

import hashlib

from trustmesh.ledger import payload as cbor

FORMAT = "local-commitment-v1"  # the submission's metadata "format"
VERSION = 1
MAX_COMMITMENT_BYTES = 4096  # a few short fields; anything larger is not a commitment


class CommitmentError(ValueError):
    """The commitment does not match this node, this round or this node's data; says which."""


def make_commitment(data: bytes, samples: int, *, schedule_id: str, node: str) -> bytes:
    """The blob for `data` (npz bytes holding `samples` samples) in round `schedule_id`."""
    return cbor.encode({"v": VERSION, "format": FORMAT, "schedule_id": schedule_id, "node": node,
                        "samples": int(samples), "data_sha256": hashlib.sha256(data).hexdigest()})


def check_commitment(blob: bytes, data: bytes, samples: int, *, schedule_id: str, node: str) -> None:
    """Raise CommitmentError unless `blob` commits `node` to exactly `data` in `schedule_id`."""
    try:
        body = cbor.decode(blob, max_bytes=MAX_COMMITMENT_BYTES)
    except cbor.PayloadError as exc:
        raise CommitmentError(f"the submitted commitment is malformed: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != VERSION or body.get("format") != FORMAT:
        raise CommitmentError(f"the submission is not a {FORMAT} commitment (a data bundle? then "
                              f"the workflow's train_on changed after the round opened)")
    if body.get("schedule_id") != schedule_id or body.get("node") != node:
        raise CommitmentError(f"the commitment belongs to node {str(body.get('node'))[:16]}… in round "
                              f"{str(body.get('schedule_id'))[:16]}…, not to this node and round")
    if body.get("data_sha256") != hashlib.sha256(data).hexdigest() or body.get("samples") != samples:
        raise CommitmentError(f"this node's data changed since it submitted ({body.get('samples')} samples "
                              f"committed, {samples} now, or the same count with other values); "
                              f"the round must train on what was committed")
