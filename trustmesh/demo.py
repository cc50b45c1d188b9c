"""`trustmesh demo`: the embedded default run, start to finish on loopback.

Today it proves the ledger layer: a fresh dev validator, an intkey processor on our runtime and a
client that commits signed batches, follows them through events and re-reads the state. The
federated workflow joins this run as the scheduling, compute-node and IoT-node issues land.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
import time

from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.devnet.node import DevnetConfig, DevValidator
from trustmesh.ledger.events import EventSubscriber, event_subscription
from trustmesh.ledger.intkey import IntkeyHandler, address, make_intkey_transaction
from trustmesh.ledger.processor import TransactionProcessor
from trustmesh.ledger.rest_client import RestClient
from trustmesh.ledger.signing import PrivateKey


def _say(text: str) -> None:
    print(text, flush=True)


async def run_demo(data_dir: pathlib.Path, batches: int = 20, per_batch: int = 5) -> None:
    started = time.perf_counter()
    validator = DevValidator(DevnetConfig(data_dir=data_dir, endpoint="tcp://127.0.0.1:0", rest_port=0))
    await validator.start()
    _say(f"[1/4] dev validator up: component {validator.component_url}, REST {validator.rest_url}")
    processor = TransactionProcessor(validator.component_url)
    processor.add_handler(IntkeyHandler())
    await processor.start()
    _say("[2/4] intkey transaction processor registered")
    subscriber = EventSubscriber(validator.component_url, [event_subscription("intkey/changed")])
    await subscriber.start()
    signer = PrivateKey.generate()
    try:
        async with RestClient(validator.rest_url) as client:
            todo = [make_batch(signer, [make_intkey_transaction(signer, "set", f"demo{b}-{t}", t)
                                        for t in range(per_batch)]) for b in range(batches)]
            ids = await client.submit_batches(todo)
            _say(f"[3/4] submitted {batches} batches of {per_batch} signed transactions")
            seen = 0
            while seen < batches * per_batch:
                block = await asyncio.wait_for(subscriber.next_block(), 30)
                seen += len(block.of_type("intkey/changed"))
                _say(f"      block {block.block_num} committed, state root {block.state_root_hash[:16]}… "
                     f"({seen}/{batches * per_batch} transactions)")
            statuses = await client.wait_for_batches(ids, 30)
            assert all(s["status"] == "COMMITTED" for s in statuses)
            value = cbor.decode(await client.get_state(address(f"demo{batches - 1}-{per_batch - 1}")))
            assert value == {f"demo{batches - 1}-{per_batch - 1}": per_batch - 1}
            _say(f"[4/4] all {batches} batches COMMITTED; state read back and verified "
                 f"in {time.perf_counter() - started:.1f} s")
    finally:
        await subscriber.close()
        await processor.stop()
        await validator.stop()


def main(data_dir: str | None = None) -> int:
    if data_dir:
        asyncio.run(run_demo(pathlib.Path(data_dir)))
    else:
        with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
            asyncio.run(run_demo(pathlib.Path(tmp)))
    return 0
