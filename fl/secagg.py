"""Secure aggregation (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017): the pieces one round is made
of, so the aggregator learns the sum of the participants' updates and nothing about any one.

Each participant i of a round, with its neighbours N(i) on a ring drawn from the round id (k of
them; everybody when k >= n - 1):

  keys       two X25519 key pairs, c (to encrypt shares) and s (to agree masks), and a self-mask
             seed b_i, all derived from the node's own secret and the round id (`round_secrets`):
             a restarted node derives the same ones, nothing is stored.
  shares     Shamir shares (pycryptodome, GF(2^128); the 32-byte secrets split as two 16-byte
             halves) of b_i and of s_sk_i, one per neighbour, `threshold` of them reconstruct;
             each encrypted for its holder with AES-GCM-SIV (`seal_shares`) under a key of its
             own: HKDF of the c agreement with the round, the direction (sender -> holder) and
             the kind (b or s) in its info, so no two sealed shares share a key (a revealed b
             share must not be a keystream for the s share beside it), and a node that re-splits
             after a restart, sealing new shares under the same key and fixed nonce, gives away
             no more than that they differ (SIV: nonce-misuse resistant); and its sha256
             published, so a holder that later reveals another share is caught.
  masked     y_i = q(n_i * x_i) + PRG(b_i) + sum_{j in N(i)} +-PRG(s_ij)   (mod 2^64)
             with q the fixed-point quantization (2^-24 steps), n_i its sample count, s_ij the key
             i and j agree from s (+ when i < j, - otherwise: the pairs cancel in the sum), PRG
             the AES-256-CTR keystream under the seed (`cryptography`).
  unmask     every participant that uploaded reveals, for each neighbour that uploaded, its share
             of b; for one that did not, its share of s_sk (one whose own upload was dropped
             reveals nothing). From `threshold` shares the aggregator rebuilds b_i (removes i's
             self-mask) or s_sk_i (removes the masks a dropped i left in its neighbours' y); with
             fewer than `threshold` uploads there is no sum to publish.

  sum        sum_i y_i - sum PRG(b_i) -+ dangling pair masks = sum q(n_i x_i): dequantized and
             divided by sum n_i it is the sample-weighted FedAvg model (quantization error
             <= 2^-25 per coordinate per participant).

Everything but the shares themselves is deterministic (the PRG included), so an auditor with the
masked uploads and the revealed shares recomputes the sum bit for bit. Bad inputs raise SecAggError saying what is wrong and whose it is.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from . import secagg_block

SCALE_BITS = 24                 # fixed point: 2^-24 steps
MAX_SUMMED = 2 ** 14            # uploads one sum may hold: a round's participants (MAX_GROUP_MEMBERS) fit
LIMIT = 2 ** 63 // MAX_SUMMED   # |q(n_i x_i)| < LIMIT, so the signed sum of MAX_SUMMED stays in (-2^63, 2^63)
SHARE_BYTES = 1 + 16 + 16       # holder index, then the two halves' shares
KINDS = ("b", "s")              # the shares a participant seals: of its self-mask seed, of its mask key
_HALF = 16


class SecAggError(ValueError):
    """An input secure aggregation cannot use; the message names whose and why."""


class RoundSecrets(NamedTuple):
    """What one participant derives for one round; none of it leaves the node but by the protocol."""

    c_private: bytes    # X25519, encrypts and decrypts shares
    s_private: bytes    # X25519, agrees pairwise masks
    self_seed: bytes    # b_i


def _x25519(private: bytes):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private)


def round_secrets(node_secret: bytes, schedule_id: str) -> RoundSecrets:
    def derive(purpose: str) -> bytes:
        return hmac.new(node_secret, f"trustmesh-secagg/{purpose}/{schedule_id}".encode(), hashlib.sha256).digest()

    return RoundSecrets(derive("c"), derive("s"), derive("b"))


def public_key(private: bytes) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = _x25519(private).public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


def _derive(private: bytes, peer_public_hex: str, info: str) -> bytes:
    """32 bytes from the X25519 agreement of `private` and the peer's key, HKDF-SHA256 with `info`."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    try:
        peer = X25519PublicKey.from_public_bytes(bytes.fromhex(peer_public_hex))
        shared = _x25519(private).exchange(peer)
    except ValueError as exc:
        raise SecAggError(f"the public key {peer_public_hex[:16]}… cannot be used: {exc}") from None
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode()).derive(shared)


