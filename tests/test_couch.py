"""stores.couch against a real CouchDB-protocol server (pouchdb-server, started for this module)."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from aiohttp import web

from helpers.ledger_helpers import run
from trustmesh.stores.couch import (
    CouchClient,
    CouchConflict,
    CouchError,
    CouchHistory,
    DigestMismatch,
    inline_attachment,
)
from trustmesh.stores.servers import CouchServer

ALL_BYTES = bytes(range(256)) * 64 + b"\x00\xff\x00"


@pytest.fixture(scope="module")
def couch_url():
    with CouchServer() as server:
        yield server.url


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_documents_revisions_and_conflicts(couch_url):
    async with CouchClient(couch_url) as couch:
        assert (await couch.server_info())["express-pouchdb"]
        assert await couch.ensure_db("docs") is True
        assert await couch.ensure_db("docs") is False  # idempotent
        assert await couch.get("docs", "missing") is None

        odd_id = "round:wf/1 é:x"  # ':' '/' ' ' and non-ASCII survive the URL
        rev1 = await couch.put("docs", {"_id": odd_id, "n": 1})
        doc = await couch.get("docs", odd_id)
        assert doc["n"] == 1 and doc["_rev"] == rev1 and doc["_id"] == odd_id

        rev2 = await couch.put("docs", {**doc, "n": 2})
        with pytest.raises(CouchConflict) as stale:
            await couch.put("docs", {**doc, "n": 3})  # rev1 is stale now
        assert stale.value.status == 409 and "conflict" in str(stale.value)
        assert (await couch.get("docs", odd_id))["n"] == 2
        assert (await couch.get("docs", odd_id, rev=rev1))["n"] == 1

        await couch.delete("docs", odd_id, rev2)
        assert await couch.get("docs", odd_id) is None
        with pytest.raises(CouchError) as bad:
            await couch.put("Bad Name", {"_id": "x"})
        assert bad.value.status in (400, 404, 500)
        assert await couch.delete_db("docs") is True


async def test_two_concurrent_writers_lose_no_update(couch_url):
    """Two clients (two connections), 30 concurrent read-merge-writes each, on one document."""

    async with CouchClient(couch_url) as first, CouchClient(couch_url) as second:
        await first.ensure_db("race")

        async def add(client, writer, i):
            def merge(doc):
                doc = doc or {"entries": {}}
                doc["entries"][f"{writer}-{i:02d}"] = i  # idempotent: set, not append
                return doc
            await client.update("race", "counter", merge, attempts=200)

        await asyncio.gather(*(add(first, "a", i) for i in range(30)),
                             *(add(second, "b", i) for i in range(30)))
        doc = await first.get("race", "counter")
        assert sorted(doc["entries"]) == sorted([f"a-{i:02d}" for i in range(30)] +
                                                [f"b-{i:02d}" for i in range(30)])
        assert doc["_rev"].startswith("60-")  # one revision per update, none lost
        assert first.conflicts + second.conflicts > 0  # the race really happened


async def test_update_gives_up_loudly_and_keeps_the_other_writes(couch_url):
    async with CouchClient(couch_url) as couch, CouchClient(couch_url) as rival:
        await couch.ensure_db("stubborn")
        await couch.put("stubborn", {"_id": "d", "mine": 0, "theirs": 0})
        sneaky = []

        def merge(doc):
            # another writer gets in between our read and our write, every time
            sneaky.append(asyncio.ensure_future(rival.update("stubborn", "d",
                                                             lambda d: {**d, "theirs": d["theirs"] + 1})))
            return {**doc, "mine": doc["mine"] + 1}

        async def slow_put(db, doc, original=couch.put):
            await asyncio.gather(*sneaky)
            return await original(db, doc)

        couch.put = slow_put
        with pytest.raises(CouchConflict, match="still conflicting after 3 read-merge-write attempts"):
            await couch.update("stubborn", "d", merge, attempts=3)
        doc = await rival.get("stubborn", "d")
        assert doc["theirs"] == 3 and doc["mine"] == 0  # their writes kept, ours reported, not half-done

        # merge returning None changes nothing
        assert (await rival.update("stubborn", "d", lambda d: None))["_rev"] == doc["_rev"]


async def test_attachments_round_trip(couch_url):
    async with CouchClient(couch_url) as couch:
        await couch.ensure_db("blobs")
        rev = await couch.put_attachment("blobs", "model-doc", "weights.bin", ALL_BYTES)
        assert await couch.get_attachment("blobs", "model-doc", "weights.bin") == ALL_BYTES
        doc = await couch.get("blobs", "model-doc")
        assert doc["_rev"] == rev and doc["_attachments"]["weights.bin"]["length"] == len(ALL_BYTES)

        # a second attachment needs the current rev; a stale one conflicts
        with pytest.raises(CouchConflict):
            await couch.put_attachment("blobs", "model-doc", "other.bin", b"x")
        await couch.put_attachment("blobs", "model-doc", "other.bin", b"\x00\x01", rev=rev)
        assert await couch.get_attachment("blobs", "model-doc", "other.bin") == b"\x00\x01"
        assert await couch.get_attachment("blobs", "model-doc", "nope") is None
        assert await couch.get_attachment("blobs", "no-doc", "weights.bin") is None

        # update() keeps attachment stubs; inline attachments go in with the fields
        await couch.update("blobs", "model-doc", lambda d: {"note": "fields only"})
        assert await couch.get_attachment("blobs", "model-doc", "weights.bin") == ALL_BYTES
        await couch.update("blobs", "inline", lambda d: {"_attachments": {"m": inline_attachment(ALL_BYTES)}})
        assert await couch.get_attachment("blobs", "inline", "m") == ALL_BYTES


async def test_history_documents(couch_url):
    wf = "federated-digits"
    nodes = ["02" + f"{i:02x}" * 32 for i in range(4)]

    async with CouchClient(couch_url) as couch:
        history = CouchHistory(couch, db="history")
        await history.ensure()
        definition = {"workflow_id": wf, "tasks": [{"id": "train", "kind": "local_train", "depends_on": []}]}
        doc = await history.save_workflow(wf, definition, version=1, owner=nodes[0], name="digits")
        assert doc["_id"] == f"workflow:{wf}" and doc["version"] == 1 and len(doc["definition_digest"]) == 64
        # every round's recorder saves it again: the same fields make no new revision, a change does
        again = await history.save_workflow(wf, definition, version=1, owner=nodes[0], name="digits")
        assert again["_rev"] == doc["_rev"]
        changed = await history.save_workflow(wf, definition, version=2, owner=nodes[0], name="digits")
        assert changed["_rev"] != doc["_rev"] and changed["version"] == 2

        models = {}
        for number in (1, 2, 10):
            models[number] = os.urandom(3000) + bytes([number])
            sid = f"{number:064x}"
            await history.save_round(wf, number, schedule_id=sid, participants=nodes[:3], status="ready",
                                     submissions={n: {"digest": sha256(n.encode()), "samples": 10} for n in nodes[:3]},
                                     aggregation_weights={n: 1 / 3 for n in nodes[:3]})
            digest = await history.put_round_model(wf, number, models[number], schedule_id=sid,
                                                   expected_digest=sha256(models[number]))
            assert digest == sha256(models[number])
        # metrics from two writers at once, merged name by name
        await asyncio.gather(history.save_round(wf, 2, metrics={"accuracy": 0.91}),
                             history.save_round(wf, 2, metrics={"loss": 0.27}))

        round2 = await history.get_round(wf, 2)
        assert round2["_id"] == f"round:{wf}:000002"
        assert round2["metrics"] == {"accuracy": 0.91, "loss": 0.27}
        assert round2["global_model_digest"] == sha256(models[2]) and round2["global_model_bytes"] == 3001
        assert round2["participants"] == nodes[:3] and round2["status"] == "ready"
        assert [d["round"] for d in await history.list_rounds(wf)] == [1, 2, 10]
        for number, model in models.items():
            assert await history.get_round_model(wf, number, expected_digest=sha256(model)) == model
        assert await history.get_round_model(wf, 3) is None

        # the chain's digest disagrees: refused before anything is read or written
        with pytest.raises(DigestMismatch, match="not the expected"):
            await history.get_round_model(wf, 1, expected_digest="00" * 32)
        with pytest.raises(DigestMismatch, match="not the expected"):
            await history.put_round_model(wf, 4, b"model", expected_digest="00" * 32)
        assert await history.get_round(wf, 4) is None

        # bytes swapped behind our back: never returned
        current = await history.get_round(wf, 1)
        await couch.put_attachment("history", current["_id"], "global_model", b"evil weights",
                                   rev=current["_rev"])
        with pytest.raises(DigestMismatch, match="refusing to return them"):
            await history.get_round_model(wf, 1)

        final = models[10]
        await history.put_final_model(wf, final, round_number=10, schedule_id=f"{10:064x}",
                                      metrics={"accuracy": 0.93})
        assert await history.get_final_model(wf, expected_digest=sha256(final)) == final
        final_doc = await couch.get("history", f"final:{wf}")
        assert final_doc["type"] == "final_model" and final_doc["model_digest"] == sha256(final)
        assert (await history.get_workflow(wf))["final_model_digest"] == sha256(final)

        # participation: concurrent writers for different rounds and nodes, nothing lost
        await asyncio.gather(*(history.record_participation(wf, node, number, schedule_id=f"{number:064x}",
                                                            samples=10 + number, included=number != 2)
                               for node in nodes for number in (1, 2, 3)))
        await history.record_participation(wf, nodes[0], 1, weight=0.25)
        record = await history.get_participation(wf, nodes[0])
        assert record["_id"] == f"participation:{wf}:{nodes[0]}" and record["type"] == "participation"
        assert record["rounds"]["1"] == {"schedule_id": f"{1:064x}", "samples": 11, "included": True,
                                         "weight": 0.25}
        assert record["rounds"]["2"]["included"] is False and set(record["rounds"]) == {"1", "2", "3"}
        assert len(await history.list_participation(wf)) == len(nodes)


def test_basic_auth_and_accept_header_are_sent():
    seen = []

    async def handler(request):
        seen.append((request.method, request.path, request.headers.get("Authorization"),
                     request.headers.get("Accept")))
        if request.headers.get("Authorization") != "Basic YWRtaW46czNjcmV0":  # admin:s3cret
            return web.json_response({"error": "unauthorized", "reason": "Name or password is incorrect."},
                                     status=401)
        return web.json_response({"couchdb": "Welcome", "version": "3.3.3"})

    async def scenario():
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            env = {"COUCHDB_URL": f"http://127.0.0.1:{port}", "COUCHDB_USER": "admin", "COUCHDB_PASSWORD": "s3cret"}
            async with CouchClient.from_env(env) as couch:
                assert (await couch.server_info())["couchdb"] == "Welcome"
            async with CouchClient(f"http://127.0.0.1:{port}") as anonymous:
                with pytest.raises(CouchError, match="HTTP 401 unauthorized: Name or password is incorrect"):
                    await anonymous.ensure_db("x")
        finally:
            await runner.cleanup()

    run(scenario())
    assert seen[0] == ("GET", "/", "Basic YWRtaW46czNjcmV0", "application/json")
    assert seen[1][2] is None and seen[1][3] == "application/json"


async def test_error_without_server_is_clear():
    from trustmesh.stores.servers import free_port

    async with CouchClient(f"http://127.0.0.1:{free_port()}", retries=1, backoff=0.01) as couch:
        with pytest.raises(CouchError, match="no response"):
            await couch.get("db", "doc")
