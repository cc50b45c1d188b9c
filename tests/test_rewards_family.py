"""trustmesh-rewards: the split rule, every refusal (on dict state and through the dev
validator, message in batch_statuses), fuzzing like the other families, conservation of the
sum of balances, and identical state roots when a validator replays the blocks."""

from __future__ import annotations

import asyncio
import copy
import hashlib
from fractions import Fraction

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from helpers import family_scenario as fs
from helpers.chain_round import trained_round
from helpers.devnet_process import DevnetProcess
from helpers.ledger_helpers import rest, run, running_processor, submit_and_wait
from helpers.rewards_scenario import BLOCK, FEE, RewardsRound, balances, escrows
from trustmesh.fl import rewards_block
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.devnet.block_info import BlockInfoHandler
from trustmesh.ledger.devnet.store import ChainStore
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, rewards, schedule, workflow
from trustmesh.rewards_audit import all_balances
from trustmesh.scheduling.reader import FederationReader
from trustmesh.scheduling.workflow_schema import check_definition

SCENARIO = RewardsRound()
SEEDS = list(SCENARIO.valid_payloads())


def outcome(state_name, signer, payload, family=layout.REWARDS_FAMILY) -> str:
    state = copy.deepcopy(SCENARIO.states[state_name])
    try:
        asyncio.run(fs.HANDLERS[family].apply(fs.request(signer, family, payload), fs.DictContext(state)))
    except InvalidTransaction as exc:
        assert str(exc).strip()
        return "invalid"
    return "ok"


def refusal(state_name, signer, payload, state=None) -> str:
    state = copy.deepcopy(state if state is not None else SCENARIO.states[state_name])
    with pytest.raises(InvalidTransaction) as caught:
        fs.apply(state, signer, layout.REWARDS_FAMILY, payload)
    return str(caught.value)


def conserved(state) -> bool:
    return sum(balances(state).values()) + sum(e["remaining"] for e in escrows(state).values()) == 0


# --------------------------------------------------------------------------- the rule


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(0, 10**12),
       weights=st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0, 1) | st.integers(0, 50), max_size=8))
def test_apportion_pays_exactly_the_amount_and_nothing_to_weight_zero(amount, weights):
    paid = rewards_block.apportion(amount, {k: Fraction(w) for k, w in weights.items()})
    if amount and any(w > 0 for w in weights.values()):
        assert sum(paid.values()) == amount
    assert all(weights[k] > 0 and v > 0 for k, v in paid.items())
    total = sum(Fraction(w) for w in weights.values())
    for k, v in paid.items():  # within one unit of the exact share
        assert abs(v - amount * Fraction(weights[k]) / total) < 1


@settings(max_examples=200, deadline=None)
@given(per_round=st.integers(1, 10**9), shares=st.lists(st.integers(0, 10_000), min_size=2, max_size=2),
       weights=st.lists(st.sampled_from([0.0, 0.1, 0.25, 1 / 3, 0.5]), min_size=1, max_size=5),
       tasks=st.lists(st.integers(0, 4), min_size=0, max_size=3))
def test_split_conserves_the_round_amount(per_round, shares, weights, tasks):
    data, compute = sorted(shares)[0], sorted(shares)[1] - sorted(shares)[0]
    terms = {"per_round": per_round, "data_share": data, "compute_share": compute, "fee_share": 10_000 - data - compute,
             "fee_account": "fee"}
    payouts = rewards_block.split(terms, {f"p{i}": w for i, w in enumerate(weights)},
                                  {f"n{i}": t for i, t in enumerate(tasks)})
    paid = rewards_block.total_of(payouts)
    assert paid <= per_round
    if any(weights):
        assert paid == per_round
    for i, w in enumerate(weights):
        assert (f"p{i}" in payouts) == bool(w and "data" in payouts.get(f"p{i}", {}))


def test_split_orders_payments_by_weight_and_pays_the_finishing_node():
    terms = {**BLOCK, "fee_account": "fee"}
    payouts = rewards_block.split(terms, {"a": 0.5, "b": 0.25, "c": 0.25, "rejected": 0.0}, {"n1": 2, "n2": 1})
    assert payouts == {"a": {"data": 300}, "b": {"data": 150}, "c": {"data": 150},
                       "n1": {"compute": 200}, "n2": {"compute": 100}, "fee": {"fee": 100}}


