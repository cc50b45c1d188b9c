"""The dashboard as the browser tests drive it: `trustmesh dashboard` as a child process on a
free loopback port, and headless Chromium (Debian's chromium and chromium-driver)."""

from __future__ import annotations

import json
import os
import pathlib
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

_READY = re.compile(r"dashboard ready at (\S+)")


class Lines:
    """Whole lines from a pipe as they come (os.read: no buffer hides a line from select())."""

    def __init__(self, pipe):
        self.fd, self.rest = pipe.fileno(), b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.fd, selectors.EVENT_READ)

    def read(self, wait: float) -> list[str]:
        if not self.selector.select(wait):
            return []
        data = os.read(self.fd, 65536)
        *lines, self.rest = (self.rest + data).split(b"\n")
        return [line.decode() for line in lines]


class DashboardProcess:
    """`trustmesh dashboard` as a child process on a free loopback port."""

    def __init__(self, *args: str, log: pathlib.Path, env: dict | None = None):
        self.log_path = log
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "dashboard", *args],
                                         stdout=subprocess.PIPE, stderr=err,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.url = self._ready(30)

    def _ready(self, timeout: float) -> str:
        lines = Lines(self.proc.stdout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the dashboard exited {self.proc.returncode}: {self.log_path.read_text()}")
            for line in lines.read(0.1):
                match = _READY.search(line)
                if match:
                    return match.group(1)
        self.stop()
        raise AssertionError(f"the dashboard did not start within {timeout} s: {self.log_path.read_text()}")

    def get(self, path: str, *, token: str | None = None) -> tuple[int, dict | str]:
        request = urllib.request.Request(self.url.rstrip("/") + path,
                                         headers={"Authorization": f"Bearer {token}"} if token else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, body, kind = response.status, response.read(), response.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            status, body, kind = exc.code, exc.read(), exc.headers.get("Content-Type", "")
        return status, json.loads(body) if "json" in kind else body.decode()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def chromium():
    """One headless Chromium for the whole run (tests/conftest.py offers it): starting one takes
    a second or two. Modules take it through `browser`."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("Debian's chromium and chromium-driver are needed for the browser tests; scripts/install "
                    "installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000", "--hide-scrollbars"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()


@pytest.fixture(scope="module")
def browser(chromium):
    """The run's Chromium for this module; afterwards it leaves the module's pages (closing their
    event streams before the module's dashboards stop) and forgets their cookies."""
    yield chromium
    chromium.get("about:blank")
    chromium.delete_all_cookies()
