"""`trustmesh audit WORKFLOW_ID [--json]`: re-verify every round of a workflow from the chain
and the stores, trusting neither the nodes that wrote them nor the stores that hold the bytes.

Everything is read at one chain head, so a workflow still running is seen consistently.

Transactions  every committed transaction of the four federation families that concerns the
              workflow: header signature (re-encoded from the REST API's JSON), payload_sha512,
              canonical CBOR, and its signer against the rules: deploy/update by the owner,
              open_round by the coordinator_node, submit by a participant (the one whose
              submission the round holds), report by the task's node at that attempt,
              round_result by the aggregate task's node. Every submission, done task and result
              in state must have the signed transaction that made it.
Rounds        the record belongs to the workflow and its schedule_id is derived; submitted nodes
              are participants; local training used exactly the submitted data; the result's
              participants are the nodes whose updates were aggregated; weights sum to 1 (to 0
              when every participant is rejected, screening.weights_sum_fits).
Blobs         submission bundles, every task output and the global model in Redis, the round's
              global model in CouchDB (when a URL is given): "missing" or "digest mismatch".
Aggregation   the strategy's weights recomputed from the stored updates and their on-chain
              metrics, the weighted average with the on-chain weights re-serialized exactly as
              compute-node/tasks.py `_aggregate` stores it: its sha256 must be the on-chain digest.
              A round whose update checks rejected every update must keep its starting model.
Lineage       which global model each round started from, by the schedule family's lineage rule
              (schedule.starting_model: the latest earlier round's global model, rounds in
              between timed out; the initial weights when there is none): every local_train done
              in the round must name exactly that one as its base_model_digest.

Exit status of the command: 0 every check passed, 1 some problem found, 2 the audit could not run
(workflow not on chain, a store unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import aiohttp
from google.protobuf import json_format
from redis.exceptions import RedisError
from yarl import URL

from trustmesh import endpoints as network
from trustmesh.ledger import payload as cbor
from trustmesh.ledger import protos as pb
from trustmesh.ledger import signing
from trustmesh.ledger.processor import InvalidTransaction
from trustmesh.ledger.rest_client import RestClient, RestError
from trustmesh.scheduling import layout
from trustmesh.fl.strategies import STRATEGIES
from trustmesh.scheduling.definition import participant_group
from trustmesh.scheduling.reader import FederationReader, expand
from trustmesh.scheduling.workflow_groups import complete
from trustmesh.fl import screening
from trustmesh.scheduling.schedule import StartingModel, lineage_problem
from trustmesh.scheduling.schedule.checks import reports_in
from trustmesh.stores.couch import CouchClient, CouchError, CouchHistory, DigestMismatch
from trustmesh.stores.blobs import BlobCorrupted, BlobError, BlobNotFound, BlobStore
from trustmesh.stores.redis_client import connect

if TYPE_CHECKING:  # torch-backed; imported where used so `trustmesh --help` stays fast
    from trustmesh.fl.strategies import ClientUpdate

FAMILIES = (layout.WORKFLOW_FAMILY, layout.PEER_FAMILY, layout.FEDERATION_FAMILY, layout.SCHEDULE_FAMILY)
PAGE_SIZE = 1000  # the most a Sawtooth REST API returns per page


class AuditError(Exception):
    """The audit could not run (workflow not on chain, a store unreachable); the message says why."""


def _short(value: Any) -> str:
    """Keys and digests as people read them in this repo: 16 hex characters and an ellipsis."""
    return f"{value[:16]}…" if isinstance(value, str) and len(value) > 16 else repr(value)


# --------------------------------------------------------------------------- report


@dataclass(kw_only=True)
class _Checks:
    """A tally: every check passes (counted) or becomes a problem that says what and where."""

    checks: int = 0
    problems: list[str] = field(default_factory=list)

    def _where(self) -> str:
        return ""

    def check(self, ok: bool, problem: str) -> bool:
        if ok:
            self.checks += 1
        else:
            self.problems.append(self._where() + problem)
        return ok

    def fail(self, problem: str) -> None:
        self.check(False, problem)

    def passed(self) -> None:
        self.checks += 1


@dataclass
class RoundAudit(_Checks):
    number: int
    schedule_id: str | None = None
    status: str = "missing"          # collecting | ready | timeout | assigned | result recorded | final
    initial_model: str | None = None  # the global model it started from (None: round 1, or none final)
    global_model: str | None = None   # its global model on chain
    recomputed_global_model: str | None = None  # sha256 of the aggregation redone here

    def _where(self) -> str:
        return f"round {self.number}: "

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class AuditReport(_Checks):
    workflow_id: str
    rounds: list[RoundAudit] = field(default_factory=list)
    transactions: int = 0  # committed transactions of this workflow re-verified

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.ok for r in self.rounds)

    def all_problems(self) -> list[str]:
        return [p for r in self.rounds for p in r.problems] + self.problems

    def to_json(self) -> dict:
        return {"workflow_id": self.workflow_id, "ok": self.ok, "transactions": self.transactions,
                "checks": self.checks + sum(r.checks for r in self.rounds), "problems": list(self.problems),
                "rounds": [r.to_json() for r in self.rounds]}


def render_text(report: AuditReport) -> str:
    lines = [f"audit of workflow {report.workflow_id}: {len(report.rounds)} round(s), "
             f"{report.transactions} transaction(s) re-verified"]
    for r in report.rounds:
        start = ("initial weights" if r.number == 1 else f"round {r.number - 1}'s "
                 + (_short(r.initial_model) if r.initial_model else "(no final model)"))
        found = f", {len(r.problems)} problem(s)" if r.problems else ""
        lines.append(f"{'✓' if r.ok else '✗'} round {r.number}  {r.status}  {r.checks} checks{found}  "
                     f"started from {start}  global model {_short(r.global_model) if r.global_model else 'none'}")
    found = f", {len(report.problems)} problem(s)" if report.problems else ""
    lines.append(f"{'✗' if report.problems else '✓'} workflow  {report.checks} checks{found}")
    problems = report.all_problems()
    if problems:
        lines += ["problems:", *(f"  {p}" for p in problems), f"FAILED: {len(problems)} problem(s)"]
    else:
        lines.append("OK: every check passed")
    return "\n".join(lines)


# --------------------------------------------------------------------------- transactions


@dataclass(frozen=True)
class SignedAction:
    """A committed transaction of a federation family, re-verified from its REST JSON."""

    txn_id: str
    family: str
    signer: str
    body: dict            # the decoded payload ({} when it does not decode)
    problem: str | None   # why the transaction itself does not verify

    @property
    def action(self) -> str:
        return str(self.body.get("action"))

    def __str__(self) -> str:
        return f"{self.family} {self.action} transaction {_short(self.txn_id)}"


def verify_transaction(txn: Mapping) -> SignedAction:
    """Signature over the header (re-encoded: protobuf encodes these fields one way only),
    payload_sha512 and canonical CBOR, as a validator checks them."""
    header = txn.get("header") or {}
    txn_id, family = str(txn.get("header_signature", "")), str(header.get("family_name", ""))
    signer = str(header.get("signer_public_key", ""))
    try:
        header_bytes = json_format.ParseDict(header, pb.TransactionHeader()).SerializeToString()
        payload = base64.b64decode(txn.get("payload", ""), validate=True)
    except (json_format.ParseError, ValueError) as exc:
        return SignedAction(txn_id, family, signer, {}, f"header or payload unreadable: {exc}")
    try:
        body = cbor.decode(payload)
    except cbor.PayloadError:
        body = None
    if not signing.verify(signer, txn_id, header_bytes):
        problem = "header signature does not verify against its signer_public_key"
    elif hashlib.sha512(payload).hexdigest() != header.get("payload_sha512"):
        problem = "payload does not hash to the header's payload_sha512"
    elif not isinstance(body, dict):
        problem = "payload is not a canonical CBOR map"
    else:
        problem = None
    return SignedAction(txn_id, family, signer, body if isinstance(body, dict) else {}, problem)


async def _chain_actions(rest: RestClient, head: str) -> list[SignedAction]:
    return [verify_transaction(t) async for t in rest.list_transactions(head=head, page_size=PAGE_SIZE)
            if (t.get("header") or {}).get("family_name") in FAMILIES]


WORKFLOW = "workflow"  # attribution of the workflow's own deploy/update transactions


def _attribute(a: SignedAction, workflow_id: str, rounds: Mapping[str, str]) -> str | None:
    """The schedule_id an action concerns, WORKFLOW, or None when it is about something else."""
    body = a.body
    if a.family == layout.WORKFLOW_FAMILY:
        definition = body.get("definition")
        return WORKFLOW if isinstance(definition, dict) and definition.get("workflow_id") == workflow_id else None
    if a.family == layout.FEDERATION_FAMILY and a.action == "open_round":
        return rounds.get(str(body.get("round"))) if body.get("workflow_id") == workflow_id else None
    if a.family in (layout.FEDERATION_FAMILY, layout.SCHEDULE_FAMILY):
        return body.get("schedule_id") if body.get("schedule_id") in rounds.values() else None
    return None


def _definitions(actions: Sequence[SignedAction]) -> dict[int, dict]:
    """version -> the definition a signed deploy (version 1) or update carried."""
    versions = {}
    for a in actions:
        if a.problem is None and a.action == "deploy":
            versions[1] = a.body.get("definition")
        elif a.problem is None and a.action == "update" and isinstance(a.body.get("expected_version"), int):
            versions[a.body["expected_version"] + 1] = a.body.get("definition")
    return versions


# --------------------------------------------------------------------------- one round


@dataclass
class _Workflow:
    """What every round check needs: the workflow as stored and as signed, and the stores."""

    workflow_id: str
    record: dict
    definitions: dict[int, dict]
    reader: FederationReader
    blobs: BlobStore
    history: CouchHistory | None

    def definition(self, version: Any) -> dict:
        """The definition a round ran under, as signed; a participant group's members (the record's
        copy, which `_check_group` holds against the group) listed as its participant_nodes."""
        signed = self.definitions.get(version) or self.record["definition"]
        return expand({**self.record, "definition": signed})["definition"]


@dataclass
class _Round:
    """One round's on-chain records, and the blobs verified so far (digest -> bytes, None if not)."""

    record: dict
    definition: dict
    assignments: dict | None = None
    statuses: dict[str, dict] = field(default_factory=dict)
    result: dict | None = None
    verified: dict[str, bytes | None] = field(default_factory=dict)
    start: StartingModel | None = None  # what the lineage rule says the round trained from

    @property
    def tasks(self) -> dict:
        return (self.assignments or {}).get("tasks") or {}

    @property
    def federation(self) -> dict:
        return self.definition.get("federation") or {}

    def aggregated(self) -> list[str]:
        """The local_train instances the aggregate task combined, as `_aggregate` selects them."""
        aggregate = self.tasks.get((self.result or {}).get("aggregate_task")) or {}
        return [d for d in aggregate.get("fetch_dependency_outputs", []) if self.tasks[d]["kind"] == "local_train"
                and (self.statuses.get(d) or {}).get("status") != "dropped"]  # a secure round went on without it

    def nodes(self) -> set[str]:
        """Every node that held one of the round's tasks, at any attempt."""
        return {e.get("node") for s in self.statuses.values() for e in s.get("history", [])}


