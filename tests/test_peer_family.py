"""trustmesh-peer: registry records, the sorted index, events, every rule. Each rule table-driven on
dict state through the handler's apply() (helpers.dict_ledger); registration, events and a sample of
the refusals through the dev validator."""

from __future__ import annotations

import asyncio
import secrets

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.devnet_process import DevnetProcess
from helpers.dict_ledger import DictLedger
from helpers.ledger_helpers import rest, running_processor, submit_and_wait
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, peers, peers_rules
from trustmesh.scheduling.peers import PeerHandler, make_register_transaction, make_update_transaction


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    node = DevnetProcess(tmp_path_factory.mktemp("peer-family") / "devnet").start()
    yield node
    node.stop()


def x25519_key() -> str:
    return secrets.token_hex(32)


def message(status: dict) -> str:
    assert status["status"] == "INVALID", status
    return status["invalid_transactions"][0]["message"]


async def events_of(client, transaction) -> dict[str, dict[str, str]]:
    [receipt] = await client.get_receipts([transaction.header_signature])
    return {e["event_type"]: {a["key"]: a["value"] for a in e.get("attributes", [])} for e in receipt.get("events", [])}


def raw(signer, body, addresses=None, *, encode=True):
    """A trustmesh-peer transaction with any payload (to break the rules on purpose)."""
    node = signer.public_key().as_hex()
    addresses = addresses or [layout.peer_address(node), layout.PEER_INDEX_ADDRESS]
    data = cbor.encode(body) if encode else body
    return make_transaction(signer, layout.PEER_FAMILY, layout.VERSION, data, addresses, addresses)


def good_body(**changes):
    body = {"action": "register", "name": "node-x", "encryption_public_key": x25519_key(),
            "resources": {"cpu_cores": 4, "memory_mb": 8192}}
    body.update(changes)
    return body


async def index_of(client) -> list[str]:
    return peers.decode_peer_index(await client.get_state(layout.PEER_INDEX_ADDRESS))


async def test_register_writes_record_sorted_index_and_event(chain):
    nodes = [PrivateKey.generate() for _ in range(3)]
    keys = [x25519_key() for _ in nodes]

    async with running_processor(chain.component_url, PeerHandler()), rest(chain.rest_url) as client:
        before = await index_of(client)
        txns = [
            make_register_transaction(n, name=f"compute-{i}", encryption_public_key=k, cpu_cores=2 + i,
                                      memory_mb=4096, accelerator="nvidia-a100" if i == 0 else None)
            for i, (n, k) in enumerate(zip(nodes, keys))
        ]
        statuses = await submit_and_wait(client, [make_batch(n, [t]) for n, t in zip(nodes, txns)])
        assert [s["status"] for s in statuses] == ["COMMITTED"] * 3

        for i, (n, k) in enumerate(zip(nodes, keys)):
            node = n.public_key().as_hex()
            record = peers.decode_peer(await client.get_state(layout.peer_address(node)))
            resources = {"cpu_cores": 2 + i, "memory_mb": 4096}
            if i == 0:
                resources["accelerator"] = "nvidia-a100"
            assert record == {"node": node, "name": f"compute-{i}", "encryption_public_key": k,
                              "resources": resources, "revision": 1}

        index = await index_of(client)
        assert index == sorted(before + [n.public_key().as_hex() for n in nodes])

        events = await events_of(client, txns[0])
        assert events[peers.EVENT_REGISTERED] == {
            "node": nodes[0].public_key().as_hex(), "name": "compute-0", "encryption_public_key": keys[0],
            "cpu_cores": "2", "memory_mb": "4096", "accelerator": "nvidia-a100", "revision": "1",
        }
        assert "accelerator" not in (await events_of(client, txns[1]))[peers.EVENT_REGISTERED]


async def test_update_replaces_own_record_and_leaves_index():
    node = PrivateKey.generate()
    key = node.public_key().as_hex()
    client = DictLedger()  # the rule on dict state; registration and events through the validator above

    await client.submit_and_wait([make_batch(node, [make_register_transaction(
        node, name="small", encryption_public_key=x25519_key(), cpu_cores=1, memory_mb=512)])],
        raise_invalid=True)
    index = await index_of(client)
    new_key = x25519_key()
    update = make_update_transaction(node, name="bigger", encryption_public_key=new_key, cpu_cores=32,
                                     memory_mb=131072, accelerator="2x H100")
    # only the node's own records (registry and liveness: an update counts as seen), never the index
    assert list(update_header(update).outputs) == [layout.peer_address(key), layout.liveness_address(key)]
    [status] = await client.submit_and_wait([make_batch(node, [update])])
    assert status["status"] == "COMMITTED"
    record = peers.decode_peer(await client.get_state(layout.peer_address(key)))
    assert record == {"node": key, "name": "bigger", "encryption_public_key": new_key, "revision": 2,
                      "resources": {"cpu_cores": 32, "memory_mb": 131072, "accelerator": "2x H100"}}
    assert await index_of(client) == index
    event = (await events_of(client, update))[peers.EVENT_UPDATED]
    assert event["revision"] == "2" and event["node"] == key and event["name"] == "bigger"


