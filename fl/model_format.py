"""The stored model format: a canonical safetensors file of float32 tensors.

Every model that leaves a compute node (a local update, a global model) is these bytes, named
by `digest(blob)` (sha256 hex) on chain and in Redis / CouchDB. An auditor re-derives the digest
from the stored bytes, and from a recomputed aggregate by calling `serialize` again, so the
bytes must be a function of (tensors, metadata) alone.

Layout (the safetensors format, https://huggingface.co/docs/safetensors):

    8 bytes     N, unsigned little-endian: length of the header
    N bytes     header, ASCII JSON, right-padded with spaces so that 8 + N is a multiple of 8
    data        each tensor's float32 values, little-endian, row-major, in header order

Header, canonical (no spaces, ASCII escapes, metadata keys sorted, tensors in state order,
each entry's keys in this order):

    {"__metadata__":{"format":"pt","model_spec_sha256":"<64 hex>","round":"<int>",
                     "trustmesh":"model/1","workflow_id":"<id>"},
     "<name>":{"dtype":"F32","shape":[...],"data_offsets":[begin,end]}, ...}

We write the header ourselves because safetensors.torch.save orders `__metadata__` keys
differently from one process to the next (a Rust HashMap), which would change the digest.
Any safetensors reader loads our files (tests check it). `load` accepts only canonical blobs
(it re-serializes and compares), so one model has exactly one digest.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections import OrderedDict
from typing import Any, Mapping, NamedTuple

import numpy as np

from trustmesh.scheduling.common import HEX64, IDENTIFIER

# torch and models.py (which needs it) are imported where tensors are made or checked: `verify`
# and `read_metadata` run without them, so a node that only checks models (an IoT node) starts
# without paying ~3 s and ~300 MB for torch.

FORMAT_TAG = "model/1"
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_ROUND = 2**53  # exact as a CBOR/JSON number on chain
_RESERVED = "__metadata__"
_DECIMAL = re.compile(r"\A(0|[1-9][0-9]{0,15})\Z")


class ModelFormatError(ValueError):
    """Bytes that are not a canonical TrustMesh model file."""


class DigestMismatchError(ModelFormatError):
    """The bytes do not hash to the digest the chain recorded for them."""


class SpecMismatchError(ModelFormatError):
    """A well-formed model file for another architecture than the one expected."""


class LoadedModel(NamedTuple):
    state: OrderedDict  # name -> float32 tensor, in the spec's state_dict order
    workflow_id: str
    round: int
    model_spec_sha256: str


def digest(blob: bytes) -> str:
    """sha256 hex of the bytes: the name of a stored model on chain and off chain."""
    return hashlib.sha256(blob).hexdigest()


def serialize(state: Mapping[str, "torch.Tensor"], *, workflow_id: str, round: int, model_spec: Mapping) -> bytes:
    """Canonical safetensors bytes of `state` (checked against `model_spec`) with its metadata."""
    from .models import StateMismatchError, check_state, spec_digest

    _check_workflow_id(workflow_id)
    _check_round(round)
    try:
        ordered = check_state(model_spec, state)
    except StateMismatchError as exc:
        raise SpecMismatchError(f"cannot serialize: {exc}") from None
    metadata = {"model_spec_sha256": spec_digest(model_spec), "round": str(round), "workflow_id": workflow_id}
    return _encode_arrays({name: t.detach().cpu().numpy() for name, t in ordered.items()}, metadata)


def verify(blob: bytes, expected_digest: str, model_spec: Mapping, *, workflow_id: str | None = None,
           round: int | None = None) -> dict[str, str]:
    """The metadata of `blob`, after the checks that need no torch: the digest, the canonical
    format, the spec's digest (and workflow_id / round when given). `load` checks these too,
    then that the tensors fit the architecture, for a node that will use them."""
    metadata, _ = _checked(blob, expected_digest, model_spec, workflow_id, round)
    return metadata


def load(blob: bytes, expected_digest: str, model_spec: Mapping, *, workflow_id: str | None = None,
         round: int | None = None) -> LoadedModel:
    """The state in `blob`, after checking, in this order: the digest, the format, the spec.

    `expected_digest` is the digest recorded on chain; readers always pass it (a store is not
    trusted). `workflow_id` / `round`, when given, must match the metadata too.
    """
    import torch

    from .models import StateMismatchError, check_state

    metadata, arrays = _checked(blob, expected_digest, model_spec, workflow_id, round)
    state = OrderedDict((name, torch.from_numpy(array)) for name, array in arrays.items())
    try:
        state = check_state(model_spec, state)
    except StateMismatchError as exc:
        raise SpecMismatchError(str(exc)) from None
    return LoadedModel(state, metadata["workflow_id"], int(metadata["round"]), metadata["model_spec_sha256"])


def _checked(blob, expected_digest, model_spec, workflow_id, round) -> tuple[dict[str, str], OrderedDict]:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ModelFormatError(f"a model blob must be bytes, got {type(blob).__name__}")
    blob = bytes(blob)
    if not isinstance(expected_digest, str) or not HEX64.match(expected_digest):
        raise ModelFormatError(f"expected_digest must be 64 lowercase hex characters (a sha256); got {expected_digest!r}")
    actual = digest(blob)
    if actual != expected_digest:
        raise DigestMismatchError(
            f"model blob has sha256 {actual}, but {expected_digest} was expected: the stored bytes were "
            f"altered or belong to another model; fetch them again from another store or node"
        )
    metadata, arrays = _decode(blob)
    expected_spec = spec_sha256(model_spec)
    if metadata["model_spec_sha256"] != expected_spec:
        raise SpecMismatchError(
            f"model blob {actual[:16]}... was made for model spec {metadata['model_spec_sha256'][:16]}..., "
            f"not the expected spec {expected_spec[:16]}...; was the workflow's model changed?"
        )
    stored_round = int(metadata["round"])
    if workflow_id is not None and metadata["workflow_id"] != workflow_id:
        raise ModelFormatError(
            f"model blob belongs to workflow {metadata['workflow_id']!r}, not {workflow_id!r}"
        )
    if round is not None and stored_round != round:
        raise ModelFormatError(f"model blob belongs to round {stored_round}, not round {round}")
    return metadata, arrays


def spec_sha256(spec: Mapping) -> str:
    """sha256 hex of the spec as canonical JSON (sorted keys, no spaces): names the architecture.
    (models.spec_digest checks the spec against its model type first.)"""
    try:
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SpecMismatchError(f"model spec is not plain JSON: {exc}") from None
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_metadata(blob: bytes) -> dict[str, str]:
    """The header's metadata, for display and routing; never a substitute for `load`."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise ModelFormatError(f"a model blob must be bytes, got {type(blob).__name__}")
    return _decode(bytes(blob), with_data=False)[0]


