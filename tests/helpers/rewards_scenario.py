"""A rewards scenario on dict state: family_scenario's round, its workflow given a `rewards`
block (a workflow update by its owner, the coordinator) and one planned round, the round made
final (its result, then its evaluate task), the escrow funded. States along the way by name."""

from __future__ import annotations

import copy

from helpers import family_scenario as fs
from trustmesh.ledger.signing import PrivateKey
from trustmesh.scheduling import layout, rewards, workflow

FEE = PrivateKey.generate()
BLOCK = {"total": 2500, "per_round": 1000, "data_share": 6000, "compute_share": 3000, "fee_share": 1000}


class RewardsRound:
    def __init__(self, block: dict | None = None):
        self.round = r = fs.Round()
        self.fee = FEE.public_key().as_hex()
        self.block = {**BLOCK, "fee_account": self.fee, **(block or {})}
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
