"""The local network as the tests drive it: the `trustmesh` command as a child process, the
processes a network left behind, a short federated-digits workflow file, and a record read off
chain through the REST API. The `home` fixture (tests/conftest.py) is a network's folder that is
brought down and checked empty after the test."""

from __future__ import annotations

import base64
import json
import os
import pathlib
import subprocess
import sys
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[2]


def trustmesh(home, *args, timeout=300, check=True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "trustmesh.cli", "--home", str(home), *args], capture_output=True,
                            text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"trustmesh {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def processes_of(home: pathlib.Path) -> list[str]:
    """Command lines of every process on this machine that belongs to the network in `home`."""
    found = []
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
            state = (proc / "stat").read_text().split(") ", 1)[1][0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (str(home) in cmdline or cwd.startswith(str(home))):
            found.append(cmdline)
    return found


def service_running(services: dict, node: str) -> str:
    """The name of the service a node runs in: its own (`iot-2`) or the host that has it (`iot-host-1`)."""
    return next(name for name, s in services.items() if name == node or node in s.get("nodes", {}))


def small_workflow(tmp_path: pathlib.Path, workflow_id: str, rounds: int) -> pathlib.Path:
    definition = json.loads((ROOT / "workflows" / "federated-digits.json").read_text())
    definition["workflow_id"] = workflow_id
    definition["hyperparameters"]["epochs"] = 1
    definition["federation"].update(participant_nodes=["iot-1", "iot-2", "iot-3"], expected_nodes=3,
                                    min_nodes_required=2, rounds=rounds, round_timeout=120)
    path = tmp_path / f"{workflow_id}.json"
    path.write_text(json.dumps(definition))
    return path


def state_of(address: str, rest: str):
    from trustmesh.ledger import payload as cbor

    try:
        with urllib.request.urlopen(f"{rest}/state/{address}", timeout=5) as response:
            return cbor.decode(base64.b64decode(json.loads(response.read())["data"]))
    except urllib.error.HTTPError:
        return None


def trustmesh_together(*calls: tuple) -> list[tuple[subprocess.CompletedProcess, float]]:
    """Several `trustmesh` commands at once, each call (home, *args) run as by `trustmesh(...,
    check=False)` (keyword options in a trailing dict); returns (result, seconds it took) per
    call, in order. For commands that each wait out a fixed window (an address nothing
    answers at): the windows overlap instead of adding up."""
    import concurrent.futures
    import time

    def one(call):
        *args, options = call if isinstance(call[-1], dict) else (*call, {})
        started = time.monotonic()
        result = trustmesh(*args, check=False, **options)
        return result, time.monotonic() - started

    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(one, calls))
