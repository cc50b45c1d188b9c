"""The stored model format: canonical safetensors bytes, digests, verified loads."""

import json
import struct
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load

from trustmesh.fl import model_format as mf
from trustmesh.fl.models import build_model, parameter_count, spec_digest, state_of

torch.set_num_threads(1)

SPEC = {"type": "mlp", "input_dim": 4, "hidden": [3], "num_classes": 2}
DIGITS_SPEC = {"type": "mlp", "input_dim": 64, "hidden": [64, 32], "num_classes": 10}


def state(seed=1, spec=SPEC):
    return state_of(build_model(spec, seed=seed))


def blob_of(st=None, **kw):
    args = {"workflow_id": "wf-1", "round": 3, "model_spec": SPEC, **kw}
    return mf.serialize(state() if st is None else st, **args)


def test_round_trip_keeps_values_order_and_metadata():
    original = state()
    blob = blob_of(original)
    loaded = mf.load(blob, mf.digest(blob), SPEC, workflow_id="wf-1", round=3)
    assert list(loaded.state) == list(original) == ["layers.0.weight", "layers.0.bias",
                                                     "layers.1.weight", "layers.1.bias"]
    for name in original:
        assert loaded.state[name].dtype == torch.float32
        assert torch.equal(loaded.state[name], original[name])
    assert (loaded.workflow_id, loaded.round, loaded.model_spec_sha256) == ("wf-1", 3, spec_digest(SPEC))


def test_layout_is_the_documented_header_then_raw_float32():
    st = OrderedDict((k, torch.full(v.shape, 0.5)) for k, v in state().items())
    blob = blob_of(st)
    (size,) = struct.unpack_from("<Q", blob)
    assert (8 + size) % 8 == 0
    header = blob[8:8 + size].rstrip(b" ")
    expected = (
        '{"__metadata__":{"format":"pt","model_spec_sha256":"%s","round":"3","trustmesh":"model/1",'
        '"workflow_id":"wf-1"},'
        '"layers.0.weight":{"dtype":"F32","shape":[3,4],"data_offsets":[0,48]},'
        '"layers.0.bias":{"dtype":"F32","shape":[3],"data_offsets":[48,60]},'
        '"layers.1.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[60,84]},'
        '"layers.1.bias":{"dtype":"F32","shape":[2],"data_offsets":[84,92]}}' % spec_digest(SPEC)
    )
    assert header.decode() == expected
    # 4 bytes per parameter, little-endian float32 0.5 = 00 00 00 3f; no JSON weights
    assert blob[8 + size:] == b"\x00\x00\x00\x3f" * 23
    digits = mf.serialize(state(spec=DIGITS_SPEC), workflow_id="federated-digits", round=1, model_spec=DIGITS_SPEC)
    assert len(digits) - 8 - struct.unpack_from("<Q", digits)[0] == 4 * parameter_count(DIGITS_SPEC) == 4 * 6570


def test_any_safetensors_reader_loads_it():
    original = state()
    blob = blob_of(original)
    loaded = st_load(blob)
    assert set(loaded) == set(original)
    assert all(torch.equal(loaded[k], original[k]) for k in original)


def test_safetensors_reader_sees_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(blob_of())
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "model_spec_sha256": spec_digest(SPEC), "round": "3",
                                "trustmesh": "model/1", "workflow_id": "wf-1"}


def test_equal_tensors_give_equal_bytes_whatever_the_dict_order():
    st = state()
    reordered = OrderedDict(reversed(list(st.items())))
    copied = OrderedDict((k, v.clone()) for k, v in st.items())
    assert blob_of(st) == blob_of(reordered) == blob_of(copied)
    changed = OrderedDict(st)
    changed["layers.1.bias"] = st["layers.1.bias"] + 1e-6
    assert mf.digest(blob_of(changed)) != mf.digest(blob_of(st))


def test_digest_is_the_same_in_another_process():
    # safetensors.torch.save orders metadata keys per process (a Rust HashMap); ours must not.
    code = (
        "from trustmesh.fl import model_format as mf; from trustmesh.fl.models import "
        "build_model, state_of; spec=%r; "
        "print(mf.digest(mf.serialize(state_of(build_model(spec, seed=1)), workflow_id='wf-1', round=3, "
        "model_spec=spec)))" % SPEC
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""})
    assert out.stdout.strip() == mf.digest(blob_of())


def test_digest_is_sha256_hex():
    assert mf.digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_tampered_bytes_fail_the_digest_check():
    blob = blob_of()
    good = mf.digest(blob)
    tampered = bytearray(blob)
    tampered[-1] ^= 0x01
    with pytest.raises(mf.DigestMismatchError, match="altered"):
        mf.load(bytes(tampered), good, SPEC)
    with pytest.raises(mf.ModelFormatError, match="64 lowercase hex"):
        mf.load(blob, good.upper(), SPEC)


def test_other_architecture_is_refused_on_load_and_save():
    blob = blob_of()
    other = {"type": "mlp", "input_dim": 4, "hidden": [5], "num_classes": 2}
    with pytest.raises(mf.SpecMismatchError, match="model spec"):
        mf.load(blob, mf.digest(blob), other)
    bad = state()
    bad["layers.0.weight"] = torch.zeros(3, 5)
    with pytest.raises(mf.SpecMismatchError, match=r"layers.0.weight has shape \[3, 5\], the spec needs \[3, 4\]"):
        blob_of(bad)
    missing = state()
    del missing["layers.1.bias"]
    with pytest.raises(mf.SpecMismatchError, match="missing layers.1.bias"):
        blob_of(missing)
    doubles = OrderedDict((k, v.double()) for k, v in state().items())
    with pytest.raises(mf.SpecMismatchError, match="float32"):
        blob_of(doubles)


