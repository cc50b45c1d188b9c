"""What a compute node does for each task kind of a round.

Every input comes from the chain (assignments, task statuses, round results) or from a store by
the digest the chain holds, verified before use; every output goes to a store under its sha256
and is reported on chain as that digest.

    preprocess   checks that every submission of the round is available and intact
    local_train  opens its IoT node's data (only this node's envelope), trains from the previous
                 round's global model, stores the update
    aggregate    combines every local_train output it depends on with the workflow's strategy,
                 stores the global model and reports the round result
    evaluate     scores the global model on the held-out split every node derives alike

The CouchDB history is written from the chain once these reports commit (history_recorder.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from trustmesh.ledger import payload as cbor
from trustmesh.scheduling.reader import FederationReader
from trustmesh.scheduling.schedule import SETTLED, StartingModel
from trustmesh.stores.data_bundle import open_bundle
from trustmesh.stores.data_envelope import EnvelopeError
from trustmesh.stores.blobs import BlobCorrupted, BlobNotFound, BlobStore, BlobTooLarge

from trustmesh.fl import dp_round, model_format, screening, secagg, secagg_block, server_state, shapley
from trustmesh.fl.datasets import held_out, load_npz
from trustmesh.fl.strategies import ClientUpdate, strategy_from_spec
from trustmesh.fl.attacks import Attack
from trustmesh.fl.batched_training import Client, local_train_many
from trustmesh.fl.training import derive_seed, evaluate, initial_state, local_train

LOGGER = logging.getLogger(__name__)

REPORTED_METRICS = ("loss", "accuracy", "samples")  # what goes on chain (small, numeric)
STRATEGY_METRICS = ("start_loss",)  # reported too when a strategy's training option asks for it


class TaskInputError(RuntimeError):
    """An input the chain names is missing or does not verify; the task fails, saying which."""


class InputNotReady(RuntimeError):
    """An input that will exist later (the previous round's global model): try the task again."""


@dataclass
class TaskOutcome:
    output_digest: str
    metrics: dict
    round_result: dict | None = None  # aggregate only: participants, weights, metrics
    compute_seconds: float = 0.0      # training, aggregating or evaluating itself: no I/O, no ledger
    dependencies: tuple[str, ...] = ()  # the task's fetch_dependency_outputs
    # (schedule_id, task_id) of other rounds' tasks this one built on: a local_train names the
    # previous round's aggregate when it started from that aggregate's report, not the chain's.
    built_on: tuple[tuple[str, str], ...] = ()
    # local_train only: the global model it trained from (digest None: the initial weights) and
    # the chain records that name it; its done report carries both (scheduling/schedule/lineage.py).
    starting_model: StartingModel | None = None


class Recent(dict):
    """A dict that forgets its oldest entries past `size` (insertion order). For what a node
    remembers only to save a read: forgetting costs that read again, never a wrong step."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def put(self, key, value=None) -> None:
        self[key] = value
        while len(self) > self.size:
            del self[next(iter(self))]

    add = put  # as a set: key in recent


@dataclass
class TaskContext:
    node: str                         # this compute node's public key
    encryption_key: Any               # its X25519 private key
    reader: FederationReader
    blobs: BlobStore
    progress: Callable[[str], None] = lambda text: None
    # This node's own reports that are submitted but maybe not committed yet, by (schedule_id,
    # task_id): a dependent task on this node starts from them instead of waiting for the block.
    reported: dict[tuple[str, str], dict] = field(default_factory=dict)
    # Likewise the global models of its own aggregate reports, by (workflow_id, round): the next
    # round's training starts from one before its round result is committed.
    global_models: dict[tuple[str, int], dict] = field(default_factory=dict)

    # For tests and benchmarks of robust strategies only (fl/attacks.py): data owner -> the attack
    # this node plays with the updates it trains on that owner's data. Empty unless asked for.
    attacks: Mapping[str, Attack] = field(default_factory=dict)

    # On an IoT node of a securely aggregated workflow: what masks its updates (iot-node/secure_upload.py).
    secure: Any = None

    # What every task of a round reads alike (its assignments' task graph, the workflow definition,
    # the global model it starts from), kept for the last few rounds: a round runs a dozen tasks.
    rounds: Recent = field(default_factory=lambda: Recent(ROUNDS_CACHED))

    # Statuses seen "done" (final: statuses only move forward), the most recent DONE_KEPT: from this
    # node's own reports and the task-done events it follows; a round's aggregate, then its history,
    # reads every training's.
    done: Recent = field(default_factory=lambda: Recent(DONE_KEPT))

    def remember_done(self, schedule_id: str, task_id: str, status: dict) -> None:
        self.done.put((schedule_id, task_id), status)

    async def task_status(self, schedule_id: str, task_id: str) -> dict | None:
        """A task's status on chain, read once it is done."""
        status = self.done.get((schedule_id, task_id))
        if status is None:
            status = await self.reader.task_status(schedule_id, task_id)
            if status is not None and status["status"] == "done":
                self.remember_done(schedule_id, task_id, status)
        return status

    async def task_statuses(self, schedule_id: str, task_ids) -> dict[str, dict | None]:
        """task_id -> task_status, side by side."""
        ids = list(task_ids)
        return dict(zip(ids, await asyncio.gather(*(self.task_status(schedule_id, t) for t in ids))))

    async def dependency_status(self, schedule_id: str, task_id: str) -> dict | None:
        return self.reported.get((schedule_id, task_id)) or await self.task_status(schedule_id, task_id)

    async def round_inputs(self, schedule_id: str) -> dict:
        """{"assignments", "definition"} of a round. The parts tasks use (kinds, inputs, data
        owners, dependencies) are fixed at assignment; reassignment only moves nodes and attempts."""
        cached = self.rounds.get(schedule_id)
        if cached is None:
            assignments = await self.reader.assignments(schedule_id)
            workflow = await self.reader.workflow(assignments["workflow_id"])
            cached = {"assignments": assignments, "definition": workflow["definition"]}
            self.rounds.put(schedule_id, cached)
        return cached


ROUNDS_CACHED = 4
DONE_KEPT = 4096  # two rounds of 1,000 participants with room to spare (a status: ~300 bytes)


def report_metrics(outcome: TaskOutcome, started: float) -> dict:
    """What a done report carries on chain: the task's metrics, compute_seconds (training,
    aggregating or evaluating itself) and task_seconds (the whole task since `started`, store I/O
    included). What a round spends outside compute is framework overhead
    (bench/bench_round_overhead.py)."""
    return {**outcome.metrics, "compute_seconds": round(outcome.compute_seconds, 6),
            "task_seconds": round(time.perf_counter() - started, 6)}


async def run_task(ctx: TaskContext, schedule_id: str, task_id: str) -> TaskOutcome:
    inputs = await ctx.round_inputs(schedule_id)
    assignments, definition = inputs["assignments"], inputs["definition"]
    task = assignments["tasks"][task_id]
    runner = {"preprocess": _preprocess, "local_train": _local_train,
              "aggregate": _aggregate, "evaluate": _evaluate}[task["kind"]]
    try:
        outcome = await runner(ctx, assignments, task_id, task, definition)
    except INPUT_ERRORS as exc:
        raise _input_error(task_id, task, exc) from exc
    outcome.dependencies = tuple(task["fetch_dependency_outputs"])
    return outcome


# Inputs that do not fit (model format, data, strategy, envelopes, a missing earlier result)
# fail the same way on every try: the task is reported failed, saying why.
INPUT_ERRORS = (ValueError, LookupError, EnvelopeError)


def _input_error(task_id: str, task: Mapping, exc: Exception) -> TaskInputError:
    error = TaskInputError(f"{task['kind']} {task_id}: {exc}")
    error.__cause__ = exc
    return error


async def run_local_trains(ctx: TaskContext, schedule_id: str, task_ids: list[str]) -> dict[str, Any]:
    """Several local_train tasks of one round trained together (fl/batched_training.py: each
    update bit-identical to its training alone, so each blob, digest and report is too).
    task_id -> its TaskOutcome, or the exception run_task raises for that task alone (one
    client's bad data fails that task only). Raises what stops every one of them alike
    (the starting model not there yet, a store outage): run them one by one then."""
    inputs = await ctx.round_inputs(schedule_id)
    assignments, definition = inputs["assignments"], inputs["definition"]
    tasks = {task_id: assignments["tasks"][task_id] for task_id in task_ids}
    global_state, built_on, start = await _global_model(ctx, definition, assignments)
    bundles = await _blobs(ctx, [_data_input(tasks[t]) for t in task_ids])  # one round trip, not one each
    outcomes: dict[str, Any] = {}
    ready = []
    for task_id, bundle in zip(task_ids, bundles):  # a failure is that task's
        try:
            if isinstance(bundle, Exception):  # not in Redis (yet), not intact
                raise bundle
            ready.append((task_id, _open_bundle(ctx, assignments, tasks[task_id], definition, bundle)))
        except INPUT_ERRORS as exc:
            outcomes[task_id] = _input_error(task_id, tasks[task_id], exc)
        except Exception as exc:  # noqa: BLE001  InputNotReady, TaskInputError, ...
            outcomes[task_id] = exc
    hp, spec = definition["hyperparameters"], definition["model"]
    clients = []
    for task_id, data in ready:
        owner = tasks[task_id]["data_owner"]
        attack = ctx.attacks.get(owner)
        labels = data.y if attack is None else attack.poison_labels(data.y, spec["num_classes"])
        clients.append(Client(data.x, labels, derive_seed(hp["seed"], assignments["round"], owner)))
    options = strategy_from_spec(definition.get("strategy") or {"name": "fedavg"}).training_options()

    def progress(index, p):
        ctx.progress(f"{ready[index][0]}: epoch {p.epoch}/{p.epochs} step {p.step}/{p.total} loss {p.loss:.3f}")

    started = time.perf_counter()
    try:
        results = await asyncio.to_thread(local_train_many, spec, hp, global_state, clients, progress=progress,
                                          **options)
    except INPUT_ERRORS as exc:  # a spec or state that does not fit: every task alike, as alone
        results = [exc] * len(clients)
    share = (time.perf_counter() - started) / max(1, len(clients))  # each task's compute_seconds: its share
    for (task_id, _), client, result in zip(ready, clients, results):
        task = tasks[task_id]
        try:
            if isinstance(result, BaseException):
                raise result
            outcome = await _store_update(ctx, assignments, task["data_owner"], definition, result, client.seed,
                                          global_state, built_on, start, share)
        except INPUT_ERRORS as exc:
            outcomes[task_id] = _input_error(task_id, task, exc)
            continue
        except Exception as exc:  # noqa: BLE001  that task's alone (TaskInputError, a store outage)
            outcomes[task_id] = exc
            continue
        outcome.dependencies = tuple(task["fetch_dependency_outputs"])
        outcomes[task_id] = outcome
    return outcomes


BLOB_ERRORS = (BlobNotFound, BlobCorrupted, BlobTooLarge, ValueError)


def _blob_error(exc: Exception, digest: str, what: str) -> InputNotReady | TaskInputError:
    """What a blob that cannot be read means for the task that needs it."""
    if isinstance(exc, BlobNotFound):
        # Lost with a Redis that restarted empty: its holder puts it back from its own copy.
        return InputNotReady(f"{what} {digest[:16]}… is not in Redis (yet): {exc}")
    return TaskInputError(f"{what} {digest[:16]}… is not available intact: {exc}")


async def _blob(ctx: TaskContext, digest: str, what: str) -> bytes:
    try:
        return await ctx.blobs.get(digest)  # verifies the sha256 before returning
    except BLOB_ERRORS as exc:
        raise _blob_error(exc, digest, what) from None


async def _blobs(ctx: TaskContext, wanted: list[tuple[str, str]]) -> list[bytes | InputNotReady | TaskInputError]:
    """_blob of each (digest, what), read together (BlobStore.get_many: one Redis round trip for
    a round's hundreds, not one each): its bytes, or the error _blob would raise for it."""
    found = await ctx.blobs.get_many([digest for digest, _ in wanted])
    return [_blob_error(result, digest, what) if isinstance(result, BLOB_ERRORS) else result
            for (digest, what), result in zip(wanted, found)]


def _every(results: list) -> list[bytes]:
    """The bytes of _blobs, or the first of its errors raised."""
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def _preprocess(ctx, assignments, task_id, task, definition) -> TaskOutcome:
    round_record = await ctx.reader.round(assignments["schedule_id"])
    manifest = {}
    for node in round_record["submitted_nodes"]:
        submission = round_record["submissions"][node]
        manifest[node] = {"digest": submission["digest"], "samples": submission["samples"]}
    _every(await _blobs(ctx, [(entry["digest"], f"submission of {node[:16]}…")  # together
                              for node, entry in manifest.items()]))
    digest = await ctx.blobs.put(cbor.encode({"schedule_id": assignments["schedule_id"], "submissions": manifest}))
    samples = sum(entry["samples"] for entry in manifest.values())
    return TaskOutcome(digest, {"submissions": len(manifest), "samples": samples})


async def _global_model(ctx, definition, assignments):
    """(state, built_on, starting_model) of the global model a round's training starts from: the
    previous round's, from this node's own aggregate report while that is not committed yet, else
    from the chain by the lineage rule (schedule.starting_model; InputNotReady while an earlier
    round has none yet). state None: the seeded initial model."""
    inputs = await ctx.round_inputs(assignments["schedule_id"])
    if "global_model" not in inputs:  # every local_train of the round starts from the same one
        workflow_id, round_number = assignments["workflow_id"], assignments["round"]
        own = ctx.global_models.get((workflow_id, round_number - 1))
        if own is not None:
            start = StartingModel.of_previous_round(workflow_id, round_number, own["schedule_id"], own["digest"],
                                                    own.get("server_state_digest"), own.get("next_clipping_norm"))
            built_on = ((own["schedule_id"], own["task_id"]),)
        else:
            try:
                start, built_on = await ctx.reader.starting_model(workflow_id, round_number), ()
            except LookupError as exc:
                raise InputNotReady(str(exc)) from None
        state = None
        if start.digest is not None:
            blob = await _blob(ctx, start.digest, f"global model of round {start.source_round}")
            state = model_format.load(blob, start.digest, definition["model"]).state
        inputs["global_model"] = (state, built_on, start)
    return inputs["global_model"]


def _or_initial(state, definition):
    """The state a round trained from: `state`, or the seeded initial weights when it is None."""
    return state if state is not None else initial_state(definition["model"], definition["hyperparameters"]["seed"])


async def starting_model_known(ctx, schedule_id: str) -> bool:
    """Whether the round's local_train tasks can start: rounds are opened and assigned while the
    previous one still trains, so its global model may not exist yet."""
    inputs = await ctx.round_inputs(schedule_id)
    try:
        await _global_model(ctx, inputs["definition"], inputs["assignments"])
    except InputNotReady:
        return False
    except TaskInputError:
        pass  # there is one but it does not verify: the task runs and reports that
    return True


async def _local_train(ctx, assignments, task_id, task, definition) -> TaskOutcome:
    data = await _open_data(ctx, assignments, task, definition)
    return await train_update(ctx, assignments, task_id, task["data_owner"], data, definition)


async def _open_data(ctx, assignments, task, definition):
    """A local_train task's data: its owner's blob, verified, opened with this node's key."""
    return _open_bundle(ctx, assignments, task, definition, await _blob(ctx, *_data_input(task)))


def _data_input(task) -> tuple[str, str]:
    """(digest, what) of a local_train task's data blob, for _blob and _blobs."""
    return task["inputs"][0], f"data of {task['data_owner'][:16]}…"


def _open_bundle(ctx, assignments, task, definition, bundle: bytes):
    sid, owner = assignments["schedule_id"], task["data_owner"]
    return load_npz(open_bundle(bundle, ctx.encryption_key, node=ctx.node, schedule_id=sid, sender=owner),
                    input_dim=definition["model"]["input_dim"], num_classes=definition["model"]["num_classes"])


async def train_update(ctx, assignments, task_id, owner, data, definition) -> TaskOutcome:
    """local_train on `owner`'s plaintext data, wherever that data is: on a compute node once the
    envelope is open, or on the IoT node itself (train_on "iot", iot-node/local_training.py).
    One function, so both places derive the seed, start model and report alike."""
    hp = definition["hyperparameters"]
    global_state, built_on, start = await _global_model(ctx, definition, assignments)

    def progress(p):
        ctx.progress(f"{task_id}: epoch {p.epoch}/{p.epochs} step {p.step}/{p.total} loss {p.loss:.3f}")

    # Training runs in a worker thread (torch releases the GIL): the node keeps its heartbeat
    # and its event stream going meanwhile.
    started = time.perf_counter()
    seed = derive_seed(hp["seed"], assignments["round"], owner)
    attack = ctx.attacks.get(owner)
    labels = data.y if attack is None else attack.poison_labels(data.y, definition["model"]["num_classes"])
    options = strategy_from_spec(definition.get("strategy") or {"name": "fedavg"}).training_options()
    result = await asyncio.to_thread(local_train, definition["model"], hp, global_state, data.x, labels,
                                     progress=progress, seed=seed, **options)
    return await _store_update(ctx, assignments, owner, definition, result, seed, global_state, built_on, start,
                               time.perf_counter() - started)


async def _store_update(ctx, assignments, owner, definition, result, seed, global_state, built_on, start,
                        compute: float) -> TaskOutcome:
    """A trained update as it leaves the trainer (poisoned in attack tests, DP-noised, masked),
    stored under its digest; the outcome its report carries."""
    attack = ctx.attacks.get(owner)
    state = result.state
    if attack is not None:
        LOGGER.warning("ATTACK (test mode): %s poisons the update of %s… in round %s with %s", ctx.node[:16],
                       owner[:16], assignments["round"], attack)
        state = attack.poison_update(_or_initial(global_state, definition), result.state, seed)
    block = definition.get("privacy")
    if block is not None and block["where"] == "client":  # clipped and noised before it leaves the trainer
        state = dp_round.client_update(block, _or_initial(global_state, definition), state,
                                       definition["federation"]["min_nodes_required"])
    secure = definition.get("secure_aggregation")
    if secure is not None:  # the update leaves only masked, whatever stores it
        if ctx.secure is None:
            raise TaskInputError("a securely aggregated update is masked by its data owner's IoT node; "
                                 "this node cannot")
        blob = await ctx.secure.mask(assignments["schedule_id"], secure, state, secure_weight(definition, result.samples))
    else:
        blob = model_format.serialize(state, workflow_id=assignments["workflow_id"], round=assignments["round"],
                                      model_spec=definition["model"])
    digest = await ctx.blobs.put(blob)
    reported = {k: result.metrics[k] for k in REPORTED_METRICS + STRATEGY_METRICS if k in result.metrics}
    return TaskOutcome(digest, reported, compute_seconds=compute,
                       built_on=built_on, starting_model=start)


def secure_weight(definition: Mapping, samples: int) -> int:
    """What a masked update is multiplied by before the sum: its sample count (FedAvg), or 1
    with DP, whose mean is unweighted."""
    return 1 if definition.get("privacy") else int(samples)


async def _aggregate(ctx, assignments, task_id, task, definition) -> TaskOutcome:
    if definition.get("secure_aggregation") is not None:
        return await _secure_aggregate(ctx, assignments, task, definition)
    sid, tasks = assignments["schedule_id"], assignments["tasks"]
    trained = [dep for dep in task["fetch_dependency_outputs"] if tasks[dep]["kind"] == "local_train"]
    statuses = await asyncio.gather(*(ctx.dependency_status(sid, dep) for dep in trained))  # a round's thousand
    blobs = _every(await _blobs(ctx, [(status["output_digest"], f"update {dep}")  # together
                                      for dep, status in zip(trained, statuses)]))
    updates = []
    for dep, status, blob in zip(trained, statuses, blobs):
        state = model_format.load(blob, status["output_digest"], definition["model"]).state
        updates.append(ClientUpdate(node=tasks[dep]["data_owner"], state=state,
                                    samples=int(status["metrics"]["samples"]), metrics=status["metrics"]))
    if not updates:
        raise TaskInputError(f"aggregate {task_id} depends on no local_train output")
    checks = definition.get("update_checks")
    strategy = strategy_from_spec(definition.get("strategy") or {"name": "fedavg"})
    block = definition.get("privacy")
    start_state = start = None
    if strategy.uses_start or block or (checks and "max_norm_ratio" in checks):  # the model the round trained from
        global_state, _, start = await _global_model(ctx, definition, assignments)
        start_state = _or_initial(global_state, definition)
    accuracy = screening.held_out_accuracy(definition) if checks and "min_accuracy" in checks else None
    received = updates
    updates, rejected = await asyncio.to_thread(screening.screen, updates, checks, start_state, accuracy)
    for node, why in sorted(rejected.items()):
        LOGGER.warning("aggregate %s: the update of %s… is rejected: %s", task_id, node[:16], why)
    if not updates and start is None:  # the round keeps the model it trained from (fl/screening.py)
        global_state, _, start = await _global_model(ctx, definition, assignments)
        start_state = _or_initial(global_state, definition)
    previous = await _server_state(ctx, strategy, start)
    private = None
    earlier = None if block is None else await dp_round.earlier_multipliers(  # the epsilon spent so far
        ctx.reader, assignments["workflow_id"], assignments["round"])
    if not updates:  # every update failed the checks: nothing to combine, no noise, the server state kept
        LOGGER.warning("aggregate %s: every update was rejected by the update checks; the round keeps the model "
                       "it started from", task_id)
        started = time.perf_counter()
        state, weights, kept_state = start_state, {}, previous
        if block is not None:
            private = dp_round.kept_start_record(
                block, assignments["round"], dp_round.clipping_norm(block, start.next_clipping_norm),
                planned=definition["federation"]["min_nodes_required"], earlier=earlier)
    elif block is not None:
        seed = await _noise_seed(ctx, sid) if block["where"] == "server" else None
        started = time.perf_counter()
        state, weights, private = dp_round.aggregate(
            block, start_state, updates, workflow_id=assignments["workflow_id"], round_number=assignments["round"],
            seed=seed, norm=dp_round.clipping_norm(block, start.next_clipping_norm),
            planned=definition["federation"]["min_nodes_required"], earlier=earlier)
        kept_state = None
    else:
        started = time.perf_counter()
        state, weights = strategy.aggregate(updates)
        state, kept_state = strategy.step(state, start_state, previous, updates)
        short = strategy.shortfall(len(updates))
        if short:  # too few updates passed the checks for the rule's guarantee (fl/strategies/krum.py)
            LOGGER.warning("aggregate %s: %s", task_id, short)
    rejected.update(strategy.rejections(weights))  # whom a robust rule left out, and why
    weights = {**{node: 0.0 for node in rejected}, **weights}
    compute = time.perf_counter() - started
    blob = model_format.serialize(state, workflow_id=assignments["workflow_id"], round=assignments["round"],
                                  model_spec=definition["model"])
    digest = await ctx.blobs.put(blob)
    server_state_digest = None
    if kept_state is not None:
        server_state_digest = await ctx.blobs.put(server_state.serialize(
            kept_state, strategy=strategy.name, workflow_id=assignments["workflow_id"], round=assignments["round"]))
    reported = updates or received  # the local metrics of the updates used (all of them, when none was)
    total = sum(u.samples for u in reported)
    metrics = {name: sum(float(u.metrics[name]) * u.samples for u in reported) / total for name in ("loss", "accuracy")}
    metrics["samples"] = total
    participants = sorted(weights)
    result = {"participants": participants, "aggregation_weights": {n: float(weights[n]) for n in participants},
              "metrics": {"loss": metrics["loss"], "accuracy": metrics["accuracy"]}, "rejected": rejected,
              "server_state_digest": server_state_digest, "privacy": private,
              "contributions": await _contributions(ctx, definition, assignments, updates),
              "submitted": await _submitted(ctx, sid)}
    return TaskOutcome(digest, metrics, round_result=result, compute_seconds=compute)


async def _submitted(ctx, schedule_id: str) -> list[str]:
    """The round's submitted_nodes: a large round's result names its participants by position there."""
    return (await ctx.reader.round(schedule_id) or {}).get("submitted_nodes") or []


async def _contributions(ctx, definition, assignments, updates):
    """Shapley contribution scores of the updates aggregated (fl/shapley.py) where the workflow's
    rewards pay by them, from a seed the chain fixes (the schedule id); else None."""
    terms = definition.get("rewards") or {}
    if terms.get("score") != "shapley":
        return None
    start_state = _or_initial((await _global_model(ctx, definition, assignments))[0], definition)
    accuracy = screening.held_out_accuracy(definition)
    return await asyncio.to_thread(shapley.scores, updates, start_state, accuracy,
                                   seed=bytes.fromhex(assignments["schedule_id"]), permutations=terms["permutations"])


async def _secure_aggregate(ctx, assignments, task, definition) -> TaskOutcome:
    """The sum of the masked uploads, unmasked with the shares revealed on chain (fl/secagg.py):
    no update is seen on its own here."""
    sid, tasks, block = assignments["schedule_id"], assignments["tasks"], definition["secure_aggregation"]
    trained = [dep for dep in task["fetch_dependency_outputs"] if tasks[dep]["kind"] == "local_train"]
    statuses = [await ctx.dependency_status(sid, dep) for dep in trained]
    uploaded = [(dep, s) for dep, s in zip(trained, statuses) if s["status"] == "done"]  # not the dropped
    trained, statuses = [dep for dep, _ in uploaded], [s for _, s in uploaded]
    owners = [tasks[dep]["data_owner"] for dep in trained]
    blobs = _every(await _blobs(ctx, [(s["output_digest"], f"masked update {dep}")  # together
                                      for dep, s in zip(trained, statuses)]))
    samples = {owner: int(s["metrics"]["samples"]) for owner, s in zip(owners, statuses)}
    participants = (await ctx.reader.round(sid))["submitted_nodes"]
    records = {node: await ctx.reader.secagg(sid, node) or {} for node in participants}
    started = time.perf_counter()
    state = secagg.aggregate_round(sid, block, participants=participants, records=records,
                                   uploads=dict(zip(owners, blobs)),
                                   samples={n: secure_weight(definition, samples[n]) for n in owners},
                                   template=initial_state(definition["model"], definition["hyperparameters"]["seed"]))
    compute = time.perf_counter() - started
    weights = secure_weights(definition, samples)
    digest = await ctx.blobs.put(model_format.serialize(state, workflow_id=assignments["workflow_id"],
                                                        round=assignments["round"], model_spec=definition["model"]))
    total = sum(samples.values())
    metrics = {name: sum(float(s["metrics"][name]) * samples[o] for o, s in zip(owners, statuses)) / total
               for name in ("loss", "accuracy")}
    private = None
    if definition.get("privacy"):
        private = dp_round.privacy_record(
            definition["privacy"], assignments["round"], float(definition["privacy"]["clipping_norm"]),
            averaged=len(owners), planned=definition["federation"]["min_nodes_required"],
            earlier=await dp_round.earlier_multipliers(ctx.reader, assignments["workflow_id"], assignments["round"]))
    result = {"participants": sorted(weights), "aggregation_weights": weights, "rejected": {},
              "metrics": dict(metrics), "server_state_digest": None, "privacy": private,
              "submitted": await _submitted(ctx, assignments["schedule_id"])}
    return TaskOutcome(digest, {**metrics, "samples": total}, round_result=result, compute_seconds=compute)


def secure_weights(definition: Mapping, samples: Mapping[str, int]) -> dict[str, float]:
    """The round result's weights of a securely aggregated round: FedAvg's sample shares, or
    equal ones with DP (secure_weight)."""
    weight = {n: secure_weight(definition, s) for n, s in samples.items()}
    total = sum(weight.values())
    return {n: weight[n] / total for n in sorted(weight)}


async def _noise_seed(ctx, schedule_id: str) -> bytes:
    """The round's DP noise seed, once its coordinator revealed it (after every update is in)."""
    record = await ctx.reader.noise_seed(schedule_id)
    if record is None:
        raise InputNotReady(f"the noise seed of round {schedule_id[:16]}… is not revealed yet")
    return bytes.fromhex(record["noise_seed"])


async def aggregate_inputs_known(ctx, schedule_id: str) -> bool | None:
    """Whether the round's aggregate can run: with server-side DP, once the noise seed is on chain;
    with secure aggregation, once `threshold` shares of every participant's secret are (None:
    never, the round ended as timeout or fewer than `threshold` participants uploaded)."""
    inputs = await ctx.round_inputs(schedule_id)
    definition = inputs["definition"]
    block = definition.get("secure_aggregation")
    if block is not None:
        round_ = await ctx.reader.round(schedule_id)
        if round_["status"] == "timeout":
            return None  # its unmask step stalled and the round ended: never
        trains = [t for t, task in inputs["assignments"]["tasks"].items() if task["kind"] == "local_train"]
        statuses = [s or {} for s in await asyncio.gather(*(ctx.dependency_status(schedule_id, t) for t in trains))]
        settled = all(s.get("status") in SETTLED for s in statuses)
        if settled and secagg_block.too_few_uploads(sum(s.get("status") == "done" for s in statuses),
                                                    block["threshold"]):
            return None  # no sum may be published: the round ends as timeout (secagg_rules.unmask_stalled)
        participants = round_["submitted_nodes"]
        records = {node: await ctx.reader.secagg(schedule_id, node) or {} for node in participants}
        return not secagg_block.short_of_shares(participants, secagg_block.revealed_by_sender(records),
                                                block["threshold"])
    if (definition.get("privacy") or {}).get("where") != "server":
        return True
    return await ctx.reader.noise_seed(schedule_id) is not None


async def _server_state(ctx, strategy, start: StartingModel | None):
    """The state a server optimizer left with the model this round trained from (None: a fresh
    start, or a strategy that keeps none), verified against its digest on chain."""
    if not strategy.keeps_state or start is None or start.server_state_digest is None:
        return None
    blob = await _blob(ctx, start.server_state_digest, f"server state of round {start.source_round}")
    try:
        return server_state.load(blob, start.server_state_digest, strategy=strategy.name)
    except server_state.ServerStateError as exc:
        raise TaskInputError(f"server state of round {start.source_round}: {exc}") from None


async def _evaluate(ctx, assignments, task_id, task, definition) -> TaskOutcome:
    sid, tasks = assignments["schedule_id"], assignments["tasks"]
    aggregates = [d for d in task["fetch_dependency_outputs"] if tasks[d]["kind"] == "aggregate"]
    final = [d for d in aggregates if not any(d in tasks[o]["fetch_dependency_outputs"] for o in aggregates)]
    if len(final) != 1:
        raise TaskInputError(f"evaluate {task_id} needs exactly one final aggregate; found {final or 'none'}")
    status = await ctx.dependency_status(sid, final[0])
    blob = await _blob(ctx, status["output_digest"], "global model")
    state = model_format.load(blob, status["output_digest"], definition["model"]).state
    data = definition["data"]
    if data.get("dataset") != "digits":
        raise TaskInputError("evaluate needs a shared held-out split; only the digits data set provides one today")
    test = held_out(data)
    started = time.perf_counter()
    scores = await asyncio.to_thread(evaluate, definition["model"], state, test.x, test.y)
    compute = time.perf_counter() - started
    # The report is stored like every output, so its on-chain digest can be checked too.
    digest = await ctx.blobs.put(cbor.encode({"model": status["output_digest"], "scores": scores}))
    return TaskOutcome(digest, {k: scores[k] for k in REPORTED_METRICS}, compute_seconds=compute)
