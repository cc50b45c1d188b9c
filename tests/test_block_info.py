"""block_info family: the injector's batch and the handler's state transition.

The handler is a pure function of payload and state, so a dict-backed Context that enforces the
transaction's declared inputs/outputs (as the validator does) exercises the real thing.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.ledger import protos as pb
from trustmesh.ledger.devnet import block_info as bi
from trustmesh.ledger.processor import AuthorizationError, InternalError, InvalidTransaction
from trustmesh.ledger.signing import PrivateKey, verify

VALIDATOR_KEY = PrivateKey(bytes.fromhex("11" * 32))
T0 = 1_700_000_000


class DictContext:
    """In-memory Context: reads/writes only what the transaction declared, like the validator."""

    def __init__(self, state: dict[str, bytes], inputs=("",), outputs=("",)):
        self.state = state
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.events: list = []
        self.receipts: list[bytes] = []

    def _authorize(self, addresses, allowed, what):
        for address in addresses:
            if not any(address.startswith(p) for p in allowed):
                raise AuthorizationError(f"{what} of {address}: not declared by the transaction")

    async def get_state(self, addresses):
        self._authorize(addresses, self.inputs, "read")
        return {a: self.state[a] for a in addresses if a in self.state}

    async def set_state(self, entries):
        self._authorize(entries, self.outputs, "write")
        self.state.update(entries)
        return list(entries)

    async def delete_state(self, addresses):
        self._authorize(addresses, self.outputs, "delete")
        return [a for a in addresses if self.state.pop(a, None) is not None]

    async def add_event(self, event_type, attributes=(), data=b""):
        self.events.append((event_type, list(attributes), data))

    async def add_receipt_data(self, data):
        self.receipts.append(data)


def run(coro):
    return asyncio.run(coro)


def make_block(block_num: int, previous_block_id: str, batch_ids=()) -> "pb.Block":
    header = pb.BlockHeader(
        block_num=block_num,
        previous_block_id=previous_block_id,
        signer_public_key=VALIDATOR_KEY.public_key().as_hex(),
        batch_ids=list(batch_ids),
        state_root_hash="ab" * 32,
    ).SerializeToString()
    return pb.Block(header=header, header_signature=VALIDATOR_KEY.sign(header))


GENESIS = make_block(0, bi.NULL_BLOCK_ID)


def request_for(txn: "pb.Transaction") -> "pb.TpProcessRequest":
    header = pb.TransactionHeader.FromString(txn.header)
    return pb.TpProcessRequest(header=header, payload=txn.payload, signature=txn.header_signature, context_id="c")


def apply_txn(state: dict, txn: "pb.Transaction", handler=None) -> DictContext:
    header = pb.TransactionHeader.FromString(txn.header)
    context = DictContext(state, header.inputs, header.outputs)
    run((handler or bi.BlockInfoHandler()).apply(request_for(txn), context))
    return context


def apply_payload(state: dict, payload: bytes, handler=None) -> None:
    run((handler or bi.BlockInfoHandler()).apply(pb.TpProcessRequest(payload=payload), DictContext(state)))


def build_chain(state: dict, count: int, *, first_target_count: int = 0, timestamps=None):
    """Inject and apply `count` block_info batches; returns the list of blocks (genesis first)."""
    blocks = [GENESIS]
    for i in range(count):
        head = blocks[-1]
        ts = timestamps[i] if timestamps else T0 + 10 * i
        batch = bi.make_block_info_batch(
            VALIDATOR_KEY, head, ts, target_count=first_target_count if i == 0 else 0
        )
        apply_txn(state, batch.transactions[0])
        head_num = pb.BlockHeader.FromString(head.header).block_num
        blocks.append(make_block(head_num + 1, head.header_signature, [batch.header_signature]))
    return blocks


def stored_config(state) -> "pb.BlockInfoConfig":
    return pb.BlockInfoConfig.FromString(state[bi.CONFIG_ADDRESS])


def stored_block_nums(state) -> list[int]:
    return sorted(int(a[8:], 16) for a in state if a.startswith(bi.BLOCK_INFO_NAMESPACE))


def valid_block_info(**overrides) -> "pb.BlockInfo":
    fields = dict(
        block_num=0,
        previous_block_id=bi.NULL_BLOCK_ID,
        signer_public_key=VALIDATOR_KEY.public_key().as_hex(),
        header_signature="cd" * 64,
        timestamp=T0,
    )
    fields.update(overrides)
    return pb.BlockInfo(**fields)


# --------------------------------------------------------------------------- addresses


def test_addresses_match_reference_layout():
    assert bi.CONFIG_ADDRESS == "00b10c01" + "0" * 62
    assert len(bi.CONFIG_ADDRESS) == 70
    for n in (0, 1, 255, 4096, 2**64 - 1):
        # The formula the reference documents: '00b10c00' + hex(block_num)[2:].zfill(62)
        assert bi.block_info_address(n) == "00b10c00" + hex(n)[2:].zfill(62)
        assert len(bi.block_info_address(n)) == 70
    with pytest.raises(ValueError):
        bi.block_info_address(-1)
    with pytest.raises(ValueError):
        bi.block_info_address(2**64)
    with pytest.raises(TypeError):
        bi.block_info_address(True)


def test_handler_identity():
    handler = bi.BlockInfoHandler()
    assert handler.family_name == "block_info"
    assert handler.family_versions == ["1.0"]
    assert handler.namespaces == ["00b10c"]


# --------------------------------------------------------------------------- injector


def test_injected_batch_matches_reference_injector():
    head = make_block(7, "ef" * 64)
    batch = bi.make_block_info_batch(VALIDATOR_KEY, head, T0)
    public_key = VALIDATOR_KEY.public_key().as_hex()

    assert len(batch.transactions) == 1
    txn = batch.transactions[0]
    header = pb.TransactionHeader.FromString(txn.header)
    assert header.family_name == "block_info"
    assert header.family_version == "1.0"
    assert list(header.inputs) == [bi.CONFIG_ADDRESS, "00b10c00"]
    assert list(header.outputs) == [bi.CONFIG_ADDRESS, "00b10c00"]
    assert list(header.dependencies) == []
    assert header.nonce == ""
    assert header.signer_public_key == public_key
    assert header.batcher_public_key == public_key
    assert header.payload_sha512 == hashlib.sha512(txn.payload).hexdigest()
    assert verify(public_key, txn.header_signature, txn.header)

    batch_header = pb.BatchHeader.FromString(batch.header)
    assert batch_header.signer_public_key == public_key
    assert list(batch_header.transaction_ids) == [txn.header_signature]
    assert verify(public_key, batch.header_signature, batch.header)


def test_payload_round_trip_describes_previous_block():
    head = make_block(7, "ef" * 64)
    batch = bi.make_block_info_batch(VALIDATOR_KEY, head, T0 + 5)
    payload = pb.BlockInfoTxn.FromString(batch.transactions[0].payload)

    assert payload.block == pb.BlockInfo(
        block_num=7,
        previous_block_id="ef" * 64,
        signer_public_key=VALIDATOR_KEY.public_key().as_hex(),
        header_signature=head.header_signature,
        timestamp=T0 + 5,
    )
    # Like the reference injector: config fields left unset, so the handler's defaults apply.
    assert payload.target_count == 0 and payload.sync_tolerance == 0
    assert payload == bi.parse_payload(payload.SerializeToString())

    changed = bi.make_block_info_batch(VALIDATOR_KEY, head, T0, target_count=9, sync_tolerance=30)
    changed_payload = pb.BlockInfoTxn.FromString(changed.transactions[0].payload)
    assert (changed_payload.target_count, changed_payload.sync_tolerance) == (9, 30)


def test_injection_is_reproducible():
    # No nonce: the same head and time give the same transaction id (reference behaviour).
    a = bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, T0)
    b = bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, T0)
    assert a.transactions[0].header_signature == b.transactions[0].header_signature
    c = bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, T0 + 1)
    assert c.transactions[0].header_signature != a.transactions[0].header_signature


@pytest.mark.parametrize("timestamp", [-1, 2**64])
def test_injector_rejects_out_of_range_timestamp(timestamp):
    with pytest.raises(ValueError, match="timestamp"):
        bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, timestamp)


def test_injector_rejects_float_timestamp():
    with pytest.raises(TypeError, match="timestamp"):
        bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, 1.5)


# --------------------------------------------------------------------------- handler: valid chains


def test_first_injection_creates_default_config():
    state: dict[str, bytes] = {}
    batch = bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, T0)
    context = apply_txn(state, batch.transactions[0])

    assert stored_config(state) == pb.BlockInfoConfig(
        latest_block=0, oldest_block=0, target_count=256, sync_tolerance=300
    )
    stored = pb.BlockInfo.FromString(state[bi.block_info_address(0)])
    assert stored == pb.BlockInfoTxn.FromString(batch.transactions[0].payload).block
    assert set(state) == {bi.CONFIG_ADDRESS, bi.block_info_address(0)}
    assert context.events == [] and context.receipts == []  # the reference emits neither


def test_chain_of_blocks_keeps_defaults_and_every_entry():
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 4)
    assert stored_config(state) == pb.BlockInfoConfig(
        latest_block=3, oldest_block=0, target_count=256, sync_tolerance=300
    )
    assert stored_block_nums(state) == [0, 1, 2, 3]
    for n in range(4):
        info = pb.BlockInfo.FromString(state[bi.block_info_address(n)])
        assert info.block_num == n
        assert info.header_signature == blocks[n].header_signature
        assert info.timestamp == T0 + 10 * n


def test_old_entries_are_pruned_beyond_target_count():
    state: dict[str, bytes] = {}
    build_chain(state, 10, first_target_count=3)
    # The reference keeps target_count + 1 entries: latest - target_count .. latest.
    assert stored_config(state) == pb.BlockInfoConfig(
        latest_block=9, oldest_block=6, target_count=3, sync_tolerance=300
    )
    assert stored_block_nums(state) == [6, 7, 8, 9]


def test_lowering_target_count_prunes_several_entries_at_once():
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 6)
    batch = bi.make_block_info_batch(VALIDATOR_KEY, blocks[-1], T0 + 100, target_count=2, sync_tolerance=60)
    apply_txn(state, batch.transactions[0])
    assert stored_config(state) == pb.BlockInfoConfig(
        latest_block=6, oldest_block=4, target_count=2, sync_tolerance=60
    )
    assert stored_block_nums(state) == [4, 5, 6]


def test_equal_timestamp_is_accepted():
    state: dict[str, bytes] = {}
    build_chain(state, 3, timestamps=[T0, T0, T0])
    assert stored_config(state).latest_block == 2


def test_unknown_payload_fields_never_reach_state():
    info = pb.BlockInfo.FromString(valid_block_info().SerializeToString() + b"\x78\x01")  # field 15
    payload = pb.BlockInfoTxn(block=info).SerializeToString()
    state: dict[str, bytes] = {}
    apply_payload(state, payload)
    assert state[bi.block_info_address(0)] == valid_block_info().SerializeToString()


def test_stored_config_bytes_are_canonical():
    state: dict[str, bytes] = {}
    build_chain(state, 2)
    assert state[bi.CONFIG_ADDRESS] == pb.BlockInfoConfig(
        latest_block=1, oldest_block=0, target_count=256, sync_tolerance=300
    ).SerializeToString()


def test_zero_config_fields_in_state_read_as_defaults():
    state = {
        bi.CONFIG_ADDRESS: pb.BlockInfoConfig(latest_block=0).SerializeToString(),
        bi.block_info_address(0): valid_block_info().SerializeToString(),
    }
    apply_payload(state, pb.BlockInfoTxn(block=valid_block_info(
        block_num=1, previous_block_id="cd" * 64, header_signature="ee" * 64)).SerializeToString())
    config = stored_config(state)
    assert (config.target_count, config.sync_tolerance) == (256, 300)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=6), min_size=1, max_size=25))
def test_stored_entries_are_always_oldest_through_latest(target_counts):
    state: dict[str, bytes] = {}
    head = GENESIS
    for i, target_count in enumerate(target_counts):
        batch = bi.make_block_info_batch(VALIDATOR_KEY, head, T0 + i, target_count=target_count)
        apply_txn(state, batch.transactions[0])
        head = make_block(i + 1, head.header_signature)
        config = stored_config(state)
        assert config.latest_block == i
        assert stored_block_nums(state) == list(range(config.oldest_block, config.latest_block + 1))
        assert config.latest_block - config.oldest_block <= config.target_count


# --------------------------------------------------------------------------- handler: invalid cases


def test_garbage_payload_is_rejected():
    with pytest.raises(InvalidTransaction, match="not a BlockInfoTxn protobuf"):
        apply_payload({}, b"\xff\xff\xff")


def test_empty_payload_is_rejected():
    with pytest.raises(InvalidTransaction, match="invalid previous_block_id ''"):
        apply_payload({}, b"")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("previous_block_id", "ab" * 63, "invalid previous_block_id"),
        ("previous_block_id", "zz" * 64, "invalid previous_block_id"),
        ("previous_block_id", " " + "ab" * 63 + "a", "invalid previous_block_id"),
        ("previous_block_id", "0" * 15, "invalid previous_block_id"),
        ("signer_public_key", "02" + "ab" * 31, "invalid signer_public_key"),
        ("signer_public_key", "", "invalid signer_public_key"),
        ("header_signature", "cd" * 64 + "\n", "invalid header_signature"),
        ("header_signature", "", "invalid header_signature"),
    ],
)
def test_malformed_block_fields_are_rejected(field, value, message):
    payload = pb.BlockInfoTxn(block=valid_block_info(**{field: value})).SerializeToString()
    state: dict[str, bytes] = {}
    with pytest.raises(InvalidTransaction, match=message):
        apply_payload(state, payload)
    assert state == {}


def test_uppercase_hex_is_accepted_as_in_the_reference():
    payload = pb.BlockInfoTxn(block=valid_block_info(header_signature="CD" * 64)).SerializeToString()
    apply_payload({}, payload)


def _next_info(blocks, timestamp=T0 + 1000) -> "pb.BlockInfo":
    return bi.block_info_of(blocks[-1], timestamp)


def _reject(state, info, message):
    before = dict(state)
    with pytest.raises(InvalidTransaction, match=message) as caught:
        apply_payload(state, pb.BlockInfoTxn(block=info).SerializeToString())
    assert state == before  # nothing written before the rejection
    return str(caught.value)


@pytest.mark.parametrize("block_num", [2, 4, 0])  # replay, skip ahead, restart from zero
def test_wrong_block_num_is_rejected(block_num):
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 3)  # latest stored block is 2, so 3 comes next
    info = _next_info(blocks)
    info.block_num = block_num
    text = _reject(state, info, f"block_num is {block_num}")
    assert "latest one in block_info state (2) is 3" in text


def test_wrong_previous_block_id_is_rejected():
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 3)
    info = _next_info(blocks)
    info.previous_block_id = "99" * 64
    text = _reject(state, info, "does not match the id of block 2")
    assert blocks[2].header_signature in text


def test_backwards_timestamp_is_rejected():
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 3)  # block 2 stored with T0 + 20
    info = _next_info(blocks, timestamp=T0 + 19)
    _reject(state, info, f"timestamp {T0 + 19} is earlier than the previous block's {T0 + 20}")


def test_same_transaction_applied_twice_is_rejected():
    state: dict[str, bytes] = {}
    batch = bi.make_block_info_batch(VALIDATOR_KEY, GENESIS, T0)
    apply_txn(state, batch.transactions[0])
    with pytest.raises(InvalidTransaction, match="block_num is 0"):
        apply_txn(state, batch.transactions[0])


def test_missing_latest_entry_is_a_state_error_not_an_invalid_transaction():
    state = {bi.CONFIG_ADDRESS: pb.BlockInfoConfig(latest_block=5, oldest_block=0).SerializeToString()}
    info = valid_block_info(block_num=6, previous_block_id="ab" * 64)
    with pytest.raises(bi.BlockInfoStateError, match="latest block 5 not found") as caught:
        apply_payload(state, pb.BlockInfoTxn(block=info).SerializeToString())
    assert isinstance(caught.value, InternalError) and not isinstance(caught.value, InvalidTransaction)


# --------------------------------------------------------------------------- clock rule


def test_default_handler_ignores_the_wall_clock():
    # Deterministic: a far-future timestamp is not the handler's business by default.
    apply_payload({}, pb.BlockInfoTxn(block=valid_block_info(timestamp=2**63)).SerializeToString())


def test_opt_in_clock_applies_the_reference_rule():
    handler = bi.BlockInfoHandler(clock=lambda: T0 + 0.9)
    ok = pb.BlockInfoTxn(block=valid_block_info(timestamp=T0 + 300)).SerializeToString()
    apply_payload({}, ok, handler)
    too_far = pb.BlockInfoTxn(block=valid_block_info(timestamp=T0 + 301)).SerializeToString()
    with pytest.raises(InvalidTransaction, match="more than the sync tolerance of 300s"):
        apply_payload({}, too_far, handler)


def test_clock_rule_uses_the_updated_sync_tolerance():
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 1)
    payload = pb.BlockInfoTxn(block=_next_info(blocks, T0 + 50), sync_tolerance=10).SerializeToString()
    with pytest.raises(InvalidTransaction, match="sync tolerance of 10s"):
        apply_payload(state, payload, bi.BlockInfoHandler(clock=lambda: T0))


def test_check_timestamp_not_ahead():
    bi.check_timestamp_not_ahead(T0 + 300, 300, T0)
    with pytest.raises(InvalidTransaction, match="ahead of this node's clock"):
        bi.check_timestamp_not_ahead(T0 + 301, 300, T0)


# --------------------------------------------------------------------------- readers


def test_readers_through_another_familys_context():
    state: dict[str, bytes] = {}
    blocks = build_chain(state, 5)
    # Another family's transaction that declared the block_info namespace among its inputs.
    context = DictContext(state, inputs=[bi.NAMESPACE, "abcdef"], outputs=["abcdef"])

    assert run(bi.latest_block_timestamp(context)) == T0 + 40
    latest = run(bi.read_latest_block_info(context))
    assert latest.block_num == 4 and latest.header_signature == blocks[4].header_signature
    assert run(bi.read_block_info(context, 2)).timestamp == T0 + 20
    assert run(bi.read_block_info(context, 99)) is None
    assert run(bi.read_block_info_config(context)).latest_block == 4

    undeclared = DictContext(state, inputs=["abcdef"], outputs=["abcdef"])
    with pytest.raises(AuthorizationError):
        run(bi.latest_block_timestamp(undeclared))


def test_readers_accept_plain_getters():
    state: dict[str, bytes] = {}
    build_chain(state, 2)

    def sync_get(addresses):
        return {a: state[a] for a in addresses if a in state}

    async def async_get(addresses):
        return sync_get(addresses)

    assert run(bi.latest_block_timestamp(sync_get)) == T0 + 10
    assert run(bi.latest_block_timestamp(async_get)) == T0 + 10


def test_readers_before_any_block_info():
    assert run(bi.latest_block_timestamp(DictContext({}))) is None
    assert run(bi.read_block_info_config(DictContext({}))) is None


def test_undecodable_state_is_reported():
    state = {bi.CONFIG_ADDRESS: b"\xff\xff"}
    with pytest.raises(bi.BlockInfoStateError, match="not decodable"):
        run(bi.read_block_info_config(DictContext(state)))
