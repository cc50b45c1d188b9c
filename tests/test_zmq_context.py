"""The ZMQ context every part of the ledger layer shares runs its I/O thread SCHED_BATCH, so that
the thread libzmq wakes for each message does not preempt the event loop that sends it. Read
back from the kernel, in a fresh process (the option only takes with the context's first socket)."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import os, pathlib, zmq
from trustmesh.ledger.messaging import shared_context
socket = shared_context().socket(zmq.DEALER)  # the first socket starts the I/O thread
socket.connect("tcp://127.0.0.1:9")
tasks = pathlib.Path("/proc/self/task")
policies = {int(t.name): os.sched_getscheduler(int(t.name)) for t in tasks.iterdir()
            if (t / "comm").read_text().startswith("ZMQbg/IO")}
print(policies and all(p == os.SCHED_BATCH for p in policies.values()), len(policies))
socket.close(0)
"""


def test_the_shared_zmq_context_runs_its_io_thread_as_a_batch_thread():
    found = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["True", "1"], found.stdout
