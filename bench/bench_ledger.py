"""Ledger benchmarks: committed transactions/s and submit→commit latency on the dev validator.

Three processes, as in a deployment: the dev validator, an intkey transaction processor on our
runtime, and this client. Batches are signed before the clock starts (signing is the client's
cost, not the ledger's). Throughput is measured twice, side by side, on fresh validators: intkey
as the reference family does it (get + set: 2 context calls per transaction) and intkey with an
event per transaction (3 context calls). Latency uses the second, whose event names the key.
Run: .venv/bin/python bench/bench_ledger.py [--txns 20000]

Targets (issue 2): >= 1,000 committed txn/s and p50 <= 50 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import re
import asyncio
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests"))

from helpers.devnet_process import DevnetProcess  # noqa: E402
import proc_stats  # noqa: E402

from trustmesh.ledger.builders import make_batch  # noqa: E402
from trustmesh.ledger.events import EventSubscriber, event_subscription  # noqa: E402
from trustmesh.ledger.intkey import make_intkey_transaction  # noqa: E402
from trustmesh.ledger.rest_client import RestClient  # noqa: E402
from trustmesh.ledger.signing import PrivateKey  # noqa: E402

PROCESSOR = """
import asyncio, sys
from trustmesh.ledger.intkey import IntkeyHandler
from trustmesh.ledger.processor import TransactionProcessor
async def main():
    tp = TransactionProcessor(sys.argv[1], max_occupancy=int(sys.argv[2]))
    tp.add_handler(IntkeyHandler(events=sys.argv[3] == "events"))
    await tp.run()
asyncio.run(main())
"""


def build_batches(signer, prefix: str, count: int, per_batch: int):
    batches, n = [], 0
    while n < count:
        size = min(per_batch, count - n)
        batches.append(make_batch(signer, [make_intkey_transaction(signer, "set", f"{prefix}{n + i}", i)
                                           for i in range(size)]))
        n += size
    return batches


async def throughput(rest_url: str, batches, concurrency: int) -> tuple[float, int]:
    txns = sum(len(b.transactions) for b in batches)
    async with RestClient(rest_url, retries=50, backoff=0.02, timeout=120) as client:
        start = time.perf_counter()
        chunks = [batches[i:i + 10] for i in range(0, len(batches), 10)]
        queue = asyncio.Queue()
        for chunk in chunks:
            queue.put_nowait(chunk)

        async def worker():
            while not queue.empty():
                await client.submit_batches(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        ids = [b.header_signature for b in batches]
        statuses = await client.wait_for_batches(ids[-50:], 600)
        statuses = await client.wait_for_batches(ids, 600)
        elapsed = time.perf_counter() - start
    committed = sum(1 for s in statuses if s["status"] == "COMMITTED")
    assert committed == len(batches), f"only {committed}/{len(batches)} batches committed"
    return txns / elapsed, txns


async def latency(rest_url: str, component_url: str, signer, samples: int) -> list[float]:
    """Idle validator: one single-transaction batch at a time, timed until its block-commit event."""
    subscriber = EventSubscriber(component_url, [event_subscription("intkey/changed")])
    await subscriber.start()
    results = []
    async with RestClient(rest_url) as client:
        for i in range(samples):
            batch = make_batch(signer, [make_intkey_transaction(signer, "set", f"lat{i}", i)])
            start = time.perf_counter()
            await client.submit_batches([batch])
            name = f"lat{i}"
            while True:  # the block whose intkey event names our key is the one that committed it
                block = await subscriber.next_block()
                if any(a.key == "name" and a.value == name
                       for e in block.of_type("intkey/changed") for a in e.attributes):
                    break
            results.append((time.perf_counter() - start) * 1000)
            await asyncio.sleep(0.02)  # idle between samples
    await subscriber.close()
    return results


def _block_phases(log: str) -> dict[str, float]:
    """Time in each phase of a block, from the validator's 'committed block' log lines. The
    phases of consecutive blocks overlap (chain.py pipelines them): shares, not a timeline."""
    totals = {"execute": 0.0, "state": 0.0, "store": 0.0, "blocks": 0}
    for m in re.finditer(r"execute (\d+) ms, state (\d+) ms, store (\d+) ms", log):
        totals["execute"] += float(m.group(1))
        totals["state"] += float(m.group(2))
        totals["store"] += float(m.group(3))
        totals["blocks"] += 1
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--txns", type=int, default=20000)
    parser.add_argument("--per-batch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-occupancy", type=int, default=32)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()

    signer = PrivateKey.generate()
    print(f"signing 2 x {args.txns} intkey transactions in batches of {args.per_batch} ...", flush=True)
    runs = {}
    for variant in ("reference", "events"):
        batches = build_batches(signer, f"{variant[0]}", args.txns, args.per_batch)
        with tempfile.TemporaryDirectory() as tmp:
            node = DevnetProcess(pathlib.Path(tmp) / "devnet", "--max-batches-per-block", "100").start()
            tp = subprocess.Popen([sys.executable, "-c", PROCESSOR, node.component_url, str(args.max_occupancy),
                                   variant])
            try:
                time.sleep(1.0)  # let the processor register
                pids = {"validator": [node.proc.pid], "state worker": proc_stats.children().get(node.proc.pid, []), "processor": [tp.pid]}
                before = {k: sum(map(proc_stats.cpu_seconds, v)) for k, v in pids.items()}
                tps, txns = asyncio.run(throughput(node.rest_url, batches, args.concurrency))
                cpu = {k: (sum(map(proc_stats.cpu_seconds, v)) - before[k]) / txns * 1e6 for k, v in pids.items()}
                lat = (asyncio.run(latency(node.rest_url, node.component_url, signer, args.latency_samples))
                       if variant == "events" else None)
            finally:
                tp.terminate()
                tp.wait()
                node.stop()
                phases = _block_phases(node.log())
        runs[variant] = (tps, txns, phases, cpu)
    for variant, label in (("reference", "intkey (reference: get+set)"), ("events", "intkey + an event per txn")):
        tps, txns, phases, cpu = runs[variant]
        busy = phases["execute"] + phases["state"] + phases["store"]
        split = ", ".join(f"{k} {phases[k] / busy:.0%}" for k in ("execute", "state", "store")) if busy else "-"
        print(f"throughput, {label}: {txns} txns committed at {tps:,.0f} txn/s "
              f"(target >= 1,000: {'met' if tps >= 1000 else 'MISSED'}, ratio {tps / 1000:.2f}x; "
              f"block phase shares over {phases['blocks']} blocks: {split})")
        print("    CPU per transaction: " + ", ".join(f"{k} {v:.0f} us" for k, v in cpu.items()))
    print(f"events / reference: {runs['events'][0] / runs['reference'][0]:.2f}x")
    lat.sort()
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    print(f"latency submit->commit event, idle, {len(lat)} samples: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
          f"(target p50 <= 50 ms: {'met' if p50 <= 50 else 'MISSED'}, ratio {50 / p50:.2f}x)")


if __name__ == "__main__":
    main()
