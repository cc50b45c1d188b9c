"""Clients wait out an outage of the REST API (issue 12): with the REST API gone for 20 s in the
middle of `trustmesh run` and of `trustmesh audit` (at the same time, each through a proxy of its
own), both wait, say once on stderr what they wait for and that it is back, and finish; neither
prints a traceback. An address nothing ever answered at fails within FIRST_CONTACT seconds, and a
malformed one at once, each with one line.

Only the commands under test go through a TcpProxy (tests/helpers/tcp_proxy.py) in front of the REST
API; the network's own nodes keep talking to it directly.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

from helpers.tcp_proxy import TcpProxy
from helpers.local_network import processes_of, small_workflow, state_of, trustmesh, trustmesh_together

OUTAGE = 20.0          # seconds the REST API is away, each time
WAITING = "waiting for the REST API at"


def _cli(home, *args) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli", "--home", str(home), *args]


def _round_assigned(rest: str, workflow_id: str, number: int) -> bool:
    from trustmesh.scheduling import layout

    index = state_of(layout.workflow_rounds_address(workflow_id), rest)
    sid = (index or {}).get("rounds", {}).get(str(number))
    return bool(sid and state_of(layout.assignments_address(sid), rest))


def _assert_waited_once(err: str, url: str, cut: list[float], started: float, ended: float) -> None:
    """stderr says once that it waits for the REST API at `url` and once that it is back, after
    about the outage's length; the cut began and ended while the command ran."""
    assert "Traceback" not in err, err
    waiting = [line for line in err.splitlines() if WAITING in line]
    back = [line for line in err.splitlines() if "the REST API at" in line and "is back after" in line]
    assert len(waiting) == 1 and f"{WAITING} {url} (down " in waiting[0], err
    assert len(back) == 1 and url in back[0], err
    assert err.index(waiting[0]) < err.index(back[0]), err
    # "back after N s": it was away about as long as the proxy was cut (it notices within a few s)
    assert OUTAGE - 3 <= float(re.search(r"is back after (\d+) s", back[0]).group(1)) <= OUTAGE + 10, back[0]
    assert cut[1] > 0, "the proxy never came back"
    assert started < cut[0] < cut[1] < ended, "the outage was not inside the command's run"


