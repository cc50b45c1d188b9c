"""Our secp256k1 signing against the reference sawtooth_signing library, both ways."""

import multiprocessing
import os
import stat

import pytest
from sawtooth_signing import create_context
from sawtooth_signing.secp256k1 import Secp256k1PrivateKey, Secp256k1PublicKey

from trustmesh.ledger.signing import (
    PrivateKey, PublicKey, SigningError, load_or_create_key, read_private_key, verify, write_key_files,
)

REFERENCE = create_context("secp256k1")
ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@pytest.mark.parametrize("message", [b"", b"header bytes", bytes(range(256)) * 40])
def test_our_signature_verifies_with_reference(message):
    key = PrivateKey.generate()
    signature = key.sign(message)
    assert len(signature) == 128
    assert REFERENCE.verify(signature, message, Secp256k1PublicKey.from_hex(key.public_key().as_hex()))


def test_reference_signature_verifies_with_ours_and_keys_agree():
    ref_key = REFERENCE.new_random_private_key()
    ours = PrivateKey.from_hex(ref_key.as_hex())
    assert ours.public_key().as_hex() == REFERENCE.get_public_key(ref_key).as_hex()
    signature = REFERENCE.sign(b"payload", ref_key)
    assert ours.public_key().verify(signature, b"payload")
    assert signature == ours.sign(b"payload")  # both RFC 6979 deterministic


def test_signatures_are_low_s_and_high_s_is_refused_by_both():
    key = PrivateKey.generate()
    for i in range(20):
        message = f"m{i}".encode()
        raw = bytes.fromhex(key.sign(message))
        s = int.from_bytes(raw[32:], "big")
        assert s <= ORDER // 2
        high = (raw[:32] + (ORDER - s).to_bytes(32, "big")).hex()
        assert not key.public_key().verify(high, message)
        assert not REFERENCE.verify(high, message, Secp256k1PublicKey.from_hex(key.public_key().as_hex()))


def test_public_key_is_compressed_66_hex():
    pub = PrivateKey.generate().public_key().as_hex()
    assert len(pub) == 66 and pub[:2] in ("02", "03")


@pytest.mark.parametrize("bad", ["", "zz" * 64, "00" * 64, "ab" * 63])
def test_malformed_signatures_are_invalid_not_errors(bad):
    key = PrivateKey.generate()
    assert verify(key.public_key().as_hex(), bad, b"x") is False


def test_tampered_message_and_wrong_key_fail():
    key, other = PrivateKey.generate(), PrivateKey.generate()
    sig = key.sign(b"message")
    assert not key.public_key().verify(sig, b"messagf")
    assert not other.public_key().verify(sig, b"message")
    assert verify("not hex", sig, b"message") is False
    assert verify("02" + "00" * 32, sig, b"message") is False  # not a curve point


def test_bad_private_keys_are_refused_clearly():
    with pytest.raises(SigningError, match="32 bytes"):
        PrivateKey(b"\x01" * 31)
    with pytest.raises(SigningError, match="not hex"):
        PrivateKey.from_hex("xyz")
    with pytest.raises(SigningError, match="valid"):
        PrivateKey(b"\x00" * 32)
    with pytest.raises(SigningError):
        PublicKey.from_hex("02" + "ff" * 32)


def test_key_files_match_sawtooth_keygen_format_and_are_private(tmp_path):
    key = PrivateKey.generate()
    priv = write_key_files(tmp_path / "keys", "node", key)
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert priv.read_text() == key.as_hex() + "\n"
    assert (tmp_path / "keys" / "node.pub").read_text() == key.public_key().as_hex() + "\n"
    # the reference reads our file
    assert Secp256k1PrivateKey.from_hex(priv.read_text().strip()).as_hex() == key.as_hex()
    assert read_private_key(priv).as_hex() == key.as_hex()
    with pytest.raises(FileExistsError):
        write_key_files(tmp_path / "keys", "node", PrivateKey.generate())  # never overwrites a key


def test_load_or_create_key_generates_once(tmp_path):
    first = load_or_create_key(tmp_path, "iot")
    again = load_or_create_key(tmp_path, "iot")
    assert first.as_hex() == again.as_hex()
    assert stat.S_IMODE(os.stat(tmp_path / "iot.priv").st_mode) == 0o600


def test_unreadable_key_file_error_names_the_file(tmp_path):
    (tmp_path / "bad.priv").write_text("nothex\n")
    with pytest.raises(SigningError, match="bad.priv"):
        read_private_key(tmp_path / "bad.priv")
    with pytest.raises(SigningError, match="missing.priv"):
        read_private_key(tmp_path / "missing.priv")


def _key_when_released(directory, barrier) -> str:
    barrier.wait()
    try:
        return load_or_create_key(directory, "user").as_hex()
    except SigningError as exc:
        return f"error: {exc}"


def test_commands_starting_together_all_get_the_one_key(tmp_path):
    # Several commands of one home started at once (as CI did) each load-or-create the user key:
    # none may read a key file another is still writing, and all must end up with the same key.
    context = multiprocessing.get_context("fork")
    with context.Manager() as manager, context.Pool(6) as pool:
        for attempt in range(12):
            directory = tmp_path / f"attempt-{attempt}"
            barrier = manager.Barrier(6)
            keys = pool.starmap(_key_when_released, [(directory, barrier)] * 6)
            assert len(set(keys)) == 1 and not keys[0].startswith("error"), keys
            assert read_private_key(directory / "user.priv").as_hex() == keys[0]
            assert (directory / "user.pub").read_text().strip() == PrivateKey.from_hex(keys[0]).public_key().as_hex()
            assert sorted(p.name for p in directory.iterdir()) == ["user.priv", "user.pub"]  # no temporaries left
