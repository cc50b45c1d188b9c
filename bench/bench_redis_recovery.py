"""Recovery from a Redis crash: seconds from a kill -9 of Redis to the next task report the chain
commits.

Runs the real thing: `trustmesh up` (dev validator, processors, Redis, CouchDB-protocol server,
2 compute nodes, 3 IoT nodes as separate processes) and a small federation cut from
workflows/federated-digits.json as the tests cut it (3 participants, 1 local epoch, many rounds).
Once round 1 is final, it kill -9's Redis --kills times while rounds run, each time the moment a
task report is committed, at least two rounds and --spacing seconds after the previous kill (so
each kill hits a round in the middle, and the federation has settled in between). The supervisor
restarts Redis from its append-only file (`--appendfsync off`: no file, Redis comes back empty);
the nodes notice, re-derive their task deliveries from the chain, re-publish the blobs they keep
on disk and go on.

Figures, in seconds after the kill, as this client sees the chain's `trustmesh/task-done` events:
- next task report: the first one committed after the kill (the issue's figure). Reports are
  sent in the background and rounds overlap, so this one was often already in flight;
- new Redis up: when the supervisor's network.json shows the restarted Redis running;
- first report after that: the first task report committed once the new Redis was up (the
  stricter figure; it too may have been sent before the kill, the nodes' logs tell).
For scale: the usual gap between two committed task reports without a kill.

Run: .venv/bin/python bench/bench_redis_recovery.py [--kills 3] [--appendfsync always|everysec|off]
                                                    [--compute-nodes 2] [--spacing 10] [--home DIR]
(--appendfsync takes a comma list too: one network per policy, one after another.)

Target (issue): <= 5 s from the kill to the next committed task report (checked on both report
figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import sys
import time

import localnet
from trustmesh.scheduling import events
from localnet import ROOT

TARGET = 5.0  # seconds from the kill to the next committed task report
ROUNDS_BETWEEN_KILLS = 2  # rounds final between two kills, and at least --spacing seconds


async def redis_back(home: pathlib.Path, old_pid: int) -> float:
    """perf_counter when network.json first shows a running Redis other than `old_pid`."""
    while True:
        redis = localnet.service(home, "redis")
        if redis.get("pid") not in (None, old_pid) and redis.get("running"):
            return time.perf_counter()
        await asyncio.sleep(0.02)


async def recover(home: pathlib.Path, definition_path: pathlib.Path, workflow_id: str, *, kills: int,
                  spacing: float, timeout: float) -> tuple[list[dict], list[float]]:
    """Kill Redis `kills` times; (one dict of seconds after the kill per kill, gaps between task
    reports without a kill)."""
    figures: list[dict] = []
    gaps: list[float] = []
    followed = (events.TASK_DONE, events.ROUND_FINALIZED)
    async with localnet.following(home, definition_path, workflow_id, followed) as run:
        rounds = run.definition["federation"]["rounds"]
        finals, last_kill = ROUNDS_BETWEEN_KILLS - 1, float("-inf")  # the first kill in round 2
        kill = None  # the current kill: {at, back (task -> perf_counter), report, after_up}
        last_report, warm = None, False  # gaps count from round 1 final on (not torch's warm-up)
        try:
            async for arrived, kind, attrs in run.events(timeout):
                if kind == events.ROUND_FINALIZED:
                    finals, warm = finals + 1, True
                    if int(attrs["round"]) % 10 == 0 or kill is not None:
                        print(f"  round {attrs['round']}/{rounds} final", flush=True)
                    if int(attrs["round"]) >= rounds:
                        raise RuntimeError(f"the workflow ended after {len(figures)} of {kills} kills; "
                                           f"give more --rounds")
                    continue
                if kill is not None and arrived > kill["at"]:  # (not the rest of the block we killed in)
                    kill.setdefault("report", arrived - kill["at"])  # the first report after the kill
                    if kill["back"].done() and kill["back"].result() <= arrived:
                        kill["up"] = kill["back"].result() - kill["at"]
                        kill["after_up"] = arrived - kill["at"]  # the first report after the new Redis was up
                        figures.append(kill)
                        print(f"  kill {len(figures)}/{kills}: next task report committed {kill['report']:.2f} s after "
                              f"the kill{' (in flight at the kill)' if kill['report'] < kill['up'] else ''}; "
                              f"new Redis up after {kill['up']:.2f} s; first report after that: "
                              f"{kill['after_up']:.2f} s ({attrs['kind']})", flush=True)
                        kill = None
                        if len(figures) == kills:
                            break
                elif kill is None and last_report is not None and arrived != last_report and warm:  # (a later block)
                    gaps.append(arrived - last_report)
                last_report = arrived
                if kill is None and finals >= ROUNDS_BETWEEN_KILLS and arrived - last_kill >= spacing:
                    pid = localnet.service(home, "redis")["pid"]
                    os.kill(pid, signal.SIGKILL)
                    last_kill = time.perf_counter()
                    kill, finals = {"at": last_kill, "back": asyncio.create_task(redis_back(home, pid))}, 0
                    print(f"  kill -9 Redis (pid {pid}) right after a task report ({attrs['kind']})", flush=True)
        except TimeoutError:
            what = f"after kill {len(figures) + 1}" if kill else "from the workflow"
            raise RuntimeError(f"no committed event for {timeout:g} s {what}; see {home / 'logs'}") from None
        finally:
            if kill is not None:
                kill["back"].cancel()
    return figures, gaps


def small_workflow(rounds: int) -> dict:
    """federated-digits cut down as tests/test_local_network.py's small_workflow does."""
    definition = json.loads((ROOT / "workflows" / "federated-digits.json").read_text())
    definition["hyperparameters"]["epochs"] = 1
    definition["federation"].update(participant_nodes=["iot-1", "iot-2", "iot-3"], expected_nodes=3,
                                    min_nodes_required=2, rounds=rounds, round_timeout=120)
    return definition


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=3, help="kill -9's of Redis per network (default 3)")
    parser.add_argument("--appendfsync", type=localnet.policies, default=[localnet.DEFAULT_POLICY],
                        help=f"Redis fsync policy: {', '.join(localnet.POLICIES)}, or a comma list of them "
                             f"(default: {localnet.DEFAULT_POLICY}); off = Redis restarts empty")
    parser.add_argument("--compute-nodes", type=int, default=2)
    parser.add_argument("--spacing", type=float, default=10,
                        help="at least this many seconds between kills (default 10)")
    parser.add_argument("--rounds", type=int, help="workflow rounds, enough for the kills (default: 50 per kill + 20)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for any event (default 120)")
    parser.add_argument("--home", help="run in DIR/POLICY and keep it (logs in DIR/POLICY/logs); "
                                       "default: a temporary directory")
    args = parser.parse_args(argv)
    if args.kills < 1:
        parser.error("--kills must be at least 1")
    localnet.sigterm_as_interrupt()

    definition = small_workflow(args.rounds or 50 * args.kills + 20)
    results = {}
    try:
        for policy, home, path in localnet.networks(args.home, args.appendfsync, definition,
                                                    compute_nodes=args.compute_nodes, iot_nodes=3):
            results[policy] = asyncio.run(recover(home, path, "redis-recovery-bench", kills=args.kills,
                                                     spacing=args.spacing, timeout=args.timeout))
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130

    print("\n== kill -9 Redis -> committed task reports, by Redis appendfsync (seconds after the kill) ==")
    for policy, (figures, gaps) in results.items():
        for label, key in (("next task report", "report"), ("new Redis up", "up"),
                           ("first report after that", "after_up")):
            seconds = [f[key] for f in figures]
            met = "met" if max(seconds) <= TARGET else "NOT met"
            verdict = "" if key == "up" else f"; target <= {TARGET:g} s: {met}"
            print(f"  {policy:>8} {label:>24}: {' '.join(f'{s:.2f}' for s in seconds)} -> "
                  f"{localnet.spread(seconds)}{verdict}")
        in_flight = sum(f["report"] < f["up"] for f in figures)
        print(f"  {'':>8} {'':>24}  ({in_flight} of {len(figures)} next reports were in flight at the kill; "
              f"gap between task reports without a kill: {localnet.spread(gaps) if gaps else 'none seen'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