# --------------------------------------------------------------------------- the workflow block


def test_rewards_block_rules():
    definition = copy.deepcopy(SCENARIO.definition)
    assert check_definition(definition) == definition
    for change, message in [({"data_share": 5000}, "must be 10000 basis points"),
                            ({"per_round": 3000}, "could not pay one round"),
                            ({"fee_account": None}, "fee_account"),
                            ({"total": 1.5}, "rewards.total must be an integer")]:
        broken = copy.deepcopy(definition)
        broken["rewards"].update(change)
        if change.get("fee_account", 0) is None:
            broken["rewards"].pop("fee_account")
        with pytest.raises(workflow.DefinitionError, match=message):
            workflow.validate_definition(broken)
    with pytest.raises(workflow.DefinitionError):
        check_definition({**definition, "rewards": {**definition["rewards"], "bonus": 1}})


# --------------------------------------------------------------------------- the rules on dict state


def test_the_scenario_pays_by_the_rule_and_conserves_every_unit():
    final, settled, refunded = (SCENARIO.states[n] for n in ("final", "settled", "refunded"))
    assert balances(final) == {SCENARIO.owner.public_key().as_hex(): -2500} and conserved(final)
    settlement = rewards.decode_record(settled[layout.settlement_address(SCENARIO.schedule_id)])
    assert settlement["amount"] == 1000 and rewards_block.total_of(settlement["payouts"]) == 1000
    assert settlement["payouts"][SCENARIO.fee] == {"fee": 100}
    assert conserved(settled) and conserved(refunded)
    assert escrows(refunded)[SCENARIO.workflow_id]["refunded"] == 1500
    owner = SCENARIO.owner.public_key().as_hex()  # the coordinator: it contributed data too
    assert balances(refunded)[owner] == -1000 + sum(settlement["payouts"][owner].values())


def test_seed_payloads_are_valid():
    assert [outcome(name, signer, payload) for name, signer, _, payload in SEEDS] == ["ok"] * len(SEEDS)


def test_each_rule_refuses_with_a_message():
    r, owner, sid, wid = SCENARIO.round, SCENARIO.owner, SCENARIO.schedule_id, SCENARIO.workflow_id
    stranger = PrivateKey.generate()
    # escrow: owner only, once, a rewards block needed
    assert "only the owner" in refusal("aggregated", stranger, rewards.escrow_payload(wid))
    assert "already has an escrow" in refusal("escrowed", owner, rewards.escrow_payload(wid))
    assert "has no rewards block" in refusal("registered", owner, rewards.escrow_payload(wid),
                                             state=r.states["registered"])
    # settle: only a final round result releases escrow, once
    assert "has no round result yet" in refusal("escrowed", owner, rewards.settle_payload(sid))
    assert "not final yet" in refusal("resulted", owner, rewards.settle_payload(sid))
    assert "has no escrow" in refusal("final", owner, rewards.settle_payload(sid), state=_final_without_escrow())
    assert "already settled" in refusal("settled", owner, rewards.settle_payload(sid))
    assert "unknown schedule_id" in refusal("final", owner, rewards.settle_payload("ab" * 32))
    # a claim paying a non-participant, or paying more than the rule
    payouts = rewards.decode_record(SCENARIO.states["settled"][layout.settlement_address(sid)])["payouts"]
    assert outcome("final", stranger, rewards.settle_payload(sid, payouts)) == "ok"
    outsider = stranger.public_key().as_hex()
    assert "does not pay" in refusal("final", stranger, rewards.settle_payload(sid, {**payouts, outsider: {"data": 1}}))
    more = {**payouts, SCENARIO.fee: {"fee": 101}}
    assert "the rule pays it" in refusal("final", stranger, rewards.settle_payload(sid, more))
    # overspend: an escrow that cannot pay a round, a balance that cannot cover a transfer
    spent = copy.deepcopy(SCENARIO.states["final"])
    record = escrows(spent)[wid]
    spent[layout.escrow_address(wid)] = cbor2.dumps({**record, "remaining": 999}, canonical=True)
    assert "the budget (2500) is spent" in refusal("final", owner, rewards.settle_payload(sid), state=spent)
    assert "cannot send 101" in refusal("settled", FEE, rewards.transfer_payload(outsider, 101))
    assert "cannot send 1" in refusal("settled", owner, rewards.transfer_payload(outsider, 1))  # owner is in debt
    # refund: the owner only, after the workflow ended, every final round settled first, once
    assert "only the owner" in refusal("settled", stranger, rewards.refund_payload(wid))
    assert "neither final nor timed out" in refusal("resulted", owner, rewards.refund_payload(wid))
    assert "final but not settled" in refusal("final", owner, rewards.refund_payload(wid))
    assert "already refunded" in refusal("refunded", owner, rewards.refund_payload(wid))
    assert "was refunded" in refusal("refunded", owner, rewards.settle_payload(sid),
                                     state=_refunded_unsettled())


