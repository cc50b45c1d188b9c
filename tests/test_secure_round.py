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
from helpers.federation_run import encodings, federate, scan_stores
from trustmesh import audit
from trustmesh.fl import model_format, secagg
from trustmesh.fl.training import initial_state
from trustmesh.fl.strategies import ClientUpdate, FedAvg
from trustmesh.iot_node.node import IoTNode
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.scheduling import layout, schedule, workflow

SECURE = {"protocol": "secagg+", "threshold": 3, "neighbours": 4}


class _Plaintexts:
    """Every update handed to masking, in the forms it would leave a node unmasked: float32,
    float64, and the fixed-point vector a masked upload holds when its masks are zero, each raw,
    in hex and in base64 (found_in: none may turn up in a store). And the positive controls
    (controls_in): the masked uploads, their digests, the global model, where the scan must find them.

    The needles are 16 consecutive values of each update that no public model holds (public: the
    initial model, each round's global model). Weights training left as they were (a hidden unit
    no sample of a node activates) equal the round's starting model, which is public: found there,
    they would say nothing about the update, and a needle of them once failed this test."""

    def __init__(self):
        self.updates: list[tuple[str, int, dict]] = []  # (node, weight, state) in the order masked
        self.controls: dict[str, list[bytes]] = {}
        self._public: list[bytes] = []
        self._needles: list[bytes] | None = None

    def add(self, state, samples: int, node: str, masked) -> None:
        self.updates.append((node, samples, state))
        self._needles = None
        blob = secagg.to_bytes(masked)
        self.control("masked upload", blob[:128])
        self.controls.setdefault("masked upload digest", []).append(hashlib.sha256(blob).hexdigest().encode())

    def public(self, model: bytes) -> None:
        """A model anyone may read (its float32 bytes, or a blob holding them)."""
        self._public.append(bytes(model))
        self._needles = None

    def control(self, name: str, raw: bytes) -> None:
        self.controls.setdefault(name, []).extend(encodings(raw))

    @property
    def needles(self) -> list[bytes]:
        if self._needles is None:
            self._needles = []
            for node, samples, state in self.updates:
                values, quantized = secagg.flat(state), secagg.to_bytes(secagg.quantize(state, samples))
                start = next((i for i in range(0, len(values) - 15, 16)
                              if not any(values[i:i + 16].astype("<f4").tobytes() in model for model in self._public)),
                             None)
                assert start is not None, f"every value of {node[:16]}'s update is in a public model"
                window = values[start:start + 16]
                for raw in (window.astype("<f4").tobytes(), window.astype("<f8").tobytes(),
                            quantized[8 * start:8 * start + 128]):
                    self._needles += encodings(raw)
        return self._needles

    def found_in(self, blob) -> bool:
        data = blob.encode() if isinstance(blob, str) else bytes(blob)
        return any(needle in data for needle in self.needles)

    def controls_in(self, blob) -> set[str]:
        data = blob.encode() if isinstance(blob, str) else bytes(blob)
        return {name for name, needles in self.controls.items() if any(n in data for n in needles)}


