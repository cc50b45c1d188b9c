"""`trustmesh dashboard [--bind 127.0.0.1:8080] [--token-file FILE]`: the web dashboard.

Pages: workflows (/), a workflow (/workflows/ID), a round (/workflows/ID/rounds/N, its audit
with ?audit=1), nodes and the chain (/nodes). The same data as JSON under /api/:

    /api/health                          the dashboard answers (and whether the chain does)
    /api/chain                           head, block rate, pending batches (total and per node)
    /api/workflows                       every workflow: state, rounds done / total, strategy, ...
    /api/workflows/ID                    one workflow and its rounds
    /api/workflows/ID/rounds/N           one round: record, result, tasks
    /api/workflows/ID/audit[?round=N]    trustmesh/audit.py's audit, run on demand, cached by head
    /api/nodes                           compute and IoT nodes: liveness, resources, load, reputation,
                                         pending batches (pending.py: heartbeats + /batch_statuses)
    /api/events                          server-sent events, one `block` event per committed block

Access: on a loopback address no token is asked. On any other address the dashboard refuses to
start without --token-file; then every route but /login and /static/ asks for one of the file's
tokens, as `Authorization: Bearer TOKEN` (scripts) or the cookie /login sets (browsers). The
file is created 0600 with one fresh token if it does not exist, and refused if others may read
it. Everything is read-only: no route changes anything on the chain or in the stores.

Live updates: the dashboard follows the validator's block events from genesis (which also tells
it in which block each round and task event happened) and sends each block to the pages, which
re-read their part when a block concerns them. Outages of the REST API, the validator and Redis
are waited out; each is said once on stderr, and the pages say what does not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import hmac
import ipaddress
import json
import logging
import pathlib
import re
import secrets
import signal
import stat
import sys
import time
from typing import Any, Awaitable, Callable

from aiohttp import web

from trustmesh import endpoints as network
from trustmesh.outage import Outage
from trustmesh.whole_files import write_whole

from . import pages, views
from .pending import PendingBatches

LOGGER = logging.getLogger(__name__)

STATIC = pathlib.Path(__file__).with_name("static")
COOKIE = "trustmesh_dashboard"
SNAPSHOT_TTL = 2.0          # seconds a snapshot serves when no block event says it is stale
HEARTBEAT_TTL = 1.0         # seconds between Redis reads of the heartbeats
AUDIT_TIMEOUT = 300.0       # an audit that takes longer is reported as failed
SSE_KEEPALIVE = 15.0        # seconds between comments on an idle event stream
MIN_TOKEN_CHARS = 16
DEFAULT_BIND = "127.0.0.1:8080"
_VALIDATOR_URL = re.compile(r"\Atcp://[^\s/:]+(?::\d+)?\Z|\Atcp://\[[0-9a-fA-F:]+\](?::\d+)?\Z")

ROUND_EVENTS = {
    "trustmesh/round-opened": "opened", "trustmesh/round-ready": "ready", "trustmesh/round-timeout": "timeout",
    "trustmesh/round-scheduled": "scheduled", "trustmesh/round-result": "result",
    "trustmesh/round-finalized": "finalized",
}
TASK_EVENTS = {
    "trustmesh/task-assigned": "assigned", "trustmesh/task-running": "running", "trustmesh/task-done": "done",
    "trustmesh/task-failed": "failed", "trustmesh/task-reassigned": "reassigned",
}
OTHER_EVENTS = ("trustmesh/workflow-deployed", "trustmesh/workflow-updated", "trustmesh/submission-accepted",
                "trustmesh/peer-registered", "trustmesh/peer-updated")


class DashboardError(Exception):
    """The dashboard cannot start as asked; the message says why and what to do."""


# ------------------------------------------------------------------------------ access


def parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise DashboardError(f"--bind expects HOST:PORT (e.g. {DEFAULT_BIND}), got {text!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve to anything: treated as exposed


def load_tokens(path: pathlib.Path, *, create: bool = True, say: Callable[[str], None] = print) -> list[str]:
    """The bearer tokens in `path`, one a line (# comments). A missing file is created 0600
    with one fresh token; a file others may read, or one without a usable token, is refused."""
    if not path.exists() and create:
        token = secrets.token_urlsafe(32)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            created = write_whole(path, "# trustmesh dashboard: read-only bearer tokens, one a line\n" + token + "\n",
                                  mode=0o600, exclusive=True)
        except OSError as exc:
            raise DashboardError(f"cannot create the token file {path}: {exc.strerror or exc}") from None
        if created:  # else another dashboard of this home made it meanwhile: its token is the one
            say(f"created {path} (mode 0600) with a new read-only token; readers send it as "
                f"`Authorization: Bearer <token>` or enter it at /login")
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise DashboardError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise DashboardError(f"the token file {path} is not a regular file")
    if mode & 0o077:
        raise DashboardError(f"the token file {path} may be read by others (mode {stat.S_IMODE(mode):04o}); "
                             f"`chmod 600 {path}` and start again")
    tokens = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    short = [t for t in tokens if len(t) < MIN_TOKEN_CHARS or any(c.isspace() for c in t)]
    if short:
        raise DashboardError(f"the token file {path} holds a token shorter than {MIN_TOKEN_CHARS} characters "
                             f"or with spaces; use long random tokens (e.g. `python3 -c 'import secrets; "
                             f"print(secrets.token_urlsafe(32))'`)")
    if not tokens:
        raise DashboardError(f"the token file {path} holds no token; add one a line, or delete the file to have "
                             f"one created")
    return tokens


class Access:
    def __init__(self, tokens: list[str] | None):
        self.tokens = [t.encode() for t in tokens or []]

    @property
    def required(self) -> bool:
        return bool(self.tokens)

    def valid(self, token: str | None) -> bool:
        if not token:
            return False
        given = token.encode()
        return any(hmac.compare_digest(given, t) for t in self.tokens)

    def granted(self, request: web.Request) -> bool:
        if not self.required:
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and self.valid(value.strip()):
            return True
        return self.valid(request.cookies.get(COOKIE))


# ------------------------------------------------------------------------------ live events


class Hub:
    """Fans each block out to every open event stream."""

    def __init__(self):
        self.queues: set[asyncio.Queue] = set()

    def publish(self, message: dict) -> None:
        for queue in list(self.queues):
            if queue.full():  # a slow reader: it re-reads its page anyway, drop the oldest
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
            queue.put_nowait(message)

    def close(self) -> None:
        for queue in list(self.queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


class Follower:
    """Follows the validator's block events from genesis: in which block each round and task
    event happened, which workflows each block touched, and the live block rate."""

    def __init__(self, validator_url: str, on_block: Callable[[dict], None]):
        self.validator_url = validator_url
        self.on_block = on_block
        self.round_blocks: dict[str, dict[str, int]] = {}
        self.task_blocks: dict[str, dict[str, dict[str, int]]] = {}  # schedule_id -> task_id -> event -> block
        self.workflow_of: dict[str, str] = {}
        self.last_block: int | None = None
        self.caught_up = False
        self.live_times: collections.deque = collections.deque(maxlen=10_000)
        self.connected = False
        self.error: str | None = None

    def subscriptions(self) -> list:
        from trustmesh.ledger.events import event_subscription

        return [event_subscription(e) for e in (*ROUND_EVENTS, *TASK_EVENTS, *OTHER_EVENTS)]

    def observed(self) -> dict:
        now = time.monotonic()
        recent = [t for t in self.live_times if t > now - views.RATE_WINDOW]
        return {"blocks_last_minute": len(recent) if self.caught_up else None, "following": self.connected,
                "last_block": self.last_block, "error": self.error}

    def apply(self, block) -> dict:
        touched: set[str] = set()
        for event in block.events:
            attrs = {a.key: a.value for a in event.attributes}
            sid = attrs.get("schedule_id")
            if attrs.get("workflow_id") and sid:
                self.workflow_of[sid] = attrs["workflow_id"]
            if attrs.get("workflow_id"):
                touched.add(attrs["workflow_id"])
            elif sid:
                touched.add(self.workflow_of.get(sid, "*"))
            if event.event_type in ROUND_EVENTS and sid:
                self.round_blocks.setdefault(sid, {})[ROUND_EVENTS[event.event_type]] = block.block_num
            elif event.event_type in TASK_EVENTS and sid and attrs.get("task_id"):
                tasks = self.task_blocks.setdefault(sid, {})
                tasks.setdefault(attrs["task_id"], {})[TASK_EVENTS[event.event_type]] = block.block_num
            elif event.event_type.startswith("trustmesh/peer-"):
                touched.add("nodes")
        self.last_block = block.block_num
        if self.caught_up:
            self.live_times.append(time.monotonic())
        return {"block": block.block_num, "id": block.block_id, "workflows": sorted(touched),
                "caught_up": self.caught_up}

    def blocks_for(self, schedule_id: str) -> dict:
        found: dict[Any, Any] = {schedule_id: self.round_blocks.get(schedule_id, {})}
        for task_id, value in self.task_blocks.get(schedule_id, {}).items():
            found[(schedule_id, task_id)] = value
        return found

    async def run(self, head_block: Callable[[], Awaitable[int | None]]) -> None:
        from trustmesh.ledger.events import (NULL_BLOCK_ID, EventSubscriber, EventSubscriptionError,
                                             UnknownBlockError)

        known = [NULL_BLOCK_ID]  # replay from genesis: the blocks of every round event
        while True:
            subscriber = EventSubscriber(self.validator_url, self.subscriptions(), last_known_block_ids=known)
            try:
                await subscriber.start()
                self.connected, self.error = True, None
                target = await head_block()
                if target is None or (self.last_block is not None and self.last_block >= target):
                    self.caught_up = True
                while True:
                    block = await subscriber.next_block()
                    message = self.apply(block)
                    if not self.caught_up and (target is None or block.block_num >= target):
                        self.caught_up = True
                        message["caught_up"] = True
                    self.on_block(message)
            except UnknownBlockError:
                # Another chain behind the same address: start over from its genesis.
                LOGGER.warning("the validator at %s has another chain; following it from genesis", self.validator_url)
                self.round_blocks.clear(), self.task_blocks.clear(), self.workflow_of.clear()
                self.caught_up, self.last_block, known = False, None, [NULL_BLOCK_ID]
            except EventSubscriptionError as exc:
                self.connected, self.error = False, str(exc)
                LOGGER.warning("following the validator at %s failed: %s; trying again", self.validator_url, exc)
                known = [subscriber.last_block_id] if subscriber.last_block_id else known
                await asyncio.sleep(5)
            finally:
                self.connected = False
                await subscriber.close()
            if subscriber.last_block_id:
                known = [subscriber.last_block_id]


# ------------------------------------------------------------------------------ the data


class Dashboard:
    """Reads the chain, Redis and network.json for the pages, with small caches."""

    def __init__(self, where: network.Endpoints, *, home: pathlib.Path | None, hub: Hub | None = None):
        from trustmesh.ledger.rest_client import RestClient

        self.where = where
        self.home = home
        self.hub = hub or Hub()
        self.rest_outage = Outage("the REST API", where.rest)
        self.redis_outage = Outage("Redis", _redacted(where.redis))
        self.rest = RestClient(where.rest, retries=1, timeout=15)  # pages answer, not wait
        self.pending = PendingBatches(self.rest)
        self.follower = Follower(where.validator, self._on_block)
        self.generation = 0
        self._snapshot: tuple[int, float, views.Snapshot] | None = None
        self._snapshot_lock = asyncio.Lock()
        self._beats: tuple[float, dict | None, str | None] | None = None
        self._redis = None
        self.audits: dict[str, dict] = {}                    # workflow_id -> latest audit
        self._audit_runs: dict[tuple[str, str], asyncio.Future] = {}
        self.rest_error: str | None = None
        self.known_names: dict[str, str] = {}

    def _on_block(self, message: dict) -> None:
        self.generation += 1
        self.hub.publish(message)

    async def close(self) -> None:
        await self.rest.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()

    # -- chain ----------------------------------------------------------------------------------

    async def snapshot(self) -> views.Snapshot:
        """The records at the chain head: re-read after each block (or every SNAPSHOT_TTL s)."""
        async with self._snapshot_lock:
            cached = self._snapshot
            if cached and cached[0] == self.generation and time.monotonic() - cached[1] < SNAPSHOT_TTL:
                return cached[2]
            generation = self.generation
            snap = await self._chain(views.read_snapshot(self.rest))
            self._snapshot = (generation, time.monotonic(), snap)
            return snap

    async def _chain(self, awaitable):
        from trustmesh.ledger.rest_client import RestError

        try:
            value = await awaitable
        except RestError as exc:
            if exc.status in (0, 429, 502, 503, 504):
                self.rest_error = str(exc)
                self.rest_outage.down(str(exc))
                raise Unavailable(f"the REST API at {self.where.rest} does not answer ({exc.message}); "
                                  f"the dashboard waits for it") from None
            raise
        self.rest_error = None
        self.rest_outage.up()
        return value

    async def head_block(self) -> int | None:
        try:
            return (await self.snapshot()).block_num
        except Unavailable:
            return None

    # -- off chain ------------------------------------------------------------------------------

    async def heartbeats(self) -> tuple[dict | None, str | None]:
        """(node -> heartbeat info, None) or (None, why Redis could not be read)."""
        if self._beats and time.monotonic() - self._beats[0] < HEARTBEAT_TTL:
            return self._beats[1], self._beats[2]
        from redis.exceptions import RedisError

        from trustmesh.stores.heartbeats import Heartbeats
        from trustmesh.stores.redis_client import client

        try:
            if self._redis is None:
                self._redis = client(self.where.redis, socket_timeout=2, socket_connect_timeout=2)
            beats, error = await Heartbeats(self._redis).live(), None
            self.redis_outage.up()
        except (RedisError, OSError, ValueError) as exc:
            beats, error = None, f"Redis at {_redacted(self.where.redis)} does not answer ({exc})"
            self.redis_outage.down(str(exc))
        self._beats = (time.monotonic(), beats, error)
        return beats, error

    def network(self) -> dict | None:
        if self.home is None:
            return None
        try:
            return network.local_network(self.home)
        except (OSError, ValueError):
            return None

    async def names(self, snap: views.Snapshot) -> tuple[dict[str, str], dict | None, str | None]:
        """Node names from every source, remembered: a node that stopped keeps its name here."""
        beats, error = await self.heartbeats()
        self.known_names.update(views.node_names(snap, beats, self.network()))
        return dict(self.known_names), beats, error

    # -- views ----------------------------------------------------------------------------------

    async def pending_batches(self, snap: views.Snapshot) -> dict:
        """The live nodes' pending batches (their heartbeats), confirmed with the REST API."""
        names, beats, error = await self.names(snap)
        return await self.pending.view(beats, names, error)

    async def chain(self) -> dict:
        snap = await self.snapshot()
        return views.chain(snap, endpoints={"rest": self.where.rest, "validator": self.where.validator},
                           observed=self.follower.observed(), pending=await self.pending_batches(snap))

    async def workflows(self) -> dict:
        snap = await self.snapshot()
        names, _, _ = await self.names(snap)
        return {"workflows": views.workflows(snap, names), "block": snap.block_num}

    async def workflow(self, workflow_id: str) -> dict:
        snap = await self.snapshot()
        names, _, _ = await self.names(snap)
        return views.workflow_detail(snap, workflow_id, names)

    async def round(self, workflow_id: str, number: int) -> dict:
        snap = await self.snapshot()
        names, _, _ = await self.names(snap)
        record = snap.rounds_of(workflow_id).get(number)
        blocks = self.follower.blocks_for(record["schedule_id"]) if record else {}
        return await self._chain(views.round_detail(self.rest, snap, workflow_id, number, names, blocks))

    async def nodes(self) -> dict:
        snap = await self.snapshot()
        names, beats, error = await self.names(snap)
        found = views.nodes(snap, beats, self.network(), names, heartbeat_error=error)
        pending = await self.pending.view(beats, names, error)
        per_node = {row["key"]: row for row in pending["nodes"]}
        for row in found["compute"] + found["iot"]:
            mine = per_node.get(row["key"])
            row["pending"] = {"count": mine["count"] if mine else 0,
                              "oldest_seconds": mine["oldest_seconds"] if mine else None}
        return {**found, "pending_batches": pending}

    # -- audits ---------------------------------------------------------------------------------

    async def audit(self, workflow_id: str, *, run: bool) -> dict | None:
        """The audit of a workflow at the current head: run now (run=True) unless one at this
        head is cached; with run=False only what is cached (possibly at an older head)."""
        snap = await self.snapshot()
        if workflow_id not in snap.workflows:
            raise views.ViewError(f"workflow {workflow_id!r} is not on chain at block {snap.block_num}")
        cached = self.audits.get(workflow_id)
        if (cached and cached["head"] == snap.head_id) or not run:
            return cached
        key = (workflow_id, snap.head_id)
        future = self._audit_runs.get(key)
        if future is None:
            future = asyncio.ensure_future(self._run_audit(workflow_id, snap))
            self._audit_runs[key] = future
            future.add_done_callback(lambda _: self._audit_runs.pop(key, None))
        return await asyncio.shield(future)

    async def _run_audit(self, workflow_id: str, snap: views.Snapshot) -> dict:
        started = time.monotonic()
        report, error = await asyncio.to_thread(_audit_in_thread, workflow_id, self.where)
        outcome = {"workflow_id": workflow_id, "head": snap.head_id, "block": snap.block_num,
                   "seconds": round(time.monotonic() - started, 2), "ran_at": time.time(),
                   "report": report, "error": error}
        if report is not None or workflow_id not in self.audits:
            self.audits[workflow_id] = outcome
        return outcome


class Unavailable(Exception):
    """A dependency (the REST API) does not answer now; the message says which."""


def _audit_in_thread(workflow_id: str, where: network.Endpoints) -> tuple[dict | None, str | None]:
    """trustmesh/audit.py's audit, in its own event loop: its CPU work (recomputing the
    aggregation with torch) must not stall the pages and the event streams."""
    from trustmesh import audit

    async def bounded():
        return await asyncio.wait_for(audit.audit_workflow(workflow_id, where), AUDIT_TIMEOUT)

    try:
        return asyncio.run(bounded()).to_json(), None
    except audit.AuditError as exc:
        return None, str(exc)
    except asyncio.TimeoutError:
        return None, f"the audit did not finish within {AUDIT_TIMEOUT:g} s"
    except Exception as exc:  # noqa: BLE001 - a bug in the audit must not take the dashboard down
        LOGGER.warning("the audit of %s failed: %r", workflow_id, exc, exc_info=LOGGER.isEnabledFor(logging.DEBUG))
        return None, f"the audit failed: {type(exc).__name__}: {exc}"


def _redacted(url: str | None) -> str:
    from yarl import URL

    if not url:
        return ""
    try:
        parsed = URL(url)
    except ValueError:
        return url
    return str(parsed.with_password("***")) if parsed.password else url


# ------------------------------------------------------------------------------ the web app


DATA = web.AppKey("dashboard", Dashboard)
ACCESS = web.AppKey("access", Access)

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _public(request: web.Request) -> bool:
    return request.path in ("/login", "/favicon.ico") or request.path.startswith("/static/")


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(value, indent=1, sort_keys=True, default=str), status=status,
                        content_type="application/json")