async def _check_blob(audit: RoundAudit, rnd: _Round, blobs: BlobStore, digest: Any, what: str) -> bytes | None:
    """The verified bytes of a Redis blob, once per digest; a problem names it when it is not intact."""
    if digest in rnd.verified:
        return rnd.verified[digest]
    data = None
    try:
        data = await blobs.get(digest)
    except BlobNotFound:
        audit.fail(f"{what}: Redis blob {_short(digest)} missing")
    except BlobCorrupted:
        audit.fail(f"{what}: Redis blob {_short(digest)} digest mismatch")
    except BlobError as exc:  # too large to read: the store never accepted such a blob
        audit.fail(f"{what}: Redis blob {_short(digest)} cannot be verified: {exc}")
    except ValueError:
        audit.fail(f"{what}: the chain names {_short(digest)}, which is not a sha256")
    else:
        audit.passed()
    if isinstance(digest, str):
        rnd.verified[digest] = data
    return data


def _task_label(task_id: str, task: Mapping) -> str:
    if task["kind"] == "local_train":
        return f"update of node {_short(task.get('data_owner'))}"
    return "global model" if task["kind"] == "aggregate" else f"output of {task['kind']} task {task_id}"


def _check_record(audit: RoundAudit, wf: _Workflow, rnd: _Round) -> None:
    record = rnd.record
    audit.check(record.get("workflow_id") == wf.workflow_id and record.get("round") == audit.number,
                f"round record belongs to workflow {record.get('workflow_id')!r} round {record.get('round')}")
    derived = layout.schedule_id_for(wf.workflow_id, audit.number, str(record.get("coordinator")))
    audit.check(audit.schedule_id == derived,
                f"schedule_id {_short(audit.schedule_id)} is not sha256(workflow/round/coordinator)")
    submitted, submissions = record.get("submitted_nodes") or [], record.get("submissions") or {}
    audit.check(sorted(submitted) == sorted(submissions),
                "submitted_nodes and the submissions map name different nodes")
    outsiders = [n for n in submitted if n not in rnd.federation.get("participant_nodes", ())]
    audit.check(not outsiders, f"submitted by node(s) outside participant_nodes: {', '.join(map(_short, outsiders))}")


