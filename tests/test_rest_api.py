"""The devnet REST API against an in-memory CLIENT_* peer: routes, envelopes, paging, errors."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time

import aiohttp
import pytest

from helpers.client_wire_peer import ClientWirePeer, address, closed_port_url, make_test_batch, seed_chain, serving
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch_list
from trustmesh.ledger.signing import PrivateKey

OCTET = {"Content-Type": "application/octet-stream"}
SIGNER = PrivateKey.generate()


pytestmark = pytest.mark.timeout(20)


@contextlib.asynccontextmanager
async def rest_api(peer: ClientWirePeer | None = None, **serving_options):
    """serving(peer, ...)'s REST API, and an HTTP session to ask it with: (server, http)."""
    async with serving(peer, **serving_options) as server, aiohttp.ClientSession() as http:
        yield server, http


async def call(session, method, url, **kwargs) -> tuple[int, dict]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def submit(http, server, batch) -> tuple[int, dict]:
    """POST /batches with a BatchList of this one batch."""
    return await call(http, "POST", server.url + "/batches", headers=OCTET,
                      data=make_batch_list([batch]).SerializeToString())


def assert_error(status_body, status: int, code: int) -> dict:
    got_status, body = status_body
    assert (got_status, body.get("error", {}).get("code")) == (status, code), body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "title", "message"}
    return body["error"]


def seeded() -> tuple[ClientWirePeer, dict]:
    peer = ClientWirePeer()
    return peer, seed_chain(peer, SIGNER)


def header_id(block) -> str:
    return block.header_signature


# -- submission and batch statuses ------------------------------------------------------------


async def test_submit_returns_202_with_status_link_and_batch_goes_pending_then_committed():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        assert server.port != 0
        batch = make_test_batch(SIGNER, {address("n"): b"9"})
        status, reply = await submit(http, server, batch)
        assert status == 202
        assert reply == {"link": f"{server.url}/batch_statuses?id={batch.header_signature}"}

        status, statuses = await call(http, "GET", reply["link"])
        assert status == 200
        assert statuses == {"data": [{"id": batch.header_signature, "invalid_transactions": [],
                                      "status": "PENDING"}], "link": reply["link"]}
        peer.commit_pending()
        _, statuses = await call(http, "GET", reply["link"])
        assert statuses["data"][0]["status"] == "COMMITTED"


async def test_submit_rejects_wrong_content_type_empty_garbage_and_batchless_bodies():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        url = server.url + "/batches"
        good = make_batch_list([make_test_batch(SIGNER, {address("x"): b"1"})]).SerializeToString()
        as_json = {"Content-Type": "application/json"}
        assert_error(await call(http, "POST", url, data=good, headers=as_json), 400, 42)
        assert_error(await call(http, "POST", url, data=good, skip_auto_headers=["Content-Type"]), 400, 42)
        assert_error(await call(http, "POST", url, data=b"", headers=OCTET), 400, 34)
        assert_error(await call(http, "POST", url, data=b"\xff\xfe garbage", headers=OCTET), 400, 35)
        # Parses (an unknown varint field) but holds no batch.
        assert_error(await call(http, "POST", url, data=b"\x10\x01", headers=OCTET), 400, 34)
        assert pb.Message.CLIENT_BATCH_SUBMIT_REQUEST not in peer.received


async def test_submit_with_bad_signature_is_400_from_validator_and_queue_full_is_429():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        batch = make_test_batch(SIGNER, {address("x"): b"1"})
        forged = pb.Batch()
        forged.CopyFrom(batch)
        forged.header_signature = "0" * 128
        error = assert_error(await submit(http, server, forged), 400, 30)
        assert error["title"] == "Submitted Batches Invalid"

        peer.queue_full = 1
        error = assert_error(await submit(http, server, batch), 429, 31)
        assert "full queue" in error["message"]
        status, _ = await submit(http, server, batch)
        assert status == 202


