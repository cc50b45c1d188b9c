"""Start and stop real store servers on loopback: redis-server and pouchdb-server.

Used by the tests (one server per test module, on a free port) and by `trustmesh up`. Each
server runs as our own child process, in a working directory of its own (a temporary one unless
`work_dir` is given), logs to `<work_dir>/server.log`, and is stopped with SIGTERM (SIGKILL after
a grace period). A server object that is dropped without stop() is killed when the interpreter
exits, so a failed test leaves no process behind.

    with RedisServer() as redis_server, CouchServer() as couch_server:
        redis_server.url     # redis://127.0.0.1:PORT/0
        couch_server.url     # http://127.0.0.1:PORT

Binaries (scripts/install provides both):

    redis-server     Debian package `redis-server` (or $TRUSTMESH_REDIS_SERVER)
    pouchdb-server   tools/couchdb-local/node_modules (npm ci --prefix tools/couchdb-local),
                     run with `node` (or $TRUSTMESH_POUCHDB_SERVER / $TRUSTMESH_NODE)

pouchdb-server 4.2.0 speaks CouchDB's HTTP API (databases, documents with revisions and 409
conflicts, attachments). Two quirks: it answers text/plain unless the request says
`Accept: application/json` (stores.couch always does), and configuring admins crashes it on the
first request, so it runs in "admin party" mode on loopback only; real CouchDB 3 (docker-compose)
requires credentials.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import weakref
from typing import Sequence
from urllib.parse import quote

LOGGER = logging.getLogger(__name__)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COUCHDB_LOCAL = REPO_ROOT / "tools" / "couchdb-local"
POUCHDB_SERVER_JS = COUCHDB_LOCAL / "node_modules" / "pouchdb-server" / "bin" / "pouchdb-server"

REDIS_INSTALL_HINT = "run scripts/install (it does `apt-get install -y redis-server`)"
POUCHDB_INSTALL_HINT = "run scripts/install (it does `npm ci --prefix tools/couchdb-local`)"


class ServerError(RuntimeError):
    """A store server could not be started or stopped."""


class ServerNotInstalled(ServerError):
    """The server's binary is missing; the message names the install step that provides it."""