def _final_without_escrow():
    state = copy.deepcopy(SCENARIO.states["final"])
    state.pop(layout.escrow_address(SCENARIO.workflow_id))
    return state


def _refunded_unsettled():
    state = copy.deepcopy(SCENARIO.states["refunded"])
    state.pop(layout.settlement_address(SCENARIO.schedule_id))
    return state


# --------------------------------------------------------------------------- fuzzing, as tests/test_families_fuzz.py

KEYS = st.text(max_size=20) | st.integers(-2**70, 2**70) | st.binary(max_size=4)
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=70)
    | st.binary(max_size=70) | st.sampled_from([1, -1]).map(lambda sign: sign * 10**5000),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(KEYS, inner, max_size=5), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_payloads_are_rejected_clearly_or_valid(data):
    state_name, signer, _, payload = data.draw(st.sampled_from(SEEDS))
    body = cbor2.loads(payload)
    for _ in range(data.draw(st.integers(1, 3))):
        keys = sorted(body, key=repr)
        choice = data.draw(st.sampled_from(["drop", "replace", "add"]))
        if choice == "drop" and keys:
            body.pop(data.draw(st.sampled_from(keys)))
        elif choice == "replace" and keys:
            body[data.draw(st.sampled_from(keys))] = data.draw(cbor_values)
        else:
            body[data.draw(KEYS)] = data.draw(cbor_values)
    try:
        mutated = cbor2.dumps(body, canonical=True)
    except Exception:
        return
    state = copy.deepcopy(SCENARIO.states[state_name])
    try:
        fs.apply(state, signer, layout.REWARDS_FAMILY, mutated)
    except InvalidTransaction as exc:
        assert str(exc).strip()
        return
    assert conserved(state)  # whatever passed kept every unit


@settings(max_examples=200, deadline=None)
@given(value=cbor_values, state=st.sampled_from(sorted(SCENARIO.states)))
def test_random_cbor_values_are_rejected_clearly(value, state):
    try:
        payload = cbor2.dumps(value, canonical=True)
    except Exception:
        return
    assert outcome(state, SCENARIO.owner, payload) == "invalid"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=st.sampled_from(sorted(SCENARIO.states)),
       claim=st.dictionaries(st.text(max_size=3) | st.sampled_from([SCENARIO.fee]), cbor_values, max_size=3))
def test_settle_claims_are_rejected_clearly_or_exact(state, claim):
    assert outcome(state, FEE, rewards.settle_payload(SCENARIO.schedule_id, claim)) == "invalid"


# --------------------------------------------------------------------------- through the dev validator


async def _final_round(client, block: dict) -> dict:
    """Deploy (with `block`), register two nodes, one round aggregated (not yet evaluated); the keys by role."""
    round_ = await trained_round(client, rewards_block=block)
    coordinator, participants, nodes, keys, by_key, sid, wid, tasks, commit = (round_[k] for k in (
        "coordinator", "participants", "nodes", "keys", "by_key", "sid", "wid", "tasks", "commit"))
    aggregator = by_key[tasks["aggregate"]["node"]]
    light, heavy, rejected = keys["iot-1"], keys["iot-2"], keys["iot-3"]  # iot-1 coordinates (and owns)
    await commit((aggregator, schedule.make_round_result_transaction(
        aggregator, sid, hashlib.sha256(b"aggregate").hexdigest(), sorted(keys.values()),
        {rejected: 0.0, light: 0.25, heavy: 0.75}, {"accuracy": 0.9, "loss": 0.3},
        rejected={rejected: "a rejected update"})))
    return {"coordinator": coordinator, "participants": participants, "nodes": nodes, "sid": sid, "wid": wid,
            "tasks": tasks, "evaluator": by_key[tasks["evaluate"]["node"]], "weights": (rejected, light, heavy), "commit": commit}


