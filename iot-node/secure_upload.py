"""An IoT node's part in a securely aggregated round (fl/secagg.py; the rules in
scheduling/secagg_rules.py):

    submit     its two X25519 public keys go in the batch of its submission (keys_transaction)
    ready      once the round's participants are fixed, its shares of its self-mask seed and of its
               mask key, sealed for its neighbours (shares_transaction): before any upload, so a
               participant that drops out later is recovered from them
    local_train  its update leaves it only masked (mask): the masked vector is the blob it stores
               and reports
    unmask     once every local_train of the round is done, it opens the shares its neighbours
               sealed for it and reveals their self-mask shares (unmask_transaction)

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
        sealed: dict[str, dict[str, str]] = {n: {} for n in theirs}
        digests: dict[str, dict[str, str]] = {n: {} for n in theirs}
        for kind, secret in (("b", mine.self_seed), ("s", mine.s_private)):
            for holder, share in secagg.split_secret(secret, block["threshold"], theirs).items():
                key = secagg.agree(mine.c_private, records[holder]["c_pk"], schedule_id=schedule_id, a=self.node,
                                   b=holder, purpose="share")
                sealed[holder][kind] = secagg.seal_share(key, share, schedule_id=schedule_id, sender=self.node,
                                                         holder=holder).hex()
                digests[holder][kind] = secagg.share_digest(share)
        return schedule.make_secagg_shares_transaction(self.signer, schedule_id, workflow_id,
                                                       secagg.commitment(mine.self_seed), sealed, digests)

    async def unmask_transaction(self, schedule_id: str, workflow_id: str, block: Mapping, uploaded: set[str]):
        """Reveal, for every neighbour, the share it sealed for this node: of its self-mask if it
        uploaded, of its mask key if its upload was dropped."""
        _, graph = await self._graph(schedule_id, block)
        mine, theirs = self.secrets(schedule_id), graph[self.node]
        records = await self._records(schedule_id, theirs)
        revealed = {}
        for sender, record in records.items():
            key = secagg.agree(mine.c_private, record["c_pk"], schedule_id=schedule_id, a=sender, b=self.node,
                               purpose="share")
            if "sealed" not in record:
                continue  # dropped before it sent any shares: nobody holds a share of it
            sealed = bytes.fromhex(record["sealed"][self.node]["b" if sender in uploaded else "s"])
            revealed[sender] = secagg.open_share(key, sealed, schedule_id=schedule_id, sender=sender,
                                                 holder=self.node).hex()
        return schedule.make_secagg_unmask_transaction(self.signer, schedule_id, workflow_id, revealed)
