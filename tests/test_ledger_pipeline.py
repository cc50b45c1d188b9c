"""The dev validator stores block N while it executes block N+1 (ledger/devnet/chain.py).

What must not change: a batch is COMMITTED only once its block is durable, blocks are stored in
order, and a kill -9 in the middle of that pipeline leaves a chain whose head, state and
committed batches agree after the restart.
"""

from __future__ import annotations

import asyncio

from devnet_process import DevnetProcess
from ledger_helpers import intkey_batch, rest, run, running_processor
from trustmesh.ledger import intkey
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.signing import PrivateKey

SIGNER = PrivateKey.generate()


def test_kill_during_pipelined_blocks_keeps_head_state_and_statuses_consistent(tmp_path):
    node = DevnetProcess(tmp_path / "d", "--max-batches-per-block", "20").start()
    batches = [intkey_batch(SIGNER, *[("set", f"k{b}-{i}", i) for i in range(5)]) for b in range(300)]
    try:
        async def scenario():
            async with running_processor(node.component_url, max_occupancy=32), \
                    rest(node.rest_url, retries=40, backoff=0.1) as client:
                for i in range(0, len(batches), 50):
                    await client.submit_batches(batches[i:i + 50])
                # let several blocks go through the execute/store pipeline, then kill -9
                while int((await client.head())["header"]["block_num"]) < 4:
                    await asyncio.sleep(0.05)
                await asyncio.get_running_loop().run_in_executor(None, node.kill)
                await asyncio.get_running_loop().run_in_executor(None, node.start)

                head = await client.head()
                ids = [b.header_signature for b in batches]
                statuses = {s["id"]: s["status"] for s in await client.batch_statuses(ids)}
                committed = {b for b, s in statuses.items() if s == "COMMITTED"}
                assert committed and all(s in ("COMMITTED", "UNKNOWN") for s in statuses.values())
                assert len(committed) < len(batches)  # the kill did land mid-stream
                # exactly the committed batches' keys are in the head's state (nothing half-written)
                state = {}
                async for _, value in client.list_state(intkey.NAMESPACE, head=head["header_signature"]):
                    state.update(cbor.decode(value))
                expected = {f"k{b}-{i}": i for b, batch in enumerate(batches)
                            if batch.header_signature in committed for i in range(5)}
                assert state == expected
                # and the chain goes on from there: resubmitting everything commits the rest once
                for i in range(0, len(batches), 50):
                    await client.submit_batches(batches[i:i + 50])
                final = await client.wait_for_batches(ids, 120)
                assert all(s["status"] == "COMMITTED" for s in final)

        run(scenario(), timeout=180)
    finally:
        node.stop()
