"""Framework overhead per federated round: round wall time minus the time spent training,
aggregating and evaluating.

Runs the real thing: `trustmesh up` (dev validator, processors, Redis, CouchDB-protocol server,
compute node(s), 10 IoT nodes as separate processes) and workflows/federated-digits.json with
10 participants. Wall time of round r = the moment this client sees round r finalized minus the
moment it saw round r-1 finalized (round 1: from the deploy), so it includes everything between:
opening, encrypting and submitting data, scheduling, event delivery, every commit. Compute time
= the sum of the round's tasks' `compute_seconds`: the time inside training, aggregation and
evaluation themselves, which each compute node measures and reports on chain with the task
(store reads and writes and commits count as overhead; the CouchDB history is written after the
round, beside the next). With one compute node (the default) tasks run one after another,
so wall - compute is exactly what the framework adds; with more nodes tasks overlap and the
figure is a lower bound. Rounds overlap by one (round r+1 collects and is scheduled while r
trains), so a round's preprocess may fall in the previous round's window: per-round figures
shift a little, the steady-state median does not. The overhead splits into store I/O inside
tasks (task_seconds - compute_seconds) and time between tasks (chain, scheduling, waiting).

Redis keeps an append-only file that it fsyncs before every answer (appendfsync `always`, the
local network's default, so task deliveries and blobs survive a kill -9 of Redis).
`--appendfsync always,everysec` brings the network up once per policy, one after another, and
prints each one's figures, then their medians side by side and the ratio: what durability costs
per round.

Run: .venv/bin/python bench/bench_round_overhead.py [--rounds 6] [--compute-nodes 1]
                                                    [--appendfsync always,everysec] [--home DIR]

Target (issue): <= 0.5 s per round with 10 participants and appendfsync always; TrustMesh
reports 3.25-4.19 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys

import localnet
from localnet import ROOT
from trustmesh.scheduling import events
from trustmesh.scheduling.reader import FederationReader

TRUSTMESH_PAPER = (3.25, 4.19)  # seconds of overhead per round reported for TrustMesh


async def measure(home: pathlib.Path, definition_path: pathlib.Path, workflow_id: str) -> list[dict]:
    async with localnet.following(home, definition_path, workflow_id, (events.ROUND_FINALIZED,)) as run:
        rounds = run.definition["federation"]["rounds"]
        seen = {0: run.started}
        async for arrived, _, attrs in run.events():
            if attrs["workflow_id"] == workflow_id:
                seen[int(attrs["round"])] = arrived
                print(f"  round {attrs['round']}/{rounds} final", flush=True)
                if len(seen) > rounds:
                    break
        reader = FederationReader(run.rest)
        index = await reader.rounds(workflow_id)
        results = []
        for number in range(1, rounds + 1):
            sid = index["rounds"][str(number)]
            assignments = await reader.assignments(sid)
            per_kind: dict[str, float] = {}
            in_tasks = 0.0  # whole tasks, store reads and writes included
            for task_id in assignments["order"]:
                status = await reader.task_status(sid, task_id)
                kind = assignments["tasks"][task_id]["kind"]
                per_kind[kind] = per_kind.get(kind, 0.0) + float(status["metrics"].get("compute_seconds", 0.0))
                in_tasks += float(status["metrics"].get("task_seconds", 0.0))
            wall = seen[number] - seen[number - 1]
            compute = sum(per_kind.values())
            results.append({"round": number, "wall": wall, "compute": compute, "overhead": wall - compute,
                            "task_io": in_tasks - compute, "between": wall - in_tasks,
                            "tasks": len(assignments["order"]), **{f"{k}_s": v for k, v in per_kind.items()}})
        return results


def report(results: list[dict], show_json: bool) -> list[float]:
    """Print one network's table and summary; the steady-state overheads (rounds 2 on)."""
    # overhead = store I/O inside tasks + everything between them (chain, scheduling, waiting)
    print(f"\n{'round':>5} {'tasks':>5} {'wall s':>8} {'compute s':>10} {'overhead s':>11} {'in tasks':>9} "
          f"{'between':>8}  (train / aggregate / evaluate s)")
    for r in results:
        print(f"{r['round']:>5} {r['tasks']:>5} {r['wall']:>8.3f} {r['compute']:>10.3f} {r['overhead']:>11.3f} "
              f"{r['task_io']:>9.3f} {r['between']:>8.3f}  "
              f"({r.get('local_train_s', 0):.3f} / {r.get('aggregate_s', 0):.3f} / {r.get('evaluate_s', 0):.3f})")
    steady = [r["overhead"] for r in results[1:]] or [results[0]["overhead"]]
    median = statistics.median(steady)
    print(f"\noverhead per round, rounds 2-{len(results)}: median {median:.3f} s, mean {statistics.mean(steady):.3f} s, "
          f"range {min(steady):.3f}-{max(steady):.3f} s (round 1, with warm-up: {results[0]['overhead']:.3f} s)")
    if show_json:
        print(json.dumps(results, indent=1))
    return steady


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--compute-nodes", type=int, default=1)
    parser.add_argument("--epochs", type=int, help="local epochs (default: the workflow's)")
    parser.add_argument("--appendfsync", type=localnet.policies, default=[localnet.DEFAULT_POLICY],
                        help=f"Redis fsync policies to compare, a comma list of {', '.join(localnet.POLICIES)} "
                             f"(default: {localnet.DEFAULT_POLICY}); one network per policy, one after another")
    parser.add_argument("--home", help="run in DIR/POLICY and keep it (logs in DIR/POLICY/logs); "
                                       "default: a temporary directory")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args(argv)
    localnet.sigterm_as_interrupt()

    definition = json.loads((ROOT / "workflows" / "federated-digits.json").read_text())
    definition["federation"]["rounds"] = args.rounds
    if args.epochs:
        definition["hyperparameters"]["epochs"] = args.epochs
    steady = {}
    try:
        for policy, home, path in localnet.networks(args.home, args.appendfsync, definition,
                                                    compute_nodes=args.compute_nodes, iot_nodes=10):
            steady[policy] = report(asyncio.run(measure(home, path, "overhead-bench")), args.json)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    medians = {policy: statistics.median(values) for policy, values in steady.items()}
    print("\n== overhead per round (steady state), by Redis appendfsync ==")
    for policy in medians:
        print(f"  {policy:>8}: {localnet.spread(steady[policy])}")
    if len(medians) > 1:  # the most durable policy over each other one: what durability costs
        first, *others = sorted(medians, key=localnet.POLICIES.index)
        for other in others:
            print(f"  {first} / {other}: {medians[first] / max(medians[other], 1e-3):.2f}x "
                  f"({medians[first] - medians[other]:+.3f} s per round)")
    target = medians.get("always")
    if target is not None:
        print(f"target <= 0.5 s per round with always: {'met' if target <= 0.5 else 'NOT met'} ({target:.3f} s)")
    best = min(medians.values())
    print(f"TrustMesh {TRUSTMESH_PAPER[0]}-{TRUSTMESH_PAPER[1]} s -> {TRUSTMESH_PAPER[0] / max(best, 1e-3):.1f}x-"
          f"{TRUSTMESH_PAPER[1] / max(best, 1e-3):.1f}x less (best median here)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
