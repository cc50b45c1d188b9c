"""Interoperability with code we did not write: the reference sawtooth-sdk 1.2.5 processor."""

from __future__ import annotations

import base64
import hashlib
import pathlib
import signal
import subprocess

import pytest

from helpers.ledger_helpers import rest, run, submit_and_wait
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.events import EventSubscriber, event_subscription
from trustmesh.ledger.signing import PrivateKey

ROOT = pathlib.Path(__file__).resolve().parents[1]
SDK_PYTHON = ROOT / ".venv-sdk38" / "bin" / "python"
SCRIPT = ROOT / "tests" / "interop" / "sdk_processor.py"
NAMESPACE = hashlib.sha512(b"sdkcounter").hexdigest()[:6]
ADDRESS = NAMESPACE + "0" * 64

if not SDK_PYTHON.exists():
    pytest.skip(
        "CPython 3.8 with sawtooth-sdk 1.2.5 is not installed (.venv-sdk38; scripts/install makes it "
        "where pyenv has 3.8.18)", allow_module_level=True,
    )


def _counter_txn(signer, delta):
    return make_transaction(signer, "sdkcounter", "1.0", str(delta).encode(), [NAMESPACE], [NAMESPACE])


@pytest.mark.parametrize("header_style", ["expanded", "raw"])
def test_reference_sdk_processor_commits_through_the_dev_validator(devnet, tmp_path, header_style):
    log = open(tmp_path / "sdk.log", "wb")
    proc = subprocess.Popen([str(SDK_PYTHON), str(SCRIPT), devnet.component_url, header_style],
                            stdout=log, stderr=subprocess.STDOUT)
    signer = PrivateKey.generate()
    try:
        async def scenario():
            async with rest(devnet.rest_url) as client:
                subscriber = EventSubscriber(devnet.component_url, [event_subscription("sdkcounter/updated")])
                await subscriber.start()
                first, second = _counter_txn(signer, 5), _counter_txn(signer, 3)
                statuses = await submit_and_wait(client, [make_batch(signer, [first]), make_batch(signer, [second])],
                                                 timeout=60)
                assert [s["status"] for s in statuses] == ["COMMITTED", "COMMITTED"]
                assert await client.get_state(ADDRESS) == b"8"
                # the SDK's InvalidTransaction message reaches batch_statuses
                [bad] = await submit_and_wait(client, [make_batch(signer, [_counter_txn(signer, -100)])])
                assert bad["status"] == "INVALID"
                assert bad["invalid_transactions"][0]["message"] == "counter would go negative: -92"
                # its events and receipt data were recorded
                seen = []
                while sum(len(b.of_type("sdkcounter/updated")) for b in seen) < 2:
                    seen.append(await subscriber.next_block())
                totals = [a.value for b in seen for e in b.of_type("sdkcounter/updated") for a in e.attributes]
                assert totals == ["5", "8"]
                [receipt] = await client.get_receipts([first.header_signature])
                assert receipt["data"] == [base64.b64encode(b"counted").decode()]
                assert receipt["state_changes"][0]["address"] == ADDRESS
                await subscriber.close()

        run(scenario(), timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert "registered" in devnet.log() or "processor registered" in devnet.log()
