"""An IoT node's part in a securely aggregated round (fl/secagg.py; the rules in
scheduling/secagg_rules.py):

    submit     its two X25519 public keys go in the batch of its submission (keys_transaction)
    ready      once the round's participants are fixed, its shares of its self-mask seed and of its
               mask key, sealed for its neighbours (shares_transaction): before any upload, so a
               participant that drops out later is recovered from them
    local_train  its update leaves it only masked (mask): the masked vector is the blob it stores
               and reports
    unmask     once every local_train of the round is settled (done, or dropped), and only if its
               own upload is in, it opens the shares its neighbours sealed for it and reveals, for
               each, its share of the self-mask (it uploaded) or of the mask key (it was dropped)
               (unmask_transaction)

Every secret of a round (the key pairs, the self-mask seed) is derived from the node's key and
the round id, so a restarted node picks up where it was without storing any of them.
"""

from __future__ import annotations

from typing import Mapping

from trustmesh.fl import secagg
from trustmesh.scheduling import schedule
from trustmesh.scheduling.reader import FederationReader


class SecureAggregation:
    def __init__(self, signer, reader: FederationReader):
        self.signer, self.reader = signer, reader
        self.node = signer.public_key().as_hex()
        self._secret = bytes.fromhex(signer.as_hex())

    def secrets(self, schedule_id: str) -> secagg.RoundSecrets:
        return secagg.round_secrets(self._secret, schedule_id)

    def keys_transaction(self, schedule_id: str, workflow_id: str):
        mine = self.secrets(schedule_id)
        return schedule.make_secagg_keys_transaction(self.signer, schedule_id, workflow_id,
                                                     secagg.public_key(mine.c_private),
                                                     secagg.public_key(mine.s_private))

    async def _graph(self, schedule_id: str, block: Mapping) -> tuple[list[str], dict]:
        record = await self.reader.round(schedule_id)
        participants = list(record["submitted_nodes"])
        return participants, secagg.neighbours(schedule_id, participants, block["neighbours"])

    async def _records(self, schedule_id: str, nodes) -> dict[str, dict]:
        found = {}
        for node in nodes:
            record = await self.reader.secagg(schedule_id, node)
            if record is None:
                raise secagg.SecAggError(f"participant {node[:16]}… of round {schedule_id[:16]}… advertised no keys")
            found[node] = record
        return found

    async def mask(self, schedule_id: str, block: Mapping, state, samples: int) -> bytes:
        """The masked upload's bytes."""
        _, graph = await self._graph(schedule_id, block)
        mine, theirs = self.secrets(schedule_id), graph[self.node]
        records = await self._records(schedule_id, theirs)
        pair_keys = secagg.pair_keys(mine, self.node, {n: r["s_pk"] for n, r in records.items()}, schedule_id, theirs)
        return secagg.to_bytes(secagg.masked_input(state, samples, me=self.node, secrets=mine, pair_keys=pair_keys))

    async def shares_transaction(self, schedule_id: str, workflow_id: str, block: Mapping):
        """This node's shares of its self-mask seed and its mask key, sealed for its neighbours."""
        _, graph = await self._graph(schedule_id, block)
        mine, theirs = self.secrets(schedule_id), graph[self.node]
        records = await self._records(schedule_id, theirs)
        sealed, digests = secagg.seal_shares(mine, self.node, {n: r["c_pk"] for n, r in records.items()}, schedule_id,
                                             block["threshold"], theirs)
        return schedule.make_secagg_shares_transaction(
            self.signer, schedule_id, workflow_id, secagg.commitment(mine.self_seed),
            {holder: {kind: blob.hex() for kind, blob in pair.items()} for holder, pair in sealed.items()}, digests)

    async def unmask_transaction(self, schedule_id: str, workflow_id: str, block: Mapping, uploaded: set[str]):
        """Reveal, for every neighbour, the share it sealed for this node: of its self-mask if it
        uploaded, of its mask key if its upload was dropped."""
        _, graph = await self._graph(schedule_id, block)
        mine, theirs = self.secrets(schedule_id), graph[self.node]
        records = await self._records(schedule_id, theirs)
        revealed = {}
        for sender, record in records.items():
            if "sealed" not in record:
                continue  # dropped before it sent any shares: nobody holds a share of it
            kind = "b" if sender in uploaded else "s"
            revealed[sender] = secagg.open_share(mine.c_private, record["c_pk"],
                                                 bytes.fromhex(record["sealed"][self.node][kind]),
                                                 schedule_id=schedule_id, sender=sender, holder=self.node,
                                                 kind=kind).hex()
        return schedule.make_secagg_unmask_transaction(self.signer, schedule_id, workflow_id, revealed)
