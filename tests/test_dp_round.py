"""Differential privacy on chain (fl/privacy_block.py, fl/dp_round.py): the coordinator commits
to each round's noise seed when it opens the round and reveals it once every update is fixed;
the aggregator clips, averages and adds that noise (or each participant noises its own update);
epsilon goes into every round result, a round beyond the budget is refused on chain, and the
audit recomputes the noisy model and the epsilon and names a tampered one."""

from __future__ import annotations

import copy
import math
import pathlib
import types
from collections import OrderedDict

import pytest
import torch

from helpers.family_scenario import Round, apply
from helpers.federation_run import federate
from helpers.ledger_helpers import submit_and_wait
from trustmesh import audit
from trustmesh.fl import dp_round, model_format, privacy, privacy_block
from trustmesh.fl import strategies as st
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.signing import load_or_create_key
from trustmesh.scheduling import federation, layout, schedule

SERVER = {"mechanism": "dp-fedavg", "clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 1.0,
          "delta": 1e-5, "epsilon_budget": 8.0, "where": "server"}  # epsilon 4.73, 7.08, 9.01 after 1, 2, 3


# --------------------------------------------------------------------------- through every real part


def test_server_side_noise_spends_the_budget_and_the_workflow_ends_when_it_is_spent(devnet, stores, tmp_path):
    async def open_round_3(client, keys):
        coordinator = load_or_create_key(tmp_path / "iot-1" / "keys", "iot-1")
        [status] = await submit_and_wait(client, [make_batch(coordinator, [federation.make_open_round_transaction(
            coordinator, "digits-dp-server", 3, noise_commitment="ab" * 32)])])
        return status

    _, results, _, refused = federate(devnet, stores, tmp_path, "digits-dp-server", rounds=3, attack=None,
                                      privacy=SERVER, after=open_round_3)
    assert len(results) == 2  # the budget allows two of the three rounds
    for number, result in enumerate(results, 1):
        spent = result["privacy"]
        assert spent["epsilon"] == pytest.approx(privacy.epsilon(1.0, 1.0, number, 1e-5))
        assert spent["noise_std"] == pytest.approx(1.0 * 1.0 / 5) and spent["clipping_norm"] == 1.0
        assert set(result["aggregation_weights"].values()) == {0.2}  # the unweighted mean
    assert refused["status"] == "INVALID"
    assert "privacy budget is exhausted" in refused["invalid_transactions"][0]["message"]


def test_client_side_noise_leaves_each_participant_already_noised(devnet, stores, tmp_path):
    block = {**SERVER, "where": "client", "epsilon_budget": 100.0}
    redis_server, _ = stores

    async def round_1_updates(client, keys):
        """Each update of round 1 as it left its trainer, read back from the blob store."""
        from trustmesh.scheduling.reader import FederationReader
        from trustmesh.stores.blobs import BlobStore
        from trustmesh.stores.redis_client import client as redis_client

        reader, blobs = FederationReader(client), BlobStore(redis_client(redis_server.url))
        sid = (await reader.rounds("digits-dp-client"))["rounds"]["1"]
        assignments, updates = await reader.assignments(sid), []
        for task_id, task in assignments["tasks"].items():
            if task["kind"] == "local_train":
                digest = (await reader.task_status(sid, task_id))["output_digest"]
                updates.append((digest, await blobs.get(digest)))
        return updates

    _, results, _, updates = federate(devnet, stores, tmp_path, "digits-dp-client", rounds=2, attack=None,
                                      privacy=block, after=round_1_updates)
    for number, result in enumerate(results, 1):
        assert "noise_std" not in result["privacy"] and set(result["aggregation_weights"].values()) == {0.2}
        assert result["privacy"]["noise_multiplier"] == 1.0  # all five noised updates averaged
        assert result["privacy"]["epsilon"] == pytest.approx(privacy.epsilon(1.0, 1.0, number, 1e-5))
    # The noise is really there: a clipped delta is at most C = 1 long; each update sent is
    # that plus N(0, (z C / sqrt(min_nodes_required))^2) per coordinate, about sqrt(d) / sqrt(5) long.
    from trustmesh.fl.training import initial_state
    from trustmesh.scheduling import workflow

    definition = workflow.load_definition(pathlib.Path(__file__).parents[1] / "workflows" / "federated-digits.json")
    start = initial_state(definition["model"], definition["hyperparameters"]["seed"])
    expected = 1.0 / math.sqrt(5) * math.sqrt(sum(t.numel() for t in start.values()))  # ~36
    assert len(updates) == 5
    for digest, blob in updates:
        sent = model_format.load(blob, digest, definition["model"]).state
        assert privacy.l2_norm(privacy.update_delta(sent, start)) == pytest.approx(expected, rel=0.1)