# --------------------------------------------------------------------------- encoding


def _encode_arrays(arrays: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    meta = dict(metadata, format="pt", trustmesh=FORMAT_TAG)
    header: dict[str, Any] = {_RESERVED: {k: meta[k] for k in sorted(meta)}}
    chunks = []
    offset = 0
    for name, array in arrays.items():
        # '<f4' pins little-endian whatever the machine; C order = row-major.
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def _decode(blob: bytes, with_data: bool = True) -> tuple[dict[str, str], OrderedDict]:
    if len(blob) < 8:
        raise ModelFormatError(f"model blob is {len(blob)} bytes; a model file has at least an 8-byte header length")
    (size,) = struct.unpack_from("<Q", blob)
    if size > MAX_HEADER_BYTES or 8 + size > len(blob):
        raise ModelFormatError(
            f"model blob declares a {size}-byte header but holds {len(blob) - 8} bytes after the length"
            f" (limit {MAX_HEADER_BYTES}); it is truncated or not a safetensors file"
        )
    try:
        header = json.loads(blob[8:8 + size].decode("ascii"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"model blob header is not ASCII JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get(_RESERVED), dict):
        raise ModelFormatError("model blob header lacks __metadata__; it was not written by trustmesh")
    metadata = header.pop(_RESERVED)
    _check_metadata(metadata)
    if not with_data:
        return metadata, OrderedDict()
    data = blob[8 + size:]
    arrays: OrderedDict[str, np.ndarray] = OrderedDict()
    for name, info in header.items():
        arrays[name] = _array(name, info, data)
    # Canonical form: one model, one byte string, one digest. Catches padding, key order,
    # gaps or trailing bytes, float64 rounding tricks: anything our writer would not produce.
    if _encode_arrays(arrays, {k: metadata[k] for k in ("model_spec_sha256", "round", "workflow_id")}) != blob:
        raise ModelFormatError(
            "model blob is a readable safetensors file but not in canonical TrustMesh form "
            "(header layout, tensor order, padding or trailing bytes differ); re-serialize it with "
            "trustmesh.fl.model_format.serialize"
        )
    return metadata, arrays


def _array(name: str, info: Any, data: bytes) -> np.ndarray:
    if not isinstance(info, dict) or info.get("dtype") != "F32":
        raise ModelFormatError(f"model blob tensor {name!r} must have dtype F32; got {info!r:.80}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise ModelFormatError(f"model blob tensor {name!r} has a malformed shape or data_offsets: {info!r:.120}")
    begin, end = offsets
    count = math.prod(shape)
    if not 0 <= begin <= end <= len(data) or end - begin != 4 * count:
        raise ModelFormatError(
            f"model blob tensor {name!r}: data_offsets {offsets} do not hold {count} float32 values "
            f"inside the {len(data)} data bytes"
        )
    values = np.frombuffer(data, dtype="<f4", count=count, offset=begin).astype(np.float32)
    return values.reshape(shape)


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _check_metadata(metadata: dict) -> None:
    want = {"format", "model_spec_sha256", "round", "trustmesh", "workflow_id"}
    if set(metadata) != want or not all(isinstance(v, str) for v in metadata.values()):
        raise ModelFormatError(
            f"model blob metadata must hold exactly {', '.join(sorted(want))} as strings; got {sorted(metadata)}"
        )
    if metadata["trustmesh"] != FORMAT_TAG:
        raise ModelFormatError(f"model blob is format {metadata['trustmesh']!r}; this reader knows {FORMAT_TAG!r}")
    if not HEX64.match(metadata["model_spec_sha256"]):
        raise ModelFormatError("model blob metadata model_spec_sha256 is not 64 lowercase hex")
    if not _DECIMAL.match(metadata["round"]) or int(metadata["round"]) > MAX_ROUND:
        raise ModelFormatError(f"model blob metadata round {metadata['round']!r:.40} is not a decimal integer")
    _check_workflow_id(metadata["workflow_id"])


def _check_workflow_id(workflow_id: Any) -> None:
    if not isinstance(workflow_id, str) or not IDENTIFIER.match(workflow_id):
        raise ModelFormatError(
            f"workflow_id must be an identifier (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or "
            f"digit); got {workflow_id!r:.80}"
        )


def _check_round(value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ROUND:
        raise ModelFormatError(f"round must be an integer between 0 and {MAX_ROUND}; got {value!r:.40}")