def _failure(request: web.Request, status: int, message: str) -> web.Response:
    if _is_api(request):
        return _json({"error": message}, status)
    return web.Response(text=pages.error_page(status, message), status=status, content_type="text/html")


@web.middleware
async def _guard(request: web.Request, handler):
    access = request.app[ACCESS]
    if not _public(request) and not access.granted(request):
        if _is_api(request):
            response = _json({"error": "a bearer token is required (Authorization: Bearer TOKEN); the "
                                       "dashboard's --token-file holds them"}, 401)
            response.headers["WWW-Authenticate"] = 'Bearer realm="trustmesh"'
        else:
            response = _redirect(f"/login?next={_quote(request.path_qs)}")
        _secure(response)
        return response
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            response = web.Response(status=exc.status, headers=exc.headers)
        else:
            response = _failure(request, exc.status, exc.reason)
    except views.ViewError as exc:
        response = _failure(request, exc.status, str(exc))
    except Unavailable as exc:
        response = _failure(request, 503, str(exc))
    except (ConnectionError, OSError) as exc:
        response = _failure(request, 503, f"a store or the chain does not answer: {exc}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug: say so in one line, the trace goes to -vv logs
        LOGGER.warning("%s %s failed: %r", request.method, request.path, exc,
                       exc_info=LOGGER.isEnabledFor(logging.DEBUG))
        response = _failure(request, 500, f"unexpected {type(exc).__name__}: {exc} (a bug; the dashboard's log "
                                          f"with -vv shows where)")
    if not response.prepared:
        _secure(response)
    return response


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _secure(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def _safe_next(value: str | None) -> str:
    # only a path on this server (no //host, no scheme): no open redirect
    return value if value and value.startswith("/") and not value.startswith("//") else "/"


def _round_number(request: web.Request) -> int:
    text = request.match_info["number"]
    if not text.isdigit() or not 0 < int(text) < 2**53:
        raise views.ViewError(f"a round is a whole number from 1, got {text!r}", 400)
    return int(text)


def _html(request: web.Request, render: Callable[[bool], str]) -> web.Response:
    partial = request.query.get("partial") == "1"
    return web.Response(text=render(partial), content_type="text/html")


async def _chain_page(request: web.Request, shown, render: Callable[..., str]) -> web.Response:
    """render(shown, chain, partial=...): a page of what a handler read, with the chain's state."""
    chain = await request.app[DATA].chain()
    return _html(request, lambda partial: render(shown, chain, partial=partial))


async def _page_workflows(request: web.Request) -> web.Response:
    return await _chain_page(request, await request.app[DATA].workflows(), pages.workflows_page)


async def _page_workflow(request: web.Request) -> web.Response:
    detail = await request.app[DATA].workflow(request.match_info["workflow_id"])
    return await _chain_page(request, detail, pages.workflow_page)


async def _page_round(request: web.Request) -> web.Response:
    data = request.app[DATA]
    workflow_id, number = request.match_info["workflow_id"], _round_number(request)
    detail, chain = await data.round(workflow_id, number), await data.chain()
    wanted = request.query.get("audit") == "1"
    audit = await data.audit(workflow_id, run=wanted and request.query.get("live") != "1")
    return _html(request, lambda partial: pages.round_page(detail, chain, audit, audit_asked=wanted,
                                                           partial=partial))


async def _page_nodes(request: web.Request) -> web.Response:
    return await _chain_page(request, await request.app[DATA].nodes(), pages.nodes_page)


async def _page_login(request: web.Request) -> web.Response:
    access = request.app[ACCESS]
    target = _safe_next(request.query.get("next"))
    if request.method == "POST":
        form = await request.post()
        target = _safe_next(str(form.get("next", "/")))
        if access.valid(str(form.get("token", "")).strip()):
            response = _redirect(target)
            response.set_cookie(COOKIE, str(form["token"]).strip(), httponly=True, samesite="Strict", path="/",
                                secure=request.secure)
            return response
        return web.Response(text=pages.login_page(target, error="that token is not in the dashboard's token file"),
                            status=401, content_type="text/html")
    if not access.required:
        return _redirect(target)
    return web.Response(text=pages.login_page(target), content_type="text/html")


async def _api_health(request: web.Request) -> web.Response:
    data = request.app[DATA]
    return _json({"ok": True, "rest": data.where.rest, "rest_error": data.rest_error,
                  "following": data.follower.observed()})


async def _api_chain(request: web.Request) -> web.Response:
    return _json(await request.app[DATA].chain())


async def _api_workflows(request: web.Request) -> web.Response:
    return _json(await request.app[DATA].workflows())


async def _api_workflow(request: web.Request) -> web.Response:
    return _json(await request.app[DATA].workflow(request.match_info["workflow_id"]))


async def _api_round(request: web.Request) -> web.Response:
    return _json(await request.app[DATA].round(request.match_info["workflow_id"], _round_number(request)))


async def _api_audit(request: web.Request) -> web.Response:
    data = request.app[DATA]
    workflow_id = request.match_info["workflow_id"]
    outcome = await data.audit(workflow_id, run=request.query.get("cached") != "1")
    if outcome is None:
        return _json({"workflow_id": workflow_id, "report": None, "error": "no audit has run yet"}, 404)
    if "round" in request.query and outcome.get("report"):
        text = request.query["round"]
        if not text.isdigit():
            raise views.ViewError(f"round must be a whole number, got {text!r}", 400)
        rounds = [r for r in outcome["report"]["rounds"] if r["number"] == int(text)]
        if not rounds:
            raise views.ViewError(f"the audit of {workflow_id!r} has no round {text}")
        outcome = {**outcome, "round": rounds[0]}
    return _json(outcome, 200 if outcome.get("report") else 503)


async def _api_nodes(request: web.Request) -> web.Response:
    return _json(await request.app[DATA].nodes())


async def _api_events(request: web.Request) -> web.StreamResponse:
    data = request.app[DATA]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    _secure(response)
    await response.prepare(request)
    queue: asyncio.Queue = asyncio.Queue(maxsize=64)
    data.hub.queues.add(queue)
    try:
        await response.write(b"retry: 2000\n\n")
        hello = {"block": data.follower.last_block, "following": data.follower.connected}
        await response.write(f"event: hello\ndata: {json.dumps(hello)}\n\n".encode())
        while True:
            try:
                message = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
            except asyncio.TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if message is None:
                break
            await response.write(f"event: block\ndata: {json.dumps(message)}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        data.hub.queues.discard(queue)
    return response


async def _favicon(request: web.Request) -> web.Response:
    return web.Response(status=204)


def make_app(dashboard: Dashboard, access: Access) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[DATA] = dashboard
    app[ACCESS] = access
    app.router.add_get("/", _page_workflows)
    app.router.add_get("/workflows/{workflow_id}", _page_workflow)
    app.router.add_get("/workflows/{workflow_id}/rounds/{number}", _page_round)
    app.router.add_get("/nodes", _page_nodes)
    app.router.add_route("*", "/login", _page_login)
    app.router.add_get("/favicon.ico", _favicon)
    app.router.add_get("/api/health", _api_health)
    app.router.add_get("/api/chain", _api_chain)
    app.router.add_get("/api/workflows", _api_workflows)
    app.router.add_get("/api/workflows/{workflow_id}", _api_workflow)
    app.router.add_get("/api/workflows/{workflow_id}/rounds/{number}", _api_round)
    app.router.add_get("/api/workflows/{workflow_id}/audit", _api_audit)
    app.router.add_get("/api/nodes", _api_nodes)
    app.router.add_get("/api/events", _api_events)
    app.router.add_static("/static/", STATIC, show_index=False, append_version=False)

    async def shutdown(app):
        dashboard.hub.close()

    app.on_shutdown.append(shutdown)
    return app


# ------------------------------------------------------------------------------ the command


def check_endpoints(where: network.Endpoints) -> None:
    from trustmesh.ledger.rest_client import BadRestURL, RestClient

    try:
        RestClient(where.rest)
    except BadRestURL as exc:
        raise DashboardError(f"{exc}; check --rest or TRUSTMESH_REST") from None
    if not _VALIDATOR_URL.match(where.validator or ""):
        raise DashboardError(f"the validator endpoint {where.validator!r} is not tcp://HOST:PORT; check --validator "
                             f"or TRUSTMESH_VALIDATOR")
    if not (where.redis or "").startswith(("redis://", "rediss://", "unix://")):
        raise DashboardError(f"the Redis URL {_redacted(where.redis)!r} is not redis://HOST:PORT[/DB]; check --redis "
                             f"or TRUSTMESH_REDIS")


async def serve(host: str, port: int, where: network.Endpoints, *, tokens: list[str] | None,
                home: pathlib.Path | None, ready: Callable[[str], None] | None = None,
                stop: asyncio.Event | None = None) -> None:
    dashboard = Dashboard(where, home=home)
    app = make_app(dashboard, Access(tokens))
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        await dashboard.close()
        why = {errno.EADDRINUSE: "the address is in use", errno.EADDRNOTAVAIL: "no interface has that address",
               errno.EACCES: "permission denied"}.get(exc.errno, exc.strerror or str(exc))
        raise DashboardError(f"cannot listen on {host}:{port}: {why}; choose another address with --bind") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    shown = f"[{host}]" if ":" in host else host
    follower = asyncio.ensure_future(dashboard.follower.run(dashboard.head_block))
    try:
        if ready is not None:
            ready(f"http://{shown}:{bound}/")
        await (stop or asyncio.Event()).wait()
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        dashboard.hub.close()
        await runner.cleanup()
        await dashboard.close()


def run_command(args: argparse.Namespace) -> int:
    try:
        host, port = parse_bind(args.bind)
        where = network.from_args(args)
        check_endpoints(where)
        tokens = None
        if args.token_file:
            tokens = load_tokens(pathlib.Path(args.token_file))
        elif not is_loopback(host):
            raise DashboardError(f"refusing to serve on {host}:{port} without --token-file: off loopback every "
                                 f"reader needs a token (the file is created 0600 with one if it does not exist)")
    except DashboardError as exc:
        print(f"trustmesh dashboard: {exc}", file=sys.stderr)
        return 2
    home = network.home_dir(args.home)

    def ready(url: str) -> None:
        access = "bearer token required" if tokens else "loopback, no token"
        print(f"dashboard ready at {url} ({access}; chain at {where.rest}, events from {where.validator})",
              flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(host, port, where, tokens=tokens, home=home, ready=ready, stop=stop)

    try:
        asyncio.run(main())
    except DashboardError as exc:
        print(f"trustmesh dashboard: {exc}", file=sys.stderr)
        return 2
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "dashboard", help="serve the web dashboard: workflows, rounds, nodes, the chain, live",
        description="A read-only web dashboard and JSON API (/api/). On loopback no token is asked; on any "
                    "other address --token-file is required.")
    parser.add_argument("--bind", default=DEFAULT_BIND, metavar="HOST:PORT",
                        help="address to listen on (default %(default)s; port 0 picks a free one)")
    parser.add_argument("--token-file", metavar="FILE",
                        help="read-only bearer tokens, one a line; created 0600 with a fresh token if missing; "
                             "required off loopback")
    network.add_endpoint_flags(parser, ("validator", "rest", "redis", "couch"))
    parser.set_defaults(func=run_command)
    return parser