async def _check_tasks(audit: RoundAudit, wf: _Workflow, rnd: _Round) -> None:
    assignments, submissions = rnd.assignments, rnd.record.get("submissions") or {}
    audit.check(assignments.get("workflow_id") == wf.workflow_id and assignments.get("round") == audit.number,
                f"assignments belong to workflow {assignments.get('workflow_id')!r} round {assignments.get('round')}")
    for task_id in assignments.get("order") or sorted(rnd.tasks):
        task, status = rnd.tasks[task_id], rnd.statuses.get(task_id)
        if task["kind"] == "local_train":
            owner = task.get("data_owner")
            submitted = (submissions.get(owner) or {}).get("digest")
            audit.check(task.get("inputs") == [submitted], f"task {task_id} trains on {task.get('inputs')}, "
                        f"not on node {_short(owner)}'s submission {_short(submitted)}")
        if not audit.check(status is not None, f"task {task_id} has no status record on chain"):
            continue
        if status.get("status") == "done":
            await _check_blob(audit, rnd, wf.blobs, status.get("output_digest"), _task_label(task_id, task))


def _check_result(audit: RoundAudit, rnd: _Round) -> None:
    result = rnd.result
    aggregate = rnd.statuses.get(result.get("aggregate_task")) or {}
    audit.check(result.get("global_model_digest") == aggregate.get("output_digest"),
                f"round result's global model {_short(result.get('global_model_digest'))} is not the output "
                f"{_short(aggregate.get('output_digest'))} of aggregate task {result.get('aggregate_task')}")
    participants = result.get("participants") or []
    owners = [rnd.tasks[d].get("data_owner") for d in rnd.aggregated()]
    audit.check(sorted(participants) == sorted(owners),
                f"result participants {', '.join(map(_short, sorted(participants)))} are not the nodes whose "
                f"local_train outputs were aggregated ({', '.join(map(_short, sorted(owners)))})")
    outsiders = [n for n in participants if n not in (rnd.record.get("submissions") or {})]
    audit.check(not outsiders, f"participants {', '.join(map(_short, outsiders))} did not submit to the round")
    weights = result.get("aggregation_weights") or {}
    audit.check(set(weights) == set(participants), "aggregation_weights name other nodes than the participants")
    total = math.fsum(w for w in weights.values() if isinstance(w, (int, float)))
    audit.check(screening.weights_sum_fits(total, participants, result.get("rejected") or {}),
                f"aggregation weights sum to {total!r}, not 1")


async def _check_couch_model(audit: RoundAudit, history: CouchHistory, workflow_id: str, digest: str) -> None:
    where = f"CouchDB {history.db}/{history.round_doc_id(workflow_id, audit.number)}"
    try:
        stored = await history.get_round_model(workflow_id, audit.number, expected_digest=digest)
    except DigestMismatch as exc:
        audit.fail(f"global model: {where} digest mismatch ({exc})")
        return
    audit.check(stored is not None, f"global model: {where} missing")


def check_aggregation(audit: RoundAudit, updates: Sequence[ClientUpdate], strategy_spec: Mapping,
                      result: Mapping, *, workflow_id: str, model_spec: Mapping,
                      update_checks: Mapping | None = None, start_state: Mapping | None = None,
                      data_spec: Mapping | None = None, server_state: Mapping | None = None,
                      privacy: Mapping | None = None, noise_seed: bytes | None = None,
                      clipping_norm: float | None = None, planned: int | None = None,
                      earlier: Mapping[int, float] | None = None) -> str | None:
    """Redo what compute-node/tasks.py `_aggregate` stored for round `audit.number`: the
    strategy's weights from the updates must be the on-chain aggregation_weights, and the
    weighted average with the on-chain weights (moved from `start_state` by a server optimizer,
    from the `server_state` the round started with), serialized the same way, must hash to the
    on-chain global_model_digest; a server optimizer's new state to its server_state_digest.
    With a `privacy` block the round is DP-FedAvg (fl/dp_round.py) instead: clipped at
    `clipping_norm`, noised from the revealed `noise_seed`, its privacy record recomputed too
    (`planned`: min_nodes_required, default the updates kept; `earlier`: round -> the noise
    multiplier each earlier round recorded, dp_round.earlier_multipliers).
    Returns the recomputed digest (None if it cannot be made)."""
    from trustmesh.fl import server_state as server_state_format
    from trustmesh.fl.strategies import FedAvg, StrategyError, check_updates, strategy_from_spec

    on_chain = dict(result.get("aggregation_weights") or {})
    # the update checks first, as `_aggregate` ran them: the same updates must be rejected, alike
    try:
        accuracy = None  # min_accuracy scores each update on the held-out split, exactly as the aggregator did
        if update_checks and "min_accuracy" in update_checks:
            accuracy = screening.held_out_accuracy({"model": model_spec, "data": data_spec})
        kept, screened = screening.screen(updates, update_checks, start_state, accuracy)
    except ValueError as exc:
        audit.fail(f"update checks cannot be redone: {exc}")
        kept, screened = list(updates), {}
    if updates and not kept:
        return _check_kept_start(audit, screened, result, start_state, strategy_name=strategy_spec.get("name"),
                                 workflow_id=workflow_id, model_spec=model_spec, server_state=server_state,
                                 privacy=privacy, clipping_norm=clipping_norm, planned=planned, earlier=earlier)
    if privacy is not None:
        state = _private_aggregation(audit, kept, screened, result, privacy, start_state, workflow_id=workflow_id,
                                     noise_seed=noise_seed, clipping_norm=clipping_norm, planned=planned,
                                     earlier=earlier)
        return None if state is None else _check_global_model(audit, state, result, workflow_id, model_spec)
    rejected = dict(screened)
    strategy = FedAvg()  # combines as a weighted average if the workflow's strategy cannot be built
    try:
        strategy = strategy_from_spec(strategy_spec)
        chosen = strategy.weights(kept)
        rejected.update(strategy.rejections(chosen))  # whom the rule left out, and why
        recomputed = {**{n: 0.0 for n in rejected}, **chosen}
    except StrategyError as exc:
        audit.fail(f"aggregation weights cannot be recomputed: {exc}")
    else:
        claimed = dict(result.get("rejected") or {})
        audit.check(claimed == rejected, f"rejected updates on chain ({_reasons(claimed)}) are not the ones the "
                                         f"update checks and {strategy.name} reject ({_reasons(rejected)})")
        differ = [f"node {_short(n)} {on_chain.get(n)!r} on chain, {recomputed.get(n)!r} recomputed"
                  for n in sorted(set(on_chain) | set(recomputed)) if on_chain.get(n) != recomputed.get(n)]
        audit.check(not differ, f"aggregation weights on chain are not {strategy.name}'s: {'; '.join(differ)}")
    try:
        # the strategy's own combination (a weighted average, or a robust rule), with the weights on chain
        ordered = check_updates([u for u in kept if u.node in on_chain])
        if set(on_chain) - set(screened) != {u.node for u in ordered}:
            raise StrategyError(f"weights name nodes {sorted(on_chain)} but kept updates come from "
                                f"{sorted(u.node for u in ordered)}; they must match")
        state = strategy.combine(ordered, {u.node: on_chain[u.node] for u in ordered})
        if strategy.uses_start and start_state is None:
            raise StrategyError("the model the round trained from is not available")
        state, kept_state = strategy.step(state, start_state, server_state, ordered)
    except StrategyError as exc:
        audit.fail(f"global model cannot be recomputed from the on-chain weights: {exc}")
        return None
    claimed_state = result.get("server_state_digest")
    if kept_state is None:
        if claimed_state is not None:
            audit.fail(f"the round result names a server state {_short(claimed_state)}, but {strategy.name} keeps none")
    else:
        kept_digest = server_state_format.digest(server_state_format.serialize(
            kept_state, strategy=strategy.name, workflow_id=workflow_id, round=audit.number))
        audit.check(kept_digest == claimed_state, f"recomputed server state {_short(kept_digest)} of "
                                                  f"{strategy.name} does not match the on-chain server_state_digest "
                                                  f"{_short(claimed_state)}: digest mismatch")
    return _check_global_model(audit, state, result, workflow_id, model_spec)