async def test_batch_status_request_errors():
    peer, chain = seeded()
    async with rest_api(peer) as (server, http):
        url = server.url + "/batch_statuses"
        assert_error(await call(http, "GET", url), 400, 66)
        error = assert_error(await call(http, "GET", url + "?id=nothex"), 400, 60)
        assert error["message"].endswith("invalid: nothex")
        assert_error(await call(http, "POST", url, data=b'["x"]', headers=OCTET), 400, 43)
        assert_error(await call(http, "POST", url, data=b"not json",
                                headers={"Content-Type": "application/json"}), 400, 46)
        assert_error(await call(http, "POST", url, json=[]), 400, 46)
        assert_error(await call(http, "POST", url, json={"id": "x"}), 400, 46)
        assert_error(await call(http, "POST", url, json=["abc"]), 400, 60)
        known = chain["batches"][0].header_signature
        status, reply = await call(http, "POST", url, json=[known, "f" * 128])
        assert status == 200 and "link" not in reply  # POST answers carry no link
        assert [(s["id"], s["status"]) for s in reply["data"]] == [(known, "COMMITTED"), ("f" * 128, "UNKNOWN")]


async def test_batch_status_wait_returns_when_the_batch_commits():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        batch = make_test_batch(SIGNER, {address("w"): b"1"})
        await submit(http, server, batch)
        asyncio.get_running_loop().call_later(0.2, peer.commit_pending)
        started = time.monotonic()
        status, reply = await call(http, "GET", f"{server.url}/batch_statuses?id={batch.header_signature}&wait=5")
        elapsed = time.monotonic() - started
        assert status == 200 and reply["data"][0]["status"] == "COMMITTED"
        assert 0.15 < elapsed < 3, elapsed
        assert reply["link"].endswith("&wait=5")
        # Nothing pending: wait returns at once.
        started = time.monotonic()
        await call(http, "GET", f"{server.url}/batch_statuses?id={batch.header_signature}&wait=5")
        assert time.monotonic() - started < 1


async def test_batch_status_wait_times_out_at_the_validator_with_pending_status():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        batch = make_test_batch(SIGNER, {address("w"): b"1"})
        await submit(http, server, batch)
        started = time.monotonic()
        status, reply = await call(http, "POST", server.url + "/batch_statuses?wait=1",
                                   json=[batch.header_signature])
        assert status == 200 and reply["data"][0]["status"] == "PENDING"
        assert 0.9 < time.monotonic() - started < 3


async def test_invalid_batch_status_carries_the_processors_message():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        batch = make_test_batch(SIGNER, {address("bad"): b"invalid:value too large"})
        await submit(http, server, batch)
        peer.commit_pending()
        _, reply = await call(http, "POST", server.url + "/batch_statuses", json=[batch.header_signature])
        assert reply["data"] == [{
            "id": batch.header_signature, "status": "INVALID",
            "invalid_transactions": [{"id": batch.transactions[0].header_signature,
                                      "message": "value too large",
                                      "extended_data": base64.b64encode(b"\x01\x02").decode()}]}]


# -- state ----------------------------------------------------------------------------------


async def test_state_list_envelope_and_paging_follow_sawtooth():
    peer, chain = seeded()
    head = chain["blocks"][2].header_signature
    ordered = sorted([chain["a"], chain["b"], chain["c"]])
    async with rest_api(peer) as (server, http):
        status, page = await call(http, "GET", server.url + "/state?limit=2")
        assert status == 200
        assert page["head"] == head
        assert [e["address"] for e in page["data"]] == ordered[:2]
        assert page["link"] == f"{server.url}/state?head={head}&start={ordered[0]}&limit=2"
        assert page["paging"] == {
            "limit": 2, "start": None, "next_position": ordered[2],
            "next": f"{server.url}/state?head={head}&start={ordered[2]}&limit=2"}
        _, last = await call(http, "GET", page["paging"]["next"])
        assert [e["address"] for e in last["data"]] == ordered[2:]
        assert last["paging"] == {"limit": 2, "start": ordered[2]}  # no next on the last page

        values = {e["address"]: base64.b64decode(e["data"]) for e in (page["data"] + last["data"])}
        assert values == {chain["a"]: b"4", chain["b"]: b"2", chain["c"]: b"3"}


