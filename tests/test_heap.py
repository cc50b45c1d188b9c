"""A long-running service collects garbage seldom and never walks what it made while starting
(trustmesh/heap.py): at 1,000 participants the default collector was a sixth of the machine's CPU."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from trustmesh.stores.servers import free_port


SERVICES = {  # services that start alone (the processors wait for a validator; the validator needs nobody)
    "processors": lambda tmp: ["processors", "--endpoint", f"tcp://127.0.0.1:{free_port()}"],
    "devnet": lambda tmp: ["devnet", "--data-dir", str(tmp / "chain"), "--endpoint", f"tcp://127.0.0.1:{free_port()}",
                           "--rest", f"127.0.0.1:{free_port()}"],
}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_a_service_sets_aside_what_it_made_at_start_up_and_collects_young_objects_seldom(tmp_path, name):
    service = subprocess.Popen([sys.executable, "-m", "trustmesh.cli", "--home", str(tmp_path),
                                *SERVICES[name](tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    timer = threading.Timer(60, service.kill)  # a service that never says it: the test fails, not hangs
    timer.start()
    try:
        said = next((line for line in service.stderr if "garbage collector:" in line), "")
    finally:
        timer.cancel()
        service.terminate()
        service.wait(timeout=30)
    found = re.search(r"(\d+) objects set aside after start-up; young collections every (\d+) allocations", said)
    assert found, said
    assert int(found[1]) > 10_000 and int(found[2]) == 50_000
