"""What an IoT node submits when it trains on its own data (federation.train_on "iot").

Its data never leaves the node, not even sealed. It stores a small commitment blob instead and
submits that blob's sha256, so the round's record, preprocess's availability check and the audit
work as for a data bundle. When it trains, the node checks that its data is still the data it
committed to: the update the chain records was trained on what the submission promised.

Blob: canonical CBOR {"v": 2, "format": "local-commitment-v2", "schedule_id", "node", "samples",
"salted_sha256"}: sha256(salt + npz bytes), with a random 32-byte salt per round that never leaves
the node (DATA_DIR/commitment-salts, 0600). The blob sits in shared Redis: an unsalted hash (v1)
let anyone able to guess a node's data confirm the guess. Revealing (salt, data) to an auditor
still proves what was committed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import secrets

from trustmesh.ledger import payload as cbor
from trustmesh.whole_files import write_whole

FORMAT = "local-commitment-v2"  # the submission's metadata "format"
VERSION = 2
MAX_COMMITMENT_BYTES = 4096  # a few short fields; anything larger is not a commitment
SALT_BYTES = 32
_SCHEDULE_ID = re.compile(r"\A[0-9a-f]{64}\Z")


class CommitmentError(ValueError):
    """The commitment does not match this node, this round or this node's data; says which."""


class SaltStore:
    """This node's commitment salts, one file per round: DIRECTORY/<schedule_id>, 0600. Kept
    on disk because training may come after a restart; gone, the round cannot be trained here."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)

    def for_round(self, schedule_id: str) -> bytes:
        """The round's salt, made (and synced to disk) at the first call."""
        path = self._path(schedule_id)
        if path.exists():
            return self.of_round(schedule_id)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        salt = secrets.token_bytes(SALT_BYTES)
        # synced to disk, its name too: a salt lost after its commitment was submitted would leave
        # the round untrainable; if another call made one meanwhile, that one is the round's
        if not write_whole(path, salt, mode=0o600, exclusive=True):
            return self.of_round(schedule_id)
        return salt

    def of_round(self, schedule_id: str) -> bytes:
        path = self._path(schedule_id)
        try:
            salt = path.read_bytes()
        except FileNotFoundError:
            raise CommitmentError(f"no commitment salt for round {schedule_id[:16]}… in {self.directory}: "
                                  f"this node did not commit in that round, or its data dir was replaced") from None
        if len(salt) != SALT_BYTES:
            raise CommitmentError(f"commitment salt {path} is damaged ({len(salt)} bytes, not {SALT_BYTES})")
        return salt

    def _path(self, schedule_id: str) -> pathlib.Path:
        if not isinstance(schedule_id, str) or not _SCHEDULE_ID.match(schedule_id):
            raise CommitmentError(f"not a schedule id: {schedule_id!r:.80}")
        return self.directory / schedule_id


def _salted_sha256(salt: bytes, data: bytes) -> str:
    return hashlib.sha256(salt + data).hexdigest()  # the salt's length is fixed: no ambiguity


def make_commitment(data: bytes, samples: int, *, schedule_id: str, node: str, salt: bytes) -> bytes:
    """The blob for `data` (npz bytes holding `samples` samples) in round `schedule_id`."""
    return cbor.encode({"v": VERSION, "format": FORMAT, "schedule_id": schedule_id, "node": node,
                        "samples": int(samples), "salted_sha256": _salted_sha256(salt, data)})


def check_commitment(blob: bytes, data: bytes, samples: int, *, schedule_id: str, node: str, salt: bytes) -> None:
    """Raise CommitmentError unless `blob` commits `node` to exactly `data` in `schedule_id`."""
    try:
        body = cbor.decode(blob, max_bytes=MAX_COMMITMENT_BYTES)
    except cbor.PayloadError as exc:
        raise CommitmentError(f"the submitted commitment is malformed: {exc}") from None
    if not isinstance(body, dict) or body.get("v") != VERSION or body.get("format") != FORMAT:
        raise CommitmentError(f"the submission is not a {FORMAT} commitment (a data bundle? then the "
                              f"workflow's train_on changed after the round opened; an unsalted v1 "
                              f"commitment from an older node? then submit again in the next round)")
    if body.get("schedule_id") != schedule_id or body.get("node") != node:
        raise CommitmentError(f"the commitment belongs to node {str(body.get('node'))[:16]}… in round "
                              f"{str(body.get('schedule_id'))[:16]}…, not to this node and round")
    if body.get("salted_sha256") != _salted_sha256(salt, data) or body.get("samples") != samples:
        raise CommitmentError(f"this node's data changed since it submitted ({body.get('samples')} samples "
                              f"committed, {samples} now, or the same count with other values); "
                              f"the round must train on what was committed")