def test_wrong_workflow_or_round_is_refused():
    blob = blob_of()
    with pytest.raises(mf.ModelFormatError, match="workflow 'wf-1', not 'wf-2'"):
        mf.load(blob, mf.digest(blob), SPEC, workflow_id="wf-2")
    with pytest.raises(mf.ModelFormatError, match="round 3, not round 4"):
        mf.load(blob, mf.digest(blob), SPEC, round=4)


def _respaced(blob: bytes) -> bytes:
    """The same file with spaces in its JSON header: any safetensors reader loads it, but it is
    not our bytes. (safetensors' own writer orders __metadata__ keys by a per-process hash seed,
    so its output matches ours now and then: no ground for a test.)"""
    (size,) = struct.unpack_from("<Q", blob)
    header = json.dumps(json.loads(blob[8:8 + size]), separators=(", ", ": ")).encode()
    header += b" " * (-(8 + len(header)) % 8)
    return struct.pack("<Q", len(header)) + header + blob[8 + size:]


def test_non_canonical_safetensors_is_refused():
    blob = blob_of()
    foreign = _respaced(blob)
    assert st_load(foreign).keys() == st_load(blob).keys()  # readable all the same
    with pytest.raises(mf.ModelFormatError, match="not in canonical"):
        mf.load(foreign, mf.digest(foreign), SPEC)
    padded = blob_of() + b"\0\0\0\0"
    with pytest.raises(mf.ModelFormatError):
        mf.load(padded, mf.digest(padded), SPEC)


@pytest.mark.parametrize("blob, message", [
    (b"", "at least an 8-byte header"),
    (struct.pack("<Q", 1000) + b"{}", "truncated"),
    (struct.pack("<Q", 8) + b"not json", "not ASCII JSON"),
    (struct.pack("<Q", 8) + b'{"a":1} ', "lacks __metadata__"),
    (struct.pack("<Q", 16) + b'{"a":1,"a":2}   ', "duplicate key"),
])
def test_garbage_is_refused_with_a_reason(blob, message):
    with pytest.raises(mf.ModelFormatError, match=message):
        mf.load(blob, mf.digest(blob), SPEC)


def _with_header_change(blob: bytes, change) -> bytes:
    """The file with change(header) applied to its JSON header, padded as safetensors pads it."""
    (size,) = struct.unpack_from("<Q", blob)
    header = json.loads(blob[8:8 + size])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + size:]


@pytest.mark.parametrize("change, message", [
    (lambda header: header["__metadata__"].update(trustmesh="model/9"), "model/9"),
    (lambda header: header["layers.0.bias"].update(dtype="F16"), "dtype F32"),
])
def test_unknown_metadata_or_dtype_is_refused(change, message):
    other = _with_header_change(blob_of(), change)
    with pytest.raises(mf.ModelFormatError, match=message):
        mf.load(other, mf.digest(other), SPEC)


@pytest.mark.parametrize("kw, message", [
    ({"workflow_id": "no spaces"}, "identifier"),
    ({"workflow_id": ""}, "identifier"),
    ({"round": -1}, "round must be an integer"),
    ({"round": 1.0}, "round must be an integer"),
    ({"round": True}, "round must be an integer"),
])
def test_serialize_checks_its_metadata(kw, message):
    with pytest.raises(mf.ModelFormatError, match=message):
        blob_of(**kw)


def test_non_bytes_input_is_refused():
    with pytest.raises(mf.ModelFormatError, match="must be bytes"):
        mf.load("text", "0" * 64, SPEC)


def test_verify_checks_digest_format_and_spec_without_tensors():
    blob = blob_of()
    meta = mf.verify(blob, mf.digest(blob), SPEC, workflow_id="wf-1", round=3)
    assert meta["model_spec_sha256"] == spec_digest(SPEC) and meta["round"] == "3"
    tampered = bytes(blob[:-1]) + bytes([blob[-1] ^ 1])
    with pytest.raises(mf.DigestMismatchError):
        mf.verify(tampered, mf.digest(blob), SPEC)
    foreign = _respaced(blob)
    with pytest.raises(mf.ModelFormatError, match="not in canonical"):
        mf.verify(foreign, mf.digest(foreign), SPEC)
    with pytest.raises(mf.SpecMismatchError, match="model spec"):
        mf.verify(blob, mf.digest(blob), {**SPEC, "hidden": [5]})
    with pytest.raises(mf.ModelFormatError, match="round 3, not round 4"):
        mf.verify(blob, mf.digest(blob), SPEC, round=4)


def test_spec_digest_is_the_plain_json_sha256_the_verifier_compares():
    for spec in (SPEC, DIGITS_SPEC):
        assert spec_digest(spec) == mf.spec_sha256(spec)


def test_an_iot_node_that_only_checks_models_never_imports_torch():
    """verify, the IoT node and the IoT host (many nodes in one process) run without torch (~2 s
    and ~190 MB a process); training on IoT nodes imports it when a workflow asks for it."""
    code = ("import sys; import trustmesh.iot_node.node, trustmesh.iot_node.host, trustmesh.fl.model_format; "
            "print(sorted(m for m in ('torch', 'trustmesh.fl.models') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
