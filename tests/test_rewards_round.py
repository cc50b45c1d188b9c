"""Incentives end to end: a whole federation (federation_run.federate: real IoT and compute nodes,
stores, dev validator), one participant a free rider (its compute nodes return the global model
unchanged), one holding twice the data. The update check min_accuracy rejects the free rider's
update (the initial model it hands back classifies about one digit in ten), so the round result
gives it weight 0; FedAvg gives the double-data participant twice the weight of the others.
The owner escrows the budget with the deployment, the coordinator settles the final round by
itself, the owner takes back the rest; rewards are ordered as contributions, every unit is
accounted for, and the audit (with its payment re-check) passes."""

from __future__ import annotations

import asyncio
import copy
import json
import subprocess
import sys

import numpy as np

from helpers import federation_run
from helpers.federation_run import federate
from trustmesh import audit
from trustmesh.endpoints import Endpoints
from trustmesh.fl.datasets import Dataset, dump_npz, federated_digits
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.signing import PrivateKey, load_or_create_key
from trustmesh import rewards_audit
from trustmesh.rewards_audit import all_balances, workflow_rewards
from trustmesh.scheduling import rewards
from trustmesh.scheduling.reader import FederationReader
from helpers.ledger_helpers import rest, run, submit_and_wait

WORKFLOW = "digits-rewards"
DATA = {"dataset": "digits", "partition": {"kind": "iid", "seed": 7}, "test_fraction": 0.2}


def test_rewards_follow_contributions_and_every_unit_is_accounted_for(devnet, stores, tmp_path, monkeypatch):
    shards = federated_digits(DATA, 5).shards
    double = Dataset(np.concatenate([shards[1].x, shards[2].x]), np.concatenate([shards[1].y, shards[2].y]))
    (tmp_path / "iot-2.npz").write_bytes(dump_npz(double))
    real = federation_run.IoTNode

    def iot_node(name, *args, **kwargs):  # iot-2 brings its own file: twice the samples of the others
        return real(name, *args, data_path=str(tmp_path / "iot-2.npz") if name == "iot-2" else None, **kwargs)

    monkeypatch.setattr(federation_run, "IoTNode", iot_node)
    fee = PrivateKey.generate().public_key().as_hex()
    block = {"total": 10_000, "per_round": 7_001, "data_share": 7000, "compute_share": 2000, "fee_share": 1000,
             "fee_account": fee}
    redis_server, couch_server = stores

    async def pay(client, keys):
        owner = load_or_create_key(tmp_path / "owner", "owner")
        reader = FederationReader(client)
        sid = (await reader.rounds(WORKFLOW))["rounds"]["1"]
        for _ in range(100):  # the coordinator settles the final round by itself
            if await reader.settlement(sid) is not None:
                break
            await asyncio.sleep(0.1)
        [status] = await submit_and_wait(client, [make_batch(owner, [rewards.make_refund_transaction(owner, WORKFLOW)])],
                                         timeout=60)
        assert status["status"] == "COMMITTED", status
        report = await audit.audit_workflow(WORKFLOW, Endpoints(
            validator=devnet.component_url, rest=devnet.rest_url, redis=redis_server.url, couch=couch_server.url))
        return (await workflow_rewards(reader, WORKFLOW), await all_balances(reader), report,
                owner.public_key().as_hex())

    free_rider, results, _, extra = federate(
        devnet, stores, tmp_path, WORKFLOW, rounds=1, epochs=6, attack="free_rider", data=DATA,
        strategy={"name": "fedavg"}, update_checks={"min_accuracy": 0.25}, rewards=block, after=pay)
    found, (accounts, escrows), report, owner = extra
    assert report.ok, audit.render_text(report)
    [result] = results
    assert free_rider in result.get("rejected", {}) and result["aggregation_weights"][free_rider] == 0

    [row] = found["rounds"]
    payouts = row["settlement"]["payouts"]
    assert payouts == row["expected"] and sum(sum(p.values()) for p in payouts.values()) == 7_001
    data = {key: parts.get("data", 0) for key, parts in payouts.items()}
    keys = {n: load_or_create_key(tmp_path / n / "keys", n).public_key().as_hex() for n in
            ("iot-1", "iot-2", "iot-3", "iot-4", "iot-5")}
    honest = [data[keys[n]] for n in ("iot-1", "iot-3", "iot-4")]
    assert data.get(keys["iot-5"], 0) == 0 and keys["iot-5"] not in payouts  # the free rider earns nothing
    assert all(data[keys["iot-2"]] > h > 0 for h in honest)                # twice the data earns the most
    assert abs(data[keys["iot-2"]] - 2 * honest[0]) <= 2
    assert payouts[fee] == {"fee": 700}
    computes = {k: p["compute"] for k, p in payouts.items() if "compute" in p}
    assert sum(computes.values()) == 1400 and len(computes) == 2
    assert sum(accounts.values()) + sum(escrows.values()) == 0             # every unit accounted for
    assert escrows[WORKFLOW] == 0 and accounts[owner] == -7_001
    assert found["escrow"]["refunded"] == 10_000 - 7_001
    assert report.to_json()["checks"] > 0 and not report.problems
    # the audit's payment re-check names what a tampered chain would show
    definition = {"rewards": block}

    def problems(found_, accounts_):
        seen = []
        rewards_audit.payment_checks(lambda ok, why: ok or seen.append(why), found_, definition, accounts_, escrows)
        return seen

    assert problems(found, accounts) == []
    tampered = copy.deepcopy(found)
    payouts = tampered["rounds"][0]["settlement"]["payouts"]
    payouts[keys["iot-5"]] = {"data": 100}
    payouts[keys["iot-2"]]["data"] -= 100
    assert any("the rule pays" in p for p in problems(tampered, accounts))
    minted = {**accounts, keys["iot-1"]: accounts.get(keys["iot-1"], 0) + 1}
    assert any("add to 1, not 0: units appeared" in p for p in problems(found, minted))