def _check_kept_start(audit: RoundAudit, screened: Mapping[str, str], result: Mapping, start_state: Mapping | None,
                      *, strategy_name: str | None, workflow_id: str, model_spec: Mapping,
                      server_state: Mapping | None, privacy: Mapping | None, clipping_norm: float | None,
                      planned: int | None, earlier: Mapping[int, float] | None) -> str | None:
    """A round whose update checks rejected every update (fl/screening.py): each is named with its
    reason and weighs 0, the global model is the starting model re-serialized for this round, a
    server optimizer's state is carried over unchanged, and a DP round's privacy record is
    dp_round.kept_start_record's."""
    from trustmesh.fl import dp_round
    from trustmesh.fl import server_state as server_state_format

    claimed = dict(result.get("rejected") or {})
    audit.check(claimed == dict(screened), f"rejected updates on chain ({_reasons(claimed)}) are not the ones the "
                                           f"update checks reject ({_reasons(screened)})")
    audit.check(dict(result.get("aggregation_weights") or {}) == {n: 0.0 for n in screened},
                "aggregation weights on chain are not all 0, though the update checks rejected every update")
    claimed_state = result.get("server_state_digest")
    if server_state is None:
        audit.check(claimed_state is None, f"the round result names a server state {_short(claimed_state)}, but the "
                                           f"round started without one and combined no update")
    else:
        kept_digest = server_state_format.digest(server_state_format.serialize(
            server_state, strategy=strategy_name, workflow_id=workflow_id, round=audit.number))
        audit.check(kept_digest == claimed_state, f"the server state the round started with, carried over as "
                                                  f"{_short(kept_digest)}, is not the on-chain server_state_digest "
                                                  f"{_short(claimed_state)}: digest mismatch")
    if privacy is not None:
        if clipping_norm is None:
            audit.fail("the privacy record cannot be redone: the clipping norm is not available")
        else:
            check_privacy_record(audit, result, dp_round.kept_start_record(
                privacy, audit.number, clipping_norm, planned=len(screened) if planned is None else planned,
                earlier=earlier))
    if start_state is None:
        audit.fail("global model cannot be recomputed: the model the round started from is not available")
        return None
    return _check_global_model(audit, start_state, result, workflow_id, model_spec)


def _check_global_model(audit: RoundAudit, state: Mapping, result: Mapping, workflow_id: str,
                        model_spec: Mapping) -> str | None:
    """The recomputed global model, serialized as the aggregator stores it, against the chain's digest."""
    from trustmesh.fl import model_format

    try:
        blob = model_format.serialize(state, workflow_id=workflow_id, round=audit.number, model_spec=model_spec)
    except model_format.ModelFormatError as exc:
        audit.fail(f"global model cannot be recomputed: {exc}")
        return None
    digest = audit.recomputed_global_model = model_format.digest(blob)
    claimed = result.get("global_model_digest")
    audit.check(digest == claimed, f"recomputed global model {_short(digest)} does not match the on-chain "
                                   f"global_model_digest {_short(claimed)}: digest mismatch")
    return digest


def _private_aggregation(audit: RoundAudit, kept: Sequence[ClientUpdate], screened: Mapping[str, str],
                         result: Mapping, block: Mapping, start_state: Mapping | None, *, workflow_id: str,
                         noise_seed: bytes | None, clipping_norm: float | None, planned: int | None = None,
                         earlier: Mapping[int, float] | None = None):
    """DP-FedAvg redone (fl/dp_round.py): the weights (1/n), the rejections, the privacy record
    (epsilon by the same accountant, within privacy.EPSILON_RTOL) and the noisy state, or None."""
    from trustmesh.fl import dp_round

    if start_state is None or clipping_norm is None or (block["where"] == "server" and noise_seed is None):
        audit.fail("the DP aggregation cannot be redone: the starting model, the clipping norm or the revealed "
                   "noise seed is not available")
        return None
    try:
        state, chosen, record = dp_round.aggregate(block, start_state, kept, workflow_id=workflow_id,
                                                   round_number=audit.number, seed=noise_seed, norm=clipping_norm,
                                                   planned=len(kept) if planned is None else planned, earlier=earlier)
    except (ValueError, KeyError) as exc:
        audit.fail(f"the DP aggregation cannot be redone: {exc}")
        return None
    claimed_rejected = dict(result.get("rejected") or {})
    audit.check(claimed_rejected == dict(screened), f"rejected updates on chain ({_reasons(claimed_rejected)}) are "
                                                    f"not the ones the update checks reject ({_reasons(screened)})")
    recomputed = {**{n: 0.0 for n in screened}, **chosen}
    on_chain = dict(result.get("aggregation_weights") or {})
    audit.check(on_chain == recomputed, "aggregation weights on chain are not DP-FedAvg's equal shares of the "
                                        "updates kept")
    check_privacy_record(audit, result, record)
    return state


