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
from helpers.dict_ledger import START, DictLedger
from helpers.rewards_scenario import (
    BLOCK, FEE, RewardsRound, balances, escrows, final_with_scores, reassigned_and_final, with_rewards,
)
from trustmesh.fl import rewards_block
from trustmesh.ledger import protos as pb
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.devnet.block_info import BlockInfoHandler
from trustmesh.ledger.devnet.store import ChainStore
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import federation, layout, rewards, schedule, workflow
from trustmesh import rewards_audit
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


def test_a_data_pot_nobody_can_take_stays_in_escrow_and_the_fee_is_a_share_of_what_is_paid():
    """Every data weight 0 (Shapley scores all <= 0): the data pot is not paid; the fee shrinks to
    fee_share of what the round pays out (compute plus fee), and never takes the data pot."""
    with_fee = {**BLOCK, "fee_account": "fee"}  # 6000 / 3000 / 1000 of 1000
    assert rewards_block.split(with_fee, {"a": 0.0, "b": 0.0}, {"n1": 2, "n2": 1}) == {
        "n1": {"compute": 200}, "n2": {"compute": 100}, "fee": {"fee": 33}}  # 33 / 333 = 10 % (floor)
    without_fee = {**BLOCK, "data_share": 7000, "fee_share": 0}
    assert rewards_block.split(without_fee, {"a": 0.0}, {"n1": 1}) == {"n1": {"compute": 300}}
    assert rewards_block.split(with_fee, {}, {}) == {}  # nothing done, nothing paid, no fee
    only_fee = {"per_round": 1000, "data_share": 0, "compute_share": 0, "fee_share": 10_000, "fee_account": "fee"}
    assert rewards_block.split(only_fee, {}, {}) == {"fee": {"fee": 1000}}


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


def test_a_reassigned_task_pays_only_the_node_that_finished_it():
    scenario = RewardsRound()
    state, missed, finisher = reassigned_and_final(scenario)
    sid = scenario.schedule_id
    tasks = schedule.decode_record(state[layout.assignments_address(sid)])["tasks"]
    finished = {t: schedule.decode_record(state[layout.task_status_address(sid, t)]) for t in tasks}
    assert finished["preprocess"]["node"] == finisher != missed == finished["preprocess"]["history"][0]["node"]
    assert all(s["status"] == "done" for s in finished.values())
    counts = {node: sum(s["node"] == node for s in finished.values()) for node in (missed, finisher)}
    fs.apply(state, FEE, layout.REWARDS_FAMILY, rewards.settle_payload(sid))
    payouts = rewards.decode_record(state[layout.settlement_address(sid)])["payouts"]
    compute = {k: parts["compute"] for k, parts in payouts.items() if "compute" in parts}
    # 300 by tasks finished: preprocess counts for the node that finished it, not the one that missed it
    assert compute == rewards_block.apportion(300, {k: Fraction(n) for k, n in counts.items()})
    assert compute[finisher] > compute.get(missed, 0) and conserved(state)


def test_the_escrow_returns_whole_when_the_last_round_timed_out():
    scenario = RewardsRound()
    owner, wid = scenario.owner, scenario.workflow_id
    state = with_rewards(scenario, "expired")  # round 1 collecting, nobody submitted, its window passed
    assert "neither final nor timed out" in refusal(None, owner, rewards.refund_payload(wid), state=state)
    fs.apply(state, FEE, layout.FEDERATION_FAMILY, federation.make_close_round_payload(scenario.schedule_id))
    assert schedule.decode_record(state[layout.round_address(scenario.schedule_id)])["status"] == "timeout"
    assert "has no round result yet" in refusal(None, owner, rewards.settle_payload(scenario.schedule_id), state=state)
    fs.apply(state, owner, layout.REWARDS_FAMILY, rewards.refund_payload(wid))
    assert escrows(state)[wid]["refunded"] == 2500 and escrows(state)[wid]["remaining"] == 0
    assert balances(state)[owner.public_key().as_hex()] == 0 and conserved(state)