def test_run_and_audit_wait_out_a_rest_api_outage(home, tmp_path):
    """The run's outage and the audit's overlap in time (each command has a proxy of its own), so
    the test waits about 20 s once, not twice: the audit reads a workflow run to the end before,
    and the workflow run through the outage is audited once it is over."""
    # IoT nodes a process each, as devices run them (the default hosts them: test_local_network)
    up = trustmesh(home, "up", "--compute-nodes", "2", "--iot-nodes", "3", "--iot-hosts", "0", timeout=240)
    assert "local network up" in up.stdout
    services = json.loads((home / "network.json").read_text())["services"]
    assert {"iot-1", "iot-2", "iot-3"} <= set(services) and not any(n.startswith("iot-host") for n in services)
    rest = json.loads((home / "network.json").read_text())["endpoints"]["rest"]
    workflow_id, audited_id = "outage-wait", "outage-audited"
    workflow = small_workflow(tmp_path, workflow_id, rounds=2)
    ran = trustmesh(home, "run", str(small_workflow(tmp_path, audited_id, rounds=2)), "--timeout", "300")
    assert "2/2 rounds final" in ran.stdout, ran.stdout
    port = int(rest.rsplit(":", 1)[1])

    with TcpProxy(port) as proxy, TcpProxy(port) as audit_proxy:
        # -- audit, once through its proxy to count its requests (the cut comes at the middle one)
        clean = trustmesh(home, "audit", audited_id, "--json", "--rest", audit_proxy.url)
        expected = json.loads(clean.stdout)
        assert expected["ok"] is True and len(expected["rounds"]) == 2, clean.stdout
        assert WAITING not in clean.stderr and "Traceback" not in clean.stderr, clean.stderr
        requests = audit_proxy.requests
        assert requests >= 4, f"the audit made only {requests} REST requests"

        # -- run: the REST API goes away once round 1 is assigned, with round 2 still to come
        started = time.monotonic()
        run = subprocess.Popen(_cli(home, "run", str(workflow), "--rest", proxy.url, "--timeout", "300"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        audit = None
        try:
            deadline = time.monotonic() + 120
            while not _round_assigned(rest, workflow_id, 1):
                assert run.poll() is None, f"the run ended before round 1 was assigned:\n{run.communicate()}"
                assert time.monotonic() < deadline, "round 1 was never assigned"
                time.sleep(0.1)
            proxy.cut(OUTAGE)
            assert run.poll() is None, "the run was over before the outage began"
            # -- the audit, meanwhile, loses the REST API at its middle request
            audit_proxy.cut_at_request(audit_proxy.requests + requests // 2, OUTAGE)
            audit_started = time.monotonic()
            audit = subprocess.Popen(_cli(home, "audit", audited_id, "--json", "--rest", audit_proxy.url),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out, err = run.communicate(timeout=300)
            ended = time.monotonic()
            audit_out, audit_err = audit.communicate(timeout=180)
            audit_ended = time.monotonic()
        finally:
            for proc in (run, audit):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.communicate()
        print(f"run: {ended - started:.1f} s, cut {proxy.cuts[0][0] - started:.1f}..{proxy.cuts[0][1] - started:.1f}"
              f"\n{out}{err}")
        assert run.returncode == 0, f"run failed:\n{out}\n{err}"
        assert "2/2 rounds final" in out and "round 2/2" in out, out
        assert len(proxy.cuts) == 1
        _assert_waited_once(err, proxy.url, proxy.cuts[0], started, ended)

        print(f"audit: {audit_ended - audit_started:.1f} s, {requests} requests, cut at the {requests // 2}th: "
              f"{[[round(t - audit_started, 1) for t in cut] for cut in audit_proxy.cuts]}\n{audit_err}")
        assert audit.returncode == 0, f"audit failed:\n{audit_out}\n{audit_err}"
        report = json.loads(audit_out)
        assert report["ok"] is True and len(report["rounds"]) == 2, audit_out
        assert report == expected, "the audit after the outage differs from the one without it"
        assert len(audit_proxy.cuts) == 1, "the audit never reached the request the proxy was to cut at"
        _assert_waited_once(audit_err, audit_proxy.url, audit_proxy.cuts[0], audit_started, audit_ended)

    # the workflow run through the outage audits clean
    after = json.loads(trustmesh(home, "audit", workflow_id, "--json").stdout)
    assert after["ok"] is True and len(after["rounds"]) == 2, after

    down = trustmesh(home, "down", timeout=120)
    assert "stopped" in down.stdout
    assert processes_of(home) == []


def _home_with_node_keys(tmp_path):
    from trustmesh.ledger.signing import load_or_create_key

    home = tmp_path / "no-network"
    for name in ("iot-1", "iot-2", "iot-3"):
        load_or_create_key(home / "nodes" / name / "keys", name)
    return home


def _last_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    return lines[-1]


def test_an_address_nothing_answers_at_fails_after_first_contact(tmp_path):
    from trustmesh.stores.servers import free_port
    from trustmesh.workflow_runs import FIRST_CONTACT

    home = _home_with_node_keys(tmp_path)
    workflow = small_workflow(tmp_path, "nobody-home", rounds=1)
    closed = f"http://127.0.0.1:{free_port()}"
    commands = (("run", str(workflow)), ("audit", "nobody-home"))
    # both at once: their FIRST_CONTACT windows overlap, each timed on its own
    results = trustmesh_together(*((home, *command, "--rest", closed, {"timeout": FIRST_CONTACT + 30})
                                   for command in commands))
    for command, (result, took) in zip(commands, results):
        name = command[0]
        assert result.returncode == 2, (result.stdout, result.stderr)
        # it tried for FIRST_CONTACT seconds (a network still starting is given that long), no more
        assert FIRST_CONTACT - 1 <= took <= FIRST_CONTACT + 3, f"{name} gave up after {took:.1f} s"
        assert "Traceback" not in result.stderr, result.stderr
        last = _last_line(result.stderr)
        assert last.startswith(f"trustmesh {name}: ") and closed in last, result.stderr
        assert "nothing answers at" in last or "did not answer" in last, result.stderr
        # besides the error, at most the one line saying what it waited for
        others = [line for line in result.stderr.splitlines()
                  if line.strip() and line != last and not line.startswith("audit: ")]
        assert len(others) <= 1 and all(WAITING in line for line in others), result.stderr


def test_a_malformed_rest_url_fails_at_once(tmp_path):
    home = _home_with_node_keys(tmp_path)
    workflow = small_workflow(tmp_path, "bad-url", rounds=1)
    for command in (("run", str(workflow)), ("audit", "bad-url"), ("workflow", "deploy", str(workflow))):
        started = time.monotonic()
        result = trustmesh(home, *command, "--rest", "notaurl", check=False, timeout=30)
        took = time.monotonic() - started
        assert result.returncode == 2, (result.stdout, result.stderr)
        assert took < 5, f"{command[0]} took {took:.1f} s to refuse a malformed URL"
        assert "Traceback" not in result.stderr and WAITING not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("audit: ")]
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith(f"trustmesh {command[0]}: ") and "'notaurl' is not a REST API URL" in lines[0]
        assert "--rest" in lines[0], lines[0]
