"""The dev validator end to end: real process, real processors, real REST API and events."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from helpers.ledger_helpers import intkey_batch, rest, run, running_processor, submit_and_wait
from trustmesh.ledger import intkey
from trustmesh.ledger import payload as cbor
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.devnet.block_info import CONFIG_ADDRESS, NAMESPACE as BLOCK_INFO_NS, latest_block_timestamp
from trustmesh.ledger.events import EventSubscriber, event_subscription, state_delta_subscription
from trustmesh.ledger.processor import InternalError, TransactionHandler
from trustmesh.ledger.rest_client import RestError
from trustmesh.ledger.signing import PrivateKey

SIGNER = PrivateKey.generate()


def invalid_message(status: dict) -> str:
    return status["invalid_transactions"][0]["message"]


async def test_intkey_batch_commits_and_state_is_readable(devnet):
    async with running_processor(devnet.component_url), rest(devnet.rest_url) as client:
        statuses = await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "alpha", 41), ("inc", "alpha", 1))])
        assert [s["status"] for s in statuses] == ["COMMITTED"]
        value = await client.get_state(intkey.address("alpha"))
        assert cbor.decode(value) == {"alpha": 42}
        head = await client.head()
        assert head["header"]["block_num"] == "1" or int(head["header"]["block_num"]) == 1
        # the block carries the injected BlockInfo batch first, then ours
        assert len(head["batches"]) == 2
        receipts = await client.get_receipts([head["batches"][1]["header_signature"][:0] or
                                              head["batches"][1]["transactions"][0]["header_signature"]])
        assert receipts[0]["state_changes"][0]["address"] == intkey.address("alpha")


async def test_batch_is_atomic_and_invalid_message_reaches_batch_statuses(devnet):
    async with running_processor(devnet.component_url), rest(devnet.rest_url) as client:
        bad = intkey_batch(SIGNER, ("set", "beta", 1), ("dec", "beta", 5))  # second would go negative
        [status] = await submit_and_wait(client, [bad])
        assert status["status"] == "INVALID"
        assert "outside 0.." in invalid_message(status)
        assert await client.get_state(intkey.address("beta")) is None  # first txn rolled back too
        # and the validator keeps serving
        [ok] = await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "beta", 1))])
        assert ok["status"] == "COMMITTED"


def _resign_batch(signer, txns):
    return make_batch(signer, txns)


async def test_bad_inputs_are_rejected_clearly_and_validator_keeps_serving(devnet):
    async with running_processor(devnet.component_url), rest(devnet.rest_url, retries=0) as client:
        good_txn = intkey.make_intkey_transaction(SIGNER, "set", "gamma", 1)

        # bad batch signature
        batch = make_batch(SIGNER, [good_txn])
        batch.header_signature = "0" * 128
        with pytest.raises(RestError) as err:
            await client.submit_batches([batch])
        assert err.value.status == 400
        [status] = await client.batch_statuses(["0" * 128])
        assert status["status"] == "INVALID" and "does not verify" in invalid_message(status)

        # tampered payload
        tampered = pb.Transaction()
        tampered.CopyFrom(good_txn)
        tampered.payload = intkey.make_payload("set", "gamma", 999)
        batch = make_batch(SIGNER, [tampered])
        with pytest.raises(RestError):
            await client.submit_batches([batch])
        [status] = await client.batch_statuses([batch.header_signature])
        assert "payload_sha512" in invalid_message(status)

        # batcher key is not the batch signer
        other = PrivateKey.generate()
        batch = make_batch(other, [good_txn])
        with pytest.raises(RestError):
            await client.submit_batches([batch])
        [status] = await client.batch_statuses([batch.header_signature])
        assert "batcher_public_key" in invalid_message(status)

        # oversized payload
        big = make_transaction(SIGNER, "intkey", "1.0", b"\x00" * (2 * 1024 * 1024), [intkey.NAMESPACE], [intkey.NAMESPACE])
        batch = make_batch(SIGNER, [big])
        with pytest.raises(RestError) as err:
            await client.submit_batches([batch])
        assert err.value.status in (400, 413)

        # malformed protobuf body
        async with aiohttp.ClientSession() as http:
            async with http.post(devnet.rest_url + "/batches", data=b"\xff\x00garbage",
                                 headers={"Content-Type": "application/octet-stream"}) as resp:
                assert resp.status == 400
                body = await resp.json()
                assert body["error"]["message"]

        # duplicate transaction: committed once, then offered again in a new batch
        [ok] = await submit_and_wait(client, [make_batch(SIGNER, [good_txn])])
        assert ok["status"] == "COMMITTED"
        # (a new batch: the same batch again would be a harmless idempotent resubmission)
        again = make_batch(SIGNER, [intkey.make_intkey_transaction(SIGNER, "set", "fresh", 1), good_txn])
        with pytest.raises(RestError):
            await client.submit_batches([again])
        [status] = await client.batch_statuses([again.header_signature])
        assert "already committed" in invalid_message(status)

        # unknown dependency
        dependent = intkey.make_intkey_transaction(SIGNER, "set", "delta", 1, dependencies=["ab" * 64])
        [status] = await submit_and_wait(client, [make_batch(SIGNER, [dependent])])
        assert status["status"] == "INVALID" and "neither committed nor pending" in invalid_message(status)

        # a dependency that is committed is fine
        first = intkey.make_intkey_transaction(SIGNER, "set", "eps", 1)
        second = intkey.make_intkey_transaction(SIGNER, "inc", "eps", 1, dependencies=[first.header_signature])
        statuses = await submit_and_wait(client, [make_batch(SIGNER, [first]), make_batch(SIGNER, [second])])
        assert [s["status"] for s in statuses] == ["COMMITTED", "COMMITTED"]
        assert cbor.decode(await client.get_state(intkey.address("eps"))) == {"eps": 2}

        # still serving after all of that
        [ok] = await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "zeta", 7))])
        assert ok["status"] == "COMMITTED"


class WritesOutsideOutputs(TransactionHandler):
    family_name = "rogue"
    family_versions = ["1.0"]
    namespaces = ["abcdef"]

    async def apply(self, transaction, context):
        await context.set_state({"abcdef" + "1" * 64: b"x"})  # outputs only allow abcdef00...


async def test_write_outside_declared_outputs_is_an_authorization_error(devnet):
    async with running_processor(devnet.component_url, WritesOutsideOutputs()), rest(devnet.rest_url) as client:
        txn = make_transaction(SIGNER, "rogue", "1.0", b"x", ["abcdef00"], ["abcdef00"])
        [status] = await submit_and_wait(client, [make_batch(SIGNER, [txn])])
        assert status["status"] == "INVALID"
        assert "outside" in invalid_message(status) and "abcdef1111" in invalid_message(status)


class FlakyHandler(TransactionHandler):
    """Fails with an internal error twice, then succeeds: the validator must retry."""

    family_name = "flaky"
    family_versions = ["1.0"]
    namespaces = ["f1a4e0"]

    def __init__(self):
        self.calls = 0

    async def apply(self, transaction, context):
        self.calls += 1
        if self.calls <= 2:
            raise InternalError("database warming up")
        await context.set_state({"f1a4e0" + "0" * 64: b"done"})


async def test_internal_error_is_retried_until_it_succeeds(devnet):
    handler = FlakyHandler()
    async with running_processor(devnet.component_url, handler), rest(devnet.rest_url) as client:
        txn = make_transaction(SIGNER, "flaky", "1.0", b"x", ["f1a4e0"], ["f1a4e0"])
        [status] = await submit_and_wait(client, [make_batch(SIGNER, [txn])])
        assert status["status"] == "COMMITTED"
        assert handler.calls == 3
        assert await client.get_state("f1a4e0" + "0" * 64) == b"done"
    assert "internal error" in devnet.log()


async def test_unregistered_family_is_reported_not_parked(start_devnet):
    node = start_devnet("--missing-processor-grace", "1")
    async with running_processor(node.component_url), rest(node.rest_url) as client:
        txn = make_transaction(SIGNER, "nobody", "1.0", b"x", ["0a0b0c"], ["0a0b0c"])
        [status] = await submit_and_wait(client, [make_batch(SIGNER, [txn])])
        assert status["status"] == "INVALID"
        assert "no transaction processor is registered for family 'nobody'" in invalid_message(status)
        # other families were not held up
        [ok] = await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "k", 1))])
        assert ok["status"] == "COMMITTED"
    assert "no transaction processor registered for family 'nobody'" in node.log()


async def test_events_block_commit_state_delta_and_processor_events(devnet):
    async with running_processor(devnet.component_url), rest(devnet.rest_url) as client:
        subscriber = EventSubscriber(devnet.component_url, [
            state_delta_subscription([intkey.NAMESPACE]),
            event_subscription("intkey/changed"),
        ])
        await subscriber.start()
        try:
            await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "ev", 5))])
            block = await asyncio.wait_for(subscriber.next_block(), 10)
            assert block.block_num == 1
            [delta] = block.of_type("sawtooth/state-delta")
            # As in Sawtooth, the filter selects the event; the event carries the block's whole delta.
            changes = {c.address: c for c in pb.StateChangeList.FromString(delta.data).state_changes}
            assert cbor.decode(changes[intkey.address("ev")].value) == {"ev": 5}
            assert changes[intkey.address("ev")].type == pb.StateChange.SET
            [changed] = block.of_type("intkey/changed")
            assert {a.key: a.value for a in changed.attributes} == {"name": "ev", "value": "5"}
        finally:
            await subscriber.close()


class ReadsBlockInfo(TransactionHandler):
    """Records the agreed timestamp of the latest block, as a federation round clock would."""

    family_name = "clock"
    family_versions = ["1.0"]
    namespaces = ["c10c00"]

    async def apply(self, transaction, context):
        timestamp = await latest_block_timestamp(context)
        await context.set_state({"c10c00" + "0" * 64: str(timestamp).encode()})


async def test_processors_can_read_block_info_timestamps(devnet):
    async with running_processor(devnet.component_url, ReadsBlockInfo(), intkey.IntkeyHandler()), \
            rest(devnet.rest_url) as client:
        # a block before the clock's (with its processor at hand: no wait for a missing one's grace)
        await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "x", 1))], raise_invalid=True)
        txn = make_transaction(SIGNER, "clock", "1.0", b"t", [BLOCK_INFO_NS, "c10c00"], ["c10c00"])
        [status] = await submit_and_wait(client, [make_batch(SIGNER, [txn])])
        assert status["status"] == "COMMITTED", status
        stamp = int(await client.get_state("c10c00" + "0" * 64))
        assert stamp > 1_600_000_000
        assert await client.get_state(CONFIG_ADDRESS) is not None


async def test_back_pressure_answers_429_and_client_retries(start_devnet):
    node = start_devnet("--max-pending-batches", "2", "--max-batches-per-block", "1")
    async with running_processor(node.component_url), rest(node.rest_url, retries=0) as raw:
        batches = [intkey_batch(SIGNER, ("set", f"bp{i}", i)) for i in range(30)]
        results = await asyncio.gather(*(raw.submit_batches([b]) for b in batches), return_exceptions=True)
        refused = [r for r in results if isinstance(r, RestError)]
        assert refused and all(r.status == 429 for r in refused)
    async with running_processor(node.component_url), rest(node.rest_url, retries=30, backoff=0.05) as patient:
        batches = [intkey_batch(SIGNER, ("set", f"r{i}", i)) for i in range(10)]
        ids = [i for ids in await asyncio.gather(*(patient.submit_batches([b]) for b in batches)) for i in ids]
        statuses = await patient.wait_for_batches(ids, 60)
        assert all(s["status"] == "COMMITTED" for s in statuses)


def test_state_root_is_reproducible_from_the_same_batches(tmp_path):
    """Two fresh validators fed the same batches agree on every state root (no BlockInfo: it
    carries wall-clock timestamps, which differ between runs by design)."""
    from helpers.devnet_process import DevnetProcess

    batches = [intkey_batch(SIGNER, ("set", f"n{i}", i), ("inc", f"n{i}", 1)) for i in range(6)]
    roots = []
    for name in ("a", "b"):
        node = DevnetProcess(tmp_path / name, "--no-block-info", "--max-batches-per-block", "2").start()
        try:
            async def scenario():
                async with running_processor(node.component_url), rest(node.rest_url) as client:
                    for pair in (batches[0:2], batches[2:4], batches[4:6]):
                        await submit_and_wait(client, pair)
                    return [b["header"]["state_root_hash"] async for b in client.list_blocks()]

            roots.append(run(scenario()))
        finally:
            node.stop()
    assert roots[0] == roots[1]
    assert len(set(roots[0])) == len(roots[0])  # every block changed the state


async def test_restart_after_kill_keeps_chain_and_peers_reconnect(start_devnet):
    node = start_devnet()
    async with running_processor(node.component_url), rest(node.rest_url, retries=40, backoff=0.1) as client:
        subscriber = EventSubscriber(node.component_url, [event_subscription("intkey/changed")])
        await subscriber.start()
        await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "p", 1))])
        first = await asyncio.wait_for(subscriber.next_block(), 10)
        head_before = await client.head()

        await asyncio.get_running_loop().run_in_executor(None, node.kill)  # kill -9
        await asyncio.get_running_loop().run_in_executor(None, node.start)

        head_after = await client.head()
        assert head_after["header_signature"] == head_before["header_signature"]
        assert head_after["header"]["state_root_hash"] == head_before["header"]["state_root_hash"]

        # the processor re-registers and the subscriber resumes by itself
        await submit_and_wait(client, [intkey_batch(SIGNER, ("inc", "p", 1))], timeout=60)
        assert cbor.decode(await client.get_state(intkey.address("p"))) == {"p": 2}
        second = await asyncio.wait_for(subscriber.next_block(), 20)
        assert second.block_num == first.block_num + 1
        assert second.previous_block_id == first.block_id
        await subscriber.close()


async def test_parallel_execution_equals_serial_order_and_failed_batches_leak_nothing(start_devnet):
    """Many batches in one block touching the same key: the result is the serial one, and a
    batch that fails after writing leaves no trace for the batches after it."""
    node = start_devnet("--max-batches-per-block", "100")
    async with running_processor(node.component_url, max_occupancy=16), rest(node.rest_url) as client:
        await submit_and_wait(client, [intkey_batch(SIGNER, ("set", "shared", 0), ("set", "other", 0))])
        batches = []
        for i in range(30):
            if i == 10:  # writes shared (+1000), then fails: must be rolled back whole
                batches.append(intkey_batch(SIGNER, ("inc", "shared", 1000), ("dec", "other", 5)))
            elif i % 3 == 0:
                batches.append(intkey_batch(SIGNER, ("set", f"solo{i}", i)))  # independent
            else:
                batches.append(intkey_batch(SIGNER, ("inc", "shared", 1)))
        statuses = await submit_and_wait(client, batches)
        by_id = {s["id"]: s["status"] for s in statuses}
        assert by_id[batches[10].header_signature] == "INVALID"
        assert sum(v == "COMMITTED" for v in by_id.values()) == 29
        expected = sum(1 for i in range(30) if i != 10 and i % 3 != 0)
        assert cbor.decode(await client.get_state(intkey.address("shared"))) == {"shared": expected}
        blocks = [b async for b in client.list_blocks()]
        assert len(blocks) <= 4  # they really were executed together, not one block each


def test_submissions_are_checked_off_the_event_loop_and_queued_in_arrival_order(monkeypatch):
    """Signature checks run on the endpoint's one worker thread (without the GIL, while the
    loop goes on); a big submission checked first is still queued before a small later one."""
    import threading

    from trustmesh.ledger.devnet import component_endpoint as ce
    from trustmesh.ledger.devnet.chain import ChainSettings
    from trustmesh.ledger.devnet.processors import ProcessorRegistry

    checked_on = []
    real_check = ce.check_batches

    def recording_check(batches, limits):
        checked_on.append(threading.current_thread())
        return real_check(batches, limits)

    monkeypatch.setattr(ce, "check_batches", recording_check)
    queued = []

    class Chain:
        settings = ChainSettings()

        def submit(self, batches, checks):
            assert all(c.batch is b for b, c in zip(batches, checks))  # checked, in order
            queued.append([b.header_signature for b in batches])
            return []

    signer = PrivateKey.generate()
    big = [intkey_batch(signer, ("set", f"big{i}", i)) for i in range(30)]
    small = [intkey_batch(signer, ("set", "small", 1))]

    def request(batches):
        body = pb.ClientBatchSubmitRequest(batches=batches).SerializeToString()
        return pb.Message(message_type=pb.Message.CLIENT_BATCH_SUBMIT_REQUEST, correlation_id="c", content=body)

    async def scenario():
        endpoint = ce.ComponentEndpoint("tcp://127.0.0.1:0", Chain(), ProcessorRegistry(), None, None)
        try:
            await asyncio.gather(endpoint._batch_submit(b"peer", request(big)),
                                 endpoint._batch_submit(b"peer", request(small)))
        finally:
            await endpoint.close()
        return threading.current_thread()

    loop_thread = run(scenario())
    assert queued == [[b.header_signature for b in big], [small[0].header_signature]]
    assert checked_on and all(t is not loop_thread for t in checked_on)


async def test_the_rest_api_in_the_validators_process_asks_its_queries_directly(tmp_path):
    """An in-process REST API answers client queries through the validator's query handler in
    place, not through its ZMQ endpoint; a REST API in its own process (create_app without
    `queries`) gets the same bodies over ZMQ."""
    from trustmesh.ledger.devnet.chain import ChainSettings
    from trustmesh.ledger.devnet.node import DevnetConfig, DevValidator
    from trustmesh.ledger.devnet.rest_api import start_rest_api

    validator = DevValidator(DevnetConfig(data_dir=tmp_path / "chain", endpoint="tcp://127.0.0.1:0", rest_port=0,
                                          block_info=False, chain=ChainSettings()))
    await validator.start()
    over_zmq = await start_rest_api(validator.component_url, "127.0.0.1", 0)
    asked = []
    handle = validator.endpoint._client_query
    validator.endpoint._client_query = lambda identity, message: asked.append(message.message_type) or handle(
        identity, message)
    try:
        signer = PrivateKey.generate()
        async with running_processor(validator.component_url), rest(validator.rest_url) as direct, \
                rest(f"http://127.0.0.1:{over_zmq.port}") as remote:
            await submit_and_wait(direct, [intkey_batch(signer, ("set", "k", 7))], raise_invalid=True)
            address = intkey.address("k")
            head = (await direct.head())["header_signature"]
            answers = [await direct.get_state(address, head=head), [b async for b in direct.list_state(address[:6])]]
            assert cbor.decode(answers[0]) == {"k": 7}
            assert asked == [], "the in-process REST API went through the endpoint"
            assert [await remote.get_state(address, head=head), [b async for b in remote.list_state(address[:6])]] \
                == answers
            assert asked, "a REST API in its own process asks over ZMQ"
    finally:
        validator.endpoint._client_query = handle
        await over_zmq.close()
        await validator.stop()