def test_a_workflow_that_went_quiet_gives_the_escrow_back_once_its_rounds_are_round_timeout_past_due():
    """A run that stopped early leaves its round ready (or scheduled) for ever: the refund waits
    until block time is round_timeout (60 s here) past the last moment the round was due to move."""
    scenario = RewardsRound()
    owner, wid, sid = scenario.owner, scenario.workflow_id, scenario.schedule_id
    ledger = DictLedger(with_rewards(scenario, "ready"), now=START, block=6)
    record = schedule.decode_record(ledger.state[layout.round_address(sid)])
    assert record["status"] == "ready"
    due = record["round_start"] + record["round_timeout"]  # nothing assigned: its collecting window
    ledger.advance(due + 59 - ledger.now)
    assert "has not gone quiet" in _dict_invalid(ledger, owner, rewards.make_refund_transaction(owner, wid))
    ledger.advance(1)
    assert _dict_committed(ledger, owner, rewards.make_refund_transaction(owner, wid))
    assert escrows(ledger.state)[wid]["refunded"] == 2500 and conserved(ledger.state)

    # assigned, its tasks an hour past their deadlines: quiet, unless the coordinator moves a task on
    late = with_rewards(scenario, "late")
    assert _dict_committed(DictLedger(copy.deepcopy(late), now=START + 3600, block=8), owner,
                           rewards.make_refund_transaction(owner, wid))
    ledger = DictLedger(late, now=START + 3600, block=8)
    coordinator = scenario.round.coordinator
    _dict_committed(ledger, coordinator, schedule.make_reassign_transaction(coordinator, sid, "preprocess"))
    moved = schedule.decode_record(ledger.state[layout.task_status_address(sid, "preprocess")])
    ledger.advance(moved["deadline"] + 59 - ledger.now)
    assert "has not gone quiet" in _dict_invalid(ledger, owner, rewards.make_refund_transaction(owner, wid))
    ledger.advance(1)
    assert _dict_committed(ledger, owner, rewards.make_refund_transaction(owner, wid))


def test_a_workflow_with_no_round_opened_keeps_its_escrow():
    scenario = RewardsRound()
    state = with_rewards(scenario, "registered")
    assert "no round of it was opened yet" in refusal(None, scenario.owner, rewards.refund_payload(scenario.workflow_id),
                                                       state=state)


def _dict_invalid(ledger: DictLedger, signer, txn) -> str:
    [status] = ledger.submit_now(make_batch(signer, [txn]))
    assert status["status"] == "INVALID", status
    return status["invalid_transactions"][0]["message"]


def _dict_committed(ledger: DictLedger, signer, txn) -> bool:
    [status] = ledger.submit_now(make_batch(signer, [txn]))
    assert status["status"] == "COMMITTED", status
    return True


def _audit_problems(state: dict, workflow_id: str, definition: dict) -> list[str]:
    found = asyncio.run(rewards_audit.workflow_rewards(FederationReader(DictLedger(state)), workflow_id))
    seen: list[str] = []
    rewards_audit.payment_checks(lambda ok, why: ok or seen.append(why), found, definition, balances(state),
                                 {w: e["remaining"] for w, e in escrows(state).items()})
    return seen


@pytest.mark.parametrize("block, paid", [({"score": "shapley", "permutations": 5}, {"compute": 300, "fee": 33}),
                                         ({"score": "shapley", "permutations": 5, "data_share": 7000, "fee_share": 0},
                                          {"compute": 300})])
def test_a_round_whose_scores_are_all_at_most_0_pays_less_and_the_audit_agrees(block, paid):
    scenario = RewardsRound(block)
    sid, wid, owner = scenario.schedule_id, scenario.workflow_id, scenario.owner
    state = final_with_scores(scenario, {0: 0.0, 1: -0.02, 2: -0.01})
    fs.apply(state, FEE, layout.REWARDS_FAMILY, rewards.settle_payload(sid))
    settlement = rewards.decode_record(state[layout.settlement_address(sid)])
    amount = sum(paid.values())
    assert settlement["amount"] == amount
    pots = {pot: sum(p.get(pot, 0) for p in settlement["payouts"].values()) for pot in ("data", "compute", "fee")}
    assert {k: v for k, v in pots.items() if v} == paid  # no data paid; the fee only on what was paid
    assert escrows(state)[wid]["remaining"] == 2500 - amount
    assert _audit_problems(state, wid, scenario.definition) == []  # a settlement below per_round, by the rule
    fs.apply(state, owner, layout.REWARDS_FAMILY, rewards.refund_payload(wid))
    assert escrows(state)[wid]["refunded"] == 2500 - amount and conserved(state)  # the data pot went home
    assert _audit_problems(state, wid, scenario.definition) == []


