"""`trustmesh demo`: the embedded default, start to finish on loopback.

A local network (dev validator, processors, Redis, CouchDB-protocol server, 2 compute nodes,
10 IoT nodes) comes up, workflows/federated-digits.json runs to completion with a progress bar
per round, the audit re-verifies every round from the chain and the stores, and the network
stops, leaving no process behind. With --home the network's data stays there afterwards.
"""

from __future__ import annotations

import asyncio
import pathlib
import signal
import sys
import tempfile
import time

from trustmesh import audit, local_network, workflow_runs
from trustmesh.endpoints import resolve
from trustmesh.scheduling import workflow

WORKFLOW = pathlib.Path(__file__).resolve().parents[1] / "workflows" / "federated-digits.json"
COMPUTE_NODES, IOT_NODES = 2, 10


def _say(text: str) -> None:
    print(text, flush=True)


def run_demo(home: pathlib.Path) -> int:
    started = time.monotonic()
    _say(f"[1/4] starting a local network in {home}: dev validator, processors, Redis, CouchDB-protocol server, "
         f"{COMPUTE_NODES} compute nodes, {IOT_NODES} IoT nodes")
    try:
        state = local_network.start(home, compute_nodes=COMPUTE_NODES, iot_nodes=IOT_NODES,
                                    progress=lambda text: _say(f"      {text}"))
        endpoints = resolve(home)
        _say(f"      up in {time.monotonic() - started:.1f} s (REST {state['endpoints']['rest']})")
        _say(f"[2/4] running {WORKFLOW.name}: 10 IoT nodes' private digits (Dirichlet 0.5), FedAvg")
        views = asyncio.run(workflow_runs.deploy_and_follow(
            str(WORKFLOW), home=home, nodes_dir=home / "nodes", validator_url=endpoints.validator,
            rest_url=endpoints.rest, timeout=600, couch_url=endpoints.couch, couch_user=endpoints.couch_user,
            couch_password=endpoints.couch_password))
        workflow_id = workflow.load_definition(WORKFLOW)["workflow_id"]
        _say(f"[3/4] auditing {workflow_id}: signers, blobs against on-chain digests, aggregation recomputed")
        report = asyncio.run(audit.audit_workflow(workflow_id, endpoints, progress=lambda text: _say(f"      {text}")))
        _say(audit.render_text(report))
    finally:
        _say("[4/4] stopping the local network")
        local_network.stop(home)
    left = [name for name, s in local_network.status(home)["services"].items() if s["running"]]
    if left:
        _say(f"still running after stop: {', '.join(left)}")
        return 1
    ok = views[-1].status == "final" and report.ok
    _say(f"demo {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.1f} s; nothing left running")
    return 0 if ok else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM too: unwind, so the network is stopped on the way out


def main(home: str | None = None) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    if home:
        return run_demo(pathlib.Path(home).absolute())
    with tempfile.TemporaryDirectory(prefix="trustmesh-demo-") as tmp:
        return run_demo(pathlib.Path(tmp))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
