"""New state roots, computed in a process of their own.

A block of 1,000 new intkey keys creates ~30,000 Merkle nodes: hashing them and folding them
into storage rows was ~30% of the validator's GIL time, and the next block could not start
executing until it was done. In this process it runs beside the event loop, on the other
core: the chain executes block N+1 (on block N's writes, chain.py) while N's root is computed
here.

The worker reads nodes from the chain's SQLite file (its own connection; WAL lets it read
while the validator writes) and keeps the nodes of its last few results in memory, so a
parent whose block is not on disk yet is still readable (state_process.py). It gets only its
end of a socket pair: if the validator dies, even by kill -9, the worker reads EOF and exits.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pathlib
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Iterable, Mapping

LOGGER = logging.getLogger(__name__)
DEFAULT_TIMEOUT = 300.0  # seconds; the root of a block of 1,000 new keys takes ~0.2 s
_PROCESS_MODULE = __name__.rpartition(".")[0] + ".state_process"


class StateWorkerError(RuntimeError):
    """The worker failed to compute a root (the message says why)."""


class StateWorker:
    """``root, rows = await update(parent_root, sets, deletes)``: the new state root, and a
    future of the packed rows ChainStore.commit_block stores. The root comes first: the block
    can be signed (and the next one can start) while the worker still folds the rows.
    Requests are answered in the order asked."""

    def __init__(self, db_path: str | pathlib.Path, timeout: float = DEFAULT_TIMEOUT):
        self._db_path = str(db_path)
        self.timeout = timeout  # per answer; a worker silent for longer is killed and replaced
        self._conn = None
        self._process = None
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        # (root future, rows future) per request in flight, oldest first; the reader thread
        # resolves them as the answers arrive.
        self._waiting: collections.deque = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready: asyncio.Future | None = None

    def start(self) -> None:
        """Start the process (it imports in the background; the first update waits for it)."""
        self._loop = asyncio.get_running_loop()
        # A plain child process running this module (not multiprocessing's spawn, which would
        # import the validator's whole __main__ first: 0.8 s before the first block).
        parent_sock, child_sock = socket.socketpair()
        process = subprocess.Popen(
            [sys.executable, "-m", _PROCESS_MODULE, str(child_sock.fileno()), self._db_path],
            pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL,
        )
        child_sock.close()  # so the worker's death reads as EOF here
        self._conn, self._process = Connection(parent_sock.detach()), process
        self._ready = self._loop.create_future()
        self._reader = threading.Thread(target=self._read_answers, args=(self._conn,),
                                        name="state-worker-answers", daemon=True)
        self._reader.start()

    async def ready(self, timeout: float = 30.0) -> None:
        """Wait until the process has started (the validator says it is ready only then, so
        its first block does not wait for the worker's imports)."""
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), timeout)
        except asyncio.TimeoutError:
            raise StateWorkerError(f"state worker did not start within {timeout} s") from None

    async def update(self, parent_root: str, sets: Mapping[str, bytes],
                     deletes: Iterable[str]) -> tuple[str, "asyncio.Future[bytes]"]:
        if self._process is None or self._process.poll() is not None:
            LOGGER.warning("state worker is not running; starting a new one")
            await asyncio.to_thread(self._stop_process)
            self.start()
        root, rows = self._loop.create_future(), self._loop.create_future()
        rows.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"
        request = (parent_root, dict(sets), list(deletes))
        try:
            # Sent from a thread: the pipe blocks while the worker is busy with the one before.
            await asyncio.wait_for(asyncio.to_thread(self._send, request, (root, rows)), self.timeout)
            new_root = await asyncio.wait_for(asyncio.shield(root), self.timeout)
        except asyncio.TimeoutError:
            raise self._wedged("a state root") from None
        return new_root, self._in_time(rows)

    def _in_time(self, rows: asyncio.Future) -> "asyncio.Future[bytes]":
        async def wait() -> bytes:
            try:
                return await asyncio.wait_for(asyncio.shield(rows), self.timeout)
            except asyncio.TimeoutError:
                raise self._wedged("a block's node rows") from None

        guarded = asyncio.ensure_future(wait())
        guarded.add_done_callback(lambda f: f.cancelled() or f.exception())  # no "never retrieved"
        return guarded

    def _wedged(self, what: str) -> StateWorkerError:
        """A worker that stops answering (stopped, deadlocked) would stall the chain for good:
        kill it; the blocks waiting on it are built again, by a fresh worker."""
        LOGGER.error("state worker gave no answer for %s within %.0f s; killing it", what, self.timeout)
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(5)  # SIGKILL ends even a stopped process at once; the next update
            # then sees it gone and starts a fresh one
        return StateWorkerError(f"state worker gave no answer for {what} within {self.timeout:.0f} s")

    def _send(self, request, futures) -> None:
        with self._send_lock:  # answers come in the order of the sends
            self._waiting.append(futures)
            try:
                self._conn.send(request)
            except (OSError, ValueError, AttributeError) as exc:
                self._waiting.remove(futures)
                raise StateWorkerError(f"state worker is gone: {exc!r}") from None

    def _read_answers(self, conn) -> None:
        while True:
            try:
                kind, ok, payload = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "ready":
                self._post(self._ready, True, None)
                continue
            futures = self._waiting[0]
            future = futures[0] if kind == "root" else futures[1]
            if kind == "rows" or not ok:
                self._waiting.popleft()
            result = payload if ok else StateWorkerError(payload)
            self._post(future, ok, result)
            if kind == "root" and not ok:
                self._post(futures[1], False, StateWorkerError(payload))
        gone = StateWorkerError("state worker exited")
        self._post(self._ready, False, gone)
        while self._waiting:  # the worker died, or we closed it
            for future in self._waiting.popleft():
                self._post(future, False, gone)

    def _post(self, future, ok: bool, result) -> None:
        try:
            self._loop.call_soon_threadsafe(_settle, future, ok, result)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _stop_process(self) -> None:
        if self._conn is not None:
            try:
                with self._send_lock:
                    self._conn.send(None)  # asks it to end; its exit ends the reader thread
            except (OSError, ValueError):
                pass  # already gone
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def close(self) -> None:
        await asyncio.to_thread(self._stop_process)


def _settle(future: asyncio.Future, ok: bool, result) -> None:
    """On the event loop: the reader thread's answer."""
    if not future.done():
        if ok:
            future.set_result(result)
        else:
            future.set_exception(result)