def test_adaptive_clipping_carries_its_norm_from_round_to_round(devnet, stores, tmp_path):
    block = {**SERVER, "clipping": "adaptive", "epsilon_budget": 100.0, "target_quantile": 0.5,
             "clipping_learning_rate": 0.2, "count_noise_std": 1.0}
    _, results, _, _ = federate(devnet, stores, tmp_path, "digits-dp-adaptive", rounds=2, attack=None, privacy=block)
    first, second = (r["privacy"] for r in results)
    assert first["clipping_norm"] == 1.0 and second["clipping_norm"] == first["next_clipping_norm"] != 1.0


# --------------------------------------------------------------------------- the rules, on a dict


@pytest.fixture(scope="module")
def private_round():
    return Round(privacy=SERVER)


def _reveal(scenario, state_name, seed, signer=None):
    state = copy.deepcopy(scenario.states[state_name])
    apply(state, signer or scenario.coordinator, layout.SCHEDULE_FAMILY,
          schedule.reveal_noise_payload(scenario.schedule_id, seed.hex()))
    return state


def test_the_coordinator_reveals_the_committed_seed_once_every_update_is_in(private_round):
    state = _reveal(private_round, "aggregated", private_round.noise_seed)
    record = schedule.decode_record(state[layout.noise_seed_address(private_round.schedule_id)])
    assert record["noise_seed"] == private_round.noise_seed.hex()
    with pytest.raises(InvalidTransaction, match="is already revealed"):
        apply(state, private_round.coordinator, layout.SCHEDULE_FAMILY,
              schedule.reveal_noise_payload(private_round.schedule_id, private_round.noise_seed.hex()))


@pytest.mark.parametrize("state_name, seed, signer, message", [
    ("scheduled", Round.noise_seed, None, "are not done yet"),           # before the updates are fixed
    ("aggregated", bytes(32), None, "does not hash to the round's noise_commitment"),
    ("aggregated", Round.noise_seed, "participant", "only the round's coordinator"),
])
def test_a_seed_revealed_early_wrong_or_by_another_is_refused(private_round, state_name, seed, signer, message):
    who = private_round.participants[1] if signer else None
    with pytest.raises(InvalidTransaction, match=message):
        _reveal(private_round, state_name, seed, who)


def test_open_round_carries_a_commitment_exactly_when_the_aggregator_adds_noise(private_round):
    state = copy.deepcopy(private_round.states["registered"])
    with pytest.raises(InvalidTransaction, match="must carry noise_commitment"):
        apply(state, private_round.coordinator, layout.FEDERATION_FAMILY,
              federation.make_open_round_payload(private_round.workflow_id, 1))
    plain = Round()
    with pytest.raises(InvalidTransaction, match="adds no server-side noise; leave noise_commitment out"):
        apply(copy.deepcopy(plain.states["registered"]), plain.coordinator, layout.FEDERATION_FAMILY,
              federation.make_open_round_payload(plain.workflow_id, 1, "ab" * 32))
    with pytest.raises(InvalidTransaction, match="has no noise commitment"):
        _reveal(plain, "aggregated", Round.noise_seed)


