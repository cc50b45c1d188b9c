"""A small async CouchDB client (aiohttp) and the durable history of TrustMesh FL.

CouchClient speaks the CouchDB 3 HTTP API (also served by pouchdb-server, see stores.servers):
databases, documents with revisions, binary attachments. It always sends
`Accept: application/json` (pouchdb-server answers text/plain otherwise) and HTTP basic auth when
credentials are given (CouchDB 3 requires admin credentials: CouchClient.from_env() reads
COUCHDB_URL, COUCHDB_USER, COUCHDB_PASSWORD).

Concurrent writers: update(db, doc_id, merge) reads the document, lets `merge` build the new
version, and writes it with the revision it read; on 409 Conflict it reads again and merges again,
up to `attempts` times, then raises CouchConflict. No update is ever dropped silently. `merge`
must be idempotent (set fields, don't append blindly): after a lost response to a write that did
succeed, the retry merges into the already-updated document.

History (CouchHistory), one database (default "trustmesh"), documents:

    workflow:{workflow_id}
        {type: "workflow", workflow_id, version, owner, definition, definition_digest
         (sha256 of the canonical-CBOR definition, as on chain), final_model_digest, ...extra}
    round:{workflow_id}:{round:06d}
        {type: "round", workflow_id, round, schedule_id, status, participants: [node keys],
         submissions: {node: {digest, samples}}, aggregation_weights: {node: float},
         metrics: {name: value}, global_model_digest, global_model_bytes, ...extra}
        attachment "global_model": the round's global model (bytes)
    final:{workflow_id}
        {type: "final_model", workflow_id, round, schedule_id, model_digest, model_bytes, metrics}
        attachment "model": the final global model
    participation:{workflow_id}:{node}
        {type: "participation", workflow_id, node,
         rounds: {"<round>": {schedule_id, digest, samples, included, weight, ...}}}

Round numbers are zero-padded so `_all_docs` lists a workflow's rounds in order. Each model goes
in with its sha256 in the same revision (inline attachment), and every read verifies the bytes
against it, and against the digest the chain holds when the caller passes `expected_digest`.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import os
import random
from typing import Any, Callable, Mapping
from urllib.parse import quote

import aiohttp
from yarl import URL

from trustmesh.http_session import HttpSession

LOGGER = logging.getLogger(__name__)

DEFAULT_DB = "trustmesh"
MODEL_CONTENT_TYPE = "application/octet-stream"


class CouchError(Exception):
    """An answer that is not the one asked for; status 0 when no HTTP answer came."""

    def __init__(self, method: str, url: str, status: int, error: str = "", reason: str = ""):
        self.method, self.url, self.status, self.error, self.reason = method, url, status, error, reason
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.status == 0:
            return f"{self.method} {self.url}: no response: {self.reason}"
        return f"{self.method} {self.url}: HTTP {self.status} {self.error}: {self.reason}".rstrip(": ")


class CouchConflict(CouchError):
    """409: the document changed since it was read (or update() ran out of attempts)."""


class CouchNotFound(CouchError):
    """404 where something had to exist."""


class DigestMismatch(Exception):
    """Bytes read back do not hash to the digest they are stored under; they are never returned."""


def _json_default(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class CouchClient(HttpSession):
    """`async with CouchClient("http://127.0.0.1:5984", user=..., password=...) as couch:`"""

    def __init__(self, url: str, *, user: str | None = None, password: str | None = None,
                 timeout: float = 30, retries: int = 3, backoff: float = 0.05):
        """retries: extra attempts of reads and database creation after a connection error,
        429 or 503 (writes are retried by update() through its read-merge-write loop)."""
        self.url = url.rstrip("/")
        # A header, not aiohttp's deprecated BasicAuth; sent on every request.
        self._authorization = aiohttp.encode_basic_auth(user, password or "") if user else None
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.retries = retries
        self.backoff = backoff
        self.conflicts = 0  # 409s that update() absorbed, for tests and metrics

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs) -> "CouchClient":
        """COUCHDB_URL (default http://127.0.0.1:5984), COUCHDB_USER, COUCHDB_PASSWORD."""
        env = os.environ if environ is None else environ
        return cls(env.get("COUCHDB_URL", "http://127.0.0.1:5984"), user=env.get("COUCHDB_USER") or None,
                   password=env.get("COUCHDB_PASSWORD") or None, **kwargs)

    # -- HTTP --------------------------------------------------------------------------------------

    def _session_options(self) -> dict:
        return {"timeout": self.timeout}

    @staticmethod
    def _path(*parts: str) -> str:
        return "/" + "/".join(quote(str(p), safe="") for p in parts)

    async def _request(self, method: str, path: str, *, params: Mapping | None = None, body: Any = None,
                       data: bytes | None = None, content_type: str | None = None,
                       ok: tuple[int, ...] = (200, 201, 202), raw: bool = False,
                       retry: bool = False) -> tuple[int, Any]:
        """(status, parsed JSON body | bytes when raw) for a status in ok; CouchError otherwise."""
        session = self._http()
        url = URL(self.url + path, encoded=True)
        if params:
            url = url.with_query({k: v for k, v in params.items() if v is not None})
        headers = {"Accept": "application/json"}
        if self._authorization:
            headers["Authorization"] = self._authorization
        if body is not None:
            data = json.dumps(body, default=_json_default, allow_nan=False).encode()
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        attempt = 0
        while True:
            attempt += 1
            try:
                async with session.request(method, url, data=data, headers=headers) as response:
                    status = response.status
                    payload = await response.read()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                error = CouchError(method, str(url), 0, "", str(exc) or type(exc).__name__)
            else:
                if status in ok:
                    if raw:
                        return status, payload
                    try:
                        return status, json.loads(payload) if payload else {}
                    except ValueError:
                        raise CouchError(method, str(url), status, "bad_response",
                                         f"body is not JSON: {payload[:80]!r}") from None
                error = self._error(method, str(url), status, payload)
                if status not in (429, 503):
                    raise error
            if not retry or attempt > self.retries:
                raise error
            await asyncio.sleep(self.backoff * 2 ** (attempt - 1) * (1 + random.random()))

    @staticmethod
    def _error(method: str, url: str, status: int, payload: bytes) -> CouchError:
        try:
            body = json.loads(payload)
            error, reason = str(body.get("error", "")), str(body.get("reason", ""))
        except (ValueError, AttributeError):
            error, reason = "", payload.decode("utf-8", "replace")[:200]
        kind = CouchConflict if status == 409 else CouchNotFound if status == 404 else CouchError
        return kind(method, url, status, error, reason)

    # -- server and databases ----------------------------------------------------------------------

    async def server_info(self) -> dict:
        return (await self._request("GET", "/", retry=True))[1]

    async def ensure_db(self, db: str) -> bool:
        """Create the database if it does not exist; True if it was created now."""
        status, _ = await self._request("PUT", self._path(db), ok=(201, 202, 412), retry=True)
        return status != 412

    async def delete_db(self, db: str) -> bool:
        status, _ = await self._request("DELETE", self._path(db), ok=(200, 202, 404))
        return status != 404

    # -- documents -------------------------------------------------------------------------------

    async def get(self, db: str, doc_id: str, *, rev: str | None = None) -> dict | None:
        """The document (with _id, _rev and attachment stubs), or None if missing or deleted."""
        status, doc = await self._request("GET", self._path(db, doc_id), params={"rev": rev}, ok=(200, 404),
                                          retry=True)
        return doc if status == 200 else None

    async def put(self, db: str, doc: Mapping) -> str:
        """Write a document (`_id` required; `_rev` required when it exists). Returns the new
        revision; CouchConflict when `_rev` is not the current one."""
        if "_id" not in doc:
            raise ValueError("put() needs a document with an _id")
        _, reply = await self._request("PUT", self._path(db, doc["_id"]), body=dict(doc))
        return reply["rev"]

    async def delete(self, db: str, doc_id: str, rev: str) -> str:
        _, reply = await self._request("DELETE", self._path(db, doc_id), params={"rev": rev})
        return reply["rev"]

    async def update(self, db: str, doc_id: str, merge: Callable[[dict | None], dict | None], *,
                     attempts: int = 20) -> dict | None:
        """Read-merge-write with conflict retries; returns the document as written (with its new
        _rev), or the current one when merge returned None (nothing to change).

        merge(current) gets a private copy of the current document (None if there is none) and
        returns the whole new document. Attachment stubs of the current document are kept when
        the new one has no `_attachments`."""
        for attempt in range(1, attempts + 1):
            current = await self.get(db, doc_id)
            new = _next_version(doc_id, current, merge)
            if new is None:
                return current
            try:
                new["_rev"] = await self.put(db, new)
                return new
            except CouchConflict:
                self.conflicts += 1
                LOGGER.debug("conflict updating %s/%s (attempt %d); merging again", db, doc_id, attempt)
                await asyncio.sleep(random.uniform(0, self.backoff * min(attempt, 10)))
        raise CouchConflict("PUT", f"{self.url}{self._path(db, doc_id)}", 409, "conflict",
                            f"still conflicting after {attempts} read-merge-write attempts; nothing was lost, "
                            f"the update was not applied")

    async def update_many(self, db: str, merges: Mapping[str, Callable[[dict | None], dict | None]]) -> None:
        """update() of many documents in two requests (_all_docs by keys, _bulk_docs) instead of
        two each: a round of a thousand participants records a thousand entries. A document
        that conflicts (someone wrote it meanwhile) is updated again on its own."""
        if not merges:
            return
        _, reply = await self._request("POST", self._path(db, "_all_docs"), params={"include_docs": "true"},
                                       body={"keys": list(merges)}, retry=True)
        current = {row["key"]: row.get("doc") for row in reply.get("rows", []) if "key" in row}
        docs = []
        for doc_id, merge in merges.items():
            new = _next_version(doc_id, current.get(doc_id), merge)
            if new is not None:
                docs.append(new)
        _, results = await self._request("POST", self._path(db, "_bulk_docs"), body={"docs": docs}, retry=True)
        for result in results:
            if result.get("error") == "conflict":
                self.conflicts += 1
                await self.update(db, result["id"], merges[result["id"]])
            elif result.get("error"):
                raise CouchError("POST", f"{self.url}{self._path(db, '_bulk_docs')}", 200, str(result["error"]),
                                 f"{result.get('id')}: {result.get('reason', '')}")

    async def all_docs(self, db: str, *, prefix: str | None = None, include_docs: bool = True) -> list[dict]:
        """Documents (include_docs) or rows of a database, in id order; only ids starting with prefix."""
        params = {"include_docs": "true" if include_docs else "false"}
        if prefix is not None:
            params["startkey"] = json.dumps(prefix)
            params["endkey"] = json.dumps(prefix + "\ufff0")
        _, reply = await self._request("GET", self._path(db, "_all_docs"), params=params, retry=True)
        rows = reply.get("rows", [])
        return [row["doc"] for row in rows if row.get("doc")] if include_docs else rows

    # -- attachments -----------------------------------------------------------------------------

    async def put_attachment(self, db: str, doc_id: str, name: str, data: bytes, *, rev: str | None = None,
                             content_type: str = MODEL_CONTENT_TYPE) -> str:
        """Attach bytes to a document (created if missing and rev is None); returns the new rev.
        CouchConflict when rev is stale; for a conflict-proof write use update() with an inline
        attachment (inline_attachment())."""
        _, reply = await self._request("PUT", self._path(db, doc_id, name), params={"rev": rev},
                                       data=bytes(data), content_type=content_type)
        return reply["rev"]

    async def get_attachment(self, db: str, doc_id: str, name: str) -> bytes | None:
        """The attachment's bytes, or None when the document or attachment is missing."""
        status, data = await self._request("GET", self._path(db, doc_id, name), ok=(200, 404), raw=True,
                                           retry=True)
        return data if status == 200 else None


def _next_version(doc_id: str, current: dict | None, merge: Callable[[dict | None], dict | None]) -> dict | None:
    """merge's new version of a document, to be written over `current` (None: nothing to change).

    It gets the document's _id and current's _rev (none for a new document), and keeps current's
    attachment stubs when it brings no `_attachments` of its own."""
    new = merge(copy.deepcopy(current))
    if new is None:
        return None
    new = {**new, "_id": doc_id}
    if current is not None:
        new["_rev"] = current["_rev"]
        if "_attachments" in current and "_attachments" not in new:
            new["_attachments"] = current["_attachments"]
    else:
        new.pop("_rev", None)
    return new


def inline_attachment(data: bytes, content_type: str = MODEL_CONTENT_TYPE) -> dict:
    """An `_attachments` entry that uploads `data` together with the document's fields."""
    return {"content_type": content_type, "data": base64.b64encode(bytes(data)).decode()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_expected(what: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected:
        raise DigestMismatch(f"{what}: stored digest {actual} is not the expected {expected} (the chain's)")


def _doc_id(kind: str, workflow_id: str, *rest: str) -> str:
    """kind:workflow_id[:rest]: a workflow's documents of one kind share the prefix
    _doc_id(kind, workflow_id, "") (its trailing ':' keeps workflow "a" from listing "ab"'s)."""
    return ":".join(map(str, (kind, workflow_id, *rest)))


def _round_fields(doc: dict | None, workflow_id: str, round_number: int, schedule_id: str | None,
                  metrics: Mapping | None, fields: Mapping) -> dict:
    """A round document (a new one when doc is None) with fields set and metrics merged name by
    name, so writers of different metrics never overwrite each other."""
    doc = doc or {"type": "round", "workflow_id": workflow_id, "round": int(round_number), "metrics": {}}
    if schedule_id is not None:
        doc["schedule_id"] = schedule_id
    doc.update(fields)
    if metrics:
        doc["metrics"] = {**doc.get("metrics", {}), **dict(metrics)}
    return doc


class CouchHistory:
    """The durable history of workflows: rounds with their global models, final models,
    participation records (document ids and shapes in the module docstring)."""

    def __init__(self, client: CouchClient, db: str = DEFAULT_DB):
        self.client = client
        self.db = db

    async def ensure(self) -> None:
        await self.client.ensure_db(self.db)

    # -- ids -------------------------------------------------------------------------------------

    @staticmethod
    def workflow_id_of(workflow_id: str) -> str:
        return _doc_id("workflow", workflow_id)

    @staticmethod
    def round_doc_id(workflow_id: str, round_number: int) -> str:
        return _doc_id("round", workflow_id, f"{int(round_number):06d}")

    @staticmethod
    def final_doc_id(workflow_id: str) -> str:
        return _doc_id("final", workflow_id)

    @staticmethod
    def participation_doc_id(workflow_id: str, node: str) -> str:
        return _doc_id("participation", workflow_id, node)

    # -- workflows -------------------------------------------------------------------------------

    async def save_workflow(self, workflow_id: str, definition: Mapping, *, version: int | None = None,
                            owner: str | None = None, **extra: Any) -> dict:
        """Record (or refresh) a workflow's metadata; other fields of the document are kept."""
        from trustmesh.ledger import payload as cbor

        fields = {"type": "workflow", "workflow_id": workflow_id, "definition": dict(definition),
                  "definition_digest": _sha256(cbor.encode(dict(definition))), **extra}
        if version is not None:
            fields["version"] = version
        if owner is not None:
            fields["owner"] = owner

        def merge(doc):
            new = {**(doc or {}), **fields}
            return None if new == doc else new  # recorded already (each round asks): no new revision

        return await self.client.update(self.db, self.workflow_id_of(workflow_id), merge)

    async def get_workflow(self, workflow_id: str) -> dict | None:
        return await self.client.get(self.db, self.workflow_id_of(workflow_id))

    # -- rounds ----------------------------------------------------------------------------------

    async def save_round(self, workflow_id: str, round_number: int, *, schedule_id: str | None = None,
                         metrics: Mapping | None = None, **fields: Any) -> dict:
        """Set fields of a round's document (participants, submissions, aggregation_weights,
        status, ...); `metrics` is merged name by name, so writers of different metrics never
        overwrite each other."""
        def merge(doc):
            return _round_fields(doc, workflow_id, round_number, schedule_id, metrics, fields)

        return await self.client.update(self.db, self.round_doc_id(workflow_id, round_number), merge)

    async def get_round(self, workflow_id: str, round_number: int) -> dict | None:
        return await self.client.get(self.db, self.round_doc_id(workflow_id, round_number))

    async def list_rounds(self, workflow_id: str) -> list[dict]:
        """Every round document of a workflow, in round order."""
        return await self.client.all_docs(self.db, prefix=_doc_id("round", workflow_id, ""))

    async def put_round_model(self, workflow_id: str, round_number: int, model: bytes, *,
                              schedule_id: str | None = None, expected_digest: str | None = None,
                              content_type: str = MODEL_CONTENT_TYPE, metrics: Mapping | None = None,
                              **fields: Any) -> str:
        """Store a round's global model as attachment "global_model" with its sha256, in one
        revision. expected_digest (the chain's) is checked before anything is written. Other
        round fields and metrics may go in the same revision (as save_round sets them)."""
        model = bytes(model)
        digest = _sha256(model)
        _check_expected(f"global model of round {round_number} of {workflow_id!r}", digest, expected_digest)

        def merge(doc):
            doc = _round_fields(doc, workflow_id, round_number, schedule_id, metrics, fields)
            doc["global_model_digest"] = digest
            doc["global_model_bytes"] = len(model)
            doc["_attachments"] = {**doc.get("_attachments", {}),
                                   "global_model": inline_attachment(model, content_type)}
            return doc

        await self.client.update(self.db, self.round_doc_id(workflow_id, round_number), merge)
        return digest

    async def get_round_model(self, workflow_id: str, round_number: int, *,
                              expected_digest: str | None = None) -> bytes | None:
        """A round's global model, verified against the digest stored with it (and the chain's
        when given); None when there is none. DigestMismatch on any difference."""
        doc_id = self.round_doc_id(workflow_id, round_number)
        return await self._verified(doc_id, "global_model", "global_model_digest", expected_digest)

    # -- final model -----------------------------------------------------------------------------

    async def put_final_model(self, workflow_id: str, model: bytes, *, round_number: int,
                              schedule_id: str | None = None, metrics: Mapping | None = None,
                              expected_digest: str | None = None, content_type: str = MODEL_CONTENT_TYPE) -> str:
        model = bytes(model)
        digest = _sha256(model)
        _check_expected(f"final model of {workflow_id!r}", digest, expected_digest)

        def merge(doc):
            doc = doc or {}
            doc.update({"type": "final_model", "workflow_id": workflow_id, "round": int(round_number),
                        "schedule_id": schedule_id, "model_digest": digest, "model_bytes": len(model),
                        "metrics": dict(metrics or {})})
            doc["_attachments"] = {"model": inline_attachment(model, content_type)}
            return doc

        await self.client.update(self.db, self.final_doc_id(workflow_id), merge)

        def note(doc):
            if doc is None or doc.get("final_model_digest") == digest:
                return None
            return {**doc, "final_model_digest": digest}

        await self.client.update(self.db, self.workflow_id_of(workflow_id), note)
        return digest

    async def get_final_model(self, workflow_id: str, *, expected_digest: str | None = None) -> bytes | None:
        return await self._verified(self.final_doc_id(workflow_id), "model", "model_digest", expected_digest)

    async def _verified(self, doc_id: str, name: str, digest_field: str, expected: str | None) -> bytes | None:
        doc = await self.client.get(self.db, doc_id)
        if doc is None or digest_field not in doc:
            return None
        stored = doc[digest_field]
        _check_expected(f"{doc_id}/{name}", stored, expected)
        data = await self.client.get_attachment(self.db, doc_id, name)
        if data is None:
            raise DigestMismatch(f"{doc_id} names model {stored} but has no attachment {name!r}")
        actual = _sha256(data)
        if actual != stored:
            raise DigestMismatch(f"{doc_id}/{name}: the {len(data)} bytes read hash to {actual}, not to the "
                                 f"recorded {stored}; refusing to return them")
        return data

    # -- participation ---------------------------------------------------------------------------

    async def record_participation(self, workflow_id: str, node: str, round_number: int, **fields: Any) -> dict:
        """Set a node's entry for one round (schedule_id, digest, samples, included, weight, ...);
        entries of other rounds, and other fields of this one, are kept."""
        return await self.client.update(self.db, self.participation_doc_id(workflow_id, node),
                                        _participation_merge(workflow_id, node, round_number, fields))

    async def record_participations(self, workflow_id: str, round_number: int, entries: Mapping[str, Mapping]) -> None:
        """record_participation for many nodes at once: node -> its fields for this round."""
        await self.client.update_many(self.db, {
            self.participation_doc_id(workflow_id, node): _participation_merge(workflow_id, node, round_number, fields)
            for node, fields in entries.items()})

    async def get_participation(self, workflow_id: str, node: str) -> dict | None:
        return await self.client.get(self.db, self.participation_doc_id(workflow_id, node))

    async def list_participation(self, workflow_id: str) -> list[dict]:
        return await self.client.all_docs(self.db, prefix=_doc_id("participation", workflow_id, ""))


def _participation_merge(workflow_id: str, node: str, round_number: int, fields: Mapping):
    """The merge that sets a node's entry for one round, keeping its other rounds and fields."""
    def merge(doc):
        doc = doc or {"type": "participation", "workflow_id": workflow_id, "node": node, "rounds": {}}
        key = str(int(round_number))
        doc["rounds"] = {**doc.get("rounds", {}), key: {**doc.get("rounds", {}).get(key, {}), **fields}}
        return doc
    return merge


__all__ = ["CouchClient", "CouchHistory", "CouchError", "CouchConflict", "CouchNotFound", "DigestMismatch",
           "inline_attachment", "DEFAULT_DB", "MODEL_CONTENT_TYPE"]