async def test_state_values_are_in_standard_base64_as_sawtooth_writes_them():
    peer, _ = seeded()
    value = b"\xfb\xff\xbf\xfe"  # "+/+//g==": where url-safe base64 would differ
    async with rest_api(peer) as (server, http):
        await submit(http, server, make_test_batch(SIGNER, {address("b64"): value}))
        peer.commit_pending()
        _, page = await call(http, "GET", f"{server.url}/state?address={address('b64')}")
        assert page["data"] == [{"address": address("b64"), "data": "+/+//g=="}]
        _, reply = await call(http, "GET", f"{server.url}/state/{address('b64')}")
        assert reply["data"] == "+/+//g=="


async def test_state_list_reverse_head_prefix_and_empty_result():
    peer, chain = seeded()
    block1 = chain["blocks"][1].header_signature
    async with rest_api(peer) as (server, http):
        _, page = await call(http, "GET", server.url + "/state?reverse")
        addresses = [e["address"] for e in page["data"]]
        assert addresses == sorted(addresses, reverse=True) and len(addresses) == 3
        _, page = await call(http, "GET", server.url + "/state?reverse=false")
        assert [e["address"] for e in page["data"]] == sorted(addresses)

        _, page = await call(http, "GET", f"{server.url}/state?head={block1}&address={chain['a']}")
        assert page["head"] == block1
        assert [(e["address"], base64.b64decode(e["data"])) for e in page["data"]] == [(chain["a"], b"1")]

        # Empty list: 200, and the link/paging exactly as sawtooth-rest-api renders them.
        status, page = await call(http, "GET", server.url + "/state?address=00ff")
        assert status == 200 and page["data"] == []
        assert page["link"] == f"{server.url}/state?head={page['head']}&start&limit=0&address=00ff"
        assert page["paging"] == {"limit": None, "start": None}


async def test_state_list_errors():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        url = server.url + "/state"
        assert_error(await call(http, "GET", url + "?start=" + address("nope")), 400, 54)
        assert_error(await call(http, "GET", url + "?limit=0"), 400, 53)
        assert_error(await call(http, "GET", url + "?limit=-3"), 400, 53)
        assert_error(await call(http, "GET", url + "?limit=ten"), 400, 53)
        assert_error(await call(http, "GET", url + "?reverse=address"), 400, 57)
        assert_error(await call(http, "GET", url + "?address=xyz"), 400, 62)
        assert_error(await call(http, "GET", url + "?head=123"), 400, 60)
        assert_error(await call(http, "GET", url + "?head=" + "e" * 128), 404, 70)


async def test_state_fetch():
    peer, chain = seeded()
    head = chain["blocks"][2].header_signature
    block1 = chain["blocks"][1].header_signature
    async with rest_api(peer) as (server, http):
        status, reply = await call(http, "GET", f"{server.url}/state/{chain['a']}")
        assert status == 200
        assert reply == {"data": base64.b64encode(b"4").decode(), "head": head,
                         "link": f"{server.url}/state/{chain['a']}?head={head}"}
        _, reply = await call(http, "GET", f"{server.url}/state/{chain['a']}?head={block1}")
        assert base64.b64decode(reply["data"]) == b"1" and reply["head"] == block1
        for path, status, code in ((address("absent"), 404, 75), (chain["a"][:10], 400, 62), ("not-hex", 400, 62),
                                   (f"{chain['a']}?head={'d' * 128}", 404, 70)):
            assert_error(await call(http, "GET", f"{server.url}/state/{path}"), status, code)


