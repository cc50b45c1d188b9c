"""Secure aggregation through every real part (train_on "iot", five IoT nodes, two compute nodes):
each participant's update leaves it only masked; the aggregator unmasks the sum with the shares
revealed on chain; a participant that goes quiet after uploading is covered by its neighbours;
no plaintext update is ever found in Redis, CouchDB or chain state, and the audit recomputes
the sum from the masked uploads and the revealed shares."""

from __future__ import annotations

import copy
import hashlib

import pytest

from helpers.family_scenario import Round, apply
from helpers.ledger_helpers import run
from helpers.federation_run import federate, scan_stores
from trustmesh.fl import model_format, secagg
from trustmesh.fl.strategies import ClientUpdate, FedAvg
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.scheduling import layout, schedule, workflow

SECURE = {"protocol": "secagg+", "threshold": 3, "neighbours": 4}


class _Plaintexts:
    """The float32 bytes of every update handed to masking: none may turn up in a store."""

    def __init__(self):
        self.needles: list[bytes] = []
        self.updates: list[tuple[str, int, dict]] = []  # (node, weight, state) in the order masked

    def add(self, state, samples: int, node: str) -> None:
        self.updates.append((node, samples, state))
        first = next(iter(state.values())).detach().numpy().ravel()[:16]
        self.needles += [first.astype("<f4").tobytes(), first.astype("<f8").tobytes()]

    def found_in(self, blob) -> bool:
        data = blob.encode() if isinstance(blob, str) else bytes(blob)
        return any(needle in data for needle in self.needles)


@pytest.fixture
def plaintexts(monkeypatch):
    """Every update as it is handed to masking (secagg.masked_input), in that order."""
    seen, masked_input = _Plaintexts(), secagg.masked_input

    def spy(state, samples, **kwargs):
        seen.add(state, samples, kwargs["me"])
        return masked_input(state, samples, **kwargs)

    monkeypatch.setattr(secagg, "masked_input", spy)
    return seen


def test_updates_leave_their_nodes_only_masked_and_the_audit_verifies_the_sum(devnet, stores, tmp_path,
                                                                             monkeypatch, plaintexts):
    # iot-4 goes quiet after uploading: it never reveals its shares of the others' self-masks
    unmask = IoTNode._unmask

    async def quiet_iot_4(self, definition, sid):
        if self.name != "iot-4":
            await unmask(self, definition, sid)

    monkeypatch.setattr(IoTNode, "_unmask", quiet_iot_4)
    redis_server, couch_server = stores

    async def scan(client, keys):
        await scan_stores(client, plaintexts, couch_server.url, redis_server.url)
        return keys

    _, results, _, keys = federate(devnet, stores, tmp_path, "digits-secagg", rounds=2, attack=None,
                                   federation={"train_on": "iot"}, secure_aggregation=SECURE, after=scan)
    assert len(plaintexts.needles) == 2 * 5 * 2  # five participants masked an update in each of two rounds
    for result in results:  # FedAvg's sample shares; the audit (in federate) redid the unmasked sum
        assert sum(result["aggregation_weights"].values()) == pytest.approx(1.0)
        assert len(set(result["aggregation_weights"].values())) > 1
    # round 1's global model is FedAvg of the five plaintext updates, to the quantization's 2^-24
    first = [ClientUpdate(node, state, samples) for node, samples, state in plaintexts.updates[:5]]
    expected, _ = FedAvg().aggregate(first)
    stored = run(_global_model(redis_server.url, results[0]["global_model_digest"]))
    for name, tensor in expected.items():
        assert (stored[name] - tensor).abs().max().item() <= 1e-6, name


async def _global_model(redis_url: str, digest: str):
    from trustmesh.stores.redis_state import BlobStore, connect

    redis = await connect(redis_url)
    try:
        return model_format.load(await BlobStore(redis).get(digest), digest, _spec()).state
    finally:
        await redis.aclose()


def _spec():
    return workflow.load_definition(__import__("pathlib").Path(__file__).resolve().parents[1] / "workflows"
                                    / "federated-digits.json")["model"]


# --------------------------------------------------------------------------- the definition


@pytest.mark.parametrize("changes, message", [
    ({"federation": {"train_on": "compute"}}, 'needs federation.train_on "iot"'),
    ({"strategy": {"name": "median"}}, "leave strategy out or set it to fedavg"),
    ({"update_checks": {"max_norm_ratio": 2.0}}, "update_checks need each update in the clear"),
    ({"secure_aggregation": {**SECURE, "threshold": 9}}, "threshold 9 is more than the 4 neighbours"),
    ({"secure_aggregation": {**SECURE, "protocol": "secagg"}}, "protocol must be one of secagg+"),
])
def test_what_secure_aggregation_cannot_protect_is_refused_at_deploy(changes, message):
    definition = copy.deepcopy(workflow.load_definition(
        __import__("pathlib").Path(__file__).resolve().parents[1] / "workflows" / "federated-digits.json"))
    definition["federation"].update(train_on="iot", min_nodes_required=5)
    definition["secure_aggregation"] = SECURE
    for key, value in changes.items():
        if key == "federation":
            definition["federation"].update(value)
        else:
            definition[key] = value
    with pytest.raises(workflow.DefinitionError, match=message):
        workflow.validate_definition(definition, allow_node_names=True)


