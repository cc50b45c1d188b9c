"""Scale: the same federated-digits workflow at 10, 100 and 1,000 participants, through a real
local network, beside the same training in a plain in-process loop.

For each participant count P: `trustmesh up --compute-nodes 2 --iot-nodes P` (IoT nodes in one
host process per core, up's default; `--iot-hosts` to choose, 0 for a process each), timing
start-up and reading the resident memory of every process; then the workflow (IID shards, its
rounds scaled so that each size fits in minutes) deployed and followed to its last round.
Per-round wall time = time between two rounds' round-finalized events as this client receives
them (round 1: from the deploy), so it holds everything: submitting, scheduling, training,
aggregating, evaluating, every commit. Rounds overlap (one collects while another trains), so
single rounds alternate long and short: the figure compared is the mean after round 1 (the
rate at which rounds finish), with the range beside it. Peak memory is sampled every half second meanwhile.
CPU per round by part: the CPU time (user + system, children included: the validator's state
process) that each part of the network (validator, processors, compute nodes, IoT nodes or
hosts, Redis, CouchDB, dashboard) spent between the end of round 1 and the end of the last
round, divided by those rounds. Two cores give at most 2 s of CPU per second of wall time, so
this says where a round's time goes and what a target leaves to spend.

The plain loop is the same training in this process, one torch thread: per round, every
participant's local_train from the global model (same model, hyperparameters and shards),
FedAvg, evaluation on the test split; run PLAIN_RUNS times after the network stopped, the median
run's mean after round 1 counts. Overhead = round wall - plain loop per round.

Run: .venv/bin/python bench/bench_scale.py [--participants 10,100,1000] [--iot-hosts K]

Targets (issue #17, 2 cores): at 10 participants round wall <= 1.0x the 1-thread plain loop; at
100 <= 2x; at 1,000 the run completes with overhead per participant no higher than at 100; `up`
of 1,000 IoT nodes <= 60 s and <= 8 GB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import threading
import time

import localnet
import proc_stats
from localnet import ROOT
from trustmesh import local_network
from trustmesh.scheduling import events

ROUNDS = {10: 12, 100: 6, 1000: 5}  # rounds per size: a steady state (rounds overlap, so their times alternate long and short; the mean over several is the rate), few enough to fit
PLAIN_RUNS = 3  # the plain loop runs this often (it varies ~1.5x between runs on a loaded machine); its median counts


def scaled_definition(participants: int, rounds: int) -> dict:
    definition = json.loads((ROOT / "workflows" / "federated-digits-100.json").read_text())
    definition["workflow_id"] = f"scale-{participants}"
    definition["federation"].update(participant_nodes=[f"iot-{i}" for i in range(1, participants + 1)],
                                    expected_nodes=participants, min_nodes_required=participants,
                                    rounds=rounds, round_timeout=600)
    return definition


def plain_loop(definition: dict, rounds: int) -> list[float]:
    """Seconds per round of the same training in this process, one torch thread."""
    import torch

    from trustmesh.fl import datasets, strategies, training

    torch.set_num_threads(1)
    spec, hp = definition["model"], definition["hyperparameters"]
    nodes = definition["federation"]["participant_nodes"]
    data = datasets.federated_digits(definition["data"], len(nodes))
    strategy, state, times = strategies.FedAvg(), None, []
    for number in range(1, rounds + 1):
        started = time.perf_counter()
        updates = []
        for node, shard in zip(nodes, data.shards):
            seed = training.derive_seed(hp["seed"], definition["workflow_id"], number, node)
            result = training.local_train(spec, hp, state, shard.x, shard.y, seed=seed)
            updates.append(strategies.ClientUpdate(node, result.state, result.samples, result.metrics))
        state, _ = strategy.aggregate(updates)
        training.evaluate(spec, state, data.test.x, data.test.y)
        times.append(time.perf_counter() - started)
    return times


class PeakMemory:
    """The largest resident memory of the network's processes, sampled every half second."""

    def __init__(self, home: pathlib.Path):
        self.home, self.peak, self._stop = home, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            self.peak = max(self.peak, local_network.memory_mib(local_network.status(self.home)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_by_part(home: pathlib.Path) -> dict[str, float]:
    """part ("validator", "compute", "iot", ...) -> CPU seconds its processes have used so far."""
    below, parts = proc_stats.children(), {}
    for name, service in local_network.status(home).get("services", {}).items():
        if service.get("pid"):
            part = name.rstrip("0123456789").rstrip("-").removesuffix("-host")  # compute-2 -> compute
            parts[part] = parts.get(part, 0.0) + proc_stats.cpu_seconds_below(service["pid"], below)
    return parts


async def follow(home: pathlib.Path, path: pathlib.Path, workflow_id: str, rounds: int) -> tuple[list[float], dict]:
    """(seconds per round, part -> CPU seconds per round after round 1)."""
    async with localnet.following(home, path, workflow_id, (events.ROUND_FINALIZED,)) as run:
        seen, cpu = {0: run.started}, {}
        async for arrived, _, attrs in run.events(timeout=900):
            if attrs["workflow_id"] == workflow_id:
                seen[int(attrs["round"])] = arrived
                print(f"  round {attrs['round']}/{rounds} final", flush=True)
                if int(attrs["round"]) in (1, rounds):
                    cpu[int(attrs["round"])] = cpu_by_part(home)
                if len(seen) > rounds:
                    break
    steady = max(1, rounds - 1)
    per_round = {part: (cpu[rounds][part] - cpu.get(1, {}).get(part, 0.0)) / steady for part in cpu[rounds]}
    return [seen[r] - seen[r - 1] for r in range(1, rounds + 1)], per_round


def measure(participants: int, base: pathlib.Path, iot_hosts: int | None) -> dict:
    rounds = ROUNDS.get(participants, 3)
    definition = scaled_definition(participants, rounds)
    home = base / f"p{participants}"
    home.mkdir(parents=True)
    path = home / "workflow.json"
    path.write_text(json.dumps(definition))
    print(f"\n== {participants} participants, {rounds} rounds ==", flush=True)
    started = time.perf_counter()
    local_network.start(home, compute_nodes=2, iot_nodes=participants, iot_hosts=iot_hosts, timeout=600)
    up_seconds = time.perf_counter() - started
    up_mib = local_network.memory_mib(local_network.status(home))
    print(f"up in {up_seconds:.1f} s, {up_mib:,.0f} MiB resident", flush=True)
    try:
        with PeakMemory(home) as memory:
            walls, cpu = asyncio.run(follow(home, path, definition["workflow_id"], rounds))
    finally:
        local_network.stop(home)
    steady = walls[1:] or walls  # round 1 warms up
    plains = [statistics.mean(times[1:] or times) for times in (plain_loop(definition, rounds) for _ in range(PLAIN_RUNS))]
    wall, loop = statistics.mean(steady), statistics.median(plains)
    return {"participants": participants, "rounds": rounds, "up_s": up_seconds, "up_mib": up_mib,
            "peak_mib": memory.peak, "walls": walls, "wall": wall, "plain": loop, "plains": plains, "ratio": wall / loop,
            "overhead": wall - loop, "per_participant_ms": 1000 * (wall - loop) / participants, "cpu": cpu}


def plain_spread(r: dict) -> str:
    return f"{r['plain']:.3f} ({min(r['plains']):.3f}-{max(r['plains']):.3f})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", default="10,100,1000",
                        help="comma list of participant counts (default %(default)s)")
    parser.add_argument("--iot-hosts", type=int, help="IoT host processes (default: up's)")
    parser.add_argument("--home", help="keep each network in DIR/pN (default: a temporary directory)")
    args = parser.parse_args(argv)
    localnet.sigterm_as_interrupt()
    sizes = [int(p) for p in args.participants.split(",")]
    results = []
    try:
        with localnet.homes(args.home, ["runs"]) as found:
            for participants in sizes:
                results.append(measure(participants, found["runs"], args.iot_hosts))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"\n{'P':>5} {'rounds':>6} {'up s':>6} {'up MiB':>7} {'peak MiB':>8} {'round s mean (range)':>22} "
          f"{'plain s (runs)':>22} {'ratio':>6} {'overhead s':>10} {'ms/participant':>14}")
    for r in results:
        spread = f"{r['wall']:.2f} ({min(r['walls'][1:] or r['walls']):.2f}-{max(r['walls'][1:] or r['walls']):.2f})"
        print(f"{r['participants']:>5} {r['rounds']:>6} {r['up_s']:>6.1f} {r['up_mib']:>7,.0f} {r['peak_mib']:>8,.0f} "
              f"{spread:>22} {plain_spread(r):>22} {r['ratio']:>5.2f}x {r['overhead']:>10.2f} "
              f"{r['per_participant_ms']:>14.1f}")
    parts = sorted({part for r in results for part in r["cpu"]}, key=lambda p: -max(r["cpu"].get(p, 0) for r in results))
    print(f"\nCPU seconds per round by part, after round 1 (two cores: at most 2 s per second of wall time)")
    print(f"{'P':>5} " + " ".join(f"{p:>10}" for p in parts) + f" {'total':>8} {'plain':>8}")
    for r in results:
        print(f"{r['participants']:>5} " + " ".join(f"{r['cpu'].get(p, 0):>10.3f}" for p in parts)
              + f" {sum(r['cpu'].values()):>8.3f} {r['plain']:>8.3f}")
    by_size = {r["participants"]: r for r in results}
    for size, limit in ((10, 1.0), (100, 2.0)):
        if size in by_size:
            ratio = by_size[size]["ratio"]
            print(f"target at {size}: round <= {limit:g}x the plain loop: {'met' if ratio <= limit else 'NOT met'} "
                  f"({ratio:.2f}x)")
    if 1000 in by_size:
        big = by_size[1000]
        print(f"target: up of 1,000 IoT nodes <= 60 s and <= 8 GB: "
              f"{'met' if big['up_s'] <= 60 and big['peak_mib'] <= 8192 else 'NOT met'} "
              f"({big['up_s']:.1f} s, peak {big['peak_mib']:,.0f} MiB)")
        if 100 in by_size:
            ok = big["per_participant_ms"] <= by_size[100]["per_participant_ms"]
            print(f"target: overhead per participant at 1,000 <= at 100: {'met' if ok else 'NOT met'} "
                  f"({big['per_participant_ms']:.1f} vs {by_size[100]['per_participant_ms']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