async def test_state_fetch_in_the_validators_process_asks_for_the_value_only():
    # chain_head (the dev validator's own head) stands for fetching the whole head block first
    peer, chain = seeded()
    head = chain["blocks"][2]
    root = pb.BlockHeader.FromString(head.header).state_root_hash
    asked = []

    def chain_head():
        asked.append(True)
        return head.header_signature, root

    async with rest_api(peer, chain_head=chain_head) as (server, http):
        status, reply = await call(http, "GET", f"{server.url}/state/{chain['a']}")
        assert (status, reply) == (200, {"data": base64.b64encode(b"4").decode(), "head": head.header_signature,
                                         "link": f"{server.url}/state/{chain['a']}?head={head.header_signature}"})
        assert asked and pb.Message.CLIENT_BLOCK_LIST_REQUEST not in peer.received
        assert peer.received.count(pb.Message.CLIENT_STATE_GET_REQUEST) == 1
        block1 = chain["blocks"][1].header_signature  # an explicit head is still looked up
        _, reply = await call(http, "GET", f"{server.url}/state/{chain['a']}?head={block1}")
        assert base64.b64decode(reply["data"]) == b"1" and reply["head"] == block1


# -- blocks, batches, transactions ------------------------------------------------------------


async def test_block_list_expands_headers_and_pages_by_block_number():
    peer, chain = seeded()
    ids = [b.header_signature for b in chain["blocks"]]
    async with rest_api(peer) as (server, http):
        _, page = await call(http, "GET", server.url + "/blocks")
        assert [b["header_signature"] for b in page["data"]] == ids[::-1]
        assert page["head"] == ids[2]
        assert page["link"] == f"{server.url}/blocks?head={ids[2]}&start=0x0000000000000002&limit=100"
        top = page["data"][0]
        assert top["header"]["block_num"] == "2"  # uint64 rendered as a string, as protobuf JSON does
        assert top["header"]["previous_block_id"] == ids[1]
        assert top["header"]["batch_ids"] == [b.header_signature for b in chain["batches"][1:]]
        assert top["header"]["consensus"] == base64.b64encode(b"Devmode").decode()
        txn = top["batches"][0]["transactions"][0]
        assert txn["header"]["family_name"] == "intkey-test"
        assert txn["payload"] == base64.b64encode(b"3").decode()
        assert top["batches"][0]["header"]["signer_public_key"] == SIGNER.public_key().as_hex()

        _, page = await call(http, "GET", server.url + "/blocks?limit=1")
        assert [b["header_signature"] for b in page["data"]] == ids[2:]
        assert page["paging"]["next_position"] == "0x0000000000000001"
        _, page = await call(http, "GET", page["paging"]["next"])
        assert [b["header_signature"] for b in page["data"]] == ids[1:2]

        _, page = await call(http, "GET", server.url + "/blocks?reverse&limit=2")
        assert [b["header_signature"] for b in page["data"]] == ids[:2]
        assert page["paging"]["next_position"] == "0x0000000000000002"

        _, page = await call(http, "GET", f"{server.url}/blocks?id={ids[0]},{ids[2]}")
        assert [b["header_signature"] for b in page["data"]] == [ids[0], ids[2]]
        _, page = await call(http, "GET", f"{server.url}/blocks?head={ids[1]}&id={ids[2]}")
        assert page["data"] == []  # above the requested head

        assert_error(await call(http, "GET", server.url + "/blocks?start=12"), 400, 54)
        assert_error(await call(http, "GET", server.url + "/blocks?start=0x00000000000000ff"), 400, 54)
        assert_error(await call(http, "GET", server.url + "/blocks?reverse=default"), 400, 57)
        assert_error(await call(http, "GET", server.url + "/blocks?id=abc"), 400, 60)
        assert_error(await call(http, "GET", server.url + "/blocks?head=" + "a" * 128), 404, 50)


