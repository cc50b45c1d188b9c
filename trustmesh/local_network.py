"""The local network behind `trustmesh up / status / down`: every part as a supervised process.

`up` starts a detached supervisor (`trustmesh supervise`), which starts, in order,

    redis        redis-server (append-only file in HOME/redis)
    couchdb      pouchdb-server, CouchDB's HTTP API (databases in HOME/couchdb)
    validator    the dev validator (chain in HOME/chain)
    processors   the federation's transaction processors
    compute-N    compute nodes   (keys and state in HOME/nodes/compute-N)
    iot-host-K   IoT nodes iot-N (keys and state in HOME/nodes/iot-N), in one host process per
                 core (iot-host), each node still with its own keys, data and transactions; or,
                 with iot_hosts=0, iot-N: one `iot-node` process each, as devices run them

each on a free loopback port, logging to HOME/logs/NAME.log. It checks each one's health
(servers answer, nodes' heartbeats are fresh), restarts a process that dies (with backoff), and
keeps HOME/network.json up to date: endpoints, pids, restarts, health. `down` asks the
supervisor to stop everything (SIGTERM, reverse order) and makes sure nothing is left behind.
Data stays in HOME between runs: `up` again resumes the same chain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from trustmesh.endpoints import NETWORK_FILE, home_dir, local_network, pid_alive
from trustmesh.machine import usable_cores
from trustmesh.stores.heartbeats import Heartbeats
from trustmesh.stores.redis_client import connect
from trustmesh.stores.servers import CouchServer, RedisServer, ServerError, free_port
from trustmesh.whole_files import write_whole

LOGGER = logging.getLogger(__name__)

CHECK_INTERVAL = 1.0       # seconds between health checks
HEARTBEAT_GRACE = 20.0     # a node without a fresh heartbeat this long after its start is unhealthy
MAX_BACKOFF = 30.0         # seconds between restarts of a process that keeps dying
STOP_TIMEOUT = 10.0        # SIGTERM, then SIGKILL after this
DASHBOARD_PORT = 8080      # the dashboard's port when free (else last run's, else any free one)


def iot_host_count(iot_nodes: int, iot_hosts: int | None) -> int:
    """Host processes for the IoT nodes (default: one per core); 0: one process per node.

    By core, not by node: a process per node cost the ten nodes of `up` over twice the CPU of
    two hosts per round (~8 ms each: its own event stream, state reads and submission POST),
    a sixth of a round's CPU at ten participants on two cores."""
    if iot_hosts is None:
        iot_hosts = usable_cores()
    return min(iot_hosts, iot_nodes)


def _ranges(count: int, parts: int) -> list[tuple[int, int]]:
    """1..count split into `parts` contiguous ranges, as even as can be."""
    size, extra = divmod(count, parts)
    ranges, first = [], 1
    for part in range(parts):
        last = first + size - 1 + (part < extra)
        ranges.append((first, last))
        first = last + 1
    return ranges


class NetworkError(RuntimeError):
    """The local network could not be started, found or stopped; the message says why."""


def _write_json(path: pathlib.Path, value: dict) -> None:
    write_whole(path, json.dumps(value, indent=2), mode=0o600, durable=False)  # readers never see half a file