def check_privacy_record(audit: RoundAudit, result: Mapping, recomputed: Mapping) -> bool:
    """The round result's privacy record against the recomputed one, field by field (privacy_same),
    no field more or fewer: what both the plain and the secure DP round check."""
    claimed = dict(result.get("privacy") or {})
    differ = [f"{key} {claimed.get(key)!r} on chain, {value!r} recomputed" for key, value in recomputed.items()
              if not privacy_same(key, claimed.get(key), value)]
    differ += [f"{key} {claimed[key]!r} on chain, none recomputed" for key in claimed if key not in recomputed]
    return audit.check(not differ, f"privacy record on chain is not what this round spent and used: "
                                   f"{'; '.join(differ)}")


def _reasons(rejected: Mapping[str, str]) -> str:
    return "; ".join(f"{_short(n)}: {why}" for n, why in sorted(rejected.items())) or "none"


async def _starting_state(audit: RoundAudit, wf: _Workflow, rnd: _Round):
    """The global model the round trained from (audit.initial_model; None: the seeded initial
    weights), as a state, for update checks that measure how far an update moved."""
    from trustmesh.fl import model_format
    from trustmesh.fl.training import initial_state

    definition = rnd.definition
    if audit.initial_model is None:
        return initial_state(definition["model"], definition["hyperparameters"]["seed"])
    blob = await _check_blob(audit, rnd, wf.blobs, audit.initial_model, "starting global model")
    return None if blob is None else model_format.load(blob, audit.initial_model, definition["model"]).state


async def _recompute_aggregation(audit: RoundAudit, wf: _Workflow, rnd: _Round) -> None:
    """Load the aggregated updates as `_aggregate` did (verified bytes, on-chain samples and
    metrics), then check_aggregation."""
    from trustmesh.fl import model_format
    from trustmesh.fl.strategies import ClientUpdate

    if rnd.definition.get("secure_aggregation") is not None:
        await _recompute_secure_aggregation(audit, wf, rnd)
        return
    spec, updates = rnd.definition["model"], []
    for dep in rnd.aggregated():
        owner, status = rnd.tasks[dep].get("data_owner"), rnd.statuses.get(dep) or {}
        digest = status.get("output_digest")
        blob = rnd.verified.get(digest)
        if blob is None:
            audit.fail(f"aggregation not recomputed: the update of node {_short(owner)} is not available intact")
            return
        try:
            state = model_format.load(blob, digest, spec, workflow_id=wf.workflow_id, round=audit.number).state
        except model_format.ModelFormatError as exc:
            audit.fail(f"update of node {_short(owner)}: {exc}")
            return
        metrics = status.get("metrics") or {}
        updates.append(ClientUpdate(node=owner, state=state, samples=int(metrics.get("samples", 0)), metrics=metrics))
    checks = rnd.definition.get("update_checks")
    strategy_spec = rnd.definition.get("strategy") or {"name": "fedavg"}
    kind = STRATEGIES.get(strategy_spec.get("name"))
    uses_start = kind is not None and kind.uses_start
    block = rnd.definition.get("privacy")
    nothing_weighed = not any((rnd.result.get("aggregation_weights") or {}).values())  # the starting model kept?
    needs_start = uses_start or block is not None or (checks and "max_norm_ratio" in checks) or nothing_weighed
    start = await _starting_state(audit, wf, rnd) if needs_start else None
    previous = await _previous_server_state(audit, wf, rnd, kind) if uses_start else None
    private = {}
    if block is not None:
        from trustmesh.fl import dp_round

        private = {"privacy": block, "noise_seed": await _noise_seed(audit, wf, rnd) if block["where"] == "server"
                   else None, "clipping_norm": dp_round.clipping_norm(
                       block, rnd.start.next_clipping_norm if rnd.start is not None else None),
                   "planned": rnd.definition["federation"]["min_nodes_required"],
                   "earlier": await dp_round.earlier_multipliers(wf.reader, wf.workflow_id, audit.number)}
    check_aggregation(audit, updates, strategy_spec, rnd.result, workflow_id=wf.workflow_id, model_spec=spec,
                      update_checks=checks, start_state=start, data_spec=rnd.definition.get("data"),
                      server_state=previous, **private)
    if (rnd.definition.get("rewards") or {}).get("score") == "shapley":
        check_contributions(audit, rnd, updates, start if start is not None else await _starting_state(audit, wf, rnd))


def check_contributions(audit: RoundAudit, rnd: _Round, updates: Sequence[ClientUpdate], start: Mapping | None) -> None:
    """The round result's contribution scores (fl/shapley.py) redone from the same updates (those
    the update checks kept), the starting model and the seed the chain fixes: exactly equal."""
    from trustmesh.fl import screening, shapley

    if not audit.check(start is not None, "contribution scores not recomputed: the starting model is not available"):
        return
    checks = rnd.definition.get("update_checks")
    accuracy = screening.held_out_accuracy(rnd.definition)
    kept, _ = screening.screen(updates, checks, start, accuracy if checks and "min_accuracy" in checks else None)
    recomputed = shapley.scores(kept, start, accuracy, seed=bytes.fromhex(rnd.record["schedule_id"]),
                                permutations=rnd.definition["rewards"]["permutations"])
    claimed = rnd.result.get("contributions") or {}
    differ = [f"{_short(n)} {claimed.get(n)!r} on chain, {recomputed.get(n)!r} recomputed"
              for n in sorted(set(claimed) | set(recomputed)) if claimed.get(n) != recomputed.get(n)]
    audit.check(not differ, f"contribution scores on chain are not the ones recomputed: {'; '.join(differ[:5])}")