def test_a_workflow_whose_budget_cannot_pay_one_round_is_refused_at_deploy():
    from trustmesh.scheduling import workflow

    with pytest.raises(workflow.DefinitionError, match="one round already spends epsilon 4.729"):
        Round(privacy={**SERVER, "epsilon_budget": 4.0})
    with pytest.raises(workflow.DefinitionError, match="aggregates by its own rule"):
        definition = {**Round(privacy=SERVER).definition, "strategy": {"name": "median"}}
        # enough updates for a median's own deploy check (3), so the privacy rule is what refuses it
        definition["federation"] = {**definition["federation"], "min_nodes_required": 3}
        workflow.validate_definition(definition)


# --------------------------------------------------------------------------- the audit


def _dp_case():
    spec = {"type": "mlp", "input_dim": 2, "hidden": [], "num_classes": 2}
    start = OrderedDict([("layers.0.weight", torch.zeros(2, 2)), ("layers.0.bias", torch.zeros(2))])
    updates = [st.ClientUpdate(n, OrderedDict([("layers.0.weight", torch.full((2, 2), 0.5 * (i + 1))),
                                               ("layers.0.bias", torch.full((2,), -1.0 * i))]), 10, {})
               for i, n in enumerate("abc")]
    seed = bytes(range(32))
    state, weights, record = dp_round.aggregate(SERVER, start, updates, workflow_id="wf", round_number=1,
                                                seed=seed, norm=1.0, planned=3)
    digest = model_format.digest(model_format.serialize(state, workflow_id="wf", round=1, model_spec=spec))
    result = {"aggregation_weights": weights, "global_model_digest": digest, "privacy": record}
    return spec, start, updates, seed, result


def _audit(spec, start, updates, seed, result, block=SERVER, planned=3):
    report = audit.RoundAudit(number=1)
    audit.check_aggregation(report, updates, {"name": "fedavg"}, result, workflow_id="wf", model_spec=spec,
                            start_state=start, privacy=block, noise_seed=seed, clipping_norm=1.0, planned=planned)
    return report


def test_the_audit_recomputes_the_noisy_model_and_names_a_tampered_epsilon_or_seed():
    spec, start, updates, seed, result = _dp_case()
    assert "clipped" not in result["privacy"]  # the exact count of clipped updates is outside epsilon: not published
    honest = _audit(spec, start, updates, seed, result)
    assert honest.ok, honest.problems
    tampered = _audit(spec, start, updates, seed, {**result, "privacy": {**result["privacy"], "epsilon": 1.0}})
    assert any("privacy record on chain" in p and "epsilon 1.0 on chain" in p for p in tampered.problems)
    extra = _audit(spec, start, updates, seed, {**result, "privacy": {**result["privacy"], "clipped": 2}})
    assert any("clipped 2 on chain, none recomputed" in p for p in extra.problems), extra.problems
    other_seed = _audit(spec, start, updates, bytes(32), result)  # not the noise the model got
    assert any("global_model_digest" in p for p in other_seed.problems), other_seed.problems


def test_a_chain_reader_removes_server_noise_with_the_revealed_seed():
    """The threat model the README states: with where "server" the seed goes on chain, and with
    it and the global model anyone gets the exact mean of the clipped updates back."""
    spec, start, updates, seed, result = _dp_case()
    state, _, record = dp_round.aggregate(SERVER, start, updates, workflow_id="wf", round_number=1, seed=seed,
                                          norm=1.0, planned=3)
    clipped = [privacy.clip(privacy.update_delta(u.state, start), 1.0)[0] for u in updates]
    exact = {name: sum(c[name] for c in clipped) / 3 for name in start}
    noise = privacy.noise(privacy.shapes_of(state), record["noise_std"], seed,
                          label=dp_round.noise_label("wf", 1, "server"))  # all a chain reader needs
    for name in start:
        noisy_delta = state[name].double() - start[name].double()
        assert (noisy_delta - exact[name]).abs().max() > 0.05  # the noise (std 1/3) hides the mean ...
        assert (noisy_delta - noise[name] - exact[name]).abs().max() < 1e-6  # ... until the seed removes it


class _Reader:
    def __init__(self, revealed):
        self.revealed = revealed

    async def noise_seed(self, schedule_id):
        return self.revealed