def _tail(path: pathlib.Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_free(port: int | None) -> bool:
    if not port:
        return False
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is fine
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _http_body(url: str) -> bytes | None:
    """The body of a 200 answer from `url`, or None for no such answer."""
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.read() if response.status == 200 else None
    except (OSError, urllib.error.URLError, ValueError):
        return None


def _names_rest(health: bytes | None, rest: str) -> bool:
    """Whether a dashboard's /api/health answer says it reads the chain at `rest`."""
    try:
        answer = json.loads(health) if health is not None else None
    except ValueError:
        return False
    return isinstance(answer, dict) and answer.get("rest") == rest


# ------------------------------------------------------------------------------ the processes


@dataclass
class Service:
    """One supervised process: how to start it, and how to tell it is healthy."""

    name: str
    kind: str                                  # store | ledger | compute | iot
    log_path: pathlib.Path
    command: list[str] = field(default_factory=list)
    server: RedisServer | CouchServer | None = None   # stores are run by their own helpers
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    healthy: bool = False
    node_key: str | None = None                # compute and IoT nodes: their public key
    hosted: dict[str, str] = field(default_factory=dict)  # an IoT host: name -> key of each node it runs
    attack: str | None = None                  # a node in attack test mode says so in its heartbeat

    @property
    def pid(self) -> int | None:
        if self.server is not None:
            return self.server.pid
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        if self.server is not None:
            return self.server.running
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        self.started_at = time.time()
        if self.server is not None:
            self.server.start(timeout=30)
            self.server.requested_port = self.server.port  # restarts keep the address peers know
            return
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def terminate(self) -> None:
        """Ask to stop (SIGTERM); wait_stopped() waits. Stores are stopped by their helpers."""
        if self.server is None and self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=STOP_TIMEOUT)
            return
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            LOGGER.warning("%s (pid %d) ignored SIGTERM; killing it", self.name, self.proc.pid)
            self.proc.kill()
            self.proc.wait()

    def describe(self) -> dict:
        return {"kind": self.kind, "pid": self.pid, "running": self.running, "healthy": self.healthy,
                "restarts": self.restarts, "started_at": self.started_at, "log": str(self.log_path),
                **({"node": self.node_key} if self.node_key else {}),
                **({"nodes": self.hosted} if self.hosted else {}),
                **({"attack": self.attack} if self.attack else {})}