async def _recompute_secure_aggregation(audit: RoundAudit, wf: _Workflow, rnd: _Round) -> None:
    """The masked uploads (verified bytes) summed and unmasked with the shares revealed on chain,
    as compute-node/tasks.py `_secure_aggregate` did: the weights and the global model's digest
    must come out as recorded, and no update is ever seen on its own here either."""
    from trustmesh.compute_node.tasks import secure_weight, secure_weights
    from trustmesh.fl import dp_round, secagg
    from trustmesh.fl.training import initial_state

    definition, sid = rnd.definition, rnd.record["schedule_id"]
    uploads, samples = {}, {}
    for dep in rnd.aggregated():
        owner, status = rnd.tasks[dep].get("data_owner"), rnd.statuses.get(dep) or {}
        blob = rnd.verified.get(status.get("output_digest"))
        if blob is None:
            audit.fail(f"secure aggregation not recomputed: the masked update of node {_short(owner)} is not "
                       f"available intact")
            return
        uploads[owner], samples[owner] = blob, int((status.get("metrics") or {}).get("samples", 0))
    participants = rnd.record.get("submitted_nodes") or []
    records = {node: await wf.reader.secagg(sid, node) or {} for node in participants}
    try:
        state = secagg.aggregate_round(sid, definition["secure_aggregation"], participants=participants,
                                       records=records, uploads=uploads,
                                       samples={n: secure_weight(definition, s) for n, s in samples.items()},
                                       template=initial_state(definition["model"], definition["hyperparameters"]["seed"]))
    except ValueError as exc:
        audit.fail(f"secure aggregation cannot be redone from the chain: {exc}")
        return
    audit.check(rnd.result.get("aggregation_weights") == secure_weights(definition, samples),
                "aggregation weights on chain are not the ones secure aggregation summed with")
    if definition.get("privacy"):
        check_privacy_record(audit, rnd.result, dp_round.privacy_record(
            definition["privacy"], audit.number, float(definition["privacy"]["clipping_norm"]), averaged=len(uploads),
            planned=definition["federation"]["min_nodes_required"],
            earlier=await dp_round.earlier_multipliers(wf.reader, wf.workflow_id, audit.number)))
    _check_global_model(audit, state, rnd.result, wf.workflow_id, definition["model"])


def privacy_same(key: str, claimed: Any, recomputed: Any) -> bool:
    """A recorded privacy value against the recomputed one: epsilon within the accountant's
    tolerance (privacy.same_epsilon), everything else exactly."""
    from trustmesh.fl import privacy

    if key == "epsilon":
        return isinstance(claimed, (int, float)) and privacy.same_epsilon(claimed, recomputed)
    return claimed == recomputed


async def _noise_seed(audit: RoundAudit, wf: _Workflow, rnd: _Round) -> bytes | None:
    """The round's revealed DP noise seed, checked against the commitment the round opened with."""
    revealed = await wf.reader.noise_seed(rnd.record["schedule_id"])
    commitment = rnd.record.get("noise_commitment")
    if not audit.check(revealed is not None and commitment is not None,
                       "server-side DP round without a committed and revealed noise seed on chain"):
        return None
    from trustmesh.fl import privacy

    try:
        seed = bytes.fromhex(revealed["noise_seed"])
        matches = privacy.commitment(seed) == commitment
    except (ValueError, TypeError):  # not 32 bytes of hex: cannot be the committed seed
        matches = False
    if not audit.check(matches, f"revealed noise seed does not hash to the round's noise_commitment "
                                f"{_short(commitment)}"):
        return None
    return seed


async def _previous_server_state(audit: RoundAudit, wf: _Workflow, rnd: _Round, kind) -> Mapping | None:
    """The server optimizer's state the round started from: what the round that produced its
    starting model left (None: a fresh start), verified against that round's digest."""
    from trustmesh.fl import server_state

    digest = rnd.start.server_state_digest if rnd.start is not None and kind.keeps_state else None
    if digest is None:
        return None
    blob = await _check_blob(audit, rnd, wf.blobs, digest, f"server state of round {rnd.start.source_round}")
    try:
        return None if blob is None else server_state.load(blob, digest, strategy=kind.name)
    except server_state.ServerStateError as exc:
        audit.fail(f"server state of round {rnd.start.source_round}: {exc}")
        return None


async def _initial_model(audit: RoundAudit, wf: _Workflow, rnd: _Round) -> None:
    try:
        start = await wf.reader.starting_model(wf.workflow_id, audit.number)
    except LookupError as exc:
        trained = any(s.get("status") == "done" for t, s in rnd.statuses.items()
                      if rnd.tasks[t]["kind"] == "local_train")
        audit.check(not trained, f"local training ran without a global model to start from: {exc}")
        return
    audit.initial_model, rnd.start = start.digest, start
    check_lineage(audit, rnd, start)


def check_lineage(audit: RoundAudit, rnd: _Round, start: StartingModel) -> None:
    """Every local_train done in the round trained from the model the lineage rule names for it
    (the base_model_digest its task status holds; absent: the initial weights)."""
    for task_id in (rnd.assignments or {}).get("order") or sorted(rnd.tasks):
        status = rnd.statuses.get(task_id) or {}
        if rnd.tasks[task_id]["kind"] == "local_train" and status.get("status") == "done":
            problem = lineage_problem(task_id, status.get("base_model_digest"), start)
            audit.check(problem is None, problem)


# -- signer rules: (ok, why not) for one verified action of the round


def _open_round_rule(a: SignedAction, rnd: _Round) -> tuple[bool, str]:
    coordinator = rnd.federation.get("coordinator_node")
    return a.signer == coordinator, f"signed by {_short(a.signer)}, not by the coordinator_node {_short(coordinator)}"


def _submit_rule(a: SignedAction, rnd: _Round) -> tuple[bool, str]:
    if a.signer not in rnd.federation.get("participant_nodes", ()):
        return False, f"signed by {_short(a.signer)}, who is not in participant_nodes"
    held = (rnd.record.get("submissions") or {}).get(a.signer) or {}
    return held.get("digest") == a.body.get("digest"), (
        f"submits {_short(a.body.get('digest'))} but the round holds {_short(held.get('digest'))} for its signer")


def _report_rule(a: SignedAction, rnd: _Round) -> tuple[bool, str]:
    task_id = a.body.get("task_id")
    history = (rnd.statuses.get(task_id) or {}).get("history") or []
    holders = {e.get("attempt"): e.get("node") for e in history if e.get("status") == "assigned"}
    if "attempt" in a.body:
        attempts = [a.body["attempt"]]
    else:  # the attempt(s) whose history shows this report
        attempts = [e.get("attempt") for e in history if e.get("status") == a.body.get("status")
                    and e.get("node") == a.signer]
    return any(holders.get(n) == a.signer for n in attempts), (
        f"report of task {task_id} signed by {_short(a.signer)}, not by the node assigned to it at that attempt")


def _round_result_rule(a: SignedAction, rnd: _Round) -> tuple[bool, str]:
    result = rnd.result or {}
    node = (rnd.statuses.get(result.get("aggregate_task")) or {}).get("node")
    return a.signer == node == result.get("reported_by"), (
        f"signed by {_short(a.signer)}, not by the aggregate task's node {_short(node)}")


