"""State roots survive any restructuring: the chain of a real federated-digits run, replayed on
today's code, reaches the recorded state root at every block.

tests/data/federated-digits-chain.cbor.gz is the whole chain of `trustmesh run
workflows/federated-digits.json` (12 rounds, 10 IoT nodes, 2 compute nodes) on a local network,
written by scripts/record_chain.py: every block's signed batches as committed, its state root,
and each transaction's writes (address and a digest of the value) from its receipt.

The replay is what any Sawtooth validator does with a peer's block: a fresh dev validator
(in-process, loopback ports, its own data dir) with BlockInfo injection off, and the families
and the BlockInfo handler served by the processor runtime over its component endpoint, are fed
one recorded block at a time. The block's own BlockInfo batch (first in every block) brings the
time the recording validator stamped on it, so nothing depends on this machine's clock: the
families read time only from 00b10c and are otherwise pure. A difference names the first block
and the addresses whose writes differ, with what the replay wrote there.

Regenerate the fixture only when a change of state layout is intended (and say so in the
commit): `.venv/bin/python scripts/record_chain.py`.
"""

from __future__ import annotations

import gzip
import hashlib
import pathlib
import time

import cbor2

from helpers.ledger_helpers import run
from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet.block_info import NAMESPACE as BLOCK_INFO_NAMESPACE
from trustmesh.ledger.devnet.block_info import BlockInfoHandler
from trustmesh.ledger.devnet.chain import ChainSettings
from trustmesh.ledger.devnet.node import DevnetConfig, DevValidator
from trustmesh.ledger.processor import TransactionProcessor
from trustmesh.scheduling.handlers import federation_handlers

FIXTURE = pathlib.Path(__file__).parent / "data" / "federated-digits-chain.cbor.gz"
FORMAT = "trustmesh-chain-replay/1"
BLOCK_TIMEOUT = 30.0  # seconds for one replayed block to settle


def load_fixture() -> dict:
    document = cbor2.loads(gzip.decompress(FIXTURE.read_bytes()))
    assert document["format"] == FORMAT, f"{FIXTURE.name} is {document['format']!r}, this test reads {FORMAT!r}"
    return document


def value_digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()[:8]  # as scripts/record_chain.py names values


def _handlers() -> list:
    return [*federation_handlers(), BlockInfoHandler()]


def _family_of(address: str, families: dict[str, str]) -> str:
    name = families.get(address[:6], "unknown family")
    return f"{name}, kind {address[6:8]}"


def _shown(value: bytes | None) -> str:
    if value is None:
        return "deleted"
    try:
        text = repr(cbor2.loads(value))
    except Exception:
        text = value.hex()
    return text if len(text) <= 400 else text[:400] + "…"


def _describe_transaction(raw_batches: list[bytes], txn_id: str) -> str:
    for raw in raw_batches:
        for txn in pb.Batch.FromString(raw).transactions:
            if txn.header_signature == txn_id:
                header = pb.TransactionHeader.FromString(txn.header)
                try:
                    action = cbor2.loads(txn.payload).get("action")
                except Exception:
                    action = None
                return f"{header.family_name} {action or ''}".strip() + f" ({txn_id[:16]})"
    return txn_id[:16]


def _difference(block: dict, receipts: dict, families: dict[str, str]) -> str:
    """Which transactions of a block wrote other values (or other addresses) than recorded."""
    lines = []
    for txn_id, recorded in block["changes"]:
        receipt = receipts.get(txn_id)
        replayed = None if receipt is None else [
            (c.address, c.value if c.type == pb.StateChange.SET else None) for c in receipt.state_changes]
        expected = {address: digest for address, digest in recorded}
        got = {} if replayed is None else {a: (None if v is None else value_digest(v)) for a, v in replayed}
        values = {} if replayed is None else dict(replayed)
        wrong = sorted(a for a in expected.keys() | got.keys() if expected.get(a, b"absent") != got.get(a, b"absent"))
        if not wrong and replayed is not None:
            continue
        what = _describe_transaction(block["batches"], txn_id)
        if replayed is None:
            lines.append(f"  transaction {what}: not committed in the replay (recorded writes: "
                         f"{', '.join(a for a in sorted(expected)) or 'none'})")
            continue
        lines.append(f"  transaction {what} wrote differently at {len(wrong)} address(es):")
        for address in wrong[:5]:
            recorded_as = ("not written" if address not in expected
                           else "deleted" if expected[address] is None else f"sha256 {expected[address].hex()}…")
            replayed_as = "not written" if address not in got else _shown(values[address])
            lines.append(f"    {address} ({_family_of(address, families)}): recorded {recorded_as}; "
                         f"replay wrote {replayed_as}")
    if not lines:
        return ("  every transaction wrote what the recording says, value for value: the difference is in "
                "how the state root is computed (ledger/devnet/merkle.py) or in what a block commits")
    return "\n".join(lines[:12])