@pytest.mark.parametrize("revealed, named", [
    (Round.noise_seed, None),
    (bytes(32), "does not hash to the round's noise_commitment"),
    (None, "without a committed and revealed noise seed"),
])
def test_the_audit_names_a_revealed_seed_that_is_not_the_committed_one(revealed, named):
    from helpers.ledger_helpers import run

    wf = types.SimpleNamespace(reader=_Reader(None if revealed is None else {"noise_seed": revealed.hex()}))
    rnd = types.SimpleNamespace(record={"schedule_id": "ab" * 32,
                                        "noise_commitment": privacy.commitment(Round.noise_seed)})
    report = audit.RoundAudit(number=1)
    seed = run(audit._noise_seed(report, wf, rnd))
    if named is None:
        assert seed == Round.noise_seed and report.ok
    else:
        assert seed is None and any(named in p for p in report.problems), report.problems


def test_update_checks_with_client_noise_are_refused_at_deploy():
    from trustmesh.scheduling import workflow

    plain = Round(privacy={**SERVER, "where": "client"}).definition  # deploys without update_checks
    with pytest.raises(workflow.DefinitionError, match="update_checks cannot go with where: client"):
        workflow.validate_definition({**plain, "update_checks": {"max_norm_ratio": 3.0}})
    assert privacy_block.problem(SERVER, {**Round(privacy=SERVER).definition, "update_checks": {}}) is None


def test_a_client_round_that_averaged_fewer_noised_updates_records_the_epsilon_it_spent():
    """Five participants each noised for min_nodes_required 5; only three updates averaged: the
    round's noise multiplier was z * sqrt(3/5), and epsilon composes it with the earlier rounds."""
    spec, start, updates, seed, _ = _dp_case()
    client = {**SERVER, "where": "client", "epsilon_budget": 100.0}
    reduced = math.sqrt(3 / 5)
    state, _, record = dp_round.aggregate(client, start, updates, workflow_id="wf", round_number=1, seed=None,
                                          norm=1.0, planned=5)
    assert record["noise_multiplier"] == pytest.approx(reduced)
    assert record["epsilon"] == pytest.approx(privacy.epsilon(reduced, 1.0, 1, 1e-5))
    assert record["epsilon"] > privacy_block.epsilon_after(client, 1)  # more than the plan
    later = dp_round.privacy_record(client, 2, 1.0, averaged=5, planned=5, earlier={1: record["noise_multiplier"]})
    assert later["noise_multiplier"] == 1.0
    assert later["epsilon"] == pytest.approx(privacy.epsilon_of_rounds([reduced, 1.0], 1.0, 1e-5))

    digest = model_format.digest(model_format.serialize(state, workflow_id="wf", round=1, model_spec=spec))
    honest = {"aggregation_weights": {u.node: 1 / 3 for u in updates}, "global_model_digest": digest,
              "privacy": record}
    assert _audit(spec, start, updates, None, honest, client, planned=5).ok
    planned = dp_round.privacy_record(client, 1, 1.0, averaged=5, planned=5)  # what a round of five would say
    report = _audit(spec, start, updates, None, {**honest, "privacy": planned}, client, planned=5)
    assert any("privacy record on chain" in p and "noise_multiplier 1.0 on chain" in p for p in report.problems)


def test_the_recorded_epsilon_decides_when_the_budget_ends_the_workflow():
    client = {**SERVER, "where": "client", "epsilon_budget": 9.5}
    definition = {"federation": {"rounds": 4}, "privacy": client}
    assert privacy_block.planned_rounds(definition) == 3  # 9.01 after three rounds at z = 1
    assert not privacy_block.budget_exhausted(definition, 2)
    assert privacy_block.rounds_to_run(definition, 2) == 3
    reduced = {1: math.sqrt(3 / 5)}  # round 1 averaged three of five noised updates
    assert privacy_block.budget_exhausted(definition, 2, reduced)  # a third round would reach 10.17
    assert privacy_block.rounds_to_run(definition, 2, reduced) == 2
    assert privacy_block.budget_exhausted(definition)  # the plan itself stops after 3 of 4
    assert not privacy_block.budget_exhausted({"federation": {"rounds": 4}})