async def test_block_batch_and_transaction_fetch_by_id():
    peer, chain = seeded()
    block, batch = chain["blocks"][1], chain["batches"][0]
    txn = batch.transactions[1]
    async with rest_api(peer) as (server, http):
        status, reply = await call(http, "GET", f"{server.url}/blocks/{block.header_signature}")
        assert status == 200 and set(reply) == {"data", "link"}
        assert reply["data"]["header_signature"] == block.header_signature
        assert reply["link"] == f"{server.url}/blocks/{block.header_signature}"
        _, reply = await call(http, "GET", f"{server.url}/batches/{batch.header_signature}")
        assert reply["data"]["header"]["transaction_ids"] == [t.header_signature for t in batch.transactions]
        _, reply = await call(http, "GET", f"{server.url}/transactions/{txn.header_signature}")
        assert reply["data"]["header"]["outputs"] == [chain["b"]]

        for kind, code in (("blocks", 70), ("batches", 71), ("transactions", 72)):
            assert_error(await call(http, "GET", f"{server.url}/{kind}/{'c' * 128}"), 404, code)
            assert_error(await call(http, "GET", f"{server.url}/{kind}/{'C' * 128}"), 400, 60)


async def test_batch_and_transaction_lists_page_by_id():
    peer, chain = seeded()
    batch_ids = [b.header_signature for b in chain["batches"]]
    async with rest_api(peer) as (server, http):
        # Newest block first, batches in block order within a block.
        _, page = await call(http, "GET", server.url + "/batches")
        expected = [batch_ids[1], batch_ids[2], batch_ids[0]]
        assert [b["header_signature"] for b in page["data"]] == expected
        _, page = await call(http, "GET", server.url + "/batches?limit=2")
        assert page["paging"]["next_position"] == expected[2]
        assert page["link"].endswith(f"&start={expected[0]}&limit=2")
        _, page = await call(http, "GET", f"{server.url}/batches?start={expected[2]}")
        assert [b["header_signature"] for b in page["data"]] == expected[2:]
        _, page = await call(http, "GET", server.url + "/batches?reverse")
        assert [b["header_signature"] for b in page["data"]] == expected[::-1]
        assert_error(await call(http, "GET", server.url + "/batches?start=" + "9" * 128), 400, 54)

        _, page = await call(http, "GET", server.url + "/transactions?limit=1")
        assert len(page["data"]) == 1 and page["paging"]["next_position"]
        _, page = await call(http, "GET", server.url + "/transactions")
        assert len(page["data"]) == 4


# -- receipts, peers, status ------------------------------------------------------------------


async def test_receipts_by_get_and_post():
    peer, chain = seeded()
    txns = [t.header_signature for t in chain["batches"][0].transactions]
    async with rest_api(peer) as (server, http):
        status, reply = await call(http, "GET", f"{server.url}/receipts?id={txns[0]}")
        assert status == 200 and reply["link"] == f"{server.url}/receipts?id={txns[0]}"
        receipt = reply["data"][0]
        assert receipt["id"] == txns[0]
        assert receipt["state_changes"] == [{"address": chain["a"], "type": "SET",
                                             "value": base64.b64encode(b"1").decode()}]
        assert receipt["data"] == [base64.b64encode(b"ok").decode()]
        assert receipt["events"][0]["event_type"] == "test/written"
        _, reply = await call(http, "POST", server.url + "/receipts", json=txns)
        assert [r["id"] for r in reply["data"]] == txns and "link" not in reply

        assert_error(await call(http, "GET", f"{server.url}/receipts?id={'b' * 128}"), 404, 80)
        assert_error(await call(http, "GET", f"{server.url}/receipts"), 400, 83)
        assert_error(await call(http, "POST", f"{server.url}/receipts", data=b"[]", headers=OCTET), 400, 81)
        assert_error(await call(http, "POST", f"{server.url}/receipts", json=[]), 400, 82)


async def test_peers_and_status():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        assert await call(http, "GET", server.url + "/peers") == (
            200, {"data": peer.peers, "link": f"{server.url}/peers"})
        status, reply = await call(http, "GET", server.url + "/status")
        assert reply["data"] == {"endpoint": peer.endpoint,
                                 "peers": [{"endpoint": e} for e in sorted(peer.peers)]}


