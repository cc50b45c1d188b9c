"""An IoT node as a participant of a round (IoTNode's mixin): it submits its data (sealed for
the compute nodes) or a commitment to it (train_on "iot"), collects and verifies every final
global model, and plays its part in secure aggregation (shares once the round is ready, its
shares of the neighbours' secrets once every upload is settled)."""

from __future__ import annotations

import functools
import json
import logging

from trustmesh.fl import model_format
from trustmesh.fl.datasets import Dataset, dump_npz, federated_digits, load_npz
from trustmesh.scheduling import federation, workflow
from trustmesh.stores.data_bundle import seal_bundle

from . import commitment
from .steps import claimed

LOGGER = logging.getLogger("trustmesh.iot_node.node")  # one log for the node, whichever part speaks


@functools.lru_cache(maxsize=4)
def _shards(data_spec: str, count: int) -> list[Dataset]:
    """The data set's shards, partitioned once per process: the nodes of one IoT host share it."""
    return federated_digits(json.loads(data_spec), count).shards


async def fetch_verified_model(blobs, digest: str, model_spec) -> bytes:
    blob = await blobs.get(digest)  # verified against the chain's digest
    model_format.verify(blob, digest, model_spec)
    return blob


class Participant:
    """The participant half of IoTNode: methods only; the node's state lives in IoTNode."""

    def _local_data(self, definition) -> tuple[bytes, int]:
        """This node's data as npz bytes; the same definition always gives the same data, so it
        is prepared once (partitioning the data set every round would cost each node CPU)."""
        # What picks the shard: the data spec, the participant count and this node's place among them
        # (not the whole list as text: 66 KB of JSON per node per round at 1,000 participants).
        participants = definition["federation"]["participant_nodes"]
        key = json.dumps([definition["data"], len(participants), participants.index(self.node)], sort_keys=True)
        if key not in self._data_cache:
            data = self._load_data(definition)
            self._data_cache[key] = (dump_npz(data), len(data))
        return self._data_cache[key]

    def _load_data(self, definition) -> Dataset:
        if self.data_path:
            model = definition["model"]
            return load_npz(self.data_path, input_dim=model["input_dim"], num_classes=model["num_classes"])
        participants = definition["federation"]["participant_nodes"]
        shards = _shards(json.dumps(definition["data"], sort_keys=True), len(participants))
        return shards[participants.index(self.node)]

    async def _participate(self, definition, record) -> None:
        sid = record["schedule_id"]
        if (record["status"] != "collecting" or self.node not in record["expected_nodes"]
                or self.node in record["submissions"] or sid in self._submitted):
            return
        await claimed(self._submitted, sid, lambda: self._submit(definition, record))

    async def _submit(self, definition, record) -> bool:
        sid = record["schedule_id"]
        data, samples = self._local_data(definition)
        if workflow.train_on(definition) == "iot":
            # This node trains on its data itself: nothing of it is shipped, not even sealed.
            blob = commitment.make_commitment(data, samples, schedule_id=sid, node=self.node,
                                              salt=self.salts.for_round(sid))
            metadata = {"format": commitment.FORMAT}
        else:
            if self._recipients is None:
                self._recipients = {node: peer["encryption_public_key"]
                                    for node, peer in (await self.reader.peers()).items()}
            recipients = self._recipients
            blob = seal_bundle(data, recipients, schedule_id=sid, sender=self.node)
            metadata = {"format": "npz-bundle-v1", "recipients": len(recipients)}
        digest = await self.blobs.put(blob)
        txn = [federation.make_submit_transaction(self.signer, sid, digest, samples, metadata)]
        if definition.get("secure_aggregation"):  # its keys in the batch: a submission never stands without them
            txn.insert(0, self.secure.keys_transaction(sid, definition["workflow_id"]))
        if not await self._commit(txn, f"submit to round {record['round']}"):
            return False
        LOGGER.info("%s: submitted %d samples to round %d (%s…)", self.name, samples, record["round"], digest[:12])
        return True

    async def _collect_final(self, workflow_id: str, definition, index) -> None:
        models = self.models.setdefault(workflow_id, {})
        for number, sid in sorted(index["rounds"].items(), key=lambda kv: int(kv[0])):
            number = int(number)
            if number in models:
                continue
            result = await self.reader.round_result(sid)
            if not result or not result.get("final"):
                continue
            digest = result["global_model_digest"]
            blob = await self._verified_model(digest, definition["model"])
            if number in models:  # a block's reaction and a full check may both get here
                continue
            (self.data_dir / f"{workflow_id}-round-{number}.safetensors").write_bytes(blob)
            models[number] = digest
            self.on_round(workflow_id, number, result)
            if definition.get("rewards") and self._coordinates(definition):
                await self._settle(workflow_id, sid, number)
            LOGGER.info("%s: round %d final, global model %s… verified, accuracy %.3f", self.name, number,
                        digest[:12], result.get("evaluations", {}).get("evaluate", {}).get("metrics", {}).get(
                            "accuracy", result["metrics"].get("accuracy", float("nan"))))

    async def _verified_model(self, digest: str, model_spec) -> bytes:
        """A global model, its bytes checked against the chain's digest and its spec; in a host,
        fetched and checked once for all its nodes (IoTHost.verified_model)."""
        if self.host is not None:
            return await self.host.verified_model(digest, model_spec, self.blobs)
        return await fetch_verified_model(self.blobs, digest, model_spec)

    async def _share(self, definition: dict, record: dict) -> None:
        """Once a securely aggregated round is ready (its participants fixed), send this node's
        sealed shares, before any upload, once."""
        sid = record["schedule_id"]
        if record["status"] != "ready" or self.node not in record["submitted_nodes"] or ("share", sid) in self._sent:
            return
        own = await self.reader.secagg(sid, self.node)
        if own is None or "sealed" in own:
            return
        txn = await self.secure.shares_transaction(sid, definition["workflow_id"], definition["secure_aggregation"])
        await self._once(("share", sid), txn, f"send its sealed shares for round {record['round']}")

    async def _unmask_round(self, sid: str) -> None:
        """After a local_train of round `sid` is done: the unmask step, if the round aggregates securely."""
        definition = (await self.trainer.context.round_inputs(sid))["definition"]
        if definition.get("secure_aggregation"):
            await self._unmask(definition, sid)

    async def _unmask(self, definition: dict, sid: str) -> None:
        """Reveal this node's shares of its neighbours' self-masks once every masked upload of the
        round is fixed (every local_train done), once."""
        if ("unmask", sid) in self._sent:
            return
        own = await self.reader.secagg(sid, self.node)
        if own is None or "sealed" not in own or "revealed" in own:
            return  # not a participant, its own upload not in yet, or revealed already
        assignments = await self.reader.assignments(sid)
        uploads = await self._settled_uploads(sid, assignments)
        if uploads is None or uploads.get(self.node) != "done":
            return  # uploads not all settled yet, or its own was dropped: the chain takes no reveal from it
        uploaded = {owner for owner, status in uploads.items() if status == "done"}
        txn = await self.secure.unmask_transaction(sid, definition["workflow_id"], definition["secure_aggregation"],
                                                   uploaded)
        await self._once(("unmask", sid), txn, f"reveal its shares of round {assignments['round']}")