def agree(private: bytes, peer_public_hex: str, *, schedule_id: str, a: str, b: str, purpose: str) -> bytes:
    """The 32-byte key nodes a and b share for `purpose` in a round, the same whichever derives it."""
    first, second = sorted((a, b))
    return _derive(private, peer_public_hex, f"trustmesh-secagg/{purpose}/{schedule_id}/{first}/{second}")


def share_key(private: bytes, peer_public_hex: str, *, schedule_id: str, sender: str, holder: str,
              kind: str) -> bytes:
    """The AES-GCM-SIV key of the one share of `kind` that `sender` seals for `holder` in a round
    (from the c keys): a key per round, direction and kind, each sealing one message only."""
    if kind not in KINDS:
        raise SecAggError(f"a share is of kind b (self-mask seed) or s (mask key); got {kind!r}")
    return _derive(private, peer_public_hex, f"trustmesh-secagg/share/{kind}/{schedule_id}/{sender}->{holder}")


# --------------------------------------------------------------------------- who shares with whom


def neighbours(schedule_id: str, nodes: Sequence[str], k: int) -> dict[str, list[str]]:
    """secagg_block.neighbours (the ring every node, the rules and the audit draw alike)."""
    try:
        return secagg_block.neighbours(schedule_id, nodes, k)
    except ValueError as exc:
        raise SecAggError(str(exc)) from None


# --------------------------------------------------------------------------- Shamir shares


def split_secret(secret: bytes, threshold: int, holders: Sequence[str]) -> dict[str, bytes]:
    """holder -> its share of a 32-byte secret; any `threshold` of them rebuild it."""
    from Crypto.Protocol.SecretSharing import Shamir

    if len(secret) != 2 * _HALF:
        raise SecAggError(f"secrets are 32 bytes; got {len(secret)}")
    if not 2 <= threshold <= len(holders):
        raise SecAggError(f"threshold must be between 2 and the {len(holders)} holders; got {threshold}")
    low = Shamir.split(threshold, len(holders), secret[:_HALF])
    high = Shamir.split(threshold, len(holders), secret[_HALF:])
    return {holder: bytes([index]) + part_low + part_high
            for holder, (index, part_low), (_, part_high) in zip(sorted(holders), low, high)}


def combine_secret(shares: Mapping[str, bytes], threshold: int) -> bytes:
    """The secret from the shares its holders revealed (holder -> share), at least `threshold` of
    them (more are ignored). A malformed share, or two with one index, is named by its holder."""
    from Crypto.Protocol.SecretSharing import Shamir

    distinct: dict[int, bytes] = {}
    holders: dict[int, str] = {}
    for holder, share in sorted(shares.items()):
        if len(share) != SHARE_BYTES or share[0] == 0:
            raise SecAggError(f"the share revealed by {holder[:16]}… is malformed: {len(share)} bytes with index "
                              f"{share[0] if share else None}; a share is {SHARE_BYTES} bytes with an index from 1")
        if share[0] in distinct:
            raise SecAggError(f"the shares revealed by {holders[share[0]][:16]}… and {holder[:16]}… both have index "
                              f"{share[0]}; each holder's share has its own")
        distinct[share[0]], holders[share[0]] = share, holder
    if len(distinct) < threshold:
        raise SecAggError(f"{len(distinct)} share(s) given, {threshold} needed")
    chosen = [distinct[index] for index in sorted(distinct)[:threshold]]
    low = Shamir.combine([(s[0], s[1:1 + _HALF]) for s in chosen])
    high = Shamir.combine([(s[0], s[1 + _HALF:]) for s in chosen])
    return low + high


share_digest = secagg_block.share_digest


