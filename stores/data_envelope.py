"""Raw IoT data encrypted for one compute node: the IoT node's privacy piece.

An IoT node encrypts its raw data for the X25519 public key of the compute node that will train on
it; only that node's private key opens it. The envelope (bytes) is what goes to Redis, named by
its sha256 like every blob; the chain holds that digest. Nothing in it reveals the plaintext.

    envelope = seal(data, compute_public_key, schedule_id=sid, sender=iot_key, recipient=compute_key)
    data = open_envelope(envelope, compute_private_key, schedule_id=sid, sender=iot_key,
                         recipient=compute_key)

Scheme (suite 1): a fresh ephemeral X25519 key pair per envelope; shared = X25519(ephemeral,
recipient); key = HKDF-SHA256(shared, salt = ephemeral_pub || recipient_pub,
info = "trustmesh data envelope v1", 32 bytes); AES-256-GCM with a random 96-bit nonce. The
associated data is the whole header, which carries the binding context (schedule_id, sender and
recipient node ids): an envelope moved to another round, or claimed for another node, fails to
open.

Layout, version 1 (integers big-endian):

    0   4  magic b"TMDE"
    4   1  version (1)
    5   1  suite (1: X25519 / HKDF-SHA256 / AES-256-GCM)
    6  32  ephemeral X25519 public key
    38 12  nonce
    50  2  context length n
    52  n  context: canonical JSON {"recipient", "schedule_id", "sender"}
    52+n   ciphertext || 16-byte GCM tag

Private keys are PEM (PKCS#8, unencrypted) files of mode 0600; load_private_key() refuses a key
file that group or others can read.
"""

from __future__ import annotations

import json
import os
import pathlib
import stat
import struct
from typing import Union

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from trustmesh.whole_files import write_whole

MAGIC = b"TMDE"
VERSION = 1
SUITE_X25519_HKDF_SHA256_AES256GCM = 1
HKDF_INFO = b"trustmesh data envelope v1"
NONCE_BYTES = 12
TAG_BYTES = 16
_FIXED = struct.Struct(">4sBB32s12sH")  # magic, version, suite, ephemeral key, nonce, context length
MAX_CONTEXT_BYTES = 4096

PublicKeyLike = Union[X25519PublicKey, X25519PrivateKey, bytes, str]


class EnvelopeError(Exception):
    """An envelope that cannot be opened; the subclass and message say why."""


class EnvelopeFormatError(EnvelopeError):
    """Not an envelope of a version and suite this code reads, or truncated."""


class EnvelopeContextMismatch(EnvelopeError):
    """The envelope is bound to another schedule, sender or recipient than the caller expects."""


class EnvelopeAuthError(EnvelopeError):
    """Authentication failed: the envelope was altered, or is not for this private key."""


class EnvelopeKeyError(EnvelopeError):
    """A key that cannot be used (bad encoding, unsafe file permissions, ...)."""


# --------------------------------------------------------------------------- keys


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(value: PublicKeyLike) -> X25519PublicKey:
    """An X25519 public key from a key object, 32 raw bytes or 64 hex characters."""
    if isinstance(value, X25519PublicKey):
        return value
    if isinstance(value, X25519PrivateKey):
        return value.public_key()
    if isinstance(value, str):
        try:
            value = bytes.fromhex(value)
        except ValueError:
            raise EnvelopeKeyError("an X25519 public key in text is 64 hex characters") from None
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise EnvelopeKeyError(f"an X25519 public key is 32 bytes (64 hex), got {len(value)} bytes")
    return X25519PublicKey.from_public_bytes(bytes(value))


def public_key_hex(key: PublicKeyLike) -> str:
    """The 64-hex form of a public key (of a private key's public half)."""
    return _raw_public(load_public_key(key)).hex()


