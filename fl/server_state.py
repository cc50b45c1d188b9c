"""The stored form of a server optimizer's state (FedAvgM's momentum, FedAdam's m and v, ...).

A strategy that keeps state between rounds (Strategy.keeps_state) leaves it in this blob after
every round; the round result names it by sha256 (`server_state_digest`), so the next round's
aggregator, on any compute node, and the audit start from the same bits. Float64 throughout: the
state is never rounded to float32, so nothing is lost from one round to the next.

Canonical CBOR (ledger/payload.py: one encoding per value):

    {"format": "server-state/1", "strategy": <name>, "workflow_id": <id>, "round": <int>,
     "slots": {<slot>: {<parameter>: {"shape": [...], "f64": <little-endian float64 bytes>}}}}

`load` refuses bytes whose sha256 is not the digest the chain names, and non-canonical bytes.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: the processors never load it
    import torch

from trustmesh.ledger import payload as cbor

FORMAT_TAG = "server-state/1"
MAX_BYTES = 64 * 1024 * 1024  # the blob store's own limit (stores/blobs.py DEFAULT_MAX_BLOB_BYTES)


class ServerStateError(ValueError):
    """Bytes that are not the server state the chain names; the message says what differs."""


def serialize(slots: Mapping[str, Mapping[str, "torch.Tensor"]], *, strategy: str, workflow_id: str,
              round: int) -> bytes:
    """slots: slot name ("m", "v") -> parameter name -> float64 tensor."""
    import torch

    encoded = {}
    for slot, tensors in slots.items():
        encoded[slot] = {}
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float64:
                raise ServerStateError(f"server state {slot}/{name} must be a float64 tensor")
            array = tensor.detach().contiguous().numpy().astype("<f8", copy=False)
            encoded[slot][name] = {"shape": list(array.shape), "f64": array.tobytes()}
    return cbor.encode({"format": FORMAT_TAG, "strategy": strategy, "workflow_id": workflow_id,
                        "round": int(round), "slots": encoded})


def digest(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def load(blob: bytes, expected_digest: str, *, strategy: str) -> dict[str, dict[str, "torch.Tensor"]] | None:
    """The slots of a verified server-state blob, as float64 tensors; None when another strategy
    left it (a workflow whose new version changed its strategy starts that one afresh)."""
    import torch

    if digest(blob) != expected_digest:
        raise ServerStateError(f"server state does not hash to {expected_digest[:16]}…: digest mismatch")
    try:
        value: Any = cbor.decode(blob, max_bytes=MAX_BYTES)
    except cbor.PayloadError as exc:
        raise ServerStateError(f"server state is not canonical CBOR: {exc}") from None
    if not isinstance(value, dict) or value.get("format") != FORMAT_TAG:
        raise ServerStateError(f"server state is not in the {FORMAT_TAG} format")
    if value.get("strategy") != strategy:
        return None
    slots = {}
    for slot, tensors in (value.get("slots") or {}).items():
        slots[slot] = {}
        for name, entry in tensors.items():
            shape, data = entry.get("shape"), entry.get("f64")
            if not isinstance(data, bytes) or not isinstance(shape, list) or len(data) != 8 * int(np.prod(shape)):
                raise ServerStateError(f"server state {slot}/{name}: shape {shape!r} does not fit its data")
            slots[slot][name] = torch.from_numpy(np.frombuffer(data, dtype="<f8").reshape(shape).copy())
    return slots
