"""stores.data_envelope: raw IoT data sealed for one compute node's X25519 key."""

from __future__ import annotations

import os
import stat

import pytest

from trustmesh.stores import data_envelope as env
from trustmesh.stores.data_envelope import (
    EnvelopeAuthError,
    EnvelopeContextMismatch,
    EnvelopeError,
    EnvelopeFormatError,
    EnvelopeKeyError,
)

SID = "ab" * 32
IOT = "02" + "11" * 32
COMPUTE = "03" + "22" * 32
CONTEXT = dict(schedule_id=SID, sender=IOT, recipient=COMPUTE)
CANARY = b"canary-row-7f3a91,0.4242,0.1337,label=3"


def raw_rows() -> bytes:
    rows = [f"row-{i},{i * 0.25:.4f},{(i * 7) % 10}".encode() for i in range(200)]
    rows.insert(117, CANARY)
    return b"\n".join(rows)


@pytest.fixture
def keypair(tmp_path):
    return env.generate_keypair(tmp_path / "compute.key")


def test_round_trip_and_no_plaintext_in_the_blob(keypair):
    private, public_hex = keypair
    data = raw_rows()
    sealed = env.seal(data, public_hex, **CONTEXT)
    assert env.open_envelope(sealed, private, **CONTEXT) == data
    assert env.decrypt(env.encrypt(data, private.public_key(), **CONTEXT), private, **CONTEXT) == data

    assert CANARY not in sealed
    assert b"canary" not in sealed and b"row-1" not in sealed
    # no 12-byte run of the plaintext survives anywhere in the envelope
    assert not any(data[i:i + 12] in sealed for i in range(0, len(data) - 12))
    # a fresh ephemeral key and nonce every time: sealing twice never gives the same bytes
    again = env.seal(data, public_hex, **CONTEXT)
    assert again != sealed and again[6:50] != sealed[6:50]
    context_length = int.from_bytes(sealed[50:52], "big")
    assert len(sealed) == 52 + context_length + len(data) + 16  # header, ciphertext, GCM tag
    assert sealed[:4] == env.MAGIC and sealed[4] == env.VERSION
    assert env.envelope_context(sealed) == {"schedule_id": SID, "sender": IOT, "recipient": COMPUTE}


def test_empty_and_large_payloads(keypair):
    private, public_hex = keypair
    for data in (b"", os.urandom(3 * 1024 * 1024)):
        assert env.open_envelope(env.seal(data, public_hex, **CONTEXT), private, **CONTEXT) == data


def test_every_single_bit_flip_is_refused(keypair):
    private, public_hex = keypair
    sealed = env.seal(b"temperature=21.5;humidity=40", public_hex, **CONTEXT)
    for index in range(len(sealed)):
        for bit in (0x01, 0x80):
            tampered = bytearray(sealed)
            tampered[index] ^= bit
            with pytest.raises(EnvelopeError):
                env.open_envelope(bytes(tampered), private, **CONTEXT)


def test_tampering_gives_clear_errors(keypair):
    private, public_hex = keypair
    sealed = env.seal(raw_rows(), public_hex, **CONTEXT)

    with pytest.raises(EnvelopeFormatError, match="bad magic"):
        env.open_envelope(b"XXXX" + sealed[4:], private, **CONTEXT)
    with pytest.raises(EnvelopeFormatError, match="version 2 is not supported"):
        env.open_envelope(sealed[:4] + b"\x02" + sealed[5:], private, **CONTEXT)
    with pytest.raises(EnvelopeFormatError, match="truncated"):
        env.open_envelope(sealed[:60], private, **CONTEXT)
    with pytest.raises(EnvelopeAuthError, match="altered"):
        env.open_envelope(sealed[:-1], private, **CONTEXT)
    body = bytearray(sealed)
    body[len(body) // 2] ^= 0x40
    with pytest.raises(EnvelopeAuthError, match="authentication failed"):
        env.open_envelope(bytes(body), private, **CONTEXT)

    # the header's context is authenticated: rewriting it to claim another round fails twice over
    other_sid = "cd" * 32
    moved = sealed.replace(SID.encode(), other_sid.encode())
    with pytest.raises(EnvelopeContextMismatch, match=f"schedule_id is '{other_sid}'"):
        env.open_envelope(moved, private, **CONTEXT)
    with pytest.raises(EnvelopeAuthError):
        env.open_envelope(moved, private, **{**CONTEXT, "schedule_id": other_sid})

    # bound to sender and recipient too
    with pytest.raises(EnvelopeContextMismatch, match="sender is"):
        env.open_envelope(sealed, private, **{**CONTEXT, "sender": "02" + "33" * 32})
    with pytest.raises(EnvelopeContextMismatch, match="recipient is"):
        env.open_envelope(sealed, private, **{**CONTEXT, "recipient": "02" + "44" * 32})

    # another compute node's key opens nothing
    with pytest.raises(EnvelopeAuthError, match="not for this private key"):
        env.open_envelope(sealed, env.generate_private_key(), **CONTEXT)


def test_context_fields_are_required():
    key = env.generate_private_key()
    with pytest.raises(ValueError, match="'sender' must be a non-empty string"):
        env.seal(b"x", key.public_key(), schedule_id=SID, sender="", recipient=COMPUTE)


def test_key_files(tmp_path):
    path = tmp_path / "keys" / "compute.key"
    old_umask = os.umask(0)  # even with a permissive umask the private key is 0600
    try:
        private, public_hex = env.generate_keypair(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "compute.key.pub").read_text().strip() == public_hex
    assert len(public_hex) == 64 and env.public_key_hex(private) == public_hex
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    loaded = env.load_private_key(path)
    assert env.public_key_hex(loaded) == public_hex
    assert env.load_or_create_keypair(path)[1] == public_hex

    with pytest.raises(EnvelopeKeyError, match="refusing to overwrite"):
        env.generate_keypair(path)
    os.chmod(path, 0o644)
    with pytest.raises(EnvelopeKeyError, match="chmod 600"):
        env.load_private_key(path)
    assert env.public_key_hex(env.load_private_key(path, check_permissions=False)) == public_hex

    fresh = tmp_path / "new.key"
    _, created = env.load_or_create_keypair(fresh)
    assert env.load_or_create_keypair(fresh)[1] == created

    (tmp_path / "junk.key").write_bytes(b"not a key")
    os.chmod(tmp_path / "junk.key", 0o600)
    with pytest.raises(EnvelopeKeyError, match="not a PEM private key"):
        env.load_private_key(tmp_path / "junk.key")
    with pytest.raises(EnvelopeKeyError, match="64 hex"):
        env.load_public_key("zz" * 32)
    with pytest.raises(EnvelopeKeyError, match="32 bytes"):
        env.load_public_key(b"\x01" * 31)