# --------------------------------------------------------------------------- the rules, on a dict


def test_a_revealed_share_that_is_not_the_one_given_is_refused_naming_its_holder():
    """Shares published by one participant, then a neighbour revealing another in their place."""
    rnd = Round()
    state = copy.deepcopy(rnd.states["registered"])
    # the workflow aggregates securely: deploy it as an update with the block (train_on iot)
    definition = copy.deepcopy(rnd.definition)
    definition["federation"].update(train_on="iot", min_nodes_required=3)
    definition["secure_aggregation"] = {"protocol": "secagg+", "threshold": 2, "neighbours": 2}
    apply(state, rnd.coordinator, layout.WORKFLOW_FAMILY, workflow.update_payload(definition, 1))
    from trustmesh.scheduling import federation

    apply(state, rnd.coordinator, layout.FEDERATION_FAMILY, federation.make_open_round_payload(rnd.workflow_id, 1))
    sid = rnd.schedule_id
    keys = [p.public_key().as_hex() for p in rnd.participants]
    secrets = {k: secagg.round_secrets(k.encode(), sid) for k in keys}
    for participant, key in zip(rnd.participants, keys):
        apply(state, participant, layout.SCHEDULE_FAMILY, schedule._encode("secagg_keys", {
            "schedule_id": sid, "c_pk": secagg.public_key(secrets[key].c_private),
            "s_pk": secagg.public_key(secrets[key].s_private)}))
        apply(state, participant, layout.FEDERATION_FAMILY,
              federation.make_submit_payload(sid, hashlib.sha256(key.encode()).hexdigest(), 10))
    graph = secagg.neighbours(sid, keys, 2)
    given = {}
    for participant, key in zip(rnd.participants, keys):
        shares = {kind: secagg.split_secret(secret, 2, graph[key])
                  for kind, secret in (("b", secrets[key].self_seed), ("s", secrets[key].s_private))}
        given[key] = shares["b"]
        apply(state, participant, layout.SCHEDULE_FAMILY, schedule._encode("secagg_shares", {
            "schedule_id": sid, "self_commitment": secagg.commitment(secrets[key].self_seed),
            "sealed": {h: {k: "00" * 49 for k in ("b", "s")} for h in graph[key]},
            "digests": {h: {k: secagg.share_digest(shares[k][h]) for k in ("b", "s")} for h in graph[key]}}))
    apply(state, rnd.coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(sid))
    tasks = schedule.decode_record(state[layout.assignments_address(sid)])["tasks"]
    by_key = {n.public_key().as_hex(): n for n in rnd.nodes} | dict(zip(keys, rnd.participants))
    holder, holder_key = rnd.participants[0], keys[0]
    sender = graph[holder_key][0]
    early = schedule._encode("secagg_unmask", {"schedule_id": sid, "shares": {sender: given[sender][holder_key].hex()}})
    with pytest.raises(InvalidTransaction, match="not yet"):
        apply(copy.deepcopy(state), holder, layout.SCHEDULE_FAMILY, early)
    for task_id in ["preprocess", *sorted(t for t in tasks if t.startswith("train:"))]:
        apply(state, by_key[tasks[task_id]["node"]], layout.SCHEDULE_FAMILY, schedule.report_payload(
            sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(),
            metrics={"loss": 0.5, "accuracy": 0.8, "samples": 10}))
    wrong = bytearray(given[sender][holder_key])
    wrong[-1] ^= 1
    with pytest.raises(InvalidTransaction, match=f"node {holder_key} revealed a share of {sender}'s self-mask"):
        apply(copy.deepcopy(state), holder, layout.SCHEDULE_FAMILY, schedule._encode(
            "secagg_unmask", {"schedule_id": sid, "shares": {sender: bytes(wrong).hex()}}))
    apply(state, holder, layout.SCHEDULE_FAMILY, early)  # the right one, once every upload is fixed
    assert schedule.decode_record(state[layout.secagg_address(sid, holder_key)])["revealed"] == {
        sender: given[sender][holder_key].hex()}


def test_an_unmask_step_below_the_threshold_ends_the_round_as_timeout_saying_why(devnet, stores, tmp_path,
                                                                                monkeypatch):
    # everybody neighbours everybody (5 nodes, k = 4) and 3 shares rebuild a self-mask: with iot-3
    # and iot-4 quiet, the other three have only two holders left who answer
    unmask = IoTNode._unmask

    async def two_quiet(self, definition, sid):
        if self.name not in ("iot-3", "iot-4"):
            await unmask(self, definition, sid)

    monkeypatch.setattr(IoTNode, "_unmask", two_quiet)

    async def round_record(client, keys):
        from trustmesh.scheduling.reader import FederationReader

        reader = FederationReader(client)
        return await reader.round((await reader.rounds("digits-secagg-stalled"))["rounds"]["1"])

    _, results, _, record = federate(devnet, stores, tmp_path, "digits-secagg-stalled", rounds=1, attack=None,
                                     finals=0, federation={"train_on": "iot", "round_timeout": 5},
                                     secure_aggregation=SECURE, after=round_record)
    assert results == [None] and record["status"] == "timeout"
    assert "only 2 of the 3 shares needed to unmask participant" in record["reason"]
    assert "within 5 s of the last upload" in record["reason"]


