"""Every event the families emit carries exactly the attributes scheduling/events.py documents.

A whole round through the four handlers' apply() on dict state (family_scenario), every event
recorded: its name must be in events.ATTRIBUTES and its attribute names must be the documented
ones (the always-present ones, plus any of the optional ones)."""

from __future__ import annotations

import copy

import pytest

from helpers import family_scenario as fs
from trustmesh.scheduling import events, layout, schedule


@pytest.fixture
def recorded(monkeypatch):
    seen: list[tuple[str, set[str]]] = []

    async def add_event(self, event_type, attributes=(), data=b"", timeout=None):
        seen.append((event_type, {k for k, _ in attributes}))

    monkeypatch.setattr(fs.DictContext, "add_event", add_event)
    return seen


def test_every_emitted_event_is_documented_with_its_attributes(recorded):
    scenario = fs.Round()
    for state_name, signer, family, payload in scenario.valid_payloads():
        fs.apply(copy.deepcopy(scenario.states[state_name]), signer, family, payload)
    # a failed report, and a round made final (its result, then its evaluate task)
    sid, by_key = scenario.schedule_id, {n.public_key().as_hex(): n for n in scenario.nodes}
    scheduled = copy.deepcopy(scenario.states["scheduled"])
    fs.apply(scheduled, by_key[scenario.assigned["preprocess"]], layout.SCHEDULE_FAMILY,
             schedule.report_payload(sid, "preprocess", "failed", reason="out of memory"))
    aggregated = copy.deepcopy(scenario.states["aggregated"])
    for state_name, signer, family, payload in scenario.valid_payloads():
        if state_name == "aggregated":
            fs.apply(aggregated, signer, family, payload)

    private = fs.Round(privacy={"mechanism": "dp-fedavg", "clipping": "fixed", "clipping_norm": 1.0,
                                "noise_multiplier": 1.0, "delta": 1e-5, "epsilon_budget": 10.0, "where": "server"})
    fs.apply(copy.deepcopy(private.states["aggregated"]), private.coordinator, layout.SCHEDULE_FAMILY,
             schedule.reveal_noise_payload(private.schedule_id, private.noise_seed.hex()))  # a DP round's noise seed

    secure = fs.Round(secure_aggregation={"protocol": "secagg+", "threshold": 2, "neighbours": 2})
    late = copy.deepcopy(secure.states["late"])  # an hour on: the participants' local_train tasks are overdue
    by_key = {n.public_key().as_hex(): n for n in secure.nodes}
    fs.apply(late, by_key[secure.assigned["preprocess"]], layout.SCHEDULE_FAMILY,
             schedule.report_payload(secure.schedule_id, "preprocess", "done", output_digest="ab" * 32))
    train = next(t for t in secure.assigned if t.startswith("train:"))
    fs.set_chain_time(late, 1_700_000_000 + 7200, block_num=8)  # past the deadline preprocess started
    fs.apply(late, secure.coordinator, layout.SCHEDULE_FAMILY,
             schedule._encode("drop_update", {"schedule_id": secure.schedule_id, "task_id": train}))

    from helpers.rewards_scenario import RewardsRound  # trustmesh-rewards: escrow, settle, refund, transfer

    paid = RewardsRound()
    for state_name, signer, family, payload in paid.valid_payloads():
        fs.apply(copy.deepcopy(paid.states[state_name]), signer, family, payload)

    emitted = {name for name, _ in recorded}
    assert emitted == set(events.ATTRIBUTES), sorted(emitted ^ set(events.ATTRIBUTES))
    for name, attributes in recorded:
        required, optional = events.ATTRIBUTES[name]
        assert set(required) <= attributes <= set(required) | set(optional), (name, sorted(attributes))


def test_event_names_are_written_once():
    names = [v for k, v in vars(events).items() if k.isupper() and isinstance(v, str)]
    assert len(names) == len(set(names)) == len(events.ATTRIBUTES)
    assert all(name.startswith("trustmesh/") for name in names)