def _snapshot(block, configured, recorded):
    from trustmesh.dashboard import views

    definition = {"workflow_id": "wf", "federation": {"rounds": configured, "participant_nodes": [],
                                                      "coordinator_node": None}, "privacy": block}
    snap = views.Snapshot("head", 7, "root", workflows={"wf": {"definition": definition, "version": 1, "owner": "o"}})
    for number, z in enumerate(recorded, 1):
        sid = f"{number:064x}"
        snap.rounds[sid] = {"schedule_id": sid, "workflow_id": "wf", "round": number, "status": "ready"}
        snap.results[sid] = {"final": True, "global_model_digest": "ab" * 32, "privacy": {
            "noise_multiplier": z, "epsilon": privacy_block.epsilon_after(block, number, dict(enumerate(recorded, 1)))}}
    return snap, definition


@pytest.mark.parametrize("block, configured, recorded, ended", [
    (SERVER, 3, [1.0, 1.0], "budget exhausted (epsilon 7.077 of 8 spent after 2 of 3 rounds)"),
    ({**SERVER, "where": "client", "epsilon_budget": 9.5}, 4, [math.sqrt(3 / 5), 1.0],
     "budget exhausted (epsilon 8.396 of 9.5 spent after 2 of 4 rounds)"),
    ({**SERVER, "epsilon_budget": 9.5}, 3, [1.0, 1.0, 1.0], None),
])
def test_a_workflow_the_budget_ended_says_so_in_run_show_and_the_dashboard(block, configured, recorded, ended):
    from trustmesh import workflow_info, workflow_runs
    from trustmesh.dashboard import views

    snap, definition = _snapshot(block, configured, recorded)
    row = views.workflow_row(snap, "wf", {})
    detail = views.workflow_detail(snap, "wf", {})
    round_views = [workflow_runs.RoundView(n, status="final", noise_multiplier=z, global_model="ab" * 32)
                   for n, z in enumerate(recorded, 1)]
    first_line = workflow_runs.summary("wf", round_views, 1.0, definition=definition).splitlines()[0]
    if ended is None:
        assert row["state"] == "finished" and not first_line.endswith("(budget exhausted)")
        return
    assert row["state"] == ended and row["rounds_total"] == len(recorded)
    assert f"state: {ended}" in workflow_info.show_text(detail)
    assert first_line == f"workflow wf: {len(recorded)}/{len(recorded)} rounds final in 1.0 s (budget exhausted)"
    assert workflow_runs.budget_ended(definition, round_views)


def test_the_round_line_shows_epsilon_and_run_says_first_what_the_budget_allows():
    from trustmesh import workflow_runs

    line = workflow_runs.RoundView(2, status="final", submitted=5, expected=5, loss=0.5, epsilon=7.0773916).render(3)
    assert line.endswith("participants 5/5 · loss 0.500 · ε 7.08")
    assert "ε" not in workflow_runs.RoundView(2, status="final", submitted=5, expected=5).render(3)
    definition = {"federation": {"rounds": 3}, "privacy": SERVER}
    assert workflow_runs.budget_header(definition) == (
        "privacy budget: epsilon 8 (delta 1e-05) allows 2 of the 3 rounds; the workflow ends then, budget exhausted")
    assert workflow_runs.budget_header({"federation": {"rounds": 2}, "privacy": SERVER}) is None
    assert workflow_runs.budget_header({"federation": {"rounds": 3}}) is None
    assert "remove the noise" in workflow_runs.privacy_notice({"privacy": SERVER})
    assert workflow_runs.privacy_notice({"privacy": {**SERVER, "where": "client"}}) is None


def test_the_schema_says_which_field_only_adaptive_clipping_uses():
    from trustmesh.scheduling import workflow_schema

    definition = {**Round().definition, "privacy": {**SERVER, "target_quantile": 0.5}}
    assert workflow_schema.schema_errors(definition)[0] == (
        'definition.privacy: holds target_quantile, which only clipping "adaptive" uses; drop it or set clipping '
        'to "adaptive"')
