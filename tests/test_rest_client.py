"""RestClient against the devnet REST API and the in-memory CLIENT_* peer."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from helpers.client_wire_peer import ClientWirePeer, address, closed_port_url, make_test_batch, seed_chain, serving
from trustmesh.ledger import protos as pb
from trustmesh.ledger.rest_client import BatchInvalidError, BatchTimeoutError, RestClient, RestError
from trustmesh.ledger.signing import PrivateKey

SIGNER = PrivateKey.generate()
FAST = {"retries": 3, "backoff": 0.01, "max_backoff": 0.05, "timeout": 5}


pytestmark = pytest.mark.timeout(20)


@contextlib.asynccontextmanager
async def client_of(peer: ClientWirePeer, **options):
    """serving(peer)'s REST API, and a RestClient for it (FAST, unless options say otherwise):
    (server, rest)."""
    async with serving(peer) as server, RestClient(server.url, **{**FAST, **options}) as rest:
        yield server, rest


def submits(peer: ClientWirePeer) -> int:
    return peer.received.count(pb.Message.CLIENT_BATCH_SUBMIT_REQUEST)


async def test_submit_and_wait_until_committed():
    peer = ClientWirePeer()
    seed_chain(peer, SIGNER)
    async with client_of(peer) as (server, rest):
        batches = [make_test_batch(SIGNER, {address("k1"): b"v1"}), make_test_batch(SIGNER, {address("k2"): b"v2"})]
        ids = await rest.submit_batches(batches)
        assert ids == [b.header_signature for b in batches]
        assert [s["status"] for s in await rest.batch_statuses(ids)] == ["PENDING", "PENDING"]
        asyncio.get_running_loop().call_later(0.2, peer.commit_pending)
        statuses = await rest.wait_for_batches(ids, timeout=5)
        assert [(s["id"], s["status"]) for s in statuses] == [(i, "COMMITTED") for i in ids]
        assert await rest.get_state(address("k2")) == b"v2"


async def test_queue_full_is_retried_until_accepted():
    peer = ClientWirePeer()
    peer.queue_full = 2
    async with client_of(peer) as (server, rest):
        batch = make_test_batch(SIGNER, {address("q"): b"1"})
        assert await rest.submit_batches([batch]) == [batch.header_signature]
        assert submits(peer) == 3
        assert batch.header_signature in peer.pending


async def test_queue_full_for_good_raises_after_bounded_retries():
    peer = ClientWirePeer()
    peer.queue_full = 100
    async with client_of(peer, retries=2) as (server, rest):
        with pytest.raises(RestError) as caught:
            await rest.submit_batches([make_test_batch(SIGNER, {address("q"): b"1"})])
        error = caught.value
        assert (error.status, error.code, error.attempts) == (429, 31, 3)
        assert submits(peer) == 3
        text = str(error)
        assert text.startswith(f"POST {server.url}/batches: HTTP 429 Unable to Accept Batches [code 31]: ")
        assert "full queue" in text and "gave up after 3 attempts" in text and "\n" not in text


async def test_validator_down_gives_clear_503_after_bounded_retries():
    async with serving(validator_url=closed_port_url(), connect_timeout=0.1) as server, \
            RestClient(server.url, **{**FAST, "retries": 2}) as rest:
        started = time.monotonic()
        with pytest.raises(RestError) as caught:
            await rest.submit_batches([make_test_batch(SIGNER, {address("d"): b"1"})])
        assert time.monotonic() - started < 3
        error = caught.value
        assert (error.status, error.code, error.attempts) == (503, 18, 3)
        assert "HTTP 503 Validator Disconnected" in str(error) and "/batches" in str(error)
        with pytest.raises(RestError) as caught:
            await rest.get_state(address("d"))
        assert caught.value.status == 503


async def test_rest_api_down_is_a_connection_error_after_retries():
    url = closed_port_url("http")
    async with RestClient(url, **{**FAST, "retries": 1}) as rest:
        with pytest.raises(RestError) as caught:
            await rest.get_status()
    error = caught.value
    assert (error.status, error.code, error.attempts) == (0, None, 2)
    assert str(error).startswith(f"GET {url}/status: no response: ")


async def test_client_errors_are_not_retried():
    peer = ClientWirePeer()
    async with client_of(peer) as (server, rest):
        forged = pb.Batch()
        forged.CopyFrom(make_test_batch(SIGNER, {address("f"): b"1"}))
        forged.header_signature = "0" * 128
        with pytest.raises(RestError) as caught:
            await rest.submit_batches([forged])
        assert (caught.value.status, caught.value.code, caught.value.attempts) == (400, 30, 1)
        assert submits(peer) == 1

        with pytest.raises(RestError) as caught:
            await rest.get_receipts(["b" * 128])
        assert (caught.value.status, caught.value.code, caught.value.attempts) == (404, 80, 1)
        with pytest.raises(RestError) as caught:
            await rest.get_state("zz")
        assert (caught.value.status, caught.value.code) == (400, 62)
        with pytest.raises(ValueError):
            await rest.submit_batches([])


async def test_state_get_and_paged_listing():
    peer = ClientWirePeer()
    chain = seed_chain(peer, SIGNER)
    block1 = chain["blocks"][1].header_signature
    async with client_of(peer) as (server, rest):
        assert await rest.get_state(chain["a"]) == b"4"
        assert await rest.get_state(chain["a"], head=block1) == b"1"
        assert await rest.get_state(address("absent")) is None
        with pytest.raises(RestError) as caught:  # an unknown head is an error, not "no value"
            await rest.get_state(chain["a"], head="e" * 128)
        assert caught.value.code == 70

        expected = sorted([(chain["a"], b"4"), (chain["b"], b"2"), (chain["c"], b"3")])
        assert [e async for e in rest.list_state(page_size=1)] == expected
        assert [e async for e in rest.list_state(reverse=True)] == expected[::-1]
        assert [e async for e in rest.list_state(chain["b"])] == [(chain["b"], b"2")]
        assert [e async for e in rest.list_state(head=block1)] == sorted([(chain["a"], b"1"), (chain["b"], b"2")])
        assert [e async for e in rest.list_state("00ff")] == []
        assert peer.received.count(pb.Message.CLIENT_STATE_LIST_REQUEST) == 7  # 3 pages + 4 single lists


async def test_list_state_reads_every_page_at_the_first_pages_head():
    peer = ClientWirePeer()
    chain = seed_chain(peer, SIGNER)
    async with client_of(peer) as (server, rest):
        seen = []
        async for item in rest.list_state(page_size=1):
            seen.append(item)
            if len(seen) == 1:  # the chain moves on mid-listing
                peer.add_block([make_test_batch(SIGNER, {address("late"): b"x", chain["c"]: b"new"})])
        assert len(seen) == 3 and (chain["c"], b"3") in seen


async def test_wait_for_batches_names_invalid_transactions_with_the_processors_message():
    peer = ClientWirePeer()
    async with client_of(peer) as (server, rest):
        good = make_test_batch(SIGNER, {address("ok"): b"1"})
        bad = make_test_batch(SIGNER, {address("bad"): b"invalid:balance would go negative"})
        ids = await rest.submit_batches([good, bad])
        peer.commit_pending()
        with pytest.raises(BatchInvalidError) as caught:
            await rest.wait_for_batches(ids, timeout=5)
        error = caught.value
        assert [s["id"] for s in error.invalid] == [bad.header_signature]
        assert "balance would go negative" in str(error)
        assert bad.header_signature[:16] in str(error) and bad.transactions[0].header_signature[:16] in str(error)
        statuses = await rest.wait_for_batches(ids, timeout=5, raise_invalid=False)
        assert [s["status"] for s in statuses] == ["COMMITTED", "INVALID"]


async def test_wait_for_batches_times_out_with_the_unfinished_ones():
    peer = ClientWirePeer()
    async with client_of(peer) as (server, rest):
        ids = await rest.submit_batches([make_test_batch(SIGNER, {address("slow"): b"1"})])
        never_sent = "a" * 128
        started = time.monotonic()
        with pytest.raises(BatchTimeoutError) as caught:
            await rest.wait_for_batches([*ids, never_sent], timeout=0.4)
        assert 0.35 < time.monotonic() - started < 2
        assert [s["status"] for s in caught.value.unfinished] == ["PENDING", "UNKNOWN"]
        assert "2 of 2 batches not final after 0.4s" in str(caught.value)

        # A longer wait long-polls the REST API (wait=N) rather than spinning.
        asyncio.get_running_loop().call_later(0.3, peer.commit_pending)
        before = peer.received.count(pb.Message.CLIENT_BATCH_STATUS_REQUEST)
        statuses = await rest.wait_for_batches(ids, timeout=3)
        assert statuses[0]["status"] == "COMMITTED"
        assert peer.received.count(pb.Message.CLIENT_BATCH_STATUS_REQUEST) - before <= 2


async def test_batch_statuses_wait_is_a_server_side_long_poll():
    peer = ClientWirePeer()
    async with client_of(peer) as (server, rest):
        ids = await rest.submit_batches([make_test_batch(SIGNER, {address("lp"): b"1"})])
        started = time.monotonic()
        statuses = await rest.batch_statuses(ids, wait=1)
        assert statuses[0]["status"] == "PENDING" and 0.9 < time.monotonic() - started < 3


async def test_blocks_batches_transactions_receipts_and_node():
    peer = ClientWirePeer()
    chain = seed_chain(peer, SIGNER)
    block_ids = [b.header_signature for b in chain["blocks"]]
    async with client_of(peer) as (server, rest):
        assert [b["header_signature"] async for b in rest.list_blocks(page_size=1)] == block_ids[::-1]
        assert [b["header"]["block_num"] async for b in rest.list_blocks(reverse=True)] == ["0", "1", "2"]
        assert [b["header_signature"] async for b in rest.list_blocks(ids=block_ids[:2])] == block_ids[:2]
        assert (await rest.head())["header_signature"] == block_ids[2]
        assert (await rest.get_block(block_ids[1]))["header"]["state_root_hash"]
        assert await rest.get_block("c" * 128) is None

        batch = chain["batches"][0]
        assert (await rest.get_batch(batch.header_signature))["header_signature"] == batch.header_signature
        assert await rest.get_batch("c" * 128) is None
        assert len([b async for b in rest.list_batches(page_size=2)]) == 3
        txn_ids = [t.header_signature for t in batch.transactions]
        assert [t["header_signature"] async for t in rest.list_transactions(ids=txn_ids)] == txn_ids
        assert (await rest.get_transaction(txn_ids[0]))["header"]["family_name"] == "intkey-test"
        assert await rest.get_transaction("c" * 128) is None

        receipts = await rest.get_receipts(txn_ids)
        assert [r["id"] for r in receipts] == txn_ids
        assert receipts[0]["state_changes"][0]["address"] == chain["a"]

        assert await rest.get_peers() == peer.peers
        status = await rest.get_status()
        assert status["endpoint"] == peer.endpoint and len(status["peers"]) == 2


async def test_a_batch_a_restarted_validator_forgot_is_sent_again_until_final():
    peer = ClientWirePeer()
    seed_chain(peer, SIGNER)
    async with client_of(peer) as (server, rest):
        batch = make_test_batch(SIGNER, {address("lost"): b"1"})
        await rest.submit_batches([batch])
        peer.pending.clear()  # the validator restarted: its pending batches are gone
        loop = asyncio.get_running_loop()

        def commit_once_resent():
            if batch.header_signature in peer.pending:
                peer.commit_pending()
            else:
                loop.call_later(0.05, commit_once_resent)

        loop.call_later(0.05, commit_once_resent)
        [status] = await rest.submit_until_final([batch], 10, resubmit_after=0.3, sent=True)
        assert status["status"] == "COMMITTED" and submits(peer) == 2
        # one it never gets to commit: a timeout naming it, after the whole patience
        other = make_test_batch(SIGNER, {address("never"): b"1"})
        with pytest.raises(BatchTimeoutError, match="1 of 1 batches not final after 0.5s"):
            await rest.submit_until_final([other], 0.5, resubmit_after=0.2)
