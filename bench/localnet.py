"""What the benches that run a real local network share: start it with a given Redis fsync
policy, stop it whatever happens (error, Ctrl-C, SIGTERM), deploy a workflow and follow its
committed events.

Not a bench itself; bench_round_overhead.py and bench_redis_recovery.py import it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator

from trustmesh import local_network, workflow_runs
from trustmesh.endpoints import resolve
from trustmesh.ledger.events import BLOCK_COMMIT, EventSubscriber, event_subscription
from trustmesh.ledger.rest_client import RestClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
FSYNC_ENV = "TRUSTMESH_REDIS_APPENDFSYNC"   # read by the supervisor (trustmesh/local_network.py)
POLICIES = ("always", "everysec", "off")    # "off": no append-only file, Redis restarts empty
DEFAULT_POLICY = os.environ.get(FSYNC_ENV, "always")  # local_network's default unless the env says otherwise


def policies(text: str) -> list[str]:
    """`always,everysec` -> ["always", "everysec"] (argparse type)."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    wrong = [p for p in names if p not in POLICIES]
    if not names or wrong:
        raise argparse.ArgumentTypeError(f"appendfsync is a comma list of {', '.join(POLICIES)}; got {text!r}")
    return names


def sigterm_as_interrupt() -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (stopping the network) runs."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)


@contextlib.contextmanager
def homes(keep: str | None, names: list[str]) -> Iterator[dict[str, pathlib.Path]]:
    """One home per name: under `keep` (kept afterwards, logs in NAME/logs) or in a temporary directory."""
    with contextlib.ExitStack() as stack:
        base = pathlib.Path(keep).resolve() if keep else pathlib.Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="trustmesh-bench-")))
        used = [str(base / n) for n in names if (base / n).exists()]
        if used:  # a chain left there would already hold the workflow
            raise SystemExit(f"{', '.join(used)} already exist; give --home a new directory")
        try:
            yield {name: base / name for name in names}
        except Exception:
            if not keep:  # the logs say what went wrong: keep them
                kept = pathlib.Path(tempfile.mkdtemp(prefix="trustmesh-bench-logs-"))
                for name in names:  # NAME/logs, or NAME/*/logs where a bench keeps several networks there
                    for logs in sorted(p for p in (base / name).rglob("logs") if p.is_dir()):
                        shutil.copytree(logs, kept / logs.parent.relative_to(base))
                print(f"logs kept in {kept}", file=sys.stderr)
            raise


@contextlib.contextmanager
def network(home: pathlib.Path, *, appendfsync: str, compute_nodes: int, iot_nodes: int) -> Iterator[None]:
    """`trustmesh up` in `home` with Redis under `appendfsync`; `down` on the way out, always."""
    previous = os.environ.get(FSYNC_ENV)
    os.environ[FSYNC_ENV] = appendfsync  # the supervisor inherits our environment
    started = time.perf_counter()
    try:
        local_network.start(home, compute_nodes=compute_nodes, iot_nodes=iot_nodes, timeout=240)
    finally:
        if previous is None:
            os.environ.pop(FSYNC_ENV)
        else:
            os.environ[FSYNC_ENV] = previous
    print(f"local network up in {time.perf_counter() - started:.1f} s (Redis appendfsync {appendfsync}, "
          f"{compute_nodes} compute node(s), {iot_nodes} IoT nodes; logs in {home / 'logs'})", flush=True)
    try:
        yield
    finally:
        # Ctrl-C (or SIGTERM) again while stopping must not leave processes behind either.
        handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            killed = local_network.stop(home)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        print(f"local network stopped{' (had to kill ' + ', '.join(killed) + ')' if killed else ''}", flush=True)


def networks(keep: str | None, names: list[str], definition: dict, *, compute_nodes: int,
             iot_nodes: int) -> Iterator[tuple[str, pathlib.Path, pathlib.Path]]:
    """For each Redis appendfsync policy in `names`: (policy, home, path of `definition` written
    there) while a local network with that policy runs in home; it is stopped before the next."""
    with homes(keep, names) as found:
        for policy, home in found.items():
            print(f"\n== Redis appendfsync {policy} ==", flush=True)
            home.mkdir(parents=True)
            path = home / "workflow.json"
            path.write_text(json.dumps(definition))
            with network(home, appendfsync=policy, compute_nodes=compute_nodes, iot_nodes=iot_nodes):
                yield policy, home, path


def service(home: pathlib.Path, name: str) -> dict:
    """A supervised service as the supervisor's network.json says now: pid, running, restarts, ..."""
    return (local_network.local_network(home) or {}).get("services", {}).get(name, {})


class Following:
    """A deployed workflow and its committed events, each stamped with when this client got it."""

    def __init__(self, rest: RestClient, subscriber: EventSubscriber, definition: dict, deployed_at: float):
        self.rest, self.subscriber, self.definition = rest, subscriber, definition
        self.started = deployed_at  # perf_counter() just before the deploy was sent

    async def events(self, timeout: float = 300) -> AsyncIterator[tuple[float, str, dict]]:
        """(perf_counter at arrival, event type, attributes) of every subscribed event, forever."""
        while True:
            block = await asyncio.wait_for(self.subscriber.next_block(), timeout)
            now = time.perf_counter()
            for event in block.events:
                if event.event_type != BLOCK_COMMIT:
                    yield now, event.event_type, {a.key: a.value for a in event.attributes}


@contextlib.asynccontextmanager
async def following(home: pathlib.Path, definition_path: pathlib.Path, workflow_id: str,
                    event_types: tuple[str, ...]) -> AsyncIterator[Following]:
    """Subscribe to `event_types`, then deploy the workflow from `definition_path` as `workflow_id`."""
    where = resolve(home)
    async with RestClient(where.rest, retries=5) as rest:
        subscriber = EventSubscriber(where.validator, [event_subscription(t) for t in event_types])
        await subscriber.start()
        try:
            definition = workflow_runs.prepare(str(definition_path), home / "nodes", workflow_id)
            started = time.perf_counter()
            await workflow_runs.deploy(rest, workflow_runs.user_key(home), definition)
            yield Following(rest, subscriber, definition, started)
        finally:
            await subscriber.close()


def spread(values: list[float]) -> str:
    """`median 0.31 s (0.22-0.48 s, n=5)`."""
    return f"median {statistics.median(values):.3f} s ({min(values):.3f}-{max(values):.3f} s, n={len(values)})"
