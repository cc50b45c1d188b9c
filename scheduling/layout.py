"""Families, namespaces and state addresses of the federation's on-chain rules.

Five families (version 1.0, canonical-CBOR payloads, canonical-CBOR state records):

| family                | namespace = sha512(name)[:6] | holds                                      |
|-----------------------|------------------------------|--------------------------------------------|
| trustmesh-workflow    | WORKFLOW_NS                  | workflow definitions, owner, version;      |
|                       |                              | participant groups (per owner)             |
| trustmesh-peer        | PEER_NS                      | compute-node registry, its index, liveness |
| trustmesh-federation  | FEDERATION_NS                | rounds: a small core (status, counts),     |
|                       |                              | roster (expected nodes), one record per    |
|                       |                              | expected node (its submission)             |
| trustmesh-schedule    | SCHEDULE_NS                  | task assignments, task status, node load,  |
|                       |                              | round results, revealed noise seeds        |
| trustmesh-rewards     | REWARDS_NS                   | account balances, escrow per workflow,     |
|                       |                              | settlement per round (scheduling/rewards)  |

Task status and round results live in the schedule family (the issue lists them apart): a task's
completion changes its node's queue length in the same transaction, which would otherwise need
two families to agree.

Every address is namespace + a 2-hex "kind" + 62 hex of sha512 over the record's key, so an
auditor can compute any address with sha512 alone. Kinds below. One exception: a round's member
records (ROUND_MEMBER) are kind + 30 hex of sha512(schedule_id) + 32 hex of sha512(node), so a
round's members share a prefix (round_members_prefix) that a transaction declares instead of
one address per node, and a reader lists them with one state query.
"""

from __future__ import annotations

import hashlib

from trustmesh.ledger.addressing import namespace

VERSION = "1.0"

WORKFLOW_FAMILY = "trustmesh-workflow"
PEER_FAMILY = "trustmesh-peer"
FEDERATION_FAMILY = "trustmesh-federation"
SCHEDULE_FAMILY = "trustmesh-schedule"
REWARDS_FAMILY = "trustmesh-rewards"

WORKFLOW_NS = namespace(WORKFLOW_FAMILY)
PEER_NS = namespace(PEER_FAMILY)
FEDERATION_NS = namespace(FEDERATION_FAMILY)
SCHEDULE_NS = namespace(SCHEDULE_FAMILY)
REWARDS_NS = namespace(REWARDS_FAMILY)
BLOCK_INFO_NS = "00b10c"  # agreed block timestamps (round clocks, deadlines)

# kinds: the two hex characters after the namespace
WORKFLOW_RECORD = "00"      # key: workflow_id
PARTICIPANT_GROUP = "01"    # key: owner public key + "/" + group_id -> a participant group's members
PEER_RECORD = "00"          # key: node public key (hex)
PEER_INDEX = "01"           # single record: sorted list of registered node public keys
PEER_LIVENESS = "02"        # key: node public key -> chain time the node was last seen (heartbeat)
ROUND_RECORD = "00"         # key: schedule_id -> the round's core (status, counts; no per-node lists)
WORKFLOW_ROUNDS = "01"      # key: workflow_id -> {round number: schedule_id}
ROUND_ROSTER = "02"         # key: schedule_id -> {expected_nodes} in the workflow's order, written once
ROUND_MEMBER = "03"         # key: schedule_id (30 hex) + node (32 hex) -> {} or its submission
ASSIGNMENTS = "00"          # key: schedule_id -> task assignments of that round
TASK_STATUS = "01"          # key: schedule_id + "/" + task_id
NODE_LOAD = "02"            # key: node public key -> queue length, done, missed (reputation)
ROUND_RESULT = "03"         # key: schedule_id
NOISE_SEED = "04"           # key: schedule_id -> the DP noise seed the coordinator revealed
SECAGG = "05"               # key: schedule_id + "/" + node -> its secure-aggregation keys, shares, reveals
ACCOUNT = "00"              # rewards, key: public key -> integer balance
ESCROW = "01"               # rewards, key: workflow_id -> the owner's escrow, its terms, what it paid
SETTLEMENT = "02"           # rewards, key: schedule_id -> what the round paid to whom