@pytest.fixture
def plaintexts(monkeypatch):
    """Every update as it is handed to masking (secagg.masked_input), in that order."""
    seen, masked_input = _Plaintexts(), secagg.masked_input

    def spy(state, samples, **kwargs):
        masked = masked_input(state, samples, **kwargs)
        seen.add(state, samples, kwargs["me"], masked)
        return masked

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
        from trustmesh.scheduling.reader import FederationReader
        from trustmesh.stores.blobs import BlobStore
        from trustmesh.stores.redis_client import connect

        reader = FederationReader(client)
        rounds = (await reader.rounds("digits-secagg"))["rounds"]
        definition = (await reader.workflow("digits-secagg"))["definition"]
        initial = initial_state(definition["model"], definition["hyperparameters"]["seed"])
        plaintexts.public(secagg.flat(initial).astype("<f4").tobytes())
        redis = await connect(redis_server.url)
        try:
            for number, sid in sorted(rounds.items()):
                model = await BlobStore(redis).get((await reader.round_result(sid))["global_model_digest"])
                plaintexts.public(model)
                if number == "1":
                    plaintexts.control("global model", model[-128:])
        finally:
            await redis.aclose()
        found = await scan_stores(client, plaintexts, couch_server.url, redis_server.url)
        return found, await _tampered_audits(client, keys, redis_server.url, couch_server.url, devnet, monkeypatch)

    _, results, _, (found, tampered) = federate(devnet, stores, tmp_path, "digits-secagg", rounds=2, attack=None,
                                                federation={"train_on": "iot"}, secure_aggregation=SECURE, after=scan)
    assert len(plaintexts.updates) == 2 * 5  # five participants masked an update in each of two rounds
    # the scan's positive control: it reads where the masked forms are
    assert {"masked upload", "global model"} <= found["redis"]
    assert "masked upload digest" in found["chain state"] and "masked upload digest" in found["blocks"]
    assert "global model" in found["couchdb"]
    for result in results:  # FedAvg's sample shares; the audit (in federate) redid the unmasked sum
        assert sum(result["aggregation_weights"].values()) == pytest.approx(1.0)
        assert len(set(result["aggregation_weights"].values())) > 1
    # round 1's global model is FedAvg of the five plaintext updates, to the quantization's 2^-24
    first = [ClientUpdate(node, state, samples) for node, samples, state in plaintexts.updates[:5]]
    expected, _ = FedAvg().aggregate(first)
    stored = run(_global_model(redis_server.url, results[0]["global_model_digest"]))
    for name, tensor in expected.items():
        assert (stored[name] - tensor).abs().max().item() <= 1e-6, name
    # and the audit names what is tampered with
    forged_share, forged_upload = tampered
    assert any("secure aggregation cannot be redone from the chain" in p and "shares do not rebuild" in p
               for p in forged_share), forged_share
    assert any("masked update of node" in p for p in forged_upload), forged_upload


async def _tampered_audits(client, keys, redis_url, couch_url, devnet, monkeypatch):
    """The audit's problems (texts) with round 1 seen tampered two ways: the revealed shares read
    back changed (forged records), and one masked upload changed in Redis."""
    from trustmesh import audit
    from trustmesh.endpoints import Endpoints
    from trustmesh.scheduling.reader import FederationReader
    from trustmesh.stores.redis_client import connect

    endpoints = Endpoints(validator=devnet.component_url, rest=devnet.rest_url, redis=redis_url, couch=couch_url)
    reader = FederationReader(client)
    sid = (await reader.rounds("digits-secagg"))["rounds"]["1"]
    honest = FederationReader.secagg

    async def forged(self, schedule_id, node):
        record = await honest(self, schedule_id, node)
        if schedule_id == sid and record and record.get("revealed"):  # each share's last byte flipped
            record = {**record, "revealed": {sender: share[:-2] + f"{int(share[-2:], 16) ^ 1:02x}"
                                             for sender, share in record["revealed"].items()}}
        return record

    monkeypatch.setattr(FederationReader, "secagg", forged)
    try:
        report = await audit.audit_workflow("digits-secagg", endpoints)
    finally:
        monkeypatch.setattr(FederationReader, "secagg", honest)
    forged_share = _problems(report)
    # one masked upload of round 1 overwritten where the audit fetches it
    assignments = await reader.assignments(sid)
    train = sorted(t for t, task in assignments["tasks"].items() if task["kind"] == "local_train")[0]
    digest = (await reader.task_status(sid, train))["output_digest"]
    redis = await connect(redis_url)
    try:
        keys_found = [key async for key in redis.scan_iter(match=f"*{digest}", count=500)]
        assert keys_found, "the masked upload is in Redis"
        for key in keys_found:
            blob = bytearray(await redis.get(key))
            blob[0] ^= 1
            await redis.set(key, bytes(blob))
    finally:
        await redis.aclose()
    return forged_share, _problems(await audit.audit_workflow("digits-secagg", endpoints))