def update_header(transaction):
    from trustmesh.ledger import protos as pb
    return pb.TransactionHeader.FromString(transaction.header)


P25519 = 2**255 - 19


def le_hex(value: int) -> str:
    return value.to_bytes(32, "little").hex()


OWNER = PrivateKey.generate()
OTHER = PrivateKey.generate()
OWNER_KEY = OWNER.public_key().as_hex()


def update_body(**changes):
    return good_body(action="update", **changes)


# (signer, transaction, expected fragment of the message); each rule on dict state, through the
# handler's apply(), after the owner registered
RULES = [
    (OWNER, lambda: raw(OWNER, good_body()), "is already registered"),
    (OTHER, lambda: raw(OTHER, update_body(), [layout.peer_address(OTHER.public_key().as_hex())]), "is not registered"),
    (OTHER, lambda: raw(OTHER, good_body(node=OWNER_KEY)), "the transaction's signer is the node"),
    (OTHER, lambda: raw(OTHER, good_body(action="delete")),
     "action must be one of heartbeat, register, update; got 'delete'"),
    (OTHER, lambda: raw(OTHER, good_body(extra=1)), "unknown field(s) 'extra'"),
    (OTHER, lambda: raw(OTHER, b"\xff\x00", encode=False), "not valid CBOR"),
    (OTHER, lambda: raw(OTHER, b"\xa1\x61a\x18\x01", encode=False), "not canonical"),
    (OTHER, lambda: raw(OTHER, [1, 2]), "must be a CBOR map"),
    (OTHER, lambda: raw(OTHER, {k: v for k, v in good_body().items() if k != "name"}), "lacks the required field 'name'"),
    (OTHER, lambda: raw(OTHER, good_body(name="bad name!")), "field 'name' must be an identifier"),
    (OTHER, lambda: raw(OTHER, good_body(encryption_public_key="ab" * 31)), "'encryption_public_key' must be a 32-byte"),
    (OTHER, lambda: raw(OTHER, good_body(encryption_public_key="AB" * 32)), "64 lowercase hex"),
    (OTHER, lambda: raw(OTHER, good_body(encryption_public_key=bytes(32))), "must be a string, got bytes"),
    (OTHER, lambda: raw(OTHER, good_body(encryption_public_key="00" * 32)), "small-order X25519 point"),
    (OTHER, lambda: raw(OTHER, good_body(encryption_public_key=le_hex(P25519 - 1))), "small-order X25519 point"),
    (OTHER, lambda: raw(OTHER, good_body(encryption_public_key=le_hex(P25519 + 1))), "small-order X25519 point"),
    (OTHER, lambda: raw(OTHER, good_body(resources=[4, 8192])), "'resources' must be a map"),
    (OTHER, lambda: raw(OTHER, good_body(resources={"cpu_cores": 0, "memory_mb": 1})),
     "resources field 'cpu_cores' must be between 1 and"),
    (OTHER, lambda: raw(OTHER, good_body(resources={"cpu_cores": 2, "memory_mb": True})),
     "resources field 'memory_mb' must be an integer, not a boolean"),
    (OTHER, lambda: raw(OTHER, good_body(resources={"cpu_cores": 2})), "resources lacks the required field 'memory_mb'"),
    (OTHER, lambda: raw(OTHER, good_body(resources={"cpu_cores": 2, "memory_mb": 1, "accelerator": 5})),
     "resources field 'accelerator' must be a string"),
    (OTHER, lambda: raw(OTHER, good_body(resources={"cpu_cores": 2, "memory_mb": 1, "accelerator": "x" * 65})),
     "resources field 'accelerator' must be 1-64 characters"),
    (OTHER, lambda: raw(OTHER, good_body(resources={"cpu_cores": 2, "memory_mb": 1, "gpu": "yes"})),
     "resources has unknown field(s) 'gpu'"),
]


@pytest.fixture(scope="module")
def owner_registered() -> dict[str, bytes]:
    """Dict state with OWNER registered (copied by each test)."""
    client = DictLedger()
    asyncio.run(client.submit_and_wait([make_batch(OWNER, [make_register_transaction(
        OWNER, name="owner", encryption_public_key=x25519_key(), cpu_cores=8, memory_mb=16384)])],
        raise_invalid=True))
    return client.state


@pytest.mark.parametrize("signer, transaction, expected", RULES, ids=[expected for _, _, expected in RULES])
def test_each_rule_refuses_with_a_clear_message(owner_registered, signer, transaction, expected):
    client = DictLedger(dict(owner_registered))
    before = dict(client.state)
    [status] = asyncio.run(client.submit_and_wait([make_batch(signer, [transaction()])]))
    assert expected in message(status), (expected, message(status))
    # nothing changed: the owner's record, the index, and no record for the other key
    assert client.state == before
    assert client.state.get(layout.peer_address(OTHER.public_key().as_hex())) is None


