"""BlockCursor: the last block a follower handled, rewritten in place once per block. It reads back
what was saved last, whatever the file held before, and a process killed -9 while saving block
after block leaves a whole id, the last one or the one before, never a part."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from trustmesh.ledger.block_cursor import RECORD_BYTES, BlockCursor

IDS = ["a" * 128, "b" * 128, "c" * 16]  # block ids, and a short one (the null block's)


def test_reads_back_the_last_id_saved_whatever_the_file_held_before(tmp_path):
    path = tmp_path / "node.last-block"
    assert BlockCursor(path).read() == ""
    path.write_text("f" * 128)  # what a node wrote before (the id alone)
    assert BlockCursor(path).read() == "f" * 128
    cursor = BlockCursor(path)
    for block_id in IDS:
        cursor.save(block_id)
        assert BlockCursor(path).read() == block_id  # a shorter id after a longer one: no tail left
    assert path.stat().st_size == RECORD_BYTES
    path.write_text("e" * 1000)  # anything longer
    fresh = BlockCursor(path)
    fresh.save("d" * 128)
    assert BlockCursor(path).read() == "d" * 128


_SAVER = """
import sys
from trustmesh.ledger.block_cursor import BlockCursor
cursor = BlockCursor(sys.argv[1])
cursor.save("0" * 128)
print("ready", flush=True)
n = 0
while True:
    n += 1
    cursor.save(format(n % 16, "x") * (128 if n % 3 else 16))
"""


def test_a_process_killed_while_saving_leaves_a_whole_id(tmp_path):
    path = tmp_path / "killed.last-block"
    whole = {format(n, "x") * size for n in range(16) for size in (16, 128)}
    for attempt in range(12):
        saver = subprocess.Popen([sys.executable, "-c", _SAVER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            assert saver.stdout.readline().strip() == "ready"
            time.sleep(0.02 + 0.01 * attempt)  # thousands of saves in, at a different point each time
        finally:
            os.kill(saver.pid, signal.SIGKILL)
            saver.wait(10)
            saver.stdout.close()
        found = BlockCursor(path).read()
        assert found in whole, (attempt, found[:40], len(found))
