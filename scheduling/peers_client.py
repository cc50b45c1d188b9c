"""trustmesh-peer's payloads, transactions and decoders, and keep_heartbeating, the loop a compute
node runs beside its work (the family: peers.py)."""

from __future__ import annotations

import asyncio
import logging

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch, make_transaction

from . import layout
from .common import MAX_RECORD_BYTES
from .peers_rules import FAMILY_NAME, FAMILY_VERSION, HEARTBEAT_SECONDS

LOGGER = logging.getLogger(__name__)


def decode_peer_index(data: bytes | None) -> list[str]:
    """The index as stored (e.g. from RestClient.get_state(PEER_INDEX_ADDRESS)); [] when absent."""
    if data is None:
        return []
    value = cbor.decode(data, max_bytes=MAX_RECORD_BYTES)
    if not isinstance(value, list):
        raise ValueError(f"peer index at {layout.PEER_INDEX_ADDRESS} is not a CBOR list")
    return value


def decode_peer(data: bytes | None) -> dict | None:
    return None if data is None else cbor.decode(data, max_bytes=MAX_RECORD_BYTES)


def decode_liveness(data: bytes | None) -> dict | None:
    """A liveness record as stored (e.g. RestClient.get_state(liveness_address(node)))."""
    return None if data is None else cbor.decode(data, max_bytes=1024 * 1024)


def make_peer_payload(action: str, *, name: str, encryption_public_key: str, cpu_cores: int, memory_mb: int,
                      accelerator: str | None = None) -> bytes:
    resources: dict = {"cpu_cores": cpu_cores, "memory_mb": memory_mb}
    if accelerator is not None:
        resources["accelerator"] = accelerator
    return cbor.encode({"action": action, "name": name, "encryption_public_key": encryption_public_key,
                        "resources": resources})


def make_register_transaction(signer, *, name: str, encryption_public_key: str, cpu_cores: int, memory_mb: int,
                              accelerator: str | None = None, **kwargs):
    """Register the signer as a compute node. Reads/writes its record, the peer index and its
    liveness record (registering counts as seen); reads BlockInfo."""
    node = signer.public_key().as_hex()
    addresses = [layout.peer_address(node), layout.PEER_INDEX_ADDRESS, layout.liveness_address(node)]
    payload = make_peer_payload("register", name=name, encryption_public_key=encryption_public_key,
                                cpu_cores=cpu_cores, memory_mb=memory_mb, accelerator=accelerator)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, [*addresses, layout.BLOCK_INFO_NS],
                            addresses, **kwargs)


def make_update_transaction(signer, *, name: str, encryption_public_key: str, cpu_cores: int, memory_mb: int,
                            accelerator: str | None = None, **kwargs):
    """Replace the signer's own record (all fields). Reads/writes only that record and its
    liveness record (an update counts as seen); reads BlockInfo."""
    node = signer.public_key().as_hex()
    addresses = [layout.peer_address(node), layout.liveness_address(node)]
    payload = make_peer_payload("update", name=name, encryption_public_key=encryption_public_key,
                                cpu_cores=cpu_cores, memory_mb=memory_mb, accelerator=accelerator)
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, payload, [*addresses, layout.BLOCK_INFO_NS],
                            addresses, **kwargs)


def heartbeat_payload() -> bytes:
    return cbor.encode({"action": "heartbeat"})


def make_heartbeat_transaction(signer, **kwargs):
    """The signer (a registered compute node) is alive. Reads its registry record and BlockInfo;
    writes only its liveness record."""
    node = signer.public_key().as_hex()
    liveness = layout.liveness_address(node)
    inputs = [layout.peer_address(node), liveness, layout.BLOCK_INFO_NS]
    return make_transaction(signer, FAMILY_NAME, FAMILY_VERSION, heartbeat_payload(), inputs, [liveness], **kwargs)


async def keep_heartbeating(rest, signer, every: float = HEARTBEAT_SECONDS, *, retry: float = 5.0,
                            commit_timeout: float = 60.0) -> None:
    """Send a heartbeat now and then every `every` seconds until cancelled (a compute node's
    on-chain liveness; run it as a task beside the node's work).

    rest: a RestClient. Never raises for a failed heartbeat (REST API or validator away, batch
    not committed in time, refused): it logs one warning per outage, tries again after `retry`
    seconds (at most `every`), and logs once when heartbeats commit again. CancelledError
    propagates, so cancelling the task stops it at once.
    """
    node = signer.public_key().as_hex()
    failing: str | None = None  # what the current outage looks like (None: the last beat committed)
    while True:
        try:
            ids = await rest.submit_batches([make_batch(signer, [make_heartbeat_transaction(signer)])])
            [status] = await rest.wait_for_batches(ids, commit_timeout, raise_invalid=False)
            if status.get("status") != "COMMITTED":
                message = (status.get("invalid_transactions") or [{}])[0].get("message") or status.get("status")
                raise RuntimeError(f"heartbeat not committed: {message}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a heartbeat must outlive any outage
            if failing is None:
                LOGGER.warning("heartbeat of node %s… failed (%s); retrying every %.0f s until it commits",
                               node[:16], exc, min(retry, every))
            else:
                LOGGER.debug("heartbeat of node %s… failed again: %s", node[:16], exc)
            failing = str(exc)
            await asyncio.sleep(min(retry, every))
            continue
        if failing is not None:
            LOGGER.info("heartbeat of node %s… commits again", node[:16])
            failing = None
        await asyncio.sleep(every)