def commitment(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def _associated(schedule_id: str, sender: str, holder: str, kind: str) -> bytes:
    return f"{schedule_id}/{sender}/{holder}/{kind}".encode()


def seal_shares(secrets: RoundSecrets, me: str, c_publics: Mapping[str, str], schedule_id: str, threshold: int,
                holders: Sequence[str]) -> tuple[dict[str, dict[str, bytes]], dict[str, dict[str, str]]]:
    """This participant's shares of its self-mask seed (b) and of its mask key (s), one of each
    for every holder: ({holder: {kind: sealed}}, {holder: {kind: sha256 of the share}}). Each is
    sealed with AES-GCM-SIV under its own key (share_key), so the fixed nonce never serves two
    shares but a resent one; the round, both nodes and the kind are authenticated."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

    sealed: dict[str, dict[str, bytes]] = {holder: {} for holder in holders}
    digests: dict[str, dict[str, str]] = {holder: {} for holder in holders}
    for kind, secret in zip(KINDS, (secrets.self_seed, secrets.s_private)):
        for holder, share in split_secret(secret, threshold, holders).items():
            key = share_key(secrets.c_private, c_publics[holder], schedule_id=schedule_id, sender=me, holder=holder,
                            kind=kind)
            sealed[holder][kind] = AESGCMSIV(key).encrypt(bytes(12), share, _associated(schedule_id, me, holder, kind))
            digests[holder][kind] = share_digest(share)
    return sealed, digests


def open_share(c_private: bytes, sender_c_public: str, sealed: bytes, *, schedule_id: str, sender: str, holder: str,
               kind: str) -> bytes:
    """The share of `kind` that `sender` sealed for `holder` (whose c key `c_private` is)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCMSIV

    key = share_key(c_private, sender_c_public, schedule_id=schedule_id, sender=sender, holder=holder, kind=kind)
    try:
        return AESGCMSIV(key).decrypt(bytes(12), sealed, _associated(schedule_id, sender, holder, kind))
    except InvalidTag:
        raise SecAggError(f"the {kind} share {sender[:16]}… sealed for {holder[:16]}… does not open: it was not "
                          f"sealed with their key for this round and kind") from None


# --------------------------------------------------------------------------- masks


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uint64 words (little-endian) of the AES-256-CTR keystream under a 32-byte seed:
    a cryptographic PRG, so a mask tells nothing about its seed or about another mask. Every
    seed (a self-mask seed, a pair's mask key) keys one stream only."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(seed) != 32:
        raise SecAggError(f"a mask seed is 32 bytes; got {len(seed)}")
    stream = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor().update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def flat(state: Mapping) -> np.ndarray:
    return np.concatenate([t.detach().numpy().astype(np.float64).ravel() for t in state.values()])


def quantize(state: Mapping, samples: int) -> np.ndarray:
    """n * x in fixed point (round half to even), as uint64 two's complement."""
    scaled = np.rint(flat(state) * float(samples) * 2.0 ** SCALE_BITS)
    if not np.isfinite(scaled).all() or np.abs(scaled).max(initial=0) >= float(LIMIT):
        raise SecAggError(f"an update of {samples} samples has values too large (or not finite) to aggregate "
                          f"securely: |samples * value| must stay below 2^{LIMIT.bit_length() - 1 - SCALE_BITS}, "
                          f"so that the sum of up to {MAX_SUMMED} uploads cannot wrap")
    return scaled.astype(np.int64).view(np.uint64)


def masked_input(state: Mapping, samples: int, *, me: str, secrets: RoundSecrets,
                 pair_keys: Mapping[str, bytes]) -> np.ndarray:
    """y = q(n x) + PRG(b) + sum over neighbours of +-PRG(pair key) (mod 2^64)."""
    y = quantize(state, samples)
    y = y + prg(secrets.self_seed, y.size)
    for other, key in sorted(pair_keys.items()):
        mask = prg(key, y.size)
        y = y + mask if me < other else y - mask
    return y


def pair_keys(secrets: RoundSecrets, me: str, publics: Mapping[str, str], schedule_id: str,
              mine: Sequence[str]) -> dict[str, bytes]:
    """neighbour -> the mask key this node shares with it (from their s public keys)."""
    return {other: agree(secrets.s_private, publics[other], schedule_id=schedule_id, a=me, b=other, purpose="mask")
            for other in mine}


def to_bytes(vector: np.ndarray) -> bytes:
    return vector.astype("<u8", copy=False).tobytes()


def from_bytes(blob: bytes, length: int) -> np.ndarray:
    if len(blob) != 8 * length:
        raise SecAggError(f"a masked upload is {len(blob)} bytes; this model needs {8 * length}")
    return np.frombuffer(blob, dtype="<u8").astype(np.uint64)


def unmask(masked: Mapping[str, np.ndarray], self_seeds: Mapping[str, bytes],
           dropped_masks: Sequence[tuple[str, str, bytes]] = ()) -> np.ndarray:
    """sum of q(n_i x_i) over the uploaders: their y summed, their self-masks removed, and the
    masks (uploader, dropped, key) that dropped neighbours left in uploaders' y removed."""
    nodes = sorted(masked)
    if len(nodes) > MAX_SUMMED:
        raise SecAggError(f"{len(nodes)} masked uploads; one sum holds at most {MAX_SUMMED} without wrapping")
    total = np.zeros(masked[nodes[0]].size, dtype=np.uint64)
    for node in nodes:
        total = total + masked[node] - prg(self_seeds[node], total.size)
    for uploader, dropped, key in dropped_masks:
        mask = prg(key, total.size)
        total = total - mask if uploader < dropped else total + mask
    return total


def dequantize(total: np.ndarray, samples: int, template: Mapping) -> OrderedDict:
    """The sample-weighted mean: the signed sum / 2^24 / sum of samples, float32 per parameter."""
    import torch

    values = total.view(np.int64).astype(np.float64) / 2.0 ** SCALE_BITS / float(samples)
    state, offset = OrderedDict(), 0
    for name, tensor in template.items():
        size = tensor.numel()
        state[name] = torch.from_numpy(values[offset:offset + size].reshape(tuple(tensor.shape)).astype(np.float32))
        offset += size
    return state


# --------------------------------------------------------------------------- recovery


def recover(schedule_id: str, graph: Mapping[str, Sequence[str]], uploaders: Sequence[str], threshold: int, *,
            revealed: Mapping[str, Mapping[str, bytes]], self_commitments: Mapping[str, str],
            s_publics: Mapping[str, str]) -> tuple[dict[str, bytes], list[tuple[str, str, bytes]]]:
    """From the revealed shares (node -> holder -> share): the self-mask seeds of the uploaders
    (each checked against the commitment its owner published) and the masks (uploader, dropped,
    key) dropped participants left in their uploading neighbours' inputs (each dropped node's
    rebuilt s key checked against its public key)."""
    too_few = secagg_block.too_few_uploads(len(uploaders), threshold)
    if too_few:
        raise SecAggError(too_few)
    short = secagg_block.short_of_shares(sorted(graph), revealed, threshold)
    if short:
        count, node = short[0]
        what = "self-mask" if node in uploaders else "mask key"
        raise SecAggError(f"only {count} of the {threshold} shares needed to rebuild the {what} of "
                          f"participant {node[:16]}… were revealed")
    seeds, dangling = {}, []
    for node in sorted(graph):
        secret = combine_secret(revealed[node], threshold)
        if node in uploaders:
            if commitment(secret) != self_commitments.get(node):
                raise SecAggError(f"participant {node[:16]}…'s shares do not rebuild the self-mask it committed "
                                  f"to: it sent inconsistent shares")
            seeds[node] = secret
            continue
        if public_key(secret) != s_publics.get(node):
            raise SecAggError(f"participant {node[:16]}…'s shares do not rebuild the mask key it published: it "
                              f"sent inconsistent shares")
        for other in graph[node]:
            if other in uploaders:
                dangling.append((other, node, agree(secret, s_publics[other], schedule_id=schedule_id, a=node,
                                                    b=other, purpose="mask")))
    return seeds, dangling


# --------------------------------------------------------------------------- one round, from its records


def aggregate_round(schedule_id: str, block: Mapping, *, participants: Sequence[str],
                    records: Mapping[str, Mapping], uploads: Mapping[str, bytes], samples: Mapping[str, int],
                    template: Mapping) -> OrderedDict:
    """The global model of a securely aggregated round, as the aggregator makes it and the audit
    redoes it: participants (the round's submitted nodes), their on-chain records
    (scheduling/secagg_rules.py: keys, commitments, revealed shares), the masked uploads of those
    that uploaded (node -> bytes, verified against their digests) and their sample counts."""
    graph = neighbours(schedule_id, participants, block["neighbours"])
    length = sum(t.numel() for t in template.values())
    uploaders = sorted(uploads)
    revealed = {sender: {holder: bytes.fromhex(share) for holder, share in by.items()}
                for sender, by in secagg_block.revealed_by_sender({n: records.get(n) for n in participants}).items()}
    seeds, dangling = recover(schedule_id, graph, uploaders, block["threshold"], revealed=revealed,
                              self_commitments={n: (records.get(n) or {}).get("self_commitment") for n in participants},
                              s_publics={n: (records.get(n) or {}).get("s_pk") for n in participants})
    total = unmask({n: from_bytes(uploads[n], length) for n in uploaders}, seeds, dangling)
    return dequantize(total, sum(samples[n] for n in uploaders), template)