def save_private_key(key: X25519PrivateKey, path: str | os.PathLike, *, overwrite: bool = False) -> pathlib.Path:
    """Write the private key as PEM with mode 0600, whole or not at all (never a readable
    half-written file); unless overwrite, only if no key is there (EnvelopeKeyError)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    if not write_whole(path, pem, mode=0o600, exclusive=not overwrite):
        raise EnvelopeKeyError(f"{path} exists; refusing to overwrite a private key (overwrite=True to replace it)")
    return path


def load_private_key(path: str | os.PathLike, *, check_permissions: bool = True) -> X25519PrivateKey:
    """Read a PEM private key written by save_private_key (refuses files others can read)."""
    path = pathlib.Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if check_permissions and mode & 0o077:
        raise EnvelopeKeyError(f"private key {path} has mode {mode:04o}; it must be readable by its owner only "
                               f"(chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as exc:
        raise EnvelopeKeyError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, X25519PrivateKey):
        raise EnvelopeKeyError(f"{path} holds a {type(key).__name__}, not an X25519 private key")
    return key


def generate_keypair(path: str | os.PathLike, *, overwrite: bool = False) -> tuple[X25519PrivateKey, str]:
    """New key pair: private key at `path` (0600), public key as hex at `path`.pub (0644).
    Returns (private key, public key hex)."""
    key = generate_private_key()
    path = save_private_key(key, path, overwrite=overwrite)
    public = public_key_hex(key)
    write_whole(path.with_name(path.name + ".pub"), public + "\n", mode=0o644)
    return key, public


def load_or_create_keypair(path: str | os.PathLike) -> tuple[X25519PrivateKey, str]:
    """The key pair at `path`, generated on first use."""
    path = pathlib.Path(path)
    if not path.exists():
        try:
            return generate_keypair(path)
        except EnvelopeKeyError:  # made meanwhile by another process of the same node: that is the key
            pass
    key = load_private_key(path)
    return key, public_key_hex(key)


# --------------------------------------------------------------------------- envelopes


def _context_bytes(schedule_id: str, sender: str, recipient: str) -> bytes:
    for name, value in (("schedule_id", schedule_id), ("sender", sender), ("recipient", recipient)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"envelope context field {name!r} must be a non-empty string")
    context = {"schedule_id": schedule_id, "sender": sender, "recipient": recipient}
    data = json.dumps(context, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_CONTEXT_BYTES:
        raise ValueError(f"envelope context is {len(data)} bytes; the limit is {MAX_CONTEXT_BYTES}")
    return data


def _derive_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral_public + recipient_public,
                info=HKDF_INFO).derive(shared)


def seal(data: bytes, recipient_public_key: PublicKeyLike, *, schedule_id: str, sender: str,
         recipient: str) -> bytes:
    """Encrypt `data` for the holder of the recipient's private key, bound to the round
    (schedule_id) and to the sender's and recipient's node ids."""
    recipient_key = load_public_key(recipient_public_key)
    context = _context_bytes(schedule_id, sender, recipient)
    ephemeral = X25519PrivateKey.generate()
    ephemeral_public = _raw_public(ephemeral.public_key())
    key = _derive_key(ephemeral.exchange(recipient_key), ephemeral_public, _raw_public(recipient_key))
    nonce = os.urandom(NONCE_BYTES)
    header = _FIXED.pack(MAGIC, VERSION, SUITE_X25519_HKDF_SHA256_AES256GCM, ephemeral_public, nonce,
                         len(context)) + context
    return header + AESGCM(key).encrypt(nonce, bytes(data), header)


def _parse(envelope: bytes) -> tuple[bytes, bytes, bytes, dict, bytes]:
    """(header, ephemeral public key, nonce, context, ciphertext) — nothing authenticated yet."""
    envelope = bytes(envelope)
    if len(envelope) < _FIXED.size or envelope[:4] != MAGIC:
        raise EnvelopeFormatError("not a TrustMesh data envelope (bad magic or too short)")
    magic, version, suite, ephemeral_public, nonce, length = _FIXED.unpack_from(envelope)
    if version != VERSION:
        raise EnvelopeFormatError(f"envelope version {version} is not supported (this code reads {VERSION})")
    if suite != SUITE_X25519_HKDF_SHA256_AES256GCM:
        raise EnvelopeFormatError(f"envelope cipher suite {suite} is not supported")
    end = _FIXED.size + length
    if length > MAX_CONTEXT_BYTES or len(envelope) < end + TAG_BYTES:
        raise EnvelopeFormatError("envelope is truncated or its context length is corrupt")
    try:
        context = json.loads(envelope[_FIXED.size:end])
        if not isinstance(context, dict):
            raise ValueError("not a map")
    except ValueError:
        raise EnvelopeFormatError("envelope context is not a JSON map (corrupt header)") from None
    return envelope[:end], ephemeral_public, nonce, context, envelope[end:]


def envelope_context(envelope: bytes) -> dict:
    """The binding context an envelope claims (unauthenticated until it is opened)."""
    return _parse(envelope)[3]


def open_envelope(envelope: bytes, private_key: X25519PrivateKey, *, schedule_id: str, sender: str,
                  recipient: str) -> bytes:
    """Decrypt an envelope with the recipient's private key; the caller states the context it
    expects (from the chain). Raises EnvelopeFormatError, EnvelopeContextMismatch or
    EnvelopeAuthError; never returns unauthenticated bytes."""
    header, ephemeral_public, nonce, context, ciphertext = _parse(envelope)
    expected = {"schedule_id": schedule_id, "sender": sender, "recipient": recipient}
    wrong = [f"{name} is {str(context.get(name))[:80]!r}, expected {value[:80]!r}"
             for name, value in expected.items() if context.get(name) != value]
    if wrong:
        raise EnvelopeContextMismatch("envelope is bound to another round or node: " + "; ".join(wrong))
    try:
        shared = private_key.exchange(X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError:
        raise EnvelopeAuthError("envelope's ephemeral public key is invalid (tampered)") from None
    key = _derive_key(shared, ephemeral_public, _raw_public(private_key.public_key()))
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise EnvelopeAuthError("envelope authentication failed: it was altered, or it is not for this "
                                "private key") from None


# The names the brief uses.
encrypt = seal
decrypt = open_envelope

__all__ = [
    "seal", "open_envelope", "encrypt", "decrypt", "envelope_context", "generate_private_key", "generate_keypair",
    "load_or_create_keypair", "save_private_key", "load_private_key", "load_public_key", "public_key_hex",
    "EnvelopeError", "EnvelopeFormatError", "EnvelopeContextMismatch", "EnvelopeAuthError", "EnvelopeKeyError",
    "MAGIC", "VERSION",
]