async def replay(blocks: list[dict], data_dir: pathlib.Path) -> tuple[int, str | None]:
    """Replay the blocks in order; (how many reached their recorded root, first difference or None)."""
    config = DevnetConfig(data_dir=data_dir, endpoint="tcp://127.0.0.1:0", rest_port=None, block_info=False,
                          chain=ChainSettings(max_batches_per_block=100_000, max_pending_batches=100_000))
    validator = DevValidator(config)
    await validator.start()
    try:
        processor = TransactionProcessor(validator.component_url, max_occupancy=32)
        handlers = _handlers()
        families = {ns: h.family_name for h in handlers for ns in h.namespaces}
        families.setdefault(BLOCK_INFO_NAMESPACE, "block_info")
        for handler in handlers:
            processor.add_handler(handler)
        await processor.start()
        try:
            chain, store = validator.chain, validator.store
            for matched, block in enumerate(blocks):
                where = f"block {block['num']} ({block['id'][:16]}…)"
                batches = [pb.Batch.FromString(raw) for raw in block["batches"]]
                ids = [b.header_signature for b in batches]
                rejected = chain.submit(batches)
                if rejected:
                    return matched, f"{where}: the validator refused a recorded batch: {rejected[0]}"
                await chain.wait_until_settled(ids, BLOCK_TIMEOUT)
                statuses = [chain.batch_status(i) for i in ids]
                troubles = [s for s in statuses if s.status != pb.ClientBatchStatus.COMMITTED]
                receipts = {t.header_signature: r for b in batches for t in b.transactions
                            if (r := store.receipt(t.header_signature)) is not None}
                if troubles:
                    first = troubles[0]
                    message = "; ".join(f"{t.transaction_id[:16]}: {t.message}" for t in first.invalid_transactions)
                    return matched, (
                        f"{where}: {len(troubles)} of its {len(ids)} recorded batches did not commit in the replay; "
                        f"batch {first.batch_id[:16]} is {pb.ClientBatchStatus.Status.Name(first.status)}"
                        f"{': ' + message if message else ''}\n{_difference(block, receipts, families)}")
                header = pb.BlockHeader.FromString(store.head.header)
                if header.block_num != block["num"] or list(header.batch_ids) != ids:
                    return matched, (f"{where}: the replay built block {header.block_num} with "
                                     f"{len(header.batch_ids)} batches instead of this block's {len(ids)}, in its order")
                if header.state_root_hash != block["state_root"]:
                    return matched, (f"{where}: state root {header.state_root_hash}, recorded {block['state_root']}\n"
                                     f"{_difference(block, receipts, families)}")
            return len(blocks), None
        finally:
            await processor.stop()
    finally:
        await validator.stop()


def test_the_recorded_federated_digits_chain_replays_to_every_recorded_state_root(tmp_path):
    fixture = load_fixture()
    blocks = fixture["blocks"]
    # The recording is the whole workflow: deployed, every round opened, submitted, assigned,
    # trained, aggregated and evaluated; a fixture that lost part of it would prove less.
    actions, definitions = {}, []
    for block in blocks:
        first = pb.Batch.FromString(block["batches"][0]).transactions[0]
        assert pb.TransactionHeader.FromString(first.header).family_name == "block_info", block["num"]
        for raw in block["batches"][1:]:
            for txn in pb.Batch.FromString(raw).transactions:
                payload = cbor2.loads(txn.payload)
                key = (pb.TransactionHeader.FromString(txn.header).family_name, payload["action"])
                actions[key] = actions.get(key, 0) + 1
                if key == ("trustmesh-workflow", "deploy"):
                    definitions.append(payload["definition"])
    assert len(definitions) == 1, "the recording deploys one workflow"
    federation = definitions[0]["federation"]
    rounds = federation["rounds"]
    assert actions[("trustmesh-federation", "open_round")] == rounds
    assert actions[("trustmesh-schedule", "round_result")] == rounds
    assert actions[("trustmesh-federation", "submit")] == rounds * federation["expected_nodes"]
    assert ("trustmesh-peer", "register") in actions and ("trustmesh-schedule", "report") in actions

    started = time.perf_counter()
    matched, difference = run(replay(blocks, tmp_path / "replay"), timeout=180)
    elapsed = time.perf_counter() - started
    assert difference is None, (
        f"replaying {FIXTURE.name} (recorded at {fixture['recorded'].get('commit', 'unknown')}): the first "
        f"{matched} blocks reached their recorded state roots, then\n{difference}")
    assert matched == len(blocks) and matched >= 100
    print(f"replayed {matched} blocks to their recorded state roots in {elapsed:.1f} s")