_SIGNER_RULES: dict[str, Callable[[SignedAction, _Round], tuple[bool, str]]] = {
    "open_round": _open_round_rule, "submit": _submit_rule, "report": _report_rule,
    "round_result": _round_result_rule,
}  # close_round, assign and reassign: anyone may send them


def _as_reports(a: SignedAction) -> list[SignedAction]:
    """A verified report_many stands for the reports it lists, each checked as a report signed
    by its signer (schedule.reports_in, as the rule reads it); any other action for itself."""
    if a.problem is not None or a.family != layout.SCHEDULE_FAMILY or a.action != "report_many":
        return [a]
    try:
        return [replace(a, body=body) for body in reports_in(a.body)]
    except InvalidTransaction as exc:  # the validator never commits one: say so rather than skip it
        return [replace(a, problem=f"its reports do not read as reports ({exc.message})")]


def _check_round_transactions(audit: RoundAudit, actions: Sequence[SignedAction], rnd: _Round) -> None:
    actions = [each for a in actions for each in _as_reports(a)]
    for a in actions:
        if not audit.check(a.problem is None, f"{a}: {a.problem}"):
            continue
        rule = _SIGNER_RULES.get(a.action)
        if rule is not None:
            ok, why = rule(a, rnd)
            audit.check(ok, f"{a}: {why}")
    _check_signed_records(audit, [a for a in actions if a.problem is None], rnd)


def _check_signed_records(audit: RoundAudit, valid: Sequence[SignedAction], rnd: _Round) -> None:
    """Every submission, done task and result in state has the signed transaction that made it."""
    def signed(action: str, signer: Any, **fields: Any) -> bool:
        return any(a.action == action and a.signer == signer and all(a.body.get(k) == v for k, v in fields.items())
                   for a in valid)

    record = rnd.record
    audit.check(signed("open_round", record.get("coordinator"), round=audit.number),
                "no open_round transaction signed by the round's coordinator")
    for node, submission in (record.get("submissions") or {}).items():
        audit.check(signed("submit", node, digest=submission.get("digest")),
                    f"submission of node {_short(node)} has no submit transaction signed by that node")
    for task_id, status in rnd.statuses.items():
        if status.get("status") == "done":
            audit.check(signed("report", status.get("node"), task_id=task_id, status="done",
                               output_digest=status.get("output_digest"),
                               base_model_digest=status.get("base_model_digest")),
                        f"task {task_id} is done without a done report signed by its node {_short(status.get('node'))}")
    if rnd.result is not None:
        audit.check(signed("round_result", rnd.result.get("reported_by"),
                           global_model_digest=rnd.result.get("global_model_digest")),
                    "the round result has no round_result transaction signed by its reporter")


def _status(rnd: _Round) -> str:
    if rnd.result is not None:
        return "final" if rnd.result.get("final") else "result recorded"
    return "assigned" if rnd.assignments is not None else str(rnd.record.get("status"))


async def _read_round(wf: _Workflow, sid: str, record: dict) -> _Round:
    rnd = _Round(record, wf.definition(record.get("workflow_version")))
    rnd.assignments = await wf.reader.assignments(sid)
    for task_id in rnd.tasks:
        status = await wf.reader.task_status(sid, task_id)
        if status is not None:
            rnd.statuses[task_id] = status
    rnd.result = await wf.reader.round_result(sid)
    return rnd


async def _audit_round(wf: _Workflow, number: int, sid: str | None,
                      actions: Sequence[SignedAction]) -> tuple[RoundAudit, set[str]]:
    """The round's checks, and the nodes that held its tasks."""
    audit = RoundAudit(number, sid)
    record = await wf.reader.round(sid) if sid else None
    if not audit.check(record is not None, "no round record on chain"):
        return audit, set()
    rnd = await _read_round(wf, sid, record)
    audit.status = _status(rnd)
    try:
        _check_record(audit, wf, rnd)
        for node in record.get("submitted_nodes") or []:
            digest = ((record.get("submissions") or {}).get(node) or {}).get("digest")
            await _check_blob(audit, rnd, wf.blobs, digest, f"submission of node {_short(node)}")
        if rnd.assignments is not None:
            await _check_tasks(audit, wf, rnd)
        await _initial_model(audit, wf, rnd)
        if rnd.result is not None:
            audit.global_model = rnd.result.get("global_model_digest")
            _check_result(audit, rnd)
            await _check_blob(audit, rnd, wf.blobs, audit.global_model, "global model")
            if wf.history is not None:
                await _check_couch_model(audit, wf.history, wf.workflow_id, audit.global_model)
            await _recompute_aggregation(audit, wf, rnd)
        _check_round_transactions(audit, actions, rnd)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # records of an unexpected shape
        audit.fail(f"records cannot be fully audited ({type(exc).__name__}: {exc})")
    return audit, rnd.nodes()


# --------------------------------------------------------------------------- the workflow


def _check_workflow(report: AuditReport, wf: _Workflow, actions: Sequence[SignedAction], index: Mapping) -> None:
    owner, version = wf.record.get("owner"), wf.record.get("version")
    deploys = [a for a in actions if a.problem is None and a.action == "deploy"]
    report.check(len(deploys) == 1, f"{len(deploys)} valid deploy transactions for the workflow, not 1")
    for a in actions:
        if report.check(a.problem is None, f"{a}: {a.problem}") and a.action in ("deploy", "update"):
            report.check(a.signer == owner, f"{a}: signed by {_short(a.signer)}, not by the owner {_short(owner)}")
    report.check(wf.definitions.get(version) == wf.record.get("definition"),
                 f"the stored definition (version {version}) is not the one its signed deploy/update carried")
    numbers = sorted(int(n) for n in index["rounds"])
    report.check(numbers == list(range(1, index["latest"] + 1)),
                 f"the rounds index lists rounds {numbers} with latest {index['latest']}")


async def _check_group(report: AuditReport, wf: _Workflow) -> None:
    """A workflow naming a participant group: the group is its owner's, complete, and its members
    are the participants the workflow record holds (and its rounds expected)."""
    group_id = participant_group(wf.record.get("definition"))
    if group_id is None:
        return
    group = await wf.reader.participant_group(wf.record.get("owner"), group_id)
    if report.check(group is not None, f"participant group {group_id!r} of the owner is not on chain"):
        report.check(complete(group), f"participant group {group_id!r} is not complete "
                                      f"({group.get('received')} of {group.get('parts')} parts)")
        report.check(group.get("members") == wf.record.get("participants"),
                     f"the workflow record's participants are not the members of participant group {group_id!r}")


