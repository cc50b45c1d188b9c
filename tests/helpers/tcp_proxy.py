"""A real TCP forwarder for tests: a free loopback port in front of a server, which a test can make
go away (nothing listens, live connections are cut) for a while and come back on the same port.

    with TcpProxy(port_of_the_rest_api) as proxy:
        ... point a client at proxy.url ...
        proxy.cut(20)                   # from now: connection refused for 20 s
        proxy.cut_at_request(5, 20)     # or: when the 5th HTTP request arrives (it is not forwarded)

Runs its own asyncio loop in a thread, so it serves subprocesses and in-process clients alike.
"""

from __future__ import annotations

import asyncio
import threading
import time

_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ")


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.port: int | None = None
        self.requests = 0                       # HTTP requests seen from clients (forwarded or not)
        self.cuts: list[list[float]] = []       # [started, ended] in time.monotonic(); ended 0 while on
        self.restored = threading.Event()       # set when the last cut is over
        self._cut_at: tuple[int, float] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._live: set[asyncio.Transport] = set()

    # -- control, from any thread ----------------------------------------------------------------

    def start(self) -> "TcpProxy":
        self._thread.start()
        self._call(self._listen())
        return self

    def close(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self, seconds: float) -> None:
        """Stop listening and drop every live connection now; listen again after `seconds`."""
        self._call(self._cut(seconds))

    def cut_at_request(self, number: int, seconds: float) -> None:
        """Cut when the `number`-th request (counted from the start) arrives, instead of forwarding it."""
        self.restored.clear()
        self._cut_at = (number, seconds)

    def __enter__(self) -> "TcpProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- the loop's side -------------------------------------------------------------------------

    async def _listen(self) -> None:
        for attempt in range(200):  # the old listener's port may take a moment to be free again
            try:
                self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port or 0,
                                                          reuse_address=True)
                break
            except OSError:
                if attempt == 199:
                    raise
                await asyncio.sleep(0.05)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self, seconds: float) -> None:
        self.restored.clear()
        self.cuts.append([time.monotonic(), 0.0])
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._live):
            transport.abort()
        self._live.clear()
        self._loop.call_later(seconds, lambda: self._loop.create_task(self._reopen()))

    async def _reopen(self) -> None:
        await self._listen()
        self.cuts[-1][1] = time.monotonic()
        self.restored.set()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for transport in list(self._live):
            transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._server is None:  # accepted just as the cut began
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._live |= pair
        try:
            await asyncio.gather(self._pump(reader, up_writer, count=True), self._pump(up_reader, writer),
                                 return_exceptions=True)
        finally:
            self._live -= pair
            for transport in pair:
                transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool = False) -> None:
        try:
            while chunk := await reader.read(65536):
                if count and chunk.startswith(_METHODS):
                    self.requests += 1
                    if self._cut_at is not None and self.requests >= self._cut_at[0]:
                        seconds, self._cut_at = self._cut_at[1], None
                        await self._cut(seconds)
                        return
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.transport.abort()