def _problems(report) -> list[str]:
    text = audit.render_text(report) if not report.ok else ""
    return [line for line in text.splitlines() if line.strip()]


async def _global_model(redis_url: str, digest: str):
    from trustmesh.stores.blobs import BlobStore
    from trustmesh.stores.redis_client import connect

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
    ({"privacy": {"mechanism": "dp-fedavg", "clipping": "fixed", "clipping_norm": 1.0, "noise_multiplier": 0.5,
                  "delta": 1e-05, "epsilon_budget": 50, "where": "server"}},
     'the noise must be added by the clients \\(privacy.where "client"\\)'),
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


class _SecureState:
    """Three participants of a securely aggregated round (threshold 2, everybody neighbours
    everybody) on dict state: keys advertised with the submissions, shares published (sealed
    blobs stand-ins, real digests), the round assigned. given[kind][sender][holder]: the share."""

    def __init__(self):
        from trustmesh.scheduling import federation

        self.rnd = rnd = Round()
        self.state = state = copy.deepcopy(rnd.states["registered"])
        # the workflow aggregates securely: deploy it as an update with the block (train_on iot)
        definition = copy.deepcopy(rnd.definition)
        definition["federation"].update(train_on="iot", min_nodes_required=3)
        definition["secure_aggregation"] = {"protocol": "secagg+", "threshold": 2, "neighbours": 2}
        apply(state, rnd.coordinator, layout.WORKFLOW_FAMILY, workflow.update_payload(definition, 1))
        apply(state, rnd.coordinator, layout.FEDERATION_FAMILY, federation.make_open_round_payload(rnd.workflow_id, 1))
        self.sid = sid = rnd.schedule_id
        self.keys = keys = [p.public_key().as_hex() for p in rnd.participants]
        secrets = {k: secagg.round_secrets(k.encode(), sid) for k in keys}
        for participant, key in zip(rnd.participants, keys):
            apply(state, participant, layout.SCHEDULE_FAMILY, schedule._encode("secagg_keys", {
                "schedule_id": sid, "c_pk": secagg.public_key(secrets[key].c_private),
                "s_pk": secagg.public_key(secrets[key].s_private)}))
            apply(state, participant, layout.FEDERATION_FAMILY,
                  federation.make_submit_payload(sid, hashlib.sha256(key.encode()).hexdigest(), 10))
        self.graph = graph = secagg.neighbours(sid, keys, 2)
        self.given = {"b": {}, "s": {}}
        for participant, key in zip(rnd.participants, keys):
            shares = {kind: secagg.split_secret(secret, 2, graph[key])
                      for kind, secret in (("b", secrets[key].self_seed), ("s", secrets[key].s_private))}
            for kind in shares:
                self.given[kind][key] = shares[kind]
            apply(state, participant, layout.SCHEDULE_FAMILY, schedule._encode("secagg_shares", {
                "schedule_id": sid, "self_commitment": secagg.commitment(secrets[key].self_seed),
                "sealed": {h: {k: "00" * 49 for k in ("b", "s")} for h in graph[key]},
                "digests": {h: {k: secagg.share_digest(shares[k][h]) for k in ("b", "s")} for h in graph[key]}}))
        apply(state, rnd.coordinator, layout.SCHEDULE_FAMILY, schedule.assign_payload(sid))
        self.tasks = schedule.decode_record(state[layout.assignments_address(sid)])["tasks"]
        self.by_key = {n.public_key().as_hex(): n for n in rnd.nodes} | dict(zip(keys, rnd.participants))
        self.trains = {task["data_owner"]: t for t, task in self.tasks.items() if task["kind"] == "local_train"}

    def report(self, task_id: str) -> None:
        apply(self.state, self.by_key[self.tasks[task_id]["node"]], layout.SCHEDULE_FAMILY, schedule.report_payload(
            self.sid, task_id, "done", output_digest=hashlib.sha256(task_id.encode()).hexdigest(),
            metrics={"loss": 0.5, "accuracy": 0.8, "samples": 10}))

    def unmask(self, holder: str, shares: dict, state=None) -> None:
        apply(self.state if state is None else state, self.by_key[holder], layout.SCHEDULE_FAMILY,
              schedule._encode("secagg_unmask", {"schedule_id": self.sid, "shares": shares}))


