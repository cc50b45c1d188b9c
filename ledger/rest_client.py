"""Async client for a Sawtooth 1.2 REST API (the real one or ledger/devnet/rest_api.py).

Only 429 (validator queue full), 503 (validator unreachable / not ready / timed out) and
connection-level failures are retried, with bounded exponential backoff and jitter; every
other answer is final. Resubmitting a batch is safe: the validator drops a batch id it
already has, so a retried POST /batches cannot commit twice.

By default a request gives up after `retries` retries. With `patience` (seconds, math.inf for
ever) it waits an outage out instead, and says so once on stderr (trustmesh.outage.Outage):

    waiting for the REST API at http://127.0.0.1:8008 (down 2 s)

A client that has never had an answer gives up after `first_contact` seconds instead (and at
once on a host that does not resolve): a wrong address fails fast, a network that answered
before is waited for. A malformed URL is refused when the client is made (BadRestURL).

    async with RestClient("http://127.0.0.1:8008") as rest:
        ids = await rest.submit_batches([batch])
        await rest.wait_for_batches(ids, timeout=30)      # raises BatchInvalidError / BatchTimeoutError
        value = await rest.get_state(address)             # bytes, or None if nothing is there

The client remembers the batches it submitted that are not final yet (`pending_batches()`,
`pending_summary()` for a heartbeat): the Sawtooth REST API lists no pending batches, so
each submitter says what it waits for. A batch leaves that set when a status read says
COMMITTED or INVALID, or when the call waiting for it gives up (timeout, error, cancelled).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import math
import time
from typing import AsyncIterator, Iterable, Mapping, Sequence
from urllib.parse import urlencode

import aiohttp
from yarl import URL

from trustmesh.http_session import HttpSession
from trustmesh.outage import Outage, backoff_delay

from . import protos as pb

LOGGER = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 503})
FINAL_BATCH_STATUSES = frozenset({"COMMITTED", "INVALID"})
_MAX_SERVER_WAIT = 60  # seconds per long-poll of /batch_statuses; we loop for longer waits
MAX_TRACKED = 10_000  # pending batches remembered; beyond, the oldest are forgotten (fire-and-forget callers)

# Sawtooth REST API error codes the client reacts to.
STATE_NOT_FOUND = 75
BLOCK_NOT_FOUND = 70
BATCH_NOT_FOUND = 71
TRANSACTION_NOT_FOUND = 72


@dataclasses.dataclass(eq=False, repr=False)  # compared and shown as the exception it is
class RestError(Exception):
    """A request that failed for good.

    status is the HTTP status, or 0 when no HTTP answer came (connection refused, reset,
    client timeout); code/title/message come from Sawtooth's error body when there is one.
    """

    method: str
    url: str
    status: int
    code: int | None
    title: str
    message: str
    attempts: int = 1
    reached: bool = True  # False: nothing ever answered this client at that address

    def __post_init__(self):
        super().__init__(str(self))

    def __str__(self) -> str:
        tries = f" (gave up after {self.attempts} attempts)" if self.attempts > 1 else ""
        if self.status == 0:
            return f"{self.method} {self.url}: no response: {self.message}{tries}"
        code = f" [code {self.code}]" if self.code is not None else ""
        return f"{self.method} {self.url}: HTTP {self.status} {self.title}{code}: {self.message}{tries}"


class BadRestURL(ValueError):
    """The address given for the REST API cannot be one (not http[s]://HOST[:PORT][/PATH])."""


def refusal(status: Mapping) -> str:
    """Why a batch status is not COMMITTED, in one line: its first invalid transaction's message,
    else the status itself (PENDING, UNKNOWN)."""
    return (status.get("invalid_transactions") or [{}])[0].get("message", status["status"])


class BatchInvalidError(Exception):
    """Some batches were rejected; .invalid holds their statuses, .statuses all of them."""

    def __init__(self, statuses: list[dict]):
        self.statuses = statuses
        self.invalid = [s for s in statuses if s.get("status") == "INVALID"]
        reasons = []
        for status in self.invalid:
            txns = status.get("invalid_transactions") or [{}]
            why = "; ".join(f"transaction {t.get('id', '?')[:16]}: {t.get('message', 'no message')}" for t in txns)
            reasons.append(f"batch {status['id'][:16]} INVALID ({why})")
        super().__init__(f"{len(self.invalid)} of {len(statuses)} batches invalid: " + ", ".join(reasons))


class BatchTimeoutError(TimeoutError):
    """Some batches were still PENDING/UNKNOWN at the deadline; .statuses has the last view."""

    def __init__(self, statuses: list[dict], timeout: float):
        self.statuses = statuses
        self.unfinished = [s for s in statuses if s.get("status") not in FINAL_BATCH_STATUSES]
        names = ", ".join(f"{s['id'][:16]} {s.get('status')}" for s in self.unfinished)
        super().__init__(f"{len(self.unfinished)} of {len(statuses)} batches not final after {timeout:g}s: {names}")


def _parse(base_url: str) -> URL:
    try:
        parsed = URL(base_url)
    except (ValueError, TypeError) as exc:
        raise BadRestURL(f"{base_url!r} is not a REST API URL ({exc}); expected http://HOST:PORT, "
                         f"e.g. http://127.0.0.1:8008") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BadRestURL(f"{base_url!r} is not a REST API URL: expected http://HOST:PORT, e.g. http://127.0.0.1:8008")
    try:
        parsed.port  # noqa: B018 - a port out of range raises here
    except ValueError as exc:
        raise BadRestURL(f"{base_url!r} is not a REST API URL ({exc})") from None
    return parsed


def _short(url: str, limit: int = 200) -> str:
    # Status and receipt URLs carry 128-char ids; keep error lines readable.
    return url if len(url) <= limit else url[: limit - 3] + "..."


class RestClient(HttpSession):
    def __init__(self, base_url: str, *, retries: int = 5, backoff: float = 0.1, max_backoff: float = 5.0,
                 timeout: float = 30, patience: float | None = None, first_contact: float | None = None,
                 outage: Outage | None = None):
        """retries: extra attempts after the first (429/503/connection errors only);
        backoff: first delay in seconds, doubled per retry up to max_backoff, with jitter;
        timeout: seconds per HTTP request (long-polls add their wait to it);
        patience: None (default) to stop after `retries`, quietly; else seconds a request keeps
        retrying those failures (math.inf: until they end), announcing an outage on stderr;
        first_contact: with patience, how long to try before anything has ever answered this
        client (default: patience); a host that does not resolve then fails at once, unless
        first_contact is math.inf (a node that waits for its network in any case);
        outage: the REST API's Outage announcer, to share one among clients of one address."""
        self.base_url = base_url.rstrip("/")
        parsed = _parse(self.base_url)
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.patience = patience
        self.first_contact = patience if first_contact is None else first_contact
        self.reached = False  # some HTTP answer came from base_url
        quiet = None if patience is not None else (lambda line: LOGGER.debug("%s", line))
        self.outage = outage or Outage("the REST API", self.base_url, write=quiet)
        # A 503 is the REST API saying that its validator does not answer.
        self.validator_outage = Outage("the validator behind the REST API", self.base_url, write=quiet)
        self._host = parsed.host
        # batch id -> (monotonic, wall clock of its first submission, signer), in submission order
        self._pending: dict[str, tuple[float, float, str]] = {}

    def _delay(self, attempt: int) -> float:
        # "Equal jitter": at least half the exponential step, so retries never bunch at zero.
        return backoff_delay(attempt, first=self.backoff, cap=self.max_backoff)

    def _gives_up(self, attempt: int, failing_for: float, permanent: bool) -> bool:
        if self.patience is None:
            return attempt > self.retries
        if not self.reached:
            # Never answered: an unresolvable host is a wrong address, unless told to wait anyway.
            return (permanent and self.first_contact != math.inf) or failing_for >= self.first_contact
        return failing_for >= self.patience

    async def _request(self, method: str, path: str, *, params: dict | None = None, body: bytes | None = None,
                       content_type: str | None = None, ok: Iterable[int] = (200,),
                       extra_timeout: float = 0) -> tuple[int, dict]:
        """One REST call with retries; returns (status, JSON body) for a status in ok."""
        session = self._http()
        url = self.base_url + path
        shown = _short(url + ("?" + urlencode(params) if params else ""))
        headers = {"Content-Type": content_type} if content_type else None
        timeout = aiohttp.ClientTimeout(total=self.timeout + extra_timeout)
        loop = asyncio.get_running_loop()
        attempt = 0
        first_failure: float | None = None
        while True:
            attempt += 1
            outage: Outage | None = None
            unresolvable = False
            try:
                async with session.request(method, url, params=params, data=body, headers=headers,
                                           timeout=timeout) as response:
                    status = response.status
                    raw = await response.read()
            except aiohttp.ClientConnectorDNSError as exc:
                # Not resolving is a wrong address until the host has answered once; then it is
                # an outage (a container's name disappears from Docker's DNS while it restarts).
                unresolvable = True
                error = RestError(method, shown, 0, None, "Unknown Host",
                                  f"host {self._host!r} does not resolve ({exc.os_error or exc})", attempt,
                                  self.reached)
                outage = self.outage
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                error = RestError(method, shown, 0, None, "No Response", str(exc) or type(exc).__name__, attempt,
                                  self.reached)
                outage = self.outage
            else:
                self.reached = True
                self.outage.up()
                if status != 503:
                    self.validator_outage.up()
                if status in ok:
                    try:
                        return status, json.loads(raw) if raw else {}
                    except ValueError:
                        raise RestError(method, shown, status, None, "Bad Response",
                                        f"body is not JSON: {raw[:80]!r}", attempt) from None
                error = self._error(method, shown, status, raw, attempt)
                if status not in RETRY_STATUSES:
                    raise error
                if status == 503:
                    outage = self.validator_outage
            now = loop.time()
            if first_failure is None:
                first_failure = now
            if self._gives_up(attempt, now - first_failure, unresolvable):
                if not self.reached and self.patience is not None and not unresolvable:
                    error.message = (f"nothing answers at {self.base_url} ({error.message}; tried for "
                                     f"{now - first_failure:.0f} s)")
                    error.args = (str(error),)
                raise error
            if outage is not None:
                outage.down(str(error))
            delay = self._delay(attempt - 1)
            if self.patience is not None:
                # The last try comes at the deadline, not up to a backoff step past it.
                limit = self.patience if self.reached else self.first_contact
                delay = min(delay, max(0.0, limit - (now - first_failure)))
            LOGGER.debug("%s; retrying in %.2fs", error, delay)
            await asyncio.sleep(delay)

    @staticmethod
    def _error(method: str, url: str, status: int, raw: bytes, attempts: int) -> RestError:
        try:
            err = json.loads(raw)["error"]
            return RestError(method, url, status, err.get("code"), err.get("title", ""), err.get("message", ""),
                             attempts)
        except (ValueError, KeyError, TypeError, AttributeError):
            text = raw.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
            return RestError(method, url, status, None, "", text or "(empty body)", attempts)

    async def _get_json(self, path: str, params: dict | None = None) -> dict:
        return (await self._request("GET", path, params=params))[1]

    async def _data_or_none(self, path: str, not_found_code: int, params: dict | None = None):
        """The `data` of a GET, or None when it answers 404 with not_found_code."""
        try:
            return (await self._get_json(path, params))["data"]
        except RestError as exc:
            if exc.status == 404 and exc.code == not_found_code:
                return None
            raise

    async def _pages(self, path: str, params: dict) -> AsyncIterator[dict]:
        """Items of a paged list; every page after the first is read at the first page's head."""
        params = {k: v for k, v in params.items() if v is not None}
        while True:
            page = await self._get_json(path, params)
            for item in page.get("data", []):
                yield item
            next_position = page.get("paging", {}).get("next_position")
            if not next_position:
                return
            params = {**params, "head": page["head"], "start": next_position}

    @staticmethod
    def _list_params(head, ids, page_size, reverse) -> dict:
        return {"head": head, "id": ",".join(ids) if ids else None, "limit": page_size,
                "reverse": "" if reverse else None}

    # -- batches this client waits for ------------------------------------------------------------

    def pending_batches(self, signer: str | None = None) -> list[tuple[str, float]]:
        """[(batch_id, seconds since its first submission)], oldest first: the batches this
        client submitted that no status read has seen COMMITTED or INVALID yet and whose
        waiter has not given up. signer: only the batches that public key signed (nodes
        that share one client, as an iot-host's do)."""
        now = time.monotonic()
        return [(batch_id, now - since) for batch_id, (since, _, by) in self._pending.items()
                if signer is None or by == signer]

    def pending_summary(self, limit: int = 20, signer: str | None = None) -> dict:
        """pending_batches() as a small JSON-able map for a heartbeat:
        {"count": n, "batches": [[batch_id, unix time of first submission], ...]} (the
        `limit` oldest). Wall-clock times, so a reader ages them by its own clock at read time."""
        mine = [(batch_id, wall) for batch_id, (_, wall, by) in self._pending.items()
                if signer is None or by == signer]
        return {"count": len(mine), "batches": [[batch_id, round(wall, 3)] for batch_id, wall in mine[:max(0, limit)]]}

    def _track(self, batches: Iterable["pb.Batch"]) -> None:
        now, wall = time.monotonic(), time.time()
        for batch in batches:
            if batch.header_signature not in self._pending:  # a resubmission keeps the first time
                signer = pb.BatchHeader.FromString(batch.header).signer_public_key
                self._pending[batch.header_signature] = (now, wall, signer)
        while len(self._pending) > MAX_TRACKED:
            del self._pending[next(iter(self._pending))]

    def _settle(self, statuses: Iterable[dict]) -> None:
        for status in statuses:
            if status.get("status") in FINAL_BATCH_STATUSES:
                self._pending.pop(status.get("id"), None)

    def _give_up(self, ids: Iterable[str]) -> None:
        for batch_id in ids:
            self._pending.pop(batch_id, None)

    # -- batches -------------------------------------------------------------------------------

    async def submit_batches(self, batches: Sequence["pb.Batch"]) -> list[str]:
        """POST /batches; returns the batch ids. Raises RestError (400 INVALID, 429 after retries...)."""
        if not batches:
            raise ValueError("submit_batches needs at least one batch")
        body = pb.BatchList(batches=list(batches)).SerializeToString()
        await self._request("POST", "/batches", body=body, content_type="application/octet-stream", ok=(202,))
        self._track(batches)  # accepted (202): the validator has it, or drops it as a duplicate
        return [b.header_signature for b in batches]

    async def batch_statuses(self, ids: Sequence[str], wait: float | None = None) -> list[dict]:
        """[{"id", "status": COMMITTED|INVALID|PENDING|UNKNOWN, "invalid_transactions": [...]}, ...].

        wait: let the validator hold the answer up to this many seconds (whole seconds, at least
        1) until none is PENDING. UNKNOWN does not hold it: the validator has not seen that batch.
        """
        params = None
        if wait is not None:
            # Sawtooth takes whole seconds (floor: never past the caller's deadline), and 0
            # would mean its 300 s default.
            params = {"wait": str(max(1, int(wait)))}
        body = json.dumps(list(ids)).encode()
        # POST: any number of ids, none of the URL length limits a GET ?id=... list runs into.
        _, page = await self._request("POST", "/batch_statuses", params=params, body=body,
                                      content_type="application/json", extra_timeout=wait or 0)
        self._settle(page["data"])
        return page["data"]

    async def wait_for_batches(self, ids: Sequence[str], timeout: float, *, raise_invalid: bool = True) -> list[dict]:
        """Wait until every batch is COMMITTED or INVALID; return their statuses.

        UNKNOWN is waited on like PENDING (right after a submission the validator may not have
        queued the batch yet). Raises BatchTimeoutError when some are not final after timeout
        seconds, and BatchInvalidError (naming each rejected transaction and the processor's
        message) when some are INVALID, unless raise_invalid=False. A batch still not final when
        this raises is no longer counted as pending by this client (its waiter gave up).
        """
        with self._given_up_unless_final(ids):
            return await self._wait_for_batches(ids, timeout, raise_invalid=raise_invalid)

    @contextlib.contextmanager
    def _given_up_unless_final(self, ids: Sequence[str]):
        try:
            yield
        except BaseException:  # timeout, error, cancelled: nobody waits for these any more
            self._give_up(ids)
            raise

    async def _wait_for_batches(self, ids: Sequence[str], timeout: float, *, raise_invalid: bool) -> list[dict]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.05
        while True:
            remaining = deadline - loop.time()
            wait = min(remaining, _MAX_SERVER_WAIT) if remaining >= 1 else None
            statuses = await self.batch_statuses(ids, wait=wait)
            if all(s.get("status") in FINAL_BATCH_STATUSES for s in statuses):
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise BatchTimeoutError(statuses, timeout)
            # The validator answers at once while a batch is UNKNOWN, so don't spin.
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, 1.0)
        if raise_invalid and any(s.get("status") == "INVALID" for s in statuses):
            raise BatchInvalidError(statuses)
        return statuses

    async def submit_until_final(self, batches: Sequence, timeout: float, *, resubmit_after: float = 10.0,
                                 sent: bool = False) -> list[dict]:
        """Submit `batches` (unless `sent` already) and wait until each is COMMITTED or INVALID
        (statuses, INVALID not raised). A batch the validator still does not know
        `resubmit_after` seconds on is submitted again: a validator that restarted has forgotten
        the batches it had not committed. Safe: a batch id the validator already has is dropped.
        BatchTimeoutError after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if sent:
            ids = [b.header_signature for b in batches]
            self._track(batches)
        else:
            ids = await self.submit_batches(batches)
        with self._given_up_unless_final(ids):
            return await self._until_final(batches, ids, deadline, timeout, resubmit_after)

    async def _until_final(self, batches: Sequence, ids: list[str], deadline: float, timeout: float,
                           resubmit_after: float) -> list[dict]:
        loop = asyncio.get_running_loop()
        while True:
            try:
                return await self._wait_for_batches(ids, max(0.1, min(resubmit_after, deadline - loop.time())),
                                                    raise_invalid=False)
            except BatchTimeoutError as exc:
                if loop.time() >= deadline:
                    raise BatchTimeoutError(exc.statuses, timeout) from None
                lost = [b for b, s in zip(batches, exc.statuses) if s.get("status") == "UNKNOWN"]
                if lost:
                    LOGGER.info("the validator does not know %d batch(es) it was sent (restarted?); sending again",
                                len(lost))
                    await self.submit_batches(lost)

    def list_batches(self, *, head: str | None = None, ids: Sequence[str] | None = None,
                     page_size: int | None = None, reverse: bool = False) -> AsyncIterator[dict]:
        return self._pages("/batches", self._list_params(head, ids, page_size, reverse))

    async def get_batch(self, batch_id: str) -> dict | None:
        return await self._data_or_none(f"/batches/{batch_id}", BATCH_NOT_FOUND)

    # -- state ---------------------------------------------------------------------------------

    async def get_state(self, address: str, head: str | None = None) -> bytes | None:
        """The value at a full 70-char address, or None when nothing is stored there."""
        params = {"head": head} if head else None
        data = await self._data_or_none(f"/state/{address}", STATE_NOT_FOUND, params)
        return None if data is None else base64.b64decode(data)

    async def list_state(self, prefix: str = "", head: str | None = None, *, page_size: int | None = None,
                         reverse: bool = False) -> AsyncIterator[tuple[str, bytes]]:
        """(address, value) under prefix, in address order, all read at one head."""
        params = {"address": prefix or None, "head": head, "limit": page_size, "reverse": "" if reverse else None}
        async for entry in self._pages("/state", params):
            yield entry["address"], base64.b64decode(entry["data"])

    # -- blocks, transactions, receipts, node --------------------------------------------------

    def list_blocks(self, *, head: str | None = None, ids: Sequence[str] | None = None,
                    page_size: int | None = None, reverse: bool = False) -> AsyncIterator[dict]:
        """Blocks with JSON headers, newest first (oldest first with reverse=True)."""
        return self._pages("/blocks", self._list_params(head, ids, page_size, reverse))

    async def get_block(self, block_id: str) -> dict | None:
        return await self._data_or_none(f"/blocks/{block_id}", BLOCK_NOT_FOUND)

    async def head(self) -> dict:
        """The chain head block."""
        page = await self._get_json("/blocks", {"limit": 1})
        return page["data"][0]

    def list_transactions(self, *, head: str | None = None, ids: Sequence[str] | None = None,
                          page_size: int | None = None, reverse: bool = False) -> AsyncIterator[dict]:
        return self._pages("/transactions", self._list_params(head, ids, page_size, reverse))

    async def get_transaction(self, transaction_id: str) -> dict | None:
        return await self._data_or_none(f"/transactions/{transaction_id}", TRANSACTION_NOT_FOUND)

    async def get_receipts(self, transaction_ids: Sequence[str]) -> list[dict]:
        """Receipts in the order asked; RestError 404 [code 80] if any one is missing."""
        body = json.dumps(list(transaction_ids)).encode()
        _, page = await self._request("POST", "/receipts", body=body, content_type="application/json")
        return page["data"]

    async def get_status(self) -> dict:
        """{"endpoint": ..., "peers": [{"endpoint": ...}, ...]}"""
        return (await self._get_json("/status"))["data"]

    async def get_peers(self) -> list[str]:
        return (await self._get_json("/peers"))["data"]


__all__ = ["RestClient", "RestError", "BadRestURL", "BatchInvalidError", "BatchTimeoutError"]
