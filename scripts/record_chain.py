"""Record the chain of a real federated-digits run as a replay fixture.

    .venv/bin/python scripts/record_chain.py              # the whole workflow (12 rounds) -> tests/data/
    .venv/bin/python scripts/record_chain.py --rounds 3 --out /tmp/short.cbor.gz --keep-home /tmp/rec

It starts a local network (`trustmesh up`: dev validator with BlockInfo injection, the four
families, Redis, CouchDB-protocol server, compute nodes, IoT nodes in host processes), runs
workflows/federated-digits.json unchanged (or cut to --rounds) to the end with `trustmesh run`,
stops the network, and reads the validator's store (HOME/chain). The REST API is not used to read
blocks: it returns headers decoded to JSON, and a replay needs the signed bytes as they were.

The fixture (gzip'd canonical CBOR, written reproducibly) holds, for every block after genesis,
in chain order:

    num, id, state_root         the block as the recording validator committed it
    batches                     each batch's serialized, signed Batch protobuf, in block order;
                                the first is the validator's injected BlockInfo batch, which
                                carries the block's agreed time (the only clock a family reads)
    changes                     per transaction, in block order: [txn_id, [[address,
                                sha256(value)[:8] or None for a delete], ...]] from its receipt,
                                so a replay that differs can name the addresses it got wrong

Nothing else a replay needs is outside the chain: families are pure functions of payload and
state, and the block time sits in the recorded BlockInfo transactions.
tests/test_state_root_replay.py replays it.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import json
import pathlib
import subprocess
import sys
import tempfile
import time

import cbor2

ROOT = pathlib.Path(__file__).resolve().parents[1]

FORMAT = "trustmesh-chain-replay/1"
DEFAULT_OUT = ROOT / "tests" / "data" / "federated-digits-chain.cbor.gz"


def value_digest(value: bytes) -> bytes:
    """How the fixture names a state value: 8 bytes of its sha256 (enough to tell two apart)."""
    return hashlib.sha256(value).digest()[:8]


def trustmesh(home: pathlib.Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "trustmesh.cli", "--home", str(home), *args]
    print("$ trustmesh " + " ".join(args), flush=True)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"trustmesh {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}\n"
                         f"logs: {home / 'logs'}")
    return result


def record(home: pathlib.Path, *, rounds: int | None, iot_nodes: int, compute_nodes: int, timeout: float) -> dict:
    definition = json.loads((ROOT / "workflows" / "federated-digits.json").read_text())
    participants = [f"iot-{i + 1}" for i in range(iot_nodes)]
    federation = definition["federation"]
    if rounds is not None:
        federation["rounds"] = rounds
    if iot_nodes != len(federation["participant_nodes"]):
        federation.update(participant_nodes=participants, expected_nodes=iot_nodes,
                          min_nodes_required=min(federation["min_nodes_required"], iot_nodes))
    home.mkdir(parents=True, exist_ok=True)
    path = home / "workflow.json"
    path.write_text(json.dumps(definition, indent=1))

    started = time.perf_counter()
    try:
        trustmesh(home, "-q", "up", "--compute-nodes", str(compute_nodes), "--iot-nodes", str(iot_nodes),
                  timeout=300)
        run = trustmesh(home, "run", str(path), "--timeout", str(timeout), timeout=timeout + 60)
        print(run.stdout.strip().splitlines()[-1] if run.stdout.strip() else "", flush=True)
    finally:  # whatever happened, leave no process behind
        subprocess.run([sys.executable, "-m", "trustmesh.cli", "--home", str(home), "-q", "down"],
                       capture_output=True, timeout=180, cwd=ROOT)
    print(f"run took {time.perf_counter() - started:.1f} s", flush=True)
    return {"workflow_id": definition["workflow_id"], "rounds": federation["rounds"], "iot_nodes": iot_nodes,
            "compute_nodes": compute_nodes}


def read_chain(chain_dir: pathlib.Path) -> list[dict]:
    """Every block after genesis, as the fixture stores it."""
    from trustmesh.ledger import protos as pb
    from trustmesh.ledger.devnet.store import ChainStore

    store = ChainStore(chain_dir)
    try:
        blocks = []
        for block in store.blocks_ascending(1):
            header = pb.BlockHeader.FromString(block.header)
            changes = []
            for batch in block.batches:
                for txn in batch.transactions:
                    receipt = store.receipt(txn.header_signature)
                    if receipt is None:
                        raise SystemExit(f"block {header.block_num}: no receipt for {txn.header_signature[:16]}")
                    changes.append([txn.header_signature, [
                        [c.address, value_digest(c.value) if c.type == pb.StateChange.SET else None]
                        for c in receipt.state_changes]])
            blocks.append({
                "num": header.block_num,
                "id": block.header_signature,
                "state_root": header.state_root_hash,
                "batches": [b.SerializeToString() for b in block.batches],
                "changes": changes,
            })
        return blocks
    finally:
        store.close()


def commit_of_tree() -> str:
    """HEAD, with "+dirty" when the tree that ran differs from it (read-only git)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_fixture(out: pathlib.Path, recorded: dict, blocks: list[dict]) -> int:
    document = {"format": FORMAT, "recorded": recorded, "blocks": blocks}
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = cbor2.dumps(document, canonical=True)
    with open(out, "wb") as f:  # mtime 0 and no file name: the same chain gives the same bytes
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as z:
            z.write(raw)
    return len(raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="rounds of federated-digits to run (default: the file's, 12)")
    parser.add_argument("--iot-nodes", type=int, default=10, help="default %(default)s, as in the workflow file")
    parser.add_argument("--compute-nodes", type=int, default=2, help="default %(default)s")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to let the run take")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="default %(default)s")
    parser.add_argument("--keep-home", type=pathlib.Path,
                        help="run the network in this (new) folder and keep it: logs, chain, stores")
    parser.add_argument("--from-chain", type=pathlib.Path, metavar="DATA_DIR",
                        help="do not run anything: write the fixture from this validator data dir (HOME/chain)")
    args = parser.parse_args(argv)

    if args.from_chain:
        saved = args.from_chain.parent / "recording.json"  # what a --keep-home recording ran
        recorded = json.loads(saved.read_text()) if saved.exists() else {"source": str(args.from_chain)}
        recorded.setdefault("commit", "unknown (written from an existing chain)")
        recorded.setdefault("date", datetime.date.today().isoformat())
        blocks = read_chain(args.from_chain)
    else:
        with tempfile.TemporaryDirectory(prefix="trustmesh-record-") as tmp:
            home = args.keep_home or pathlib.Path(tmp) / "net"
            if args.keep_home and args.keep_home.exists():
                raise SystemExit(f"{args.keep_home} exists; give --keep-home a new folder")
            recorded = record(home, rounds=args.rounds, iot_nodes=args.iot_nodes,
                              compute_nodes=args.compute_nodes, timeout=args.timeout)
            recorded.update(commit=commit_of_tree(), date=datetime.date.today().isoformat())
            (home / "recording.json").write_text(json.dumps(recorded))
            blocks = read_chain(home / "chain")
    raw_size = write_fixture(args.out, recorded, blocks)
    txns = sum(len(b["changes"]) for b in blocks)
    batches = sum(len(b["batches"]) for b in blocks)
    print(f"{args.out}: {len(blocks)} blocks, {batches} batches, {txns} transactions; "
          f"{raw_size / 1024:.0f} KiB of CBOR, {args.out.stat().st_size / 1024:.0f} KiB gzip'd", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