def test_a_revealed_share_that_is_not_the_one_given_is_refused_naming_its_holder():
    """Shares published by one participant, then a neighbour revealing another in their place."""
    s = _SecureState()
    holder = s.keys[0]
    sender = s.graph[holder][0]
    right = {sender: s.given["b"][sender][holder].hex()}
    with pytest.raises(InvalidTransaction, match="3 are not yet"):  # no upload settled
        s.unmask(holder, right, copy.deepcopy(s.state))
    for task_id in ["preprocess", *sorted(s.trains.values())]:
        s.report(task_id)
    wrong = bytearray(s.given["b"][sender][holder])
    wrong[-1] ^= 1
    with pytest.raises(InvalidTransaction, match=f"node {holder} revealed a share of {sender}'s self-mask"):
        s.unmask(holder, {sender: bytes(wrong).hex()}, copy.deepcopy(s.state))
    s.unmask(holder, right)  # the right one, once every upload is fixed
    assert schedule.decode_record(s.state[layout.secagg_address(s.sid, holder)])["revealed"] == right
    with pytest.raises(InvalidTransaction, match=f"node {holder} already revealed its shares"):
        s.unmask(holder, right, copy.deepcopy(s.state))


def test_with_fewer_uploads_than_the_threshold_no_dropped_node_reveals_and_the_round_ends_saying_why():
    """One of three uploads (threshold 2), the other two dropped past their deadline: the dropped
    may not reveal (their reveals would let the one upload be unmasked alone), the one uploader's
    reveals are taken, and the round ends as timeout at once, saying why."""
    from helpers.family_scenario import set_chain_time
    from trustmesh.scheduling import federation

    s = _SecureState()
    uploader, *dropped = s.keys
    s.report("preprocess")
    s.report(s.trains[uploader])
    pending = schedule._encode("secagg_unmask", {"schedule_id": s.sid, "shares": {}})
    with pytest.raises(InvalidTransaction, match="dropped by the coordinator past its deadline \\(a dropped upload "
                                                 "counts as settled\\); 2 are not yet"):
        apply(copy.deepcopy(s.state), s.by_key[uploader], layout.SCHEDULE_FAMILY, pending)
    set_chain_time(s.state, 1_700_000_000 + 7200, block_num=9)
    for node in dropped:
        apply(s.state, s.rnd.coordinator, layout.SCHEDULE_FAMILY,
              schedule._encode("drop_update", {"schedule_id": s.sid, "task_id": s.trains[node]}))
    other = dropped[1]
    with pytest.raises(InvalidTransaction, match=f"node {dropped[0]}'s own upload in round .* was dropped"):
        s.unmask(dropped[0], {other: s.given["s"][other][dropped[0]].hex()}, copy.deepcopy(s.state))
    s.unmask(uploader, {n: s.given["s"][n][uploader].hex() for n in dropped})  # their mask keys' shares
    apply(s.state, s.rnd.coordinator, layout.FEDERATION_FAMILY, federation.make_close_round_payload(s.sid))
    record = schedule.decode_record(s.state[layout.round_address(s.sid)])
    assert record["status"] == "timeout"
    assert record["reason"].startswith("secure aggregation: only 1 participant(s) uploaded a masked update, fewer "
                                       "than the threshold 2")


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