async def _invalid(client, signer, txn) -> str:
    [status] = await submit_and_wait(client, [make_batch(signer, [txn])], timeout=60)
    assert status["status"] == "INVALID", status
    return status["invalid_transactions"][0]["message"]



async def _break_every_rule(client) -> None:
    fee = PrivateKey.generate()
    run_ = await _final_round(client, {**BLOCK, "fee_account": fee.public_key().as_hex()})
    owner, sid, wid, commit = run_["coordinator"], run_["sid"], run_["wid"], run_["commit"]
    stranger = PrivateKey.generate()
    outsider = stranger.public_key().as_hex()
    # payment without a final round: the result is there, its evaluation is not
    assert "not final yet" in await _invalid(client, stranger, rewards.make_settle_transaction(stranger, sid, wid))
    assert "neither final nor timed out" in await _invalid(client, owner, rewards.make_refund_transaction(owner, wid))
    evaluator = run_["evaluator"]
    await commit((evaluator, schedule.make_report_transaction(evaluator, sid, "evaluate", "done",
                                                              output_digest="34" * 32)))
    # a non-owner escrow withdrawal, and an owner's refund before the final round is paid
    assert "only the owner" in await _invalid(client, stranger, rewards.make_refund_transaction(stranger, wid))
    assert "final but not settled" in await _invalid(client, owner, rewards.make_refund_transaction(owner, wid))
    # payment to a non-participant
    claim = {outsider: {"data": 100}}
    assert "does not pay" in await _invalid(client, stranger, rewards.make_settle_transaction(stranger, sid, wid, claim))
    await commit((stranger, rewards.make_settle_transaction(stranger, sid, wid)))
    # double payment
    assert "already settled" in await _invalid(client, stranger, rewards.make_settle_transaction(stranger, sid, wid))
    # overspend: more than an account holds
    assert "cannot send 101" in await _invalid(client, fee, rewards.make_transfer_transaction(fee, outsider, 101))
    await commit((fee, rewards.make_transfer_transaction(fee, outsider, 100)))
    await commit((owner, rewards.make_refund_transaction(owner, wid)))
    accounts, escrowed = await all_balances(FederationReader(client))
    assert sum(accounts.values()) + sum(escrowed.values()) == 0
    rejected, light, heavy = run_["weights"]
    assert rejected not in accounts  # weight 0: nothing
    assert accounts[heavy] == 450 and accounts[light] == -1000 + 150  # data pot 600 by 0.75 / 0.25; light owns
    assert accounts[outsider] == 100 and accounts[fee.public_key().as_hex()] == 0
    node_keys = [n.public_key().as_hex() for n in run_["nodes"]]
    assert sum(accounts.get(k, 0) for k in node_keys) == 300
    assert escrowed == {wid: 0}


def test_every_rule_breaks_through_the_dev_validator_and_a_replay_gives_the_same_state_roots(tmp_path):
    a = DevnetProcess(tmp_path / "a").start()
    try:
        async def record():
            async with running_processor(a.component_url, *fs.HANDLERS.values()), rest(a.rest_url) as client:
                await _break_every_rule(client)

        run(record(), timeout=240)
    finally:
        a.stop()
    store = ChainStore(tmp_path / "a")
    blocks = list(store.blocks_ascending(1))
    roots_a = [pb.BlockHeader.FromString(b.header).state_root_hash for b in blocks]
    store.close()

    b = DevnetProcess(tmp_path / "b", "--no-block-info").start()
    try:
        async def replay():
            async with running_processor(b.component_url, *fs.HANDLERS.values(), BlockInfoHandler()), \
                    rest(b.rest_url) as client:
                roots = []
                for block in blocks:
                    statuses = await submit_and_wait(client, list(block.batches), timeout=60)
                    assert {s["status"] for s in statuses} == {"COMMITTED"}, statuses
                    roots.append((await client.head())["header"]["state_root_hash"])
                return roots

        assert run(replay(), timeout=240) == roots_a
    finally:
        b.stop()
