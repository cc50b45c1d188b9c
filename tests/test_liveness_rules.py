"""Liveness on chain, as every validator decides it: heartbeats, and who may take a late task.

The handlers' apply() on a dict of state (tests/helpers/family_scenario.py): the rules are pure, so this
is the real processor code, at dict speed. One round with two compute nodes, an hour after it
was scheduled (`late`), its preprocess task overdue.
"""

from __future__ import annotations

import copy

import pytest

from helpers.family_scenario import Round, apply, set_chain_time
from trustmesh.ledger import payload as cbor
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.scheduling import layout, peers, schedule

T0 = 1_700_000_000 + 3600  # chain time of the `late` state


@pytest.fixture(scope="module")
def scenario():
    return Round()


def at(state: dict, seconds: int, block: int) -> dict:
    """state at chain time T0 + seconds."""
    set_chain_time(state, T0 + seconds, block_num=block)
    return state


def last_seen(state, node) -> int | None:
    return peers.last_seen_of(peers.decode_liveness(state.get(layout.liveness_address(node.public_key().as_hex()))))


def task(state, sid, task_id) -> dict:
    return schedule.decode_record(state[layout.assignments_address(sid)])["tasks"][task_id]


def reassign(state, scenario, task_id="preprocess"):
    apply(state, scenario.coordinator, layout.SCHEDULE_FAMILY, schedule.reassign_payload(scenario.schedule_id, task_id))
    return task(state, scenario.schedule_id, task_id)


def nodes(scenario, state, task_id="preprocess"):
    """(the node holding the task, the other one) as signers."""
    holder = task(state, scenario.schedule_id, task_id)["node"]
    by_key = {n.public_key().as_hex(): n for n in scenario.nodes}
    [other] = [n for k, n in by_key.items() if k != holder]
    return by_key[holder], other


def test_a_heartbeat_records_chain_time_never_backwards_and_only_for_registered_nodes(scenario):
    state = copy.deepcopy(scenario.states["registered"])
    node = scenario.nodes[0]
    assert last_seen(state, node) == 1_700_000_000  # registering counts as seen
    apply(at(state, 0, 9), node, layout.PEER_FAMILY, peers.heartbeat_payload())
    assert last_seen(state, node) == T0
    apply(at(state, -100, 10), node, layout.PEER_FAMILY, peers.heartbeat_payload())  # a block stamped earlier
    assert last_seen(state, node) == T0
    stranger = scenario.coordinator  # an IoT node: not in the compute-node registry
    with pytest.raises(InvalidTransaction, match="is not registered, so its heartbeat means nothing"):
        apply(state, stranger, layout.PEER_FAMILY, peers.heartbeat_payload())
    with pytest.raises(InvalidTransaction, match=r"unknown field\(s\) 'name'"):
        apply(state, node, layout.PEER_FAMILY, cbor.encode({"action": "heartbeat", "name": "c0"}))


def test_is_live_is_a_window_of_chain_time():
    assert peers.is_live(100, 100 + peers.LIVENESS_SECONDS)
    assert not peers.is_live(100, 101 + peers.LIVENESS_SECONDS)
    assert not peers.is_live(None, 100)


def test_a_late_task_never_goes_to_a_node_not_seen_within_the_window(scenario):
    state = copy.deepcopy(scenario.states["late"])  # both nodes heartbeat at T0
    holder, other = nodes(scenario, state)
    # the other node's last heartbeat is now older than the window; the holder keeps beating
    at(state, peers.LIVENESS_SECONDS + 1, 9)
    apply(state, holder, layout.PEER_FAMILY, peers.heartbeat_payload())
    with pytest.raises(InvalidTransaction, match="no live compute node to take task 'preprocess'"):
        reassign(state, scenario)
    assert task(state, scenario.schedule_id, "preprocess")["node"] == holder.public_key().as_hex()
    apply(state, other, layout.PEER_FAMILY, peers.heartbeat_payload())  # it shows itself again
    moved = reassign(state, scenario)
    assert moved["node"] == other.public_key().as_hex() and moved["attempt"] == 2


def test_a_node_that_missed_a_deadline_gets_no_task_until_it_is_seen_again(scenario):
    """The livelock the issue names: a dead node heartbeated just before it died, so it looks
    live; a late task moves to it, it misses too, and the task must not bounce back and forth."""
    state = copy.deepcopy(scenario.states["late"])  # both seen at T0
    holder, other = nodes(scenario, state)
    first = reassign(state, scenario)  # the holder missed: to the other node (dead, but seen at T0)
    assert first["node"] == other.public_key().as_hex()
    load = schedule.decode_record(state[layout.node_load_address(holder.public_key().as_hex())])
    assert load["missed"] == 1 and load["last_missed"] == T0
    at(state, schedule.DEFAULT_DEADLINE_SECONDS + 1, 9)  # the other node missed its deadline too
    with pytest.raises(InvalidTransaction, match="without missing a deadline since"):
        reassign(state, scenario)  # the holder missed at T0 and was not seen since: not a candidate
    assert task(state, scenario.schedule_id, "preprocess")["node"] == other.public_key().as_hex()
    apply(state, holder, layout.PEER_FAMILY, peers.heartbeat_payload())  # the live one beats again
    second = reassign(state, scenario)
    assert second["node"] == holder.public_key().as_hex() and second["attempt"] == 3


def test_a_round_is_assigned_to_responsive_nodes_only_while_there_are_some(scenario):
    state = copy.deepcopy(scenario.states["ready"])  # both registered at T0 - 3600
    at(state, 0, 9)  # an hour on: neither was seen within the window
    quiet = copy.deepcopy(state)
    apply(state, scenario.nodes[1], layout.PEER_FAMILY, peers.heartbeat_payload())
    apply(state, scenario.coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(scenario.schedule_id))
    tasks = schedule.decode_record(state[layout.assignments_address(scenario.schedule_id)])["tasks"]
    assert {t["node"] for t in tasks.values()} == {scenario.nodes[1].public_key().as_hex()}
    # nobody live: every registered node stays a candidate (its tasks wait for it)
    apply(quiet, scenario.coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(scenario.schedule_id))
    tasks = schedule.decode_record(quiet[layout.assignments_address(scenario.schedule_id)])["tasks"]
    assert {t["node"] for t in tasks.values()} == {n.public_key().as_hex() for n in scenario.nodes}


def test_responsive_weighs_the_last_miss_against_the_last_sighting():
    now = 1000
    assert schedule.responsive(990, {}, now)
    assert not schedule.responsive(990, {"last_missed": 990}, now)  # missed in the second it was seen
    assert schedule.responsive(991, {"last_missed": 990}, now)
    assert not schedule.responsive(900, {}, now)  # out of the window, whatever it missed