def test_a_participant_that_drops_out_before_uploading_is_left_out_and_its_masks_removed(devnet, stores,
                                                                                          tmp_path, monkeypatch,
                                                                                          plaintexts):
    """iot-5 submits and sends its shares, then never trains: past its deadline the coordinator
    drops its upload, its neighbours reveal their shares of its mask key, and the round's model is
    FedAvg of the other four."""
    start_trainer = IoTNode._start_trainer

    async def iot_5_never_trains(self):
        if self.name != "iot-5":
            await start_trainer(self)

    monkeypatch.setattr(IoTNode, "_start_trainer", iot_5_never_trains)
    redis_server, _ = stores
    dropped, results, _, _ = federate(devnet, stores, tmp_path, "digits-secagg-dropout", rounds=1, attack=None,
                                      task_deadline=2, federation={"train_on": "iot"}, secure_aggregation=SECURE)
    [result] = results
    assert dropped not in result["aggregation_weights"] and len(result["aggregation_weights"]) == 4
    assert len(plaintexts.updates) == 4  # iot-5 never masked anything
    expected, _ = FedAvg().aggregate([ClientUpdate(n, state, s) for n, s, state in plaintexts.updates])
    stored = run(_global_model(redis_server.url, result["global_model_digest"]))
    for name, tensor in expected.items():
        assert (stored[name] - tensor).abs().max().item() <= 1e-6, name


@pytest.fixture(scope="module")
def secure_round():
    return Round(secure_aggregation={"protocol": "secagg+", "threshold": 2, "neighbours": 2})


def _overdue(scenario, past_deadline: bool = True):
    """An hour on, preprocess done, then (past_deadline) past the deadline it gave the local_train tasks."""
    from helpers.family_scenario import set_chain_time

    state = copy.deepcopy(scenario.states["late"])
    by_key = {n.public_key().as_hex(): n for n in scenario.nodes}
    apply(state, by_key[scenario.assigned["preprocess"]], layout.SCHEDULE_FAMILY,
          schedule.report_payload(scenario.schedule_id, "preprocess", "done", output_digest="ab" * 32))
    if past_deadline:
        set_chain_time(state, 1_700_000_000 + 7200, block_num=8)
    return state


def _drop(scenario, state, task_id, signer=None):
    apply(state, signer or scenario.coordinator, layout.SCHEDULE_FAMILY,
          schedule._encode("drop_update", {"schedule_id": scenario.schedule_id, "task_id": task_id}))


def test_the_coordinator_drops_an_overdue_upload_and_the_aggregate_may_go_on(secure_round):
    state = _overdue(secure_round)
    trains = sorted(t for t in secure_round.assigned if t.startswith("train:"))
    _drop(secure_round, state, trains[0])
    assert schedule.decode_record(state[layout.task_status_address(secure_round.schedule_id, trains[0])])[
        "status"] == "dropped"
    with pytest.raises(InvalidTransaction, match="is dropped already"):
        _drop(secure_round, state, trains[0])
    owner = {p.public_key().as_hex(): p for p in secure_round.participants}[secure_round.assigned[trains[0]]]
    with pytest.raises(InvalidTransaction, match="was dropped past its deadline"):  # a late report comes too late
        apply(state, owner, layout.SCHEDULE_FAMILY, schedule.report_payload(
            secure_round.schedule_id, trains[0], "done", output_digest="cd" * 32, metrics={"samples": 10}))


@pytest.mark.parametrize("case, message", [
    ("not overdue", "is not overdue"),
    ("not the coordinator", "only the round's coordinator"),
    ("not an upload", "only a local_train"),
    ("not a secure workflow", "does not aggregate securely"),
])
def test_an_upload_is_dropped_only_by_the_coordinator_past_its_deadline_in_a_secure_round(secure_round, case,
                                                                                       message):
    scenario, state = secure_round, _overdue(secure_round)
    task_id = sorted(t for t in scenario.assigned if t.startswith("train:"))[0]
    signer = None
    if case == "not overdue":
        state = _overdue(scenario, past_deadline=False)
    elif case == "not the coordinator":
        signer = scenario.participants[1]
    elif case == "not an upload":
        task_id = "aggregate"
    else:
        scenario = Round()
        state = copy.deepcopy(scenario.states["late"])
    with pytest.raises(InvalidTransaction, match=message):
        _drop(scenario, state, task_id, signer)
