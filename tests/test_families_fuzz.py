"""Random and mutated payloads against every federation family: never a crash, never an
internal error, always a clear InvalidTransaction (or a valid transaction)."""

from __future__ import annotations

import asyncio
import copy

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers.family_scenario import HANDLERS, DictContext, Round, request
from helpers.ledger_helpers import rest, run, submit_and_wait
from trustmesh.ledger.builders import make_batch, make_transaction
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.scheduling import layout

ROUND = Round()
SEEDS = list(ROUND.valid_payloads())

def _huge(sign: int) -> int:
    """An integer past Python's int->str limit: error messages must not try to print it."""
    return sign * 10**5000


KEYS = st.text(max_size=20) | st.integers(-2**70, 2**70) | st.binary(max_size=4)  # CBOR keys need not be text

cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=70)
    | st.binary(max_size=70) | st.sampled_from([1, -1]).map(_huge),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)


def outcome(state_name, signer, family, payload) -> str:
    """'ok' or 'invalid'; anything else raised fails the test with its traceback."""
    state = copy.deepcopy(ROUND.states[state_name])
    try:
        asyncio.run(HANDLERS[family].apply(request(signer, family, payload), DictContext(state)))
    except InvalidTransaction as exc:
        assert str(exc).strip(), "an InvalidTransaction must say why"
        return "invalid"
    return "ok"


def test_seed_payloads_are_valid():
    """The mutations below start from payloads that really succeed, so they reach deep code."""
    assert [outcome(*seed) for seed in SEEDS] == ["ok"] * len(SEEDS)


def _mutate(body: dict, data) -> dict:
    body = copy.deepcopy(body)
    for _ in range(data.draw(st.integers(1, 3))):
        choice = data.draw(st.sampled_from(["drop", "replace", "add", "nest"]))
        keys = sorted(body, key=repr)
        if choice == "drop" and keys:
            body.pop(data.draw(st.sampled_from(keys)))
        elif choice == "replace" and keys:
            body[data.draw(st.sampled_from(keys))] = data.draw(cbor_values)
        elif choice == "add":
            body[data.draw(KEYS)] = data.draw(cbor_values)
        elif choice == "nest" and keys:
            key = data.draw(st.sampled_from(keys))
            value = body[key]
            if isinstance(value, dict) and value:
                inner = data.draw(st.sampled_from(sorted(value, key=repr)))
                value[inner] = data.draw(cbor_values)
            elif isinstance(value, list) and value:
                value[data.draw(st.integers(0, len(value) - 1))] = data.draw(cbor_values)
    return body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_payloads_are_rejected_clearly_or_valid(data):
    state_name, signer, family, payload = data.draw(st.sampled_from(SEEDS))
    body = _mutate(cbor2.loads(payload), data)
    try:
        mutated = cbor2.dumps(body, canonical=True)
    except Exception:
        return  # not encodable at all (e.g. a NaN key): nothing to send
    outcome(state_name, signer, family, mutated)


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from(sorted(HANDLERS)), payload=st.binary(max_size=300), state=st.sampled_from(sorted(ROUND.states)))
def test_random_bytes_are_rejected_clearly(family, payload, state):
    assert outcome(state, ROUND.coordinator, family, payload) == "invalid"


@settings(max_examples=300, deadline=None)
@given(family=st.sampled_from(sorted(HANDLERS)), value=cbor_values, state=st.sampled_from(sorted(ROUND.states)))
def test_random_cbor_values_are_rejected_clearly(family, value, state):
    try:
        payload = cbor2.dumps(value, canonical=True)
    except Exception:
        return
    assert outcome(state, ROUND.nodes[0], family, payload) == "invalid"


def test_garbage_through_the_validator_is_invalid_never_internal_error(devnet):
    """The same property end to end: statuses are INVALID with a message, the log shows no
    internal error, and the validator keeps committing."""
    from helpers.ledger_helpers import running_processor

    garbage = [b"", b"\xff", cbor2.dumps({"action": "nope"}), cbor2.dumps([1, 2, 3]),
               cbor2.dumps({"action": "submit", "schedule_id": 7}), b"\x00" * 100]

    async def scenario():
        async with running_processor(devnet.component_url, *HANDLERS.values()), rest(devnet.rest_url) as client:
            batches = []
            for family in sorted(HANDLERS):
                ns = layout.namespace(family)
                for payload in garbage:
                    txn = make_transaction(ROUND.coordinator, family, layout.VERSION, payload,
                                           [ns, layout.BLOCK_INFO_NS], [ns])
                    batches.append(make_batch(ROUND.coordinator, [txn]))
            statuses = await submit_and_wait(client, batches, timeout=60)
            assert {s["status"] for s in statuses} == {"INVALID"}
            assert all(s["invalid_transactions"][0]["message"] for s in statuses)

    run(scenario())
    assert "internal error" not in devnet.log()


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key in value:
            yield from _paths(value[key], path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, path + (i,))


def _replaced(value, path, new):
    value = copy.deepcopy(value)
    cursor = value
    for step in path[:-1]:
        cursor = cursor[step]
    cursor[path[-1]] = new
    return value


@pytest.mark.parametrize("replacement", ["huge", "huge-list", "nan", "bytes", "none", "nested", "odd-keys"])
def test_every_field_of_every_payload_replaced_by_hostile_values(replacement):
    """Exhaustive over fields: each field of each valid payload swapped for a hostile value."""
    new = {"huge": _huge(1), "huge-list": [_huge(-1)], "nan": float("nan"), "bytes": b"\x00" * 64,
           "none": None, "nested": {"a": [{"b": _huge(1)}]},
           "odd-keys": {1: "x", b"k": 2, "s": 3, _huge(1): 4}}[replacement]
    for state_name, signer, family, payload in SEEDS:
        body = cbor2.loads(payload)
        for path in _paths(body):
            if path:
                outcome(state_name, signer, family, cbor2.dumps(_replaced(body, path, new), canonical=True))
        if replacement == "odd-keys":  # stray keys of every type at the top level too
            outcome(state_name, signer, family, cbor2.dumps({**body, **new}, canonical=True))
