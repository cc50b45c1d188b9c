"""secp256k1 keys and signatures exactly as Sawtooth 1.2 uses them.

A signature is ECDSA over sha256(message), serialized as 64-byte compact r||s with low S, hex
encoded (128 chars). Public keys are compressed (33 bytes, 66 hex). Key files follow
`sawtooth keygen`: one hex line in NAME.priv (kept 0600) and NAME.pub.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import secrets

import coincurve
from coincurve._libsecp256k1 import lib as _secp256k1
from coincurve.ecdsa import deserialize_compact

from trustmesh.whole_files import write_whole


class SigningError(ValueError):
    """A key or signature that cannot be used, with the reason."""


class PrivateKey:
    __slots__ = ("_key",)

    def __init__(self, secret: bytes):
        if len(secret) != 32:
            raise SigningError(f"a secp256k1 private key is 32 bytes, got {len(secret)}")
        try:
            self._key = coincurve.PrivateKey(secret)
        except ValueError as exc:
            raise SigningError(f"not a valid secp256k1 private key: {exc}") from None

    @classmethod
    def generate(cls) -> "PrivateKey":
        while True:  # the odd out-of-range draw is simply retried
            try:
                return cls(secrets.token_bytes(32))
            except SigningError:
                continue

    @classmethod
    def from_hex(cls, text: str) -> "PrivateKey":
        try:
            return cls(bytes.fromhex(text.strip()))
        except ValueError as exc:
            if isinstance(exc, SigningError):
                raise
            raise SigningError("private key is not hex") from None

    def as_hex(self) -> str:
        return self._key.secret.hex()

    def public_key(self) -> "PublicKey":
        return PublicKey(self._key.public_key.format(compressed=True))

    def sign(self, message: bytes) -> str:
        # The first 64 bytes of the recoverable form are the compact r||s; libsecp256k1
        # always emits low S, which is what validators require.
        return self._key.sign_recoverable(message)[:64].hex()


class PublicKey:
    __slots__ = ("_key", "_hex")

    def __init__(self, compressed: bytes):
        if len(compressed) != 33:
            raise SigningError(f"a compressed public key is 33 bytes, got {len(compressed)}")
        try:
            self._key = coincurve.PublicKey(compressed)
        except ValueError:
            raise SigningError("not a point on secp256k1") from None
        self._hex = compressed.hex()

    @classmethod
    def from_hex(cls, text: str) -> "PublicKey":
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise SigningError("public key is not hex") from None
        return cls(raw)

    def as_hex(self) -> str:
        return self._hex

    def verify(self, signature_hex: str, message: bytes) -> bool:
        """True only for a valid compact low-S signature of message by this key."""
        if len(signature_hex) != 128:
            return False
        try:
            signature = deserialize_compact(bytes.fromhex(signature_hex))
        except ValueError:
            return False
        # Straight to libsecp256k1 (which rejects high S): coincurve's verify() takes DER, and
        # encoding it here only for coincurve to parse it back cost ~10% of a verify.
        key = self._key
        digest = hashlib.sha256(message).digest()
        return _secp256k1.secp256k1_ecdsa_verify(key.context.ctx, signature, digest, key.public_key) == 1


def verify(public_key_hex: str, signature_hex: str, message: bytes) -> bool:
    """Verify without raising: any malformed key or signature is simply invalid."""
    try:
        return PublicKey.from_hex(public_key_hex).verify(signature_hex, message)
    except SigningError:
        return False


def write_key_files(directory: os.PathLike | str, name: str, key: PrivateKey) -> pathlib.Path:
    """Write NAME.priv (0600 from the start) and NAME.pub, each whole or not at all: a command
    starting beside another of the same home finds no key or the whole key, never an empty file.
    Raises FileExistsError if NAME.priv is there already: a key is never replaced."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    priv_path = directory / f"{name}.priv"
    if not write_whole(priv_path, key.as_hex() + "\n", mode=0o600, exclusive=True):
        raise FileExistsError(f"{priv_path} exists; a key is never replaced")
    write_whole(directory / f"{name}.pub", key.public_key().as_hex() + "\n", mode=0o644)
    return priv_path


def read_private_key(path: os.PathLike | str) -> PrivateKey:
    path = pathlib.Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise SigningError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        return PrivateKey.from_hex(text)
    except SigningError as exc:
        raise SigningError(f"{path}: {exc}") from None


def load_or_create_key(directory: os.PathLike | str, name: str) -> PrivateKey:
    """The node's key: generated at first start, read back on every later start."""
    priv_path = pathlib.Path(directory) / f"{name}.priv"
    if priv_path.exists():
        return read_private_key(priv_path)
    key = PrivateKey.generate()
    try:
        write_key_files(directory, name, key)
    except FileExistsError:  # another process of the same node won the race
        return read_private_key(priv_path)
    return key
