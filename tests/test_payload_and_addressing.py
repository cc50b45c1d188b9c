import hashlib

import cbor2
import pytest
from hypothesis import given, strategies as st

from trustmesh.ledger import addressing, payload
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger import protos as pb
from trustmesh.ledger.signing import PrivateKey, verify

values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(values)
def test_canonical_round_trip(value):
    data = payload.encode(value)
    assert payload.decode(data) == value
    assert payload.encode(payload.decode(data)) == data


def test_map_key_order_is_canonical_whatever_the_insertion_order():
    assert payload.encode({"b": 1, "a": 2, "aa": 3}) == payload.encode({"aa": 3, "a": 2, "b": 1})


def test_non_canonical_encodings_are_refused():
    non_canonical = [
        bytes.fromhex("a2616201616102"),        # keys out of order {"b":1,"a":2}
        bytes.fromhex("1801"),                  # 1 encoded in two bytes
        bytes.fromhex("9f01ff"),                # indefinite-length array
        cbor2.dumps(1.0),                       # float64 where float16 suffices
    ]
    for data in non_canonical:
        with pytest.raises(payload.PayloadError, match="not canonical"):
            payload.decode(data)


@pytest.mark.parametrize("data,match", [(b"", "empty"), (b"\xff\xff", "not valid CBOR"), (b"\x5f", "not valid CBOR")])
def test_garbage_is_refused_clearly(data, match):
    with pytest.raises(payload.PayloadError, match=match):
        payload.decode(data)


def test_oversized_payload_is_refused_before_parsing():
    with pytest.raises(payload.PayloadError, match="limit"):
        payload.decode(b"\x00" * 11, max_bytes=10)


def test_namespace_and_addresses():
    assert addressing.namespace("intkey") == hashlib.sha512(b"intkey").hexdigest()[:6] == "1cf126"
    address = addressing.make_address("1cf126", "a", "b")
    assert addressing.is_address(address) and address.startswith("1cf126")
    assert address == "1cf126" + hashlib.sha512(b"a/b").hexdigest()[:64]
    assert not addressing.is_address("1cf126")
    assert not addressing.is_address("1CF126" + "0" * 64)
    assert addressing.is_address_prefix("1cf126") and addressing.is_address_prefix("")
    assert not addressing.is_address_prefix("xyz")
    with pytest.raises(ValueError):
        addressing.make_address("XYZ", "a")


def test_builders_produce_what_a_validator_checks():
    signer = PrivateKey.generate()
    data = payload.encode({"k": 1})
    txn = make_transaction(signer, "fam", "1.0", data, ["abcdef"], ["abcdef"], dependencies=["d" * 128], nonce="n1")
    header = pb.TransactionHeader.FromString(txn.header)
    assert header.payload_sha512 == hashlib.sha512(data).hexdigest()
    assert header.batcher_public_key == header.signer_public_key == signer.public_key().as_hex()
    assert list(header.dependencies) == ["d" * 128] and header.nonce == "n1"
    assert verify(header.signer_public_key, txn.header_signature, txn.header)
    batch = make_batch(signer, [txn])
    bheader = pb.BatchHeader.FromString(batch.header)
    assert list(bheader.transaction_ids) == [txn.header_signature]
    assert verify(bheader.signer_public_key, batch.header_signature, batch.header)