def test_the_audit_names_a_settlement_that_paid_another_amount_than_the_rule():
    """The audit recomputes the amount from the round's records: a settlement written as if the
    round paid per_round (the fee taking the unpaid data pot), its escrow and accounts consistent
    with it so no sum gives it away, is named."""
    scenario = RewardsRound({"score": "shapley", "permutations": 5})
    sid, wid = scenario.schedule_id, scenario.workflow_id
    state = final_with_scores(scenario, {0: -0.01, 1: -0.02, 2: 0.0})
    fs.apply(state, FEE, layout.REWARDS_FAMILY, rewards.settle_payload(sid))
    settlement = rewards.decode_record(state[layout.settlement_address(sid)])
    extra = 1000 - settlement["amount"]
    payouts = {**settlement["payouts"], scenario.fee: {"fee": settlement["payouts"][scenario.fee]["fee"] + extra}}
    escrow = escrows(state)[wid]
    fee_account = rewards.decode_record(state[layout.account_address(scenario.fee)])
    state[layout.settlement_address(sid)] = cbor2.dumps({**settlement, "amount": 1000, "payouts": payouts}, canonical=True)
    state[layout.escrow_address(wid)] = cbor2.dumps({**escrow, "paid": 1000, "remaining": 1500}, canonical=True)
    state[layout.account_address(scenario.fee)] = cbor2.dumps(
        {**fee_account, "balance": fee_account["balance"] + extra}, canonical=True)
    assert conserved(state)
    problems = _audit_problems(state, wid, scenario.definition)
    assert any("paid 1000; the rule pays 333 of per_round 1000" in p for p in problems), problems
    # the amount alone (payouts as the rule's): named too
    state[layout.settlement_address(sid)] = cbor2.dumps({**settlement, "amount": 1000}, canonical=True)
    assert any("paid 1000; the rule pays 333" in p for p in _audit_problems(state, wid, scenario.definition))


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



async def _second_round_final(client, run_: dict) -> str:
    """The workflow updated to two rounds, round 2 run to final by the same nodes; its schedule id."""
    coordinator, wid, commit = run_["coordinator"], run_["wid"], run_["commit"]
    reader = FederationReader(client)
    stored = await reader.workflow(wid, expanded=False)
    definition = copy.deepcopy(stored["definition"])
    definition["federation"]["rounds"] = 2
    await commit((coordinator, workflow.make_update_transaction(coordinator, definition, stored["version"])))
    await commit((coordinator, federation.make_open_round_transaction(coordinator, wid, 2)))
    sid = layout.schedule_id_for(wid, 2, coordinator.public_key().as_hex())
    await commit(*[(p, federation.make_submit_transaction(p, sid, f"{i + 5:064x}", 10 + i))
                   for i, p in enumerate(run_["participants"])])
    await commit((coordinator, schedule.make_assign_transaction(coordinator, sid, wid)))
    tasks = schedule.decode_record(await client.get_state(layout.assignments_address(sid)))["tasks"]
    by_key = {n.public_key().as_hex(): n for n in run_["nodes"]}
    start = await reader.starting_model(wid, 2)
    for task_id in ["preprocess", *sorted(t for t in tasks if t.startswith("train:")), "aggregate"]:
        node = by_key[tasks[task_id]["node"]]
        await commit((node, schedule.make_report_transaction(
            node, sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode() + b"2").hexdigest(),
            starting_model=start if task_id.startswith("train:") else None)))
    aggregator, evaluator = by_key[tasks["aggregate"]["node"]], by_key[tasks["evaluate"]["node"]]
    keys = sorted(p.public_key().as_hex() for p in run_["participants"])
    await commit((aggregator, schedule.make_round_result_transaction(
        aggregator, sid, hashlib.sha256(b"aggregate2").hexdigest(), keys, {k: 1 / 3 for k in keys},
        {"accuracy": 0.9, "loss": 0.3})))
    await commit((evaluator, schedule.make_report_transaction(evaluator, sid, "evaluate", "done",
                                                              output_digest="35" * 32)))
    return sid