async def test_links_honour_forwarded_headers():
    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        _, reply = await call(http, "GET", server.url + "/peers",
                              headers={"X-Forwarded-Host": "ledger.example", "X-Forwarded-Proto": "https"})
        assert reply["link"] == "https://ledger.example/peers"
        _, reply = await call(http, "GET", server.url + "/peers",
                              headers={"Forwarded": 'for=1.2.3.4;proto=https;host="api.example:443"'})
        assert reply["link"] == "https://api.example:443/peers"


# -- validator trouble, limits, logging -------------------------------------------------------


async def test_validator_without_genesis_is_503_not_ready():
    async with rest_api(ClientWirePeer(genesis=False)) as (server, http):
        for path in ("/state", "/blocks", "/batches", "/transactions"):
            error = assert_error(await call(http, "GET", server.url + path), 503, 15)
            assert error["title"] == "Validator Not Ready"


async def test_unreachable_validator_is_503_quickly():
    async with rest_api(validator_url=closed_port_url(), connect_timeout=0.2) as (server, http):
        started = time.monotonic()
        assert_error(await call(http, "GET", server.url + "/blocks"), 503, 18)
        batch = make_batch_list([make_test_batch(SIGNER, {address("x"): b"1"})]).SerializeToString()
        assert_error(await call(http, "POST", server.url + "/batches", headers=OCTET, data=batch), 503, 18)
        assert time.monotonic() - started < 2


async def test_silent_validator_is_503_timed_out_and_a_vanishing_one_503_disconnected():
    peer, _ = seeded()
    async with rest_api(peer, timeout=0.3) as (server, http):
        peer.mute = True
        assert_error(await call(http, "GET", server.url + "/status"), 503, 17)

        pending = asyncio.ensure_future(call(http, "GET", server.url + "/status"))
        await asyncio.sleep(0.05)
        await peer.close()  # drops the TCP link while the request waits
        assert_error(await pending, 503, 18)


async def test_oversized_body_is_413():
    peer, _ = seeded()
    async with rest_api(peer, client_max_size=1000) as (server, http):
        error = assert_error(await call(http, "POST", server.url + "/batches", headers=OCTET,
                                        data=b"\x00" * 5000), 413, 36)
        assert "1000 bytes" in error["message"]
        async def chunks():  # no Content-Length: caught while reading
            for _ in range(10):
                yield b"\x00" * 500
        assert_error(await call(http, "POST", server.url + "/batches", headers=OCTET, data=chunks()), 413, 36)


async def test_each_request_is_logged_at_debug(caplog):
    caplog.set_level(logging.DEBUG, logger="trustmesh.ledger.devnet.rest_api")

    peer, _ = seeded()
    async with rest_api(peer) as (server, http):
        await call(http, "GET", server.url + "/peers")
        await call(http, "GET", server.url + "/blocks/xyz")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any(line.startswith("GET /peers -> 200 in ") for line in lines), lines
    assert any(line.startswith("GET /blocks/xyz -> 400 in ") for line in lines), lines


@pytest.mark.parametrize("wait, expected", [("3", 3), ("", 285), ("soon", 285), ("false", None)])
async def test_wait_query_becomes_the_validators_wait(wait, expected):
    seen = []

    peer, chain = seeded()
    original = ClientWirePeer._HANDLERS[pb.Message.CLIENT_BATCH_STATUS_REQUEST]

    async def spy(self, request, R):
        seen.append(request.timeout if request.wait else None)
        return await original[3](self, request, R)

    peer._HANDLERS = {**ClientWirePeer._HANDLERS,
                      pb.Message.CLIENT_BATCH_STATUS_REQUEST: (*original[:3], spy)}
    async with rest_api(peer) as (server, http):
        batch_id = chain["batches"][0].header_signature
        status, _ = await call(http, "GET", f"{server.url}/batch_statuses?id={batch_id}&wait={wait}")
        assert status == 200
    assert seen == [expected]
