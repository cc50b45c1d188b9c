"""Batched local training: N clients' local_train of one round one by one vs local_train_many.

Both train the same N digits shards (workflows/federated-digits.json: model, hyperparameters,
Dirichlet partition of the training split into N shards, as an N-participant round gets them)
from the same global model with the seeds the compute node derives, in this process, side by
side: each repetition runs both, in alternating order, so a noisy machine slows both alike.
Prints per N and torch thread count the wall time of each approach (median and min..max over the
repetitions), the ratio plain / batched, and whether every result is bit-identical.

vmap over stacked parameters is not a contender: it does not give the same bits (the check at
the start prints whether vmap(F.linear) equals F.linear per client here; see
fl/batched_training.py). The compute node batches where this shows the lockstep path wins.

Run: .venv/bin/python bench/bench_batched_training.py [--clients 10,50,100] [--threads 1,2] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from trustmesh.fl import datasets, model_format, training
from trustmesh.fl.batched_training import Client, local_train_many

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "workflows" / "federated-digits.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workflow", type=pathlib.Path, default=WORKFLOW)
    p.add_argument("--clients", default="10,50,100")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--optimizer", choices=sorted(training.OPTIMIZERS), help="default: the workflow's")
    return p.parse_args(argv)


def vmap_matches() -> bool:
    """Whether vmap(F.linear) over stacked weights gives each client's F.linear bits (shapes of
    the digits model, a small last batch included)."""
    gen = torch.Generator().manual_seed(0)
    for batch, fan_in, fan_out in ((32, 64, 64), (5, 64, 64), (32, 64, 32), (17, 32, 10)):
        w, b = torch.randn(50, fan_out, fan_in, generator=gen), torch.randn(50, fan_out, generator=gen)
        x = torch.randn(50, batch, fan_in, generator=gen)
        alone = torch.stack([F.linear(x[i], w[i], b[i]) for i in range(50)])
        if not torch.equal(torch.vmap(F.linear)(x, w, b), alone):
            return False
    return True


def digests(results) -> list[str]:
    return [model_format.digest(model_format.serialize(r.state, workflow_id="bench", round=1,
                                                       model_spec=SPEC)) + json.dumps(r.metrics) for r in results]


SPEC: dict = {}


def main(argv=None) -> int:
    global SPEC
    args = parse_args(argv)
    workflow = json.loads(args.workflow.read_text())
    SPEC, hp = workflow["model"], dict(workflow["hyperparameters"])
    if args.optimizer:
        hp["optimizer"] = args.optimizer
    start = training.initial_state(SPEC, hp["seed"] + 1)  # a global model, as from round 2 on
    print(f"model {json.dumps(SPEC)}, hyperparameters {json.dumps(hp)}")
    print(f"{'threads':>7} {'clients':>7} {'samples':>8} {'plain s':>18} {'batched s':>18} {'ratio':>6}  identical")
    all_identical = True
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"{threads:>7} vmap(F.linear) equals F.linear per client: {vmap_matches()}")
        for count in [int(c) for c in args.clients.split(",")]:
            data = datasets.federated_digits(workflow["data"], count)
            clients = [Client(s.x, s.y, training.derive_seed(hp["seed"], 2, f"node-{i}"))
                       for i, s in enumerate(data.shards)]
            times = {"plain": [], "batched": []}
            identical = True
            for rep in range(args.reps):
                order = ("plain", "batched") if rep % 2 == 0 else ("batched", "plain")
                out = {}
                for way in order:
                    t0 = time.perf_counter()
                    if way == "plain":
                        out[way] = [training.local_train(SPEC, hp, start, c.x, c.y, seed=c.seed) for c in clients]
                    else:
                        out[way] = local_train_many(SPEC, hp, start, clients)
                    times[way].append(time.perf_counter() - t0)
                identical = identical and digests(out["plain"]) == digests(out["batched"])
            all_identical = all_identical and identical
            shown = {w: f"{statistics.median(t):.3f} ({min(t):.3f}..{max(t):.3f})" for w, t in times.items()}
            ratio = statistics.median(times["plain"]) / statistics.median(times["batched"])
            samples = sum(len(s) for s in data.shards)
            print(f"{threads:>7} {count:>7} {samples:>8} {shown['plain']:>18} {shown['batched']:>18} "
                  f"{ratio:>5.2f}x  {'yes' if identical else 'NO'}", flush=True)
    return 0 if all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