def _check_peer_actions(report: AuditReport, actions: Sequence[SignedAction], nodes: set[str]) -> int:
    """Registrations of the nodes that held tasks: signed by the node itself (its key is the record's)."""
    mine = [a for a in actions if a.signer in nodes]
    for a in mine:
        report.check(a.problem is None, f"{a}: {a.problem}")
    return len(mine)


def _check_unattributed(report: AuditReport, actions: Sequence[SignedAction]) -> None:
    """A committed transaction whose payload cannot be read might concern this workflow: a
    validator never commits one, so it is reported rather than skipped."""
    for a in actions:
        if a.problem is not None and not a.body:
            report.fail(f"{a.family} transaction {_short(a.txn_id)} does not verify ({a.problem}) and cannot "
                        f"be attributed to a workflow")


async def _open_chain(workflow_id: str, rest: RestClient) -> tuple[str, dict]:
    """(head block id, workflow record); AuditError when the chain cannot be read or lacks it."""
    try:
        head = (await rest.head())["header_signature"]
        record = await FederationReader(rest, head).workflow(workflow_id, expanded=False)  # as stored and signed
    except (RestError, aiohttp.ClientError, ValueError, KeyError, IndexError) as exc:
        raise AuditError(f"cannot read the chain through the REST API at {rest.base_url}: {exc}") from None
    if record is None:
        raise AuditError(f"workflow {workflow_id!r} is not on chain (no record at "
                         f"{layout.workflow_address(workflow_id)}); check the id and the REST endpoint")
    return head, record


def _redacted(url: str) -> str:
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


async def _open_stores(endpoints: network.Endpoints, stack: contextlib.AsyncExitStack) \
        -> tuple[BlobStore, CouchHistory | None]:
    try:
        redis = await connect(endpoints.redis, socket_connect_timeout=5, socket_timeout=30)
    except (RedisError, ValueError, OSError) as exc:
        raise AuditError(f"Redis at {_redacted(endpoints.redis)} is unreachable: {exc}") from None
    stack.push_async_callback(redis.aclose)
    if not endpoints.couch:
        return BlobStore(redis), None
    couch = CouchClient(endpoints.couch, user=endpoints.couch_user, password=endpoints.couch_password)
    stack.push_async_callback(couch.close)
    try:
        await couch.server_info()
    except (CouchError, aiohttp.ClientError, ValueError) as exc:
        raise AuditError(f"CouchDB at {_redacted(endpoints.couch)} is unreachable: {exc}") from None
    return BlobStore(redis), CouchHistory(couch)


async def _audit(workflow_id: str, endpoints: network.Endpoints, progress: Callable[[str], None],
                 stack: contextlib.AsyncExitStack) -> AuditReport:
    rest = network.command_rest_client(endpoints.rest)  # waits out outages once reached
    stack.push_async_callback(rest.close)
    head, record = await _open_chain(workflow_id, rest)
    blobs, history = await _open_stores(endpoints, stack)
    reader = FederationReader(rest, head)
    progress(f"reading the transactions of the chain at block {_short(head)}")
    index = await reader.rounds(workflow_id)
    attributed: dict[str, list[SignedAction]] = {}
    peer_actions, unattributed = [], []
    for a in await _chain_actions(rest, head):
        key = _attribute(a, workflow_id, index["rounds"])
        if a.family == layout.PEER_FAMILY:
            peer_actions.append(a)
        elif key is None:
            unattributed.append(a)
        else:
            attributed.setdefault(key, []).append(a)
    own = attributed.get(WORKFLOW, [])
    wf = _Workflow(workflow_id, record, _definitions(own), reader, blobs, history)
    report = AuditReport(workflow_id)
    nodes: set[str] = set()
    for number in range(1, index["latest"] + 1):
        progress(f"checking round {number} of {index['latest']}")
        sid = index["rounds"].get(str(number))
        audit, held = await _audit_round(wf, number, sid, attributed.get(sid, []))
        report.rounds.append(audit)
        nodes |= held
    _check_workflow(report, wf, own, index)
    await _check_group(report, wf)
    from trustmesh.rewards_audit import check_payments  # trustmesh-rewards: every payment by the rule

    await check_payments(report.check, reader, workflow_id, (expand(record) or {}).get("definition") or {})
    _check_unattributed(report, unattributed)
    report.transactions = (len(own) + sum(len(attributed.get(r.schedule_id, [])) for r in report.rounds)
                           + _check_peer_actions(report, peer_actions, nodes))
    return report


async def audit_workflow(workflow_id: str, endpoints: network.Endpoints, *,
                         progress: Callable[[str], None] | None = None) -> AuditReport:
    """Audit every round of a workflow; AuditError when it cannot run (not on chain, store down)."""
    try:
        async with contextlib.AsyncExitStack() as stack:
            return await _audit(workflow_id, endpoints, progress or (lambda text: None), stack)
    except RestError as exc:
        raise AuditError(f"the REST API at {endpoints.rest} failed during the audit: {exc}") from None
    except RedisError as exc:
        raise AuditError(f"Redis at {_redacted(endpoints.redis)} failed during the audit: {exc}") from None
    except CouchError as exc:
        raise AuditError(f"CouchDB at {_redacted(endpoints.couch or '')} failed during the audit: {exc}") from None


# --------------------------------------------------------------------------- command


def run_audit_command(args: argparse.Namespace) -> int:
    endpoints = network.from_args(args)

    def progress(text: str) -> None:  # stderr, so --json output stays parseable
        print(f"audit: {text}", file=sys.stderr, flush=True)

    try:
        report = asyncio.run(audit_workflow(args.workflow_id, endpoints, progress=progress))
    except AuditError as exc:
        print(f"trustmesh audit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_json(), indent=2, ensure_ascii=False) if args.json else render_text(report))
    return 0 if report.ok else 1


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "audit", help="re-verify every round of a workflow from the chain, Redis and CouchDB",
        description="Re-verify every round of a workflow: signatures and signers of its transactions, "
                    "submissions and participants, every blob against its on-chain digest, and the "
                    "aggregation recomputed. Exit 0 if every check passes, 1 on any problem, 2 if the "
                    "audit cannot run.")
    parser.add_argument("workflow_id", metavar="WORKFLOW_ID", help="workflow_id of a deployed workflow")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    network.add_endpoint_flags(parser, ("rest", "redis", "couch"))
    parser.set_defaults(func=run_audit_command)
    return parser
