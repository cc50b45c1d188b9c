"""What secure aggregation (fl/secagg.py) costs, side by side with plain FedAvg.

1. In one process, per round, for 10 and 50 participants (model of workflows/federated-digits.json,
   6,570 parameters; neighbours 8 with threshold 4, or everybody below 10): each participant's
   work (derive keys, agree pair keys, split and seal its shares, mask its update), the
   aggregator's (rebuild every self-mask from revealed shares, sum and unmask), and plain FedAvg's
   weighted average of the same updates; and the largest difference between the securely
   aggregated model and FedAvg's, relative to the largest parameter.
2. --network: the real thing, twice, one after the other: `trustmesh up` with 10 (or
   --network-participants) IoT nodes training their own data (train_on "iot"), plain FedAvg,
   then the same with secure_aggregation (threshold 4, neighbours 8): round wall time and
   framework overhead per round (bench_round_overhead.py's measure), medians side by side and
   their ratio. Above 16 IoT nodes `up` runs them in IoT host processes (one per core).

Run: .venv/bin/python bench/bench_secagg.py [--participants 10,50] [--network [--rounds 4]
     [--network-participants 10,50]]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import time

import numpy as np
import torch

from trustmesh.fl import secagg, training
from trustmesh.fl.strategies import ClientUpdate, FedAvg

from localnet import ROOT

BLOCK = {"protocol": "secagg+", "threshold": 4, "neighbours": 8}


def one_round(n: int, spec: dict, seed: int) -> dict:
    sid = hashlib.sha256(f"bench/{n}".encode()).hexdigest()
    rng = np.random.default_rng(n)
    base = training.initial_state(spec, seed)
    nodes = [f"node-{i:03d}" for i in range(n)]
    states = {node: {k: v + torch.tensor(rng.normal(scale=0.05, size=tuple(v.shape)), dtype=torch.float32)
                     for k, v in base.items()} for node in nodes}
    samples = {node: int(rng.integers(50, 400)) for node in nodes}
    k = BLOCK["neighbours"] if n > BLOCK["neighbours"] + 1 else n - 1
    threshold = min(BLOCK["threshold"], k)
    graph = secagg.neighbours(sid, nodes, k)

    started = time.perf_counter()
    secrets = {node: secagg.round_secrets(node.encode() * 2, sid) for node in nodes}
    c_pub = {node: secagg.public_key(s.c_private) for node, s in secrets.items()}
    s_pub = {node: secagg.public_key(s.s_private) for node, s in secrets.items()}
    sealed, masked, records = {}, {}, {node: {"s_pk": s_pub[node]} for node in nodes}
    for node in nodes:
        mine = secrets[node]
        keys = secagg.pair_keys(mine, node, s_pub, sid, graph[node])
        masked[node] = secagg.to_bytes(secagg.masked_input(states[node], samples[node], me=node, secrets=mine,
                                                           pair_keys=keys))
        records[node]["self_commitment"] = secagg.commitment(mine.self_seed)
        sealed[node], _ = secagg.seal_shares(mine, node, c_pub, sid, threshold, graph[node])
    client = (time.perf_counter() - started) / n

    started = time.perf_counter()
    for holder in nodes:  # each holder opens and reveals (its part of the unmask step)
        revealed = {}
        for sender in graph[holder]:
            revealed[sender] = secagg.open_share(secrets[holder].c_private, c_pub[sender], sealed[sender][holder]["b"],
                                                 schedule_id=sid, sender=sender, holder=holder, kind="b").hex()
        records[holder]["revealed"] = revealed
    reveal = (time.perf_counter() - started) / n

    started = time.perf_counter()
    state = secagg.aggregate_round(sid, {**BLOCK, "threshold": threshold, "neighbours": k}, participants=nodes,
                                   records=records, uploads=masked, samples=samples, template=base)
    server = time.perf_counter() - started

    started = time.perf_counter()
    plain, _ = FedAvg().aggregate([ClientUpdate(node, states[node], samples[node]) for node in nodes])
    fedavg = time.perf_counter() - started
    scale = max(t.abs().max().item() for t in plain.values())
    error = max((state[name] - plain[name]).abs().max().item() for name in plain) / scale
    return {"n": n, "neighbours": k, "threshold": threshold, "client_s": client, "reveal_s": reveal,
            "server_s": server, "fedavg_s": fedavg, "relative_error": error}


def in_process(participants: list[int]) -> None:
    definition = json.loads((ROOT / "workflows" / "federated-digits.json").read_text())
    spec, seed = definition["model"], definition["hyperparameters"]["seed"]
    print(f"{'n':>4} {'k':>3} {'t':>3} {'per participant s':>18} {'reveal s':>9} {'aggregator s':>13} "
          f"{'FedAvg s':>9} {'ratio':>7} {'rel. error':>11}")
    for n in participants:
        r = one_round(n, spec, seed)
        print(f"{r['n']:>4} {r['neighbours']:>3} {r['threshold']:>3} {r['client_s']:>18.4f} {r['reveal_s']:>9.4f} "
              f"{r['server_s']:>13.4f} {r['fedavg_s']:>9.4f} {r['server_s'] / max(r['fedavg_s'], 1e-9):>6.1f}x "
              f"{r['relative_error']:>11.2e}", flush=True)
    print("target: quantization error <= 1e-4 relative")


def network(rounds: int, compute_nodes: int, participants: int) -> None:
    import localnet
    from bench_round_overhead import measure

    definition = json.loads((ROOT / "workflows" / "federated-digits.json").read_text())
    definition["federation"].update(rounds=rounds, train_on="iot")
    if participants != 10:
        definition["federation"].update(participant_nodes=[f"iot-{i}" for i in range(1, participants + 1)],
                                        expected_nodes=participants, min_nodes_required=participants - 3)
    secure = {**definition, "secure_aggregation": BLOCK}
    figures = {}
    for label, wanted in (("plain", definition), ("secagg+", secure)):
        print(f"\n== {label}: {participants} IoT nodes training their own data ==", flush=True)
        for _, home, path in localnet.networks(None, [localnet.DEFAULT_POLICY], wanted,
                                               compute_nodes=compute_nodes, iot_nodes=participants):
            results = asyncio.run(measure(home, path, "overhead-bench"))
        steady = results[1:] or results
        figures[label] = ([r["wall"] for r in steady], [r["overhead"] for r in steady])
        print(f"  wall per round {localnet.spread(figures[label][0])}; overhead {localnet.spread(figures[label][1])}")
    walls = {label: statistics.median(values[0]) for label, values in figures.items()}
    print(f"\n{participants} participants: round wall time, secagg+ / plain: {walls['secagg+'] / walls['plain']:.2f}x "
          f"({walls['secagg+'] - walls['plain']:+.3f} s per round)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--participants", default="10,50")
    parser.add_argument("--network", action="store_true", help="also measure through the real local network")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--compute-nodes", type=int, default=1)
    parser.add_argument("--network-participants", default="10", help="IoT nodes of the --network runs, e.g. 10,50")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    in_process([int(n) for n in args.participants.split(",")])
    if args.network:
        for participants in (int(n) for n in args.network_participants.split(",")):
            network(args.rounds, args.compute_nodes, participants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