async def _break_every_rule(client) -> None:
    fee = PrivateKey.generate()
    # per_round above half the total: the escrow pays one round, not two
    run_ = await _final_round(client, {**BLOCK, "total": 1500, "fee_account": fee.public_key().as_hex()})
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
    # overspend: a second final round the escrow (500 left) cannot pay
    second = await _second_round_final(client, run_)
    assert "the budget (1500) is spent" in await _invalid(
        client, stranger, rewards.make_settle_transaction(stranger, second, wid))
    await commit((owner, rewards.make_refund_transaction(owner, wid)))
    accounts, escrowed = await all_balances(FederationReader(client))
    assert sum(accounts.values()) + sum(escrowed.values()) == 0
    rejected, light, heavy = run_["weights"]
    assert rejected not in accounts  # weight 0: nothing
    assert accounts[heavy] == 450 and accounts[light] == -1500 + 150 + 500  # data 600 by 0.75 / 0.25; light owns
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


# --------------------------------------------------------------------------- taking the escrow back by hand


def test_trustmesh_rewards_refund_settles_what_is_owed_then_takes_back_the_rest():
    from trustmesh import rewards_info
    from trustmesh.cli import build_parser
    from trustmesh.workflow_runs import RunError

    args = build_parser().parse_args(["rewards", "wf", "--refund", "--key", "owner.priv"])
    assert args.func is rewards_info.run_rewards and args.refund and args.key == "owner.priv"
    owner, wid = SCENARIO.owner, SCENARIO.workflow_id
    ledger = DictLedger(copy.deepcopy(SCENARIO.states["final"]), now=START, block=6)  # final, nobody settled it
    assert asyncio.run(rewards_info.refund(ledger, owner, wid)) == \
        "rewards: 1000 paid over 1 round(s), 1500 back to the owner"
    assert asyncio.run(rewards_info.refund(ledger, owner, wid)).endswith("refunded already (1500 back to the owner)")
    assert conserved(ledger.state)
    other = RewardsRound()
    stuck = DictLedger(with_rewards(other, "ready"), now=START, block=6)  # a run that stopped early
    with pytest.raises(RunError, match="was not refunded: .* has not gone quiet"):
        asyncio.run(rewards_info.refund(stuck, other.owner, wid))
    with pytest.raises(RunError, match="was not refunded: only the owner"):
        asyncio.run(rewards_info.refund(stuck, owner, wid))


def test_a_run_that_stops_early_says_how_to_take_the_escrow_back(monkeypatch, tmp_path):
    from contextlib import asynccontextmanager

    from trustmesh import workflow_runs

    definition = copy.deepcopy(SCENARIO.definition)

    @asynccontextmanager
    async def no_client(_url):
        yield None

    async def deployed(*_args, **_kwargs):
        return "deployed, budget escrowed", {"version": 1}

    async def stops(*_args, **_kwargs):
        raise workflow_runs.RunError("workflow 'federated-digits' did not finish within 5 s (round 1/1); it goes on running")

    monkeypatch.setattr(workflow_runs, "prepare", lambda *_args: definition)
    monkeypatch.setattr(workflow_runs, "rest_client", no_client)
    monkeypatch.setattr(workflow_runs, "deploy", deployed)
    monkeypatch.setattr(workflow_runs, "follow", stops)
    monkeypatch.setattr(workflow_runs, "user_key", lambda *_args: owner_key)
    owner_key = SCENARIO.owner
    with pytest.raises(workflow_runs.RunError) as stopped:
        asyncio.run(workflow_runs.deploy_and_follow("wf.json", home=tmp_path, nodes_dir=tmp_path, validator_url="",
                                                    rest_url="", timeout=5, out=open(tmp_path / "out", "w")))
    message = str(stopped.value)
    assert "\n" not in message and "it goes on running; its escrow stays on chain" in message
    assert "`trustmesh rewards federated-digits --refund`" in message
