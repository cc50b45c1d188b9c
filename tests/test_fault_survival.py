"""Every single fault is survived: during one `trustmesh run`, kill -9 the parts of the local
network one after another (the supervisor restarts each); the run still ends with every round
final, the audit passes and `down` leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers.local_network import processes_of, small_workflow, state_of, trustmesh


def _services(home):
    return json.loads((home / "network.json").read_text())["services"]


def _kill(home, name: str) -> int:
    """SIGKILL the current process of a service; returns its pid."""
    pid = _services(home)[name]["pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


def _wait_until(what, check, timeout: float, run: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if run.poll() is not None:
            raise AssertionError(f"the run ended (exit {run.returncode}) while waiting for {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _round_assigned(home, workflow_id: str, number: int):
    from trustmesh.scheduling import layout

    rest = json.loads((home / "network.json").read_text())["endpoints"]["rest"]

    def check():
        try:
            index = state_of(layout.workflow_rounds_address(workflow_id), rest)
            sid = (index or {}).get("rounds", {}).get(str(number))
            return bool(sid and state_of(layout.assignments_address(sid), rest))
        except OSError:  # the REST API is one of the parts being killed
            return False
    return check


def _run_killing(home, tmp_path, workflow_id: str, rounds: int, victims: list[str], *, gap: float):
    up = trustmesh(home, "up", "--compute-nodes", "2", "--iot-nodes", "3", timeout=240)
    assert "local network up" in up.stdout
    workflow = small_workflow(tmp_path, workflow_id, rounds=rounds)
    run = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "--home", str(home), "run", str(workflow),
                            "--timeout", "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = {}
    # Each kill waits for a round to be under way (round 1 first), spread over the run so the
    # last one still finds rounds to go, however fast this machine runs them.
    step = max(1, rounds // (len(victims) + 1))
    try:
        for i, name in enumerate(victims):
            number = 1 + i * step
            _wait_until(f"round {number} to be assigned", _round_assigned(home, workflow_id, number), 240, run)
            before = _services(home)[name]
            killed.setdefault(name, []).append(_kill(home, name))
            # The supervisor brings it back (a new pid) before the next one goes.
            _wait_until(f"{name} to be restarted", lambda: _services(home)[name]["pid"] not in killed[name]
                        and _services(home)[name]["running"], 60, run)
            assert _services(home)[name]["restarts"] > before["restarts"]
            time.sleep(gap)
        out, err = run.communicate(timeout=540)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 0, f"run failed:\n{out}\n{err}"
    assert f"{rounds}/{rounds} rounds final" in out, out
    assert "Traceback" not in err, err
    audit = trustmesh(home, "audit", workflow_id, "--json")
    report = json.loads(audit.stdout)
    assert report["ok"] is True and len(report["rounds"]) == rounds, audit.stdout
    assert "Traceback" not in audit.stderr
    down = trustmesh(home, "down", timeout=120)
    assert "stopped" in down.stdout
    assert processes_of(home) == []


def test_one_run_survives_every_part_killed_in_turn(home, tmp_path):
    _run_killing(home, tmp_path, "fault-every-part", rounds=28, gap=1,
                 victims=["redis", "validator", "processors", "couchdb", "compute-1", "iot-host-1"])  # the coordinator's


def test_one_run_survives_redis_killed_twice(home, tmp_path):
    _run_killing(home, tmp_path, "fault-redis-twice", rounds=16, gap=1, victims=["redis", "redis"])


@pytest.mark.slow
def test_redis_killed_twice_without_its_append_only_file(home, tmp_path, monkeypatch):
    """Redis restarts empty (no append-only file at all): everything the federation needs is
    re-derived from the chain and the nodes' own copies."""
    monkeypatch.setenv("TRUSTMESH_REDIS_APPENDFSYNC", "off")
    _run_killing(home, tmp_path, "fault-redis-empty", rounds=16, gap=1, victims=["redis", "redis"])