class ServerStartError(ServerError):
    """The server exited or did not answer in time; the message holds the end of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the server may still lose a race: start() retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _kill(proc: subprocess.Popen, work_dir: pathlib.Path | None = None) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if work_dir is not None:
        shutil.rmtree(work_dir, ignore_errors=True)


def _tail(path: pathlib.Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


class _ManagedServer:
    """One child process on a loopback port; subclasses say how to run it and when it is ready."""

    name = "server"
    _ADDRESS_IN_USE = ("Address already in use", "EADDRINUSE")

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 work_dir: str | os.PathLike | None = None):
        self.host = host
        self.requested_port = port
        self.port: int | None = port
        self._own_work_dir = work_dir is None
        self.work_dir = pathlib.Path(work_dir) if work_dir is not None else None
        self.proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    # -- to be provided by subclasses -----------------------------------------------------------

    def _command(self) -> Sequence[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Write config files into work_dir before the process starts."""

    def _ready(self) -> bool:
        raise NotImplementedError

    # -- life cycle -----------------------------------------------------------------------------

    @property
    def log_path(self) -> pathlib.Path:
        assert self.work_dir is not None, "not started"
        return self.work_dir / "server.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def healthy(self) -> bool:
        """Running and answering as itself (for supervisors' health checks)."""
        return self.running and self._ready()

    def start(self, timeout: float = 20) -> "_ManagedServer":
        """Start and wait until the server answers; raises ServerStartError with its log."""
        if self.running:
            return self
        if self.work_dir is None:
            self.work_dir = pathlib.Path(tempfile.mkdtemp(prefix=f"trustmesh-{self.name}-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        attempts = 3 if self.requested_port is None else 1
        for attempt in range(1, attempts + 1):
            self.port = self.requested_port if self.requested_port is not None else free_port(self.host)
            self._prepare()
            command = list(self._command())
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(command, cwd=self.work_dir, stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT)
            self._finalizer = weakref.finalize(self, _kill, self.proc, self.work_dir if self._own_work_dir else None)
            try:
                self._wait_ready(timeout)
                LOGGER.info("%s ready on %s:%d (pid %d)", self.name, self.host, self.port, self.proc.pid)
                return self
            except ServerStartError as exc:
                _kill(self.proc)
                self._finalizer.detach()
                lost_race = any(marker in str(exc) for marker in self._ADDRESS_IN_USE)
                if not (lost_race and attempt < attempts):
                    if self._own_work_dir:  # the message holds the log's end
                        shutil.rmtree(self.work_dir, ignore_errors=True)
                        self.work_dir = None
                    raise
                LOGGER.info("%s lost the race for port %d; trying another", self.name, self.port)
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {code} during start-up "
                    f"({' '.join(self.proc.args)}); log {self.log_path}:\n{_tail(self.log_path)}")
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"{self.name} did not answer on {self.host}:{self.port} within {timeout:g} s; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; removes a temporary work_dir. Returns the exit status."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    LOGGER.warning("%s (pid %d) ignored SIGTERM for %g s; killing it", self.name, self.proc.pid, timeout)
                    _kill(self.proc)
            code = self.proc.returncode
            if self._finalizer is not None:
                self._finalizer.detach()
        if self._own_work_dir and self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None
        return code

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


APPENDFSYNC_POLICIES = ("always", "everysec", "no")


class RedisServer(_ManagedServer):
    """A real redis-server. No persistence unless `persist=True` (append-only file in work_dir).

    With persistence, task deliveries, consumer-group state and blobs survive a kill -9 of
    redis-server: Redis writes each change to the append-only file before it answers.
    appendfsync "always" (the default) also fsyncs it first, so not even a crash of the machine
    loses what Redis acknowledged; "everysec" may lose the last second then (the cost of
    "always" per round: bench/bench_round_overhead.py --appendfsync)."""

    name = "redis-server"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, password: str | None = None,
                 work_dir: str | os.PathLike | None = None, persist: bool = False, binary: str | None = None,
                 extra_args: Sequence[str] = (), appendfsync: str = "always"):
        super().__init__(host=host, port=port, work_dir=work_dir)
        if appendfsync not in APPENDFSYNC_POLICIES:
            raise ValueError(f"appendfsync is one of {', '.join(APPENDFSYNC_POLICIES)}, got {appendfsync!r}")
        self.password = password
        self.persist = persist
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
        self.binary = binary or os.environ.get("TRUSTMESH_REDIS_SERVER") or shutil.which("redis-server")
        if not self.binary or not os.access(self.binary, os.X_OK):
            raise ServerNotInstalled(f"redis-server not found (PATH or $TRUSTMESH_REDIS_SERVER): {REDIS_INSTALL_HINT}")

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def _config_path(self) -> pathlib.Path:
        return self.work_dir / "redis.conf"

    def _prepare(self) -> None:
        # The password goes in a 0600 config file, not on the command line where `ps` shows it.
        lines = []
        if self.password:
            escaped = "".join(f"\\x{byte:02x}" for byte in self.password.encode())
            lines.append(f'requirepass "{escaped}"')
        fd = os.open(self._config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as config:
            config.write("\n".join(lines) + "\n")

    def _command(self) -> list[str]:
        command = [self.binary, str(self._config_path), "--port", str(self.port), "--bind", self.host,
                   "--daemonize", "no", "--dir", str(self.work_dir), "--save", ""]
        if self.persist:
            command += ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        else:
            command += ["--appendonly", "no"]
        return command + self.extra_args

    def _ready(self) -> bool:
        # Ours, not another server that already held the port: its process id must be ours.
        import redis
        from redis.exceptions import RedisError

        client = redis.Redis(host=self.host, port=self.port, password=self.password, socket_timeout=1,
                             socket_connect_timeout=1)
        try:
            return int(client.info("server")["process_id"]) == self.proc.pid
        except (RedisError, OSError, KeyError, ValueError):
            return False
        finally:
            client.close()


class CouchServer(_ManagedServer):
    """pouchdb-server (CouchDB HTTP API): in memory by default, or on disk under `data_dir`."""

    name = "pouchdb-server"

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 data_dir: str | os.PathLike | None = None, work_dir: str | os.PathLike | None = None,
                 script: str | os.PathLike | None = None, node: str | None = None):
        super().__init__(host=host, port=port, work_dir=work_dir)
        self.data_dir = pathlib.Path(data_dir) if data_dir is not None else None
        self.script = pathlib.Path(script or os.environ.get("TRUSTMESH_POUCHDB_SERVER") or POUCHDB_SERVER_JS)
        self.node = node or os.environ.get("TRUSTMESH_NODE") or shutil.which("node")
        if not self.script.is_file():
            raise ServerNotInstalled(f"pouchdb-server not found at {self.script}: {POUCHDB_INSTALL_HINT}")
        if not self.node:
            raise ServerNotInstalled("node (Node.js) not found on PATH, needed to run pouchdb-server: "
                                     "apt-get install -y nodejs npm, then " + POUCHDB_INSTALL_HINT)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _prepare(self) -> None:
        # pouchdb-server keeps its /_config in this file and would write log.txt into the
        # current directory; both stay in work_dir.
        # The uuid tells our server's answer from another one that already held the port.
        self._uuid = str(uuid.uuid4())
        config = {"log": {"file": str(self.work_dir / "pouchdb.log"), "level": "warning"},
                  "couchdb": {"uuid": self._uuid}}
        (self.work_dir / "config.json").write_text(json.dumps(config))
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)

    def _command(self) -> list[str]:
        command = [self.node, str(self.script), "--port", str(self.port), "--host", self.host,
                   "--config", str(self.work_dir / "config.json"), "--no-stdout-logs", "--no-color"]
        if self.data_dir is None:
            command.append("--in-memory")
        else:
            # pouchdb-server prefixes database names with this string: keep the trailing slash.
            command += ["--dir", str(self.data_dir.resolve()) + os.sep]
        return command

    def _ready(self) -> bool:
        request = urllib.request.Request(self.url + "/", headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=1) as response:
                welcome = json.loads(response.read())
        except (OSError, ValueError, urllib.error.URLError):
            return False
        return isinstance(welcome, dict) and welcome.get("uuid") == self._uuid


__all__ = ["RedisServer", "CouchServer", "ServerError", "ServerNotInstalled", "ServerStartError", "free_port"]
