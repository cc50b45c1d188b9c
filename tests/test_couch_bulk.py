"""CouchClient.update_many against a real CouchDB-protocol server: a round's thousand participation
entries in two requests, merged into what is there, with a document written meanwhile merged again
on its own; CouchHistory.record_participations writes what record_participation would."""

from __future__ import annotations

import asyncio

import pytest

from trustmesh.stores.couch import CouchClient, CouchHistory
from trustmesh.stores.servers import CouchServer


@pytest.fixture(scope="module")
def couch_url():
    with CouchServer() as server:
        yield server.url


class _Counting(CouchClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.requests: list[tuple[str, str]] = []

    async def _request(self, method, path, **kwargs):
        self.requests.append((method, path.rsplit("/", 1)[-1]))
        return await super()._request(method, path, **kwargs)


def test_participations_of_many_nodes_are_written_in_two_requests_and_match_one_by_one(couch_url):
    async def scenario():
        async with _Counting(couch_url) as couch:
            history = CouchHistory(couch, db="bulk-a")
            await history.ensure()
            await history.record_participation("wf", "node-0", 1, weight=0.5, included=True)
            couch.requests.clear()
            entries = {f"node-{i}": {"weight": i / 300, "samples": i, "included": True} for i in range(300)}
            await history.record_participations("wf", 2, entries)
            assert couch.requests == [("POST", "_all_docs"), ("POST", "_bulk_docs")]
            alone = CouchHistory(couch, db="bulk-b")
            await alone.ensure()
            await alone.record_participation("wf", "node-0", 1, weight=0.5, included=True)
            await asyncio.gather(*(alone.record_participation("wf", node, 2, **fields) for node, fields in entries.items()))
            for node in ("node-0", "node-1", "node-299"):
                bulk, single = await history.get_participation("wf", node), await alone.get_participation("wf", node)
                for doc in (bulk, single):
                    doc.pop("_rev")
                assert bulk == single, node
            assert set((await history.get_participation("wf", "node-0"))["rounds"]) == {"1", "2"}  # round 1 kept

    asyncio.run(scenario())


def test_a_document_written_meanwhile_is_merged_again_not_overwritten(couch_url):
    async def scenario():
        async with CouchClient(couch_url) as couch:
            await couch.ensure_db("bulk-c")
            await couch.put("bulk-c", {"_id": "a", "seen": ["first"]})
            calls, other = {"n": 0}, []

            def merge(doc):
                calls["n"] += 1
                if calls["n"] == 1:  # another writer gets in between our read and our write
                    other.append(asyncio.get_running_loop().create_task(
                        couch.update("bulk-c", "a", lambda d: {**d, "seen": [*d["seen"], "other"]})))
                return {**(doc or {}), "seen": [*(doc or {}).get("seen", []), "ours"]}

            original_bulk = couch._request

            async def slow_bulk(method, path, **kwargs):
                if path.endswith("_bulk_docs") and other:
                    await other[0]  # the other writer commits first
                return await original_bulk(method, path, **kwargs)

            couch._request = slow_bulk
            await couch.update_many("bulk-c", {"a": merge, "b": lambda doc: {"seen": ["new"]}})
            assert couch.conflicts == 1 and calls["n"] == 2
            assert (await couch.get("bulk-c", "a"))["seen"] == ["first", "other", "ours"]
            assert (await couch.get("bulk-c", "b"))["seen"] == ["new"]

    asyncio.run(scenario())
