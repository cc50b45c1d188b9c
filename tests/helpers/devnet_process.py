"""Runs `trustmesh devnet` as a real child process on free loopback ports, for tests."""

from __future__ import annotations

import os
import pathlib
import re
import selectors
import signal
import subprocess
import sys
import time

_READY = re.compile(r"devnet ready component=(\S+) rest=(\S+)")


class DevnetProcess:
    def __init__(self, data_dir: pathlib.Path, *extra_args: str):
        self.data_dir = pathlib.Path(data_dir)
        self.extra_args = list(extra_args)
        self.component_url = "tcp://127.0.0.1:0"
        self.rest = "127.0.0.1:0"
        self.rest_url = ""
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"

    def start(self, timeout: float = 30) -> "DevnetProcess":
        """Start; a restart reuses the ports of the first start so peers can reconnect."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trustmesh.cli", "-v", "devnet", "--data-dir", str(self.data_dir),
             "--endpoint", self.component_url, "--rest", self.rest, *self.extra_args],
            stdout=subprocess.PIPE, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"devnet exited with {self.proc.returncode}; log:\n{self.log_path.read_text()[-3000:]}")
            if sel.select(0.1):
                line = self.proc.stdout.readline()
                match = _READY.search(line.decode())
                if match:
                    self.component_url, self.rest_url = match.group(1), match.group(2)
                    self.rest = self.rest_url.removeprefix("http://")
                    return self
        self.kill()
        raise RuntimeError(f"devnet not ready within {timeout} s; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 15) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