def _address(ns: str, kind: str, key: str) -> str:
    return ns + kind + hashlib.sha512(key.encode()).hexdigest()[:62]


def workflow_address(workflow_id: str) -> str:
    return _address(WORKFLOW_NS, WORKFLOW_RECORD, workflow_id)


def participant_group_address(owner: str, group_id: str) -> str:
    """A participant group (workflow_groups.py): its owner's, so nobody else can take or fill its id."""
    return _address(WORKFLOW_NS, PARTICIPANT_GROUP, f"{owner}/{group_id}")


PARTICIPANT_GROUP_PREFIX = WORKFLOW_NS + PARTICIPANT_GROUP  # every participant group


def peer_address(public_key: str) -> str:
    return _address(PEER_NS, PEER_RECORD, public_key)


PEER_INDEX_ADDRESS = PEER_NS + PEER_INDEX + "0" * 62
PEER_LIVENESS_PREFIX = PEER_NS + PEER_LIVENESS  # every liveness record (a reader of all nodes' liveness)


def liveness_address(public_key: str) -> str:
    """A compute node's own small liveness record, apart from its registry record, so a heartbeat
    rewrites a few bytes and the registry record (and its revision) never changes for it."""
    return _address(PEER_NS, PEER_LIVENESS, public_key)


def round_address(schedule_id: str) -> str:
    return _address(FEDERATION_NS, ROUND_RECORD, schedule_id)


def round_roster_address(schedule_id: str) -> str:
    """A round's expected nodes, in the workflow's order: written once, when it opens."""
    return _address(FEDERATION_NS, ROUND_ROSTER, schedule_id)


def round_members_prefix(schedule_id: str) -> str:
    """What every member record of a round starts with (38 hex): a transaction that reads or
    writes members declares it, a reader lists them under it."""
    return FEDERATION_NS + ROUND_MEMBER + hashlib.sha512(schedule_id.encode()).hexdigest()[:30]


def round_member_address(schedule_id: str, node: str) -> str:
    """An expected node's record in a round: {} until it submits, then its submission."""
    return round_members_prefix(schedule_id) + hashlib.sha512(node.encode()).hexdigest()[:32]


def workflow_rounds_address(workflow_id: str) -> str:
    return _address(FEDERATION_NS, WORKFLOW_ROUNDS, workflow_id)


def assignments_address(schedule_id: str) -> str:
    return _address(SCHEDULE_NS, ASSIGNMENTS, schedule_id)


def task_status_address(schedule_id: str, task_id: str) -> str:
    return _address(SCHEDULE_NS, TASK_STATUS, f"{schedule_id}/{task_id}")


def node_load_address(public_key: str) -> str:
    return _address(SCHEDULE_NS, NODE_LOAD, public_key)


def round_result_address(schedule_id: str) -> str:
    return _address(SCHEDULE_NS, ROUND_RESULT, schedule_id)


def noise_seed_address(schedule_id: str) -> str:
    return _address(SCHEDULE_NS, NOISE_SEED, schedule_id)


def secagg_address(schedule_id: str, node: str) -> str:
    return _address(SCHEDULE_NS, SECAGG, f"{schedule_id}/{node}")


SECAGG_PREFIX = SCHEDULE_NS + SECAGG  # every participant's secure-aggregation record


def account_address(public_key: str) -> str:
    return _address(REWARDS_NS, ACCOUNT, public_key)


def escrow_address(workflow_id: str) -> str:
    return _address(REWARDS_NS, ESCROW, workflow_id)


def settlement_address(schedule_id: str) -> str:
    return _address(REWARDS_NS, SETTLEMENT, schedule_id)


ACCOUNT_PREFIX = REWARDS_NS + ACCOUNT  # every account (the sum of all balances)
ESCROW_PREFIX = REWARDS_NS + ESCROW


def schedule_id_for(workflow_id: str, round_number: int, coordinator: str) -> str:
    """The shared id of a round: derived, not drawn, so every validator computes the same one."""
    return hashlib.sha256(f"{workflow_id}/{round_number}/{coordinator}".encode()).hexdigest()