async def test_every_rule_refuses_through_the_dev_validator(chain):
    """The rules above as the validator reports them (a sample, submitted together), and the one
    the validator itself enforces: a write outside the transaction's declared addresses."""
    owner = PrivateKey.generate()
    other = PrivateKey.generate()
    owner_key = owner.public_key().as_hex()

    cases = [
        # (signer, transaction, expected fragment of the message)
        (owner, raw(owner, good_body()), "is already registered"),
        (other, raw(other, update_body(), [layout.peer_address(other.public_key().as_hex())]), "is not registered"),
        (other, raw(other, update_body(name="hijack"), [layout.peer_address(owner_key)]),
         "outside the transaction's declared inputs"),
        (other, raw(other, good_body(node=owner_key)), "the transaction's signer is the node"),
        (other, raw(other, b"\xff\x00", encode=False), "not valid CBOR"),
        (other, raw(other, good_body(encryption_public_key="00" * 32)), "small-order X25519 point"),
        (other, raw(other, good_body(resources={"cpu_cores": 0, "memory_mb": 1})),
         "resources field 'cpu_cores' must be between 1 and"),
    ]

    async with running_processor(chain.component_url, PeerHandler()), rest(chain.rest_url) as client:
        first = make_register_transaction(owner, name="owner", encryption_public_key=x25519_key(),
                                          cpu_cores=8, memory_mb=16384)
        await submit_and_wait(client, [make_batch(owner, [first])], raise_invalid=True)
        owner_record = await client.get_state(layout.peer_address(owner_key))
        index = await index_of(client)

        statuses = await submit_and_wait(client, [make_batch(s, [t]) for s, t, _ in cases])
        assert len(statuses) == len(cases)
        for (_, _, expected), status in zip(cases, statuses):
            assert expected in message(status), (expected, message(status))

        # nothing changed: the owner's record, the index, and no record for the other key
        assert await client.get_state(layout.peer_address(owner_key)) == owner_record
        assert await index_of(client) == index
        assert await client.get_state(layout.peer_address(other.public_key().as_hex())) is None


async def test_registry_is_bounded(monkeypatch):
    node = PrivateKey.generate()
    client = DictLedger()
    others = [PrivateKey.generate() for _ in range(2)]

    await client.submit_and_wait([make_batch(k, [make_register_transaction(
        k, name=f"n{i}", encryption_public_key=x25519_key(), cpu_cores=1, memory_mb=1)]) for i, k in enumerate(others)],
        raise_invalid=True)
    monkeypatch.setattr(peers_rules, "MAX_PEERS", len(await index_of(client)))  # what the handler reads
    txn = make_register_transaction(node, name="late", encryption_public_key=x25519_key(),
                                    cpu_cores=1, memory_mb=1)
    [status] = await client.submit_and_wait([make_batch(node, [txn])])
    assert "the peer registry is full" in message(status)


# --------------------------------------------------------------------------- any payload: InvalidTransaction only


class MemoryContext:
    """In-memory stand-in for a processor Context (the fuzz test only; the rules are tested above)."""

    def __init__(self):
        self.state: dict[str, bytes] = {}

    async def get_state(self, addresses):
        return {a: self.state[a] for a in addresses if a in self.state}

    async def set_state(self, entries):
        self.state.update(entries)
        return list(entries)

    async def add_event(self, event_type, attributes=(), data=b""):
        assert all(isinstance(v, str) for _, v in attributes)


class Txn:
    def __init__(self, payload: bytes, signer: str):
        from trustmesh.ledger import protos as pb
        self.payload = payload
        self.header = pb.TransactionHeader(signer_public_key=signer)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(), st.text(max_size=70), st.binary(max_size=40),
                    st.sampled_from(["ab" * 32, "00" * 32, "node-1", "nvidia-a100"]))
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["cpu_cores", "memory_mb", "accelerator", "gpu"]) | st.text(max_size=5), inner, max_size=4),
    max_leaves=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(action=st.sampled_from(["register", "update", "heartbeat", "other"]),
       fields=st.dictionaries(st.sampled_from(["name", "encryption_public_key", "resources", "node", "extra"]),
                              VALUES, max_size=5))
def test_any_payload_is_applied_or_refused_as_invalid(action, fields):
    try:
        payload = cbor.encode({"action": action, **fields})
    except cbor.PayloadError:
        return
    signer = PrivateKey.generate().public_key().as_hex()
    try:
        asyncio.run(PeerHandler().apply(Txn(payload, signer), MemoryContext()))
    except InvalidTransaction as exc:
        assert str(exc)