async def _live_nodes(redis_url: str) -> dict[str, dict]:
    redis = await connect(redis_url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return await Heartbeats(redis).live()
    finally:
        await redis.aclose()


def _trustmesh(home: pathlib.Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "trustmesh.cli", "--home", str(home), *args]


def _node_key(home: pathlib.Path, name: str) -> str:
    from trustmesh.ledger.signing import load_or_create_key

    return load_or_create_key(home / "nodes" / name / "keys", name).public_key().as_hex()


class Supervisor:
    def __init__(self, home: pathlib.Path, *, compute_nodes: int = 2, iot_nodes: int = 10,
                 iot_hosts: int | None = None):
        self.home = home
        self.compute_nodes, self.iot_nodes = compute_nodes, iot_nodes
        self.iot_hosts = iot_host_count(iot_nodes, iot_hosts)
        self.logs = home / "logs"
        self.services: list[Service] = []
        self.endpoints: dict[str, str] = {}
        self.ready = False
        self._stopping = False

    # -- plan ----------------------------------------------------------------------------------

    def _plan(self) -> None:
        home, logs = self.home, self.logs
        previous = (local_network(home) or {}).get("ports", {})
        # The same ports as last time when they are free, so keys, logs and URLs stay valid.
        ports = {name: previous.get(name) if _port_free(previous.get(name)) else free_port()
                 for name in ("component", "rest")}
        ports["dashboard"] = next((p for p in (previous.get("dashboard"), DASHBOARD_PORT) if _port_free(p)), None) \
            or free_port()
        self.ports = ports
        # Deliveries and blobs must outlive a kill -9 of Redis: fsync before every answer
        # (TRUSTMESH_REDIS_APPENDFSYNC=everysec to compare, as bench/bench_round_overhead.py does;
        # "off": no append-only file at all, a Redis that restarts empty, for fault tests).
        fsync = os.environ.get("TRUSTMESH_REDIS_APPENDFSYNC", "always")
        redis = RedisServer(work_dir=home / "redis", persist=fsync != "off",
                            appendfsync="always" if fsync == "off" else fsync,
                            port=previous.get("redis") if _port_free(previous.get("redis")) else None)
        couch = CouchServer(work_dir=home / "couchdb", data_dir=home / "couchdb" / "data",
                            port=previous.get("couchdb") if _port_free(previous.get("couchdb")) else None)
        self.services = [Service("redis", "store", home / "redis" / "server.log", server=redis),
                         Service("couchdb", "store", home / "couchdb" / "server.log", server=couch)]
        for service in self.services:  # every log in one folder; the servers write beside their data
            link = logs / f"{service.name}.log"
            if not link.is_symlink():
                link.symlink_to(service.log_path)
        component, rest = f"tcp://127.0.0.1:{ports['component']}", f"127.0.0.1:{ports['rest']}"
        self.services.append(Service("validator", "ledger", logs / "validator.log", _trustmesh(
            home, "devnet", "--data-dir", str(home / "chain"), "--endpoint", component, "--rest", rest)))
        self.services.append(Service("processors", "ledger", logs / "processors.log",
                                     _trustmesh(home, "processors", "--endpoint", component)))
        # All nodes share this machine: compute nodes split its cores, IoT nodes (small devices,
        # training only for train_on "iot") take one thread each.
        threads = {"compute": max(1, usable_cores() // max(1, self.compute_nodes)), "iot": 1}
        for host, (first, last) in enumerate(_ranges(self.iot_nodes, self.iot_hosts) if self.iot_hosts else (), 1):
            name = f"iot-host-{host}"
            self.services.append(Service(name, "iot", logs / f"{name}.log", _trustmesh(
                home, "iot-host", "--nodes", f"{first}-{last}", "--data-root", str(home / "nodes"),
                "--torch-threads", "1"), hosted={f"iot-{i}": _node_key(home, f"iot-{i}") for i in range(first, last + 1)}))
        for kind, count in (("compute", self.compute_nodes), ("iot", 0 if self.iot_hosts else self.iot_nodes)):
            for i in range(1, count + 1):
                name = f"{kind}-{i}"
                command = "compute-node" if kind == "compute" else "iot-node"
                self.services.append(Service(name, kind, logs / f"{name}.log", _trustmesh(
                    home, command, "--name", name, "--data-dir", str(home / "nodes" / name),
                    "--torch-threads", str(threads[kind])), node_key=_node_key(home, name)))
        # The dashboard, on loopback (no token there); it reads Redis's address from network.json.
        dashboard = f"127.0.0.1:{ports['dashboard']}"
        self.services.append(Service("dashboard", "view", logs / "dashboard.log", _trustmesh(
            home, "dashboard", "--bind", dashboard, "--validator", component, "--rest", f"http://{rest}")))
        self.endpoints = {"validator": component, "rest": f"http://{rest}", "dashboard": f"http://{dashboard}"}

    # -- health ----------------------------------------------------------------------------------

    def _check(self, service: Service, live_nodes: dict[str, dict]) -> bool:
        if not service.running:
            return False
        if service.server is not None:
            return service.server.healthy()
        if service.name == "validator":
            return _http_body(self.endpoints["rest"] + "/blocks?limit=1") is not None
        if service.name == "dashboard":  # ours, not another network's that took the port first
            return _names_rest(_http_body(self.endpoints["dashboard"] + "/api/health"), self.endpoints["rest"])
        if service.node_key is not None:
            return service.node_key in live_nodes
        if service.hosted:
            return all(key in live_nodes for key in service.hosted.values())
        return True  # processors: alive is all we can see (the validator does not list them)

    def _live_nodes(self) -> dict[str, dict]:
        """Nodes whose heartbeat has not expired, with what they say of themselves (Heartbeats)."""
        url = self.endpoints.get("redis")
        if not url:
            return {}
        try:
            return asyncio.run(_live_nodes(url))
        except (RedisError, OSError):
            return {}

    # -- run -------------------------------------------------------------------------------------

    def _save(self) -> None:
        _write_json(self.home / NETWORK_FILE, {
            "supervisor_pid": os.getpid(), "ready": self.ready, "stopping": self._stopping,
            "endpoints": self.endpoints, "ports": self.ports, "home": str(self.home),
            "services": {s.name: s.describe() for s in self.services}, "updated_at": time.time()})

    def _start_all(self) -> None:
        for service in self.services:
            if self._stopping:
                return
            LOGGER.info("starting %s", service.name)
            service.start()
            if service.name == "redis":
                self.endpoints["redis"] = service.server.url
                self.ports["redis"] = service.server.port
            elif service.name == "couchdb":
                self.endpoints["couch"] = service.server.url
                self.ports["couchdb"] = service.server.port
            elif service.name == "validator":
                self._wait(service, 60)
            self._save()

    def _wait(self, service: Service, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._check(service, set()):
            if self._stopping:
                return
            if not service.running:
                raise NetworkError(f"{service.name} exited during start-up; see {service.log_path}")
            if time.monotonic() > deadline:
                raise NetworkError(f"{service.name} did not become healthy within {timeout:g} s; see {service.log_path}")
            time.sleep(0.1)

    def run(self) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        self._plan()
        try:
            self._start_all()
            while not self._stopping:
                self._supervise_once()
                time.sleep(CHECK_INTERVAL)
        except (NetworkError, ServerError) as exc:
            LOGGER.error("%s", exc)
            self._save_failure(str(exc))
            return 1
        except Exception as exc:  # a bug: keep its trace in the log, and say so in network.json
            LOGGER.exception("the supervisor failed")
            self._save_failure(f"the supervisor failed: {exc!r} (trace in logs/supervisor.log)")
            return 1
        finally:
            self._stop_all()
        return 0

    def _supervise_once(self) -> None:
        live = self._live_nodes()
        now = time.time()
        for service in self.services:
            if self._stopping:
                return
            if not service.running and now >= service.next_start:
                # Crashed (or killed): start again, waiting longer each time it keeps dying.
                service.restarts += 1
                backoff = min(MAX_BACKOFF, 2 ** min(service.restarts, 5) / 4)
                service.next_start = now + backoff
                LOGGER.warning("%s is not running; restart %d", service.name, service.restarts)
                self._move_dashboard_if_taken(service)
                try:
                    service.start()
                except ServerError as exc:
                    LOGGER.error("%s did not restart: %s", service.name, exc)
            healthy = self._check(service, live)
            if service.node_key in live:
                service.attack = live[service.node_key].get("attack")
            grace = HEARTBEAT_GRACE + len(service.hosted) * 0.05  # a host starts its nodes one by one
            if not healthy and (service.node_key or service.hosted) and now - service.started_at < grace:
                healthy = None  # still starting: not yet a problem
            service.healthy = healthy
        if not self.ready and all(s.healthy for s in self.services):
            self.ready = True
            LOGGER.info("local network ready: %s", self.endpoints)
        self._save()

    def _move_dashboard_if_taken(self, service: Service) -> None:
        """A dashboard that could not listen because its port was taken meanwhile (by another
        local network started at the same moment: `_plan` saw the port free) comes back on a free one."""
        if service.name != "dashboard" or _port_free(self.ports["dashboard"]):
            return
        taken, port = self.ports["dashboard"], free_port()
        service.command[service.command.index("--bind") + 1] = f"127.0.0.1:{port}"
        self.ports["dashboard"], self.endpoints["dashboard"] = port, f"http://127.0.0.1:{port}"
        LOGGER.warning("the dashboard's port %d is taken by another process; it moves to %d", taken, port)

    def _on_signal(self, signum, frame) -> None:
        self._stopping = True

    def _stop_all(self) -> None:
        self._stopping = True
        self.ready = False
        # Users of a tier first, all of a tier at once: nodes, then the ledger, then the stores.
        for tier in (("compute", "iot", "view"), ("ledger",), ("store",)):
            group = [s for s in reversed(self.services) if s.kind in tier]
            for service in group:
                service.terminate()
            began = time.monotonic()
            for service in group:
                try:
                    service.wait_stopped()
                except Exception:  # one stubborn process must not keep the others running
                    LOGGER.exception("stopping %s failed", service.name)
            LOGGER.info("stopped %s in %.1f s", ", ".join(s.name for s in group), time.monotonic() - began)
        path = self.home / NETWORK_FILE
        if path.exists():
            state = json.loads(path.read_text())
            state.update(ready=False, stopping=False, supervisor_pid=None, stopped_at=time.time(),
                         services={s.name: s.describe() for s in self.services})
            _write_json(path, state)
        LOGGER.info("local network stopped")

    def _save_failure(self, message: str) -> None:
        path = self.home / NETWORK_FILE
        state = json.loads(path.read_text()) if path.exists() else {}
        state["failure"] = message
        _write_json(path, state)


# ------------------------------------------------------------------------------ the commands


def start(home: pathlib.Path, *, compute_nodes: int, iot_nodes: int, iot_hosts: int | None = None,
          timeout: float = 120, progress=lambda text: None) -> dict:
    """Start the supervisor in the background and wait until every process is healthy."""
    home = home_dir(home)
    state = local_network(home)
    if state and pid_alive(state.get("supervisor_pid")):
        raise NetworkError(f"a local network already runs from {home} (supervisor pid {state['supervisor_pid']}); "
                           f"`trustmesh status` shows it, `trustmesh down` stops it")
    home.mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(exist_ok=True)
    if state is not None:
        state.pop("failure", None)
        state["supervisor_pid"] = None
        state["ready"] = False
        _write_json(home / NETWORK_FILE, state)
    log = open(home / "logs" / "supervisor.log", "ab")
    supervisor = subprocess.Popen(
        _trustmesh(home, "supervise", "--compute-nodes", str(compute_nodes), "--iot-nodes", str(iot_nodes),
                   *(["--iot-hosts", str(iot_hosts)] if iot_hosts is not None else [])),
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    try:
        iot_services = iot_host_count(iot_nodes, iot_hosts) or iot_nodes
        return _wait_ready(home, supervisor, compute_nodes + iot_services + 5, timeout, progress)
    except BaseException:  # failed, timed out or interrupted: nothing may keep running
        if supervisor.poll() is None:
            supervisor.terminate()  # it stops what it started, even before network.json exists
            try:
                supervisor.wait(STOP_TIMEOUT * 3)
            except subprocess.TimeoutExpired:
                supervisor.kill()
        with contextlib.suppress(NetworkError):
            stop(home)  # and whatever outlived it
        raise


def _wait_ready(home: pathlib.Path, supervisor: subprocess.Popen, total: int, timeout: float, progress) -> dict:
    deadline = time.monotonic() + timeout
    shown = set()
    while True:
        state = local_network(home) or {}
        if supervisor.poll() is not None:
            reason = state.get("failure") or f"the supervisor exited with status {supervisor.returncode}"
            raise NetworkError(f"the local network did not start: {reason}; logs in {home / 'logs'}; the "
                               f"supervisor's last words:\n{_tail(home / 'logs' / 'supervisor.log')}")
        if state.get("supervisor_pid") == supervisor.pid:
            for name, service in state.get("services", {}).items():
                if service.get("healthy") and name not in shown:
                    shown.add(name)
                    progress(f"{name} up ({len(shown)}/{total})")
            if state.get("ready"):
                return state
        if time.monotonic() > deadline:
            raise NetworkError(f"the local network was not healthy within {timeout:g} s; logs in {home / 'logs'}")
        time.sleep(0.2)


def stop(home: pathlib.Path, timeout: float = 60) -> list[str]:
    """Stop the supervisor and every process it ran; returns the names of processes it had to kill."""
    home = home_dir(home)
    state = local_network(home)
    if state is None:
        raise NetworkError(f"no local network was started from {home}")
    supervisor = state.get("supervisor_pid")
    if pid_alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid_alive(supervisor):
            os.kill(supervisor, signal.SIGKILL)
    # Whatever outlived its supervisor (say it was killed with -9) goes too — only our own
    # processes: the pid must still run a command line we started.
    killed = []
    for name, service in (local_network(home) or state).get("services", {}).items():
        pid = service.get("pid")
        if pid_alive(pid) and _is_ours(pid, home):
            os.kill(pid, signal.SIGKILL)
            killed.append(name)
    return killed


def _is_ours(pid: int, home: pathlib.Path) -> bool:
    try:
        cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return False
    return str(home) in cmdline or cwd.startswith(str(home))


def _rss_kib(pid: int | None) -> int:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_mib(state: dict) -> float:
    """Resident memory of the supervisor and every process it runs, in MiB (Linux /proc)."""
    pids = [state.get("supervisor_pid"), *(s.get("pid") for s in state.get("services", {}).values())]
    return sum(_rss_kib(pid) for pid in pids if pid) / 1024


def status(home: pathlib.Path) -> dict:
    """network.json, with each pid re-checked now."""
    home = home_dir(home)
    state = local_network(home)
    if state is None:
        raise NetworkError(f"no local network was started from {home}; `trustmesh up` starts one")
    state["supervisor_running"] = pid_alive(state.get("supervisor_pid"))
    for service in state.get("services", {}).values():
        service["running"] = state["supervisor_running"] and pid_alive(service.get("pid"))
    return state
