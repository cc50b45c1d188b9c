"""The one aiohttp session an HTTP client (the REST client, the CouchDB client) keeps.

It is opened at the first request, not in __init__, so a client can be made outside a running
event loop; close() (or leaving `async with client:`) closes it, and a later request opens a new one.
"""

from __future__ import annotations

from typing import Self

import aiohttp


class HttpSession:
    """Mix-in: `_http()` is the client's session; `close()` and `async with` end it."""

    _session: aiohttp.ClientSession | None = None

    def _session_options(self) -> dict:
        """Keyword arguments for aiohttp.ClientSession (e.g. a default timeout)."""
        return {}

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(**self._session_options())
        return self._session

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