def test_shapley_scores_pay_the_free_rider_least_and_the_audit_recomputes_them(devnet, stores, tmp_path):
    fee = PrivateKey.generate().public_key().as_hex()
    block = {"total": 10_000, "per_round": 5_000, "data_share": 9000, "compute_share": 0, "fee_share": 1000,
             "fee_account": fee, "score": "shapley", "permutations": 120}  # ~ every order of 5: near-exact
    free_rider, results, _, _ = federate(devnet, stores, tmp_path, "digits-shapley", rounds=1, epochs=3,
                                         attack="free_rider", data=DATA, strategy={"name": "fedavg"}, rewards=block)
    [result] = results  # the audit in federate recomputed every score from the seed on chain
    scores = result["contributions"]
    assert set(scores) == set(result["aggregation_weights"])
    assert scores[free_rider] < min(v for k, v in scores.items() if k != free_rider), scores
    # the everyday commands read the same from the chain
    shown = _cli(devnet, "rewards", "digits-shapley", "--json")
    [row] = shown["rounds"]
    assert row["settlement"]["amount"] == 5_000 and row["settlement"]["payouts"] == row["expected"]
    balances = _cli(devnet, "balance", "--json")
    assert sum(balances["accounts"].values()) + sum(balances["escrows"].values()) == 0
    assert _cli(devnet, "balance", fee, "--json") == {fee: 500}
    bad = subprocess.run([sys.executable, "-m", "trustmesh.cli", "rewards", "no-such-workflow", "--rest",
                          devnet.rest_url], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in bad.stderr
    # and the dashboard's nodes page shows each participant's balance
    nodes = run(_dashboard_nodes(devnet.rest_url))
    shown_balances = {n["key"]: n["balance"] for n in nodes["iot"]}
    assert {k: v for k, v in shown_balances.items() if v} == {k: v for k, v in balances["accounts"].items()
                                                            if k in shown_balances and v}


async def _dashboard_nodes(rest_url: str) -> dict:
    from trustmesh.dashboard import views

    async with rest(rest_url) as client:
        return views.nodes(await views.read_snapshot(client), None, None, {})


def _cli(devnet, *args):
    done = subprocess.run([sys.executable, "-m", "trustmesh.cli", *args, "--rest", devnet.rest_url],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
