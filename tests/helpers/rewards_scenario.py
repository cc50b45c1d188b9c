"""A rewards scenario on dict state: family_scenario's round, its workflow given a `rewards`
block (a workflow update by its owner, the coordinator) and one planned round, the round made
final (its result, then its evaluate task), the escrow funded. States along the way by name."""

from __future__ import annotations

import copy
import hashlib

from helpers import family_scenario as fs
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, rewards, schedule, workflow

FEE = PrivateKey.generate()
BLOCK = {"total": 2500, "per_round": 1000, "data_share": 6000, "compute_share": 3000, "fee_share": 1000}


class RewardsRound:
    def __init__(self, block: dict | None = None):
        self.round = r = fs.Round()
        self.fee = FEE.public_key().as_hex()
        self.block = {**BLOCK, "fee_account": self.fee, **(block or {})}
        if self.block["fee_share"] == 0:
            self.block.pop("fee_account")
        self.definition = copy.deepcopy(r.definition)
        self.definition["rewards"] = self.block
        self.definition["federation"]["rounds"] = 1
        self.owner = r.coordinator
        self.schedule_id, self.workflow_id = r.schedule_id, r.workflow_id
        self.states: dict[str, dict[str, bytes]] = {}
        state = copy.deepcopy(r.states["aggregated"])
        fs.apply(state, self.owner, layout.WORKFLOW_FAMILY, workflow.update_payload(self.definition, 1))
        self.states["aggregated"] = copy.deepcopy(state)
        fs.apply(state, self.owner, layout.REWARDS_FAMILY, rewards.escrow_payload(self.workflow_id))
        self.states["escrowed"] = copy.deepcopy(state)
        finals = [(s, f, p) for name, s, f, p in r.valid_payloads() if name == "aggregated"]
        for signer, family, payload in finals[:1]:  # the result, not yet final (evaluate pending)
            fs.apply(state, signer, family, payload)
        self.states["resulted"] = copy.deepcopy(state)
        for signer, family, payload in finals[1:]:
            fs.apply(state, signer, family, payload)
        self.states["final"] = copy.deepcopy(state)
        fs.apply(state, r.coordinator, layout.REWARDS_FAMILY, rewards.settle_payload(self.schedule_id))
        self.states["settled"] = copy.deepcopy(state)
        fs.apply(state, self.owner, layout.REWARDS_FAMILY, rewards.refund_payload(self.workflow_id))
        self.states["refunded"] = copy.deepcopy(state)

    def valid_payloads(self):
        """(state name, signer, family, payload): each a valid next step, the seeds for mutation."""
        r = self.round
        yield "aggregated", self.owner, layout.REWARDS_FAMILY, rewards.escrow_payload(self.workflow_id)
        yield "final", r.participants[1], layout.REWARDS_FAMILY, rewards.settle_payload(self.schedule_id)
        yield "settled", self.owner, layout.REWARDS_FAMILY, rewards.refund_payload(self.workflow_id)
        yield "settled", FEE, layout.REWARDS_FAMILY, rewards.transfer_payload(r.participants[2].public_key().as_hex(), 50)


def balances(state: dict[str, bytes]) -> dict[str, int]:
    return {r["key"]: r["balance"] for a, v in state.items() if a.startswith(layout.ACCOUNT_PREFIX)
            for r in [rewards.decode_record(v)]}


def escrows(state: dict[str, bytes]) -> dict[str, dict]:
    return {r["workflow_id"]: r for a, v in state.items() if a.startswith(layout.ESCROW_PREFIX)
            for r in [rewards.decode_record(v)]}


def with_rewards(scenario: RewardsRound, state_name: str) -> dict[str, bytes]:
    """family_scenario's state `state_name`, its workflow given the scenario's rewards block (one
    planned round) and the escrow funded."""
    state = copy.deepcopy(scenario.round.states[state_name])
    fs.apply(state, scenario.owner, layout.WORKFLOW_FAMILY, workflow.update_payload(scenario.definition, 1))
    fs.apply(state, scenario.owner, layout.REWARDS_FAMILY, rewards.escrow_payload(scenario.workflow_id))
    return state


def reassigned_and_final(scenario: RewardsRound) -> tuple[dict[str, bytes], str, str]:
    """The round's preprocess reassigned after its node missed the deadline (family_scenario's
    `late` state), the new node finishing it, every other task done by its node, the round final.
    -> (state, the node that missed preprocess, the node that finished it)."""
    r, sid = scenario.round, scenario.schedule_id
    state = with_rewards(scenario, "late")
    fs.apply(state, r.coordinator, layout.SCHEDULE_FAMILY, schedule.reassign_payload(sid, "preprocess"))
    status = schedule.decode_record(state[layout.task_status_address(sid, "preprocess")])
    missed, finisher = status["history"][0]["node"], status["node"]
    by_key = {n.public_key().as_hex(): n for n in r.nodes}
    tasks = schedule.decode_record(state[layout.assignments_address(sid)])["tasks"]
    for task_id in ["preprocess", *sorted(t for t in tasks if t.startswith("train:")), "aggregate"]:
        node = schedule.decode_record(state[layout.task_status_address(sid, task_id)])["node"]
        fs.apply(state, by_key[node], layout.SCHEDULE_FAMILY, schedule.report_payload(
            sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest()))
    for name, signer, family, payload in r.valid_payloads():
        if name == "aggregated" and family == layout.SCHEDULE_FAMILY:  # the result, then evaluate: final
            fs.apply(state, signer, family, payload)
    return state, missed, finisher


def final_with_scores(scenario: RewardsRound, contributions: dict[int, float]) -> dict[str, bytes]:
    """The escrowed round made final by a round result carrying contribution scores
    ({participant index: score}) and weights 0.25 / 0.25 / 0.5, then its evaluate task done."""
    r, sid = scenario.round, scenario.schedule_id
    state = copy.deepcopy(scenario.states["escrowed"])
    by_key = {n.public_key().as_hex(): n for n in r.nodes}
    keys = [p.public_key().as_hex() for p in r.participants]
    fs.apply(state, by_key[r.assigned["aggregate"]], layout.SCHEDULE_FAMILY, schedule.round_result_payload(
        sid, hashlib.sha256(b"aggregate").hexdigest(), keys, {keys[0]: 0.25, keys[1]: 0.25, keys[2]: 0.5},
        {"accuracy": 0.9, "loss": 0.3}, contributions={keys[i]: v for i, v in contributions.items()}))
    fs.apply(state, by_key[r.assigned["evaluate"]], layout.SCHEDULE_FAMILY, schedule.report_payload(
        sid, "evaluate", "done", output_digest="34" * 32, metrics={"accuracy": 0.9, "loss": 0.3}))
    return state
