"""Contribution scores (fl/shapley.py): a free rider's update (the model it was given, unchanged)
scores least, below every trained update; the scores add up to what the round gained;
they are a function of the seed on chain, and the audit names a score that is not the recomputed
one. The workflow rules refuse the option where updates are not seen one by one."""

from __future__ import annotations

import copy
import pathlib

import pytest
import torch

from trustmesh import audit
from trustmesh.fl import datasets, rewards_block, screening, shapley, training
from trustmesh.fl.strategies import ClientUpdate
from trustmesh.scheduling import workflow

torch.set_num_threads(1)
WORKFLOW = pathlib.Path(__file__).resolve().parents[1] / "workflows" / "federated-digits.json"


@pytest.fixture(scope="module")
def round_one():
    definition = workflow.load_definition(WORKFLOW)
    hp = {**definition["hyperparameters"], "epochs": 3}
    shards = datasets.federated_digits(definition["data"], 4).shards
    start = training.initial_state(definition["model"], hp["seed"])
    updates = [ClientUpdate(f"node-{i}", training.local_train(definition["model"], hp, None, s.x, s.y, seed=i).state,
                            len(s.y)) for i, s in enumerate(shards[:3])]
    updates.append(ClientUpdate("node-free-rider", copy.deepcopy(start), len(shards[3].y)))
    return definition, start, updates


def test_a_free_rider_scores_nothing_and_the_scores_add_up_to_the_rounds_gain(round_one):
    definition, start, updates = round_one
    accuracy = screening.held_out_accuracy(definition)
    scores = shapley.scores(updates, start, accuracy, seed=b"round", permutations=30)
    assert scores["node-free-rider"] < min(scores[f"node-{i}"] for i in range(3)), scores  # the least
    gain = accuracy(_fedavg(updates)) - accuracy(start)
    assert abs(sum(scores.values()) - gain) <= shapley.TRUNCATION + 1e-12  # efficiency, up to the truncation
    assert shapley.scores(updates, start, accuracy, seed=b"round", permutations=30) == scores  # the seed decides
    weights = {u.node: 0.25 for u in updates}
    paid = rewards_block.data_weights({"score": "shapley"}, {"contributions": {**scores, "node-0": -0.5},
                                                             "aggregation_weights": weights})
    assert paid["node-0"] == 0.0 and paid["node-2"] == scores["node-2"]  # a negative score is paid as 0


def test_an_update_the_aggregation_gave_weight_0_earns_nothing_whatever_its_score():
    """A robust strategy (or an update check) that set an update aside gave it weight 0; its
    Shapley score (every screened update is scored) must not pay it."""
    terms = {"per_round": 1000, "data_share": 10_000, "compute_share": 0, "fee_share": 0, "score": "shapley",
             "permutations": 5}
    result = {"contributions": {"kept": 0.1, "trimmed": 0.3, "negative": -0.2},
              "aggregation_weights": {"kept": 0.5, "trimmed": 0.0, "negative": 0.5}}
    assert rewards_block.data_weights(terms, result) == {"kept": 0.1, "trimmed": 0.0, "negative": 0.0}
    assert rewards_block.split(terms, rewards_block.data_weights(terms, result), {}) == {"kept": {"data": 1000}}


def _fedavg(updates):
    from trustmesh.fl.strategies import FedAvg

    return FedAvg().aggregate(updates)[0]


def test_the_audit_names_a_contribution_that_is_not_the_recomputed_one(round_one):
    definition, start, updates = round_one
    definition = {**definition, "rewards": {"score": "shapley", "permutations": 5}}
    sid = "ab" * 32
    scores = shapley.scores(updates, start, screening.held_out_accuracy(definition), seed=bytes.fromhex(sid),
                            permutations=5)
    for claimed, ok in ((scores, True), ({**scores, "node-free-rider": 0.25}, False)):
        rnd = audit._Round({"schedule_id": sid}, definition, result={"contributions": claimed})
        report = audit.RoundAudit(number=1)
        audit.check_contributions(report, rnd, updates, start)
        assert report.ok is ok, report.problems


@pytest.mark.parametrize("changes, message", [
    ({"score": "shapley"}, "score shapley needs permutations"),
    ({"permutations": 5}, "permutations belongs to score shapley"),
    ({"score": "best"}, "score must be one of weight, shapley"),
])
def test_a_score_option_that_cannot_work_is_refused_at_deploy(changes, message):
    definition = workflow.load_definition(WORKFLOW)
    definition["rewards"] = {"total": 100, "per_round": 10, "data_share": 10000, "compute_share": 0,
                             "fee_share": 0, **changes}
    with pytest.raises(workflow.DefinitionError, match=message):
        workflow.validate_definition(definition, allow_node_names=True)
