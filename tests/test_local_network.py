"""The local network as a user drives it: `trustmesh up`, `run`, `status`, `audit`, `down`, as
processes, with a compute node killed with SIGKILL in the middle of a round."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers.local_network import ROOT, processes_of, service_running, small_workflow, state_of, trustmesh


def test_up_run_kill_compute_node_audit_down(home, tmp_path):
    from trustmesh.scheduling import layout

    up = trustmesh(home, "up", "--compute-nodes", "2", "--iot-nodes", "3", timeout=240)
    assert "local network up" in up.stdout
    network = json.loads((home / "network.json").read_text())
    rest = network["endpoints"]["rest"]
    status = trustmesh(home, "status")
    # the stores, the validator, the processors, two compute nodes, the dashboard, and the three
    # IoT nodes in one host process per core (a process each with --iot-hosts 0)
    hosts = [name for name in network["services"] if name.startswith("iot-host-")]
    assert len(hosts) == min(3, len(os.sched_getaffinity(0))) and "iot-1" not in network["services"], network
    assert "chain head: block" in status.stdout and status.stdout.count(" up ") == 7 + len(hosts), status.stdout
    # Nodes share this machine: the compute nodes split its cores (and register what they use);
    # IoT nodes leave torch unloaded until they train.
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    for name in ("compute-1", "compute-2"):
        record = state_of(layout.peer_address(network["services"][name]["node"]), rest)
        assert record["resources"]["cpu_cores"] == share, record
    for name in (service_running(network["services"], "iot-1"), "compute-1"):
        maps = pathlib.Path(f"/proc/{network['services'][name]['pid']}/maps").read_text()
        assert ("libtorch" in maps) == name.startswith("compute"), name

    workflow = small_workflow(tmp_path, "e2e-kill", rounds=2)
    run = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "--home", str(home), "run", str(workflow),
                            "--timeout", "400"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # As soon as round 1's tasks are assigned, kill -9 a compute node that has work in it.
        victim = None
        deadline = time.monotonic() + 180
        while victim is None and time.monotonic() < deadline and run.poll() is None:
            index = state_of(layout.workflow_rounds_address("e2e-kill"), rest)
            sid = (index or {}).get("rounds", {}).get("1")
            assignments = state_of(layout.assignments_address(sid), rest) if sid else None
            if assignments:
                busy = {task["node"] for task in assignments["tasks"].values()}
                services = json.loads((home / "network.json").read_text())["services"]
                victim = next(name for name, s in services.items() if s.get("node") in busy)
                os.kill(services[victim]["pid"], signal.SIGKILL)
            time.sleep(0.05)
        assert victim is not None, "round 1 was never assigned"
        out, err = run.communicate(timeout=420)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, f"run failed:\n{out}\n{err}"
    assert "2/2 rounds final" in out and "round 2/2" in out, out

    services = json.loads((home / "network.json").read_text())["services"]
    assert services[victim]["restarts"] >= 1, "the supervisor restarted the killed node"
    assert trustmesh(home, "status").returncode == 0

    audit = trustmesh(home, "audit", "e2e-kill", "--json")
    report = json.loads(audit.stdout)
    assert report["ok"] is True and len(report["rounds"]) == 2, audit.stdout

    # Ctrl-C while following: a clean stop with a word on what goes on, no traceback
    other = small_workflow(tmp_path, "e2e-interrupted", rounds=20)
    run = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "--home", str(home), "run", str(other)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "deployed" in run.stdout.readline()
        assert " 1/20 " in run.stdout.readline()
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 130, (out, err)
    assert "the network keeps running the workflow" in err and "Traceback" not in err

    down = trustmesh(home, "down", timeout=120)
    assert "stopped" in down.stdout
    assert processes_of(home) == []
    assert trustmesh(home, "status", check=False).returncode == 1  # known network, nothing running


class _Started:
    """A `trustmesh` command started now (as by trustmesh(..., check=False)), its result read later."""

    def __init__(self, folder: pathlib.Path, home, *args: str):
        self.out, self.err = folder.with_suffix(".out"), folder.with_suffix(".err")
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "--home", str(home), *args],
                                         stdout=out, stderr=err, text=True)

    def result(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self.proc.wait(timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, self.out.read_text(),
                                           self.err.read_text())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module", autouse=True)
def without_a_network(tmp_path_factory):
    """The commands of test_commands_without_a_network_say_what_to_do, started with the module:
    the two that try a closed address wait FIRST_CONTACT seconds each for nothing, and that wait
    overlaps the module's first test instead of adding to it. -> the closed address and
    (status, down, run, deploy at the closed address, run at the closed address)."""
    from trustmesh.ledger.signing import load_or_create_key

    folder = tmp_path_factory.mktemp("without-a-network")
    home = folder / "none"
    # with every node's key at hand (another home), the missing network is what gets named
    keyed = folder / "keyed"
    for i in range(1, 11):
        load_or_create_key(keyed / "nodes" / f"iot-{i}" / "keys", f"iot-{i}")
    digits = str(ROOT / "workflows" / "federated-digits.json")
    # Bound and never listening: the port refuses every connection, and no server another test
    # starts meanwhile can take it.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
        started = [_Started(folder / f"command-{i}", *call) for i, call in enumerate((
            (home, "status"), (home, "down"), (home, "run", digits),
            (keyed, "workflow", "deploy", digits, "--rest", closed), (keyed, "run", digits, "--rest", closed)))]
        try:
            yield closed, started
        finally:
            for command in started:
                command.stop()


def test_commands_without_a_network_say_what_to_do(without_a_network):
    closed, started = without_a_network
    status, down, run, *closed_results = (command.result() for command in started)
    assert status.returncode == 2 and "trustmesh up" in status.stderr and "Traceback" not in status.stderr
    assert down.returncode == 2 and "no local network" in down.stderr
    assert run.returncode == 2 and "no key for nodes iot-1" in run.stderr and "--iot-nodes 10" in run.stderr
    for result in closed_results:
        assert result.returncode == 2 and f"the network at {closed} did not answer" in result.stderr, result.stderr
        assert "trustmesh up" in result.stderr and "Traceback" not in result.stderr


def test_bad_workflow_files_are_refused_before_anything_is_sent(tmp_path):
    home = tmp_path / "h"
    broken = tmp_path / "broken.json"
    broken.write_text('{"workflow_id": "x",')
    result = trustmesh(home, "workflow", "deploy", str(broken), check=False)
    assert result.returncode == 2 and "is not valid JSON" in result.stderr and "Traceback" not in result.stderr
    missing = trustmesh(home, "run", str(tmp_path / "nope.json"), check=False)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


@pytest.mark.parametrize("given, expected", [("0", None), ("3", 3), (None, None)])
def test_torch_threads_flag_and_environment(monkeypatch, given, expected):
    from trustmesh.cli import build_parser

    for command in ("compute-node", "iot-node"):
        args = ["--name", "x", "--data-dir", "/tmp/x"]
        flag = build_parser().parse_args([command, *args, *(["--torch-threads", given] if given else [])])
        assert flag.torch_threads == expected
        if given is not None:
            monkeypatch.setenv("TRUSTMESH_TORCH_THREADS", given)
            assert build_parser().parse_args([command, *args]).torch_threads == expected


def test_bad_torch_threads_are_refused(capsys, monkeypatch):
    from trustmesh.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["compute-node", "--name", "x", "--data-dir", "/tmp/x", "--torch-threads", "-1"])
    assert "thread count from 0 (one per core) to 256" in capsys.readouterr().err
    monkeypatch.setenv("TRUSTMESH_TORCH_THREADS", "many")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["iot-node", "--name", "x", "--data-dir", "/tmp/x"])
    assert "got 'many'" in capsys.readouterr().err


def test_a_stopped_local_networks_endpoints_are_not_used(tmp_path, monkeypatch):
    """After `trustmesh down` (or a crashed supervisor) network.json stays behind; a command must
    not send its traffic to ports that may belong to anything by now."""
    from trustmesh import endpoints

    for name in endpoints.ENVIRONMENT.values():
        monkeypatch.delenv(name, raising=False)
    written = {"endpoints": {"validator": "tcp://127.0.0.1:1", "rest": "http://127.0.0.1:2",
                             "redis": "redis://127.0.0.1:3/0", "couch": "http://127.0.0.1:4"}}
    for pid, running in ((None, False), (os.getpid(), True), (2**22 + 12345, False)):
        (tmp_path / endpoints.NETWORK_FILE).write_text(json.dumps({**written, "supervisor_pid": pid}))
        found = endpoints.resolve(tmp_path)
        assert (found.couch == "http://127.0.0.1:4") is running, (pid, found)
        if not running:
            assert found == endpoints.resolve(tmp_path / "nothing-here")  # the loopback defaults


class _Dashboard:
    """A dashboard of another local network on a port: answers /api/health naming its own REST API."""

    def __init__(self, rest: str):
        import http.server
        import threading

        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = json.dumps({"ok": True, "rest": rest}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Health)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_another_networks_dashboard_on_our_port_is_not_ours_and_ours_moves(tmp_path):
    # Two local networks started at the same moment can both see port 8080 free; the one whose
    # dashboard loses the race must not take the other's for its own, and comes back on a free port.
    from trustmesh.local_network import Service, Supervisor

    other = _Dashboard("http://127.0.0.1:1111")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        supervisor = Supervisor(tmp_path / "net", compute_nodes=0, iot_nodes=0)
        supervisor.ports = {"dashboard": other.port}
        supervisor.endpoints = {"rest": "http://127.0.0.1:2222", "dashboard": f"http://127.0.0.1:{other.port}"}
        dashboard = Service("dashboard", "view", tmp_path / "dashboard.log",
                            ["trustmesh", "dashboard", "--bind", f"127.0.0.1:{other.port}", "--rest", "x"],
                            proc=sleeper)
        assert not supervisor._check(dashboard, {})  # it answers, but for another chain
        supervisor.endpoints["rest"] = "http://127.0.0.1:1111"
        assert supervisor._check(dashboard, {})  # the same answer naming our REST API: ours
        supervisor._move_dashboard_if_taken(dashboard)
        moved = supervisor.ports["dashboard"]
        assert moved != other.port and dashboard.command[3] == f"127.0.0.1:{moved}"
        assert supervisor.endpoints["dashboard"] == f"http://127.0.0.1:{moved}"
        supervisor._move_dashboard_if_taken(dashboard)  # free: it stays
        assert supervisor.ports["dashboard"] == moved
    finally:
        other.close()
        sleeper.kill()
        sleeper.wait()


def test_two_networks_started_together_each_get_their_own_dashboard(tmp_path):
    from helpers.local_network import trustmesh_together

    homes = [tmp_path / "one", tmp_path / "two"]
    try:
        ups = trustmesh_together(*((home, "up", "--compute-nodes", "0", "--iot-nodes", "0", "--timeout", "90")
                                   for home in homes))
        for (result, _), home in zip(ups, homes):
            assert result.returncode == 0, result.stdout + result.stderr
        answers = []
        for home in homes:
            endpoints = json.loads((home / "network.json").read_text())["endpoints"]
            with urllib.request.urlopen(endpoints["dashboard"] + "/api/health", timeout=10) as response:
                answers.append((endpoints["dashboard"], json.loads(response.read())["rest"], endpoints["rest"]))
        assert answers[0][0] != answers[1][0]  # two dashboards, each answering for its own chain
        assert all(answered == ours for _, answered, ours in answers), answers
    finally:
        for home in homes:
            trustmesh(home, "down", check=False)
