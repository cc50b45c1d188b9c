"""`trustmesh workflow deploy FILE` and `trustmesh run FILE`: put a workflow on chain and follow
its rounds to the end.

Node names in a definition ("iot-1") become public keys read from NODES_DIR/NAME/keys/NAME.pub
(the layout every node's --data-dir has; `trustmesh up` keeps them in HOME/nodes). The workflow
is signed by the user's key (HOME/keys/user.priv, created 0600 at first use); its signer owns it.

Following needs nothing but the chain: each committed block that touches the workflow triggers
a re-read of its rounds, assignments, task statuses and results through the REST API.

Outages are waited out: once the REST API or the validator has answered, `run` waits for it
however long it is away, saying once on stderr what it waits for (trustmesh/outage.py). One that
never answered gives up after FIRST_CONTACT seconds with a RunError saying what to do.
"""

from __future__ import annotations

import asyncio
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import Mapping, TextIO

from trustmesh.endpoints import FIRST_CONTACT
from trustmesh.endpoints import command_rest_client as rest_client
from trustmesh.ledger.builders import make_batch
from trustmesh.ledger.events import (EventSubscriber, EventSubscriptionError, UnknownBlockError,
                                     ValidatorUnreachable, event_subscription)
from trustmesh.ledger.messaging import BadEndpoint
from trustmesh.ledger.rest_client import BatchTimeoutError, RestClient, RestError, refusal
from trustmesh.ledger.signing import PrivateKey, load_or_create_key, read_private_key
from trustmesh.fl import privacy_block
from trustmesh.scheduling import events, rewards, workflow
from trustmesh.scheduling.reader import FederationReader
from trustmesh.rewards_audit import final_unsettled

ROUND_EVENTS = (events.ROUND_OPENED, events.SUBMISSION_ACCEPTED, events.ROUND_READY,
                events.ROUND_TIMEOUT, events.ROUND_SCHEDULED, events.TASK_DONE,
                events.TASK_FAILED, events.ROUND_FINALIZED)
BAR_WIDTH = 20


class RunError(RuntimeError):
    """A workflow cannot be deployed or followed; the message says what to do."""


def rest_failure(exc: RestError, base_url: str) -> str:
    """One line for a REST API that failed for good, saying what to do about it."""
    if exc.status == 0 and exc.title == "Unknown Host":
        return (f"the REST API address {base_url} names a host that does not resolve ({exc.message}); "
                f"check --rest or TRUSTMESH_REST")
    if exc.status == 0 and not exc.reached:
        return (f"the network at {base_url} did not answer ({exc.message}); is it up? `trustmesh up` starts "
                f"a local one, --rest or TRUSTMESH_REST points elsewhere")
    if exc.status == 0:
        return f"the REST API at {base_url} stopped answering: {exc}"
    if exc.status in (401, 403):
        return (f"the REST API at {base_url} refused access (HTTP {exc.status} {exc.title}: {exc.message}); "
                f"check the address and any credentials the server in front of it asks for")
    if exc.status == 404 and exc.code is None:
        return (f"{base_url} answered HTTP 404 to {exc.method} {exc.url}: it is not the base URL of a Sawtooth "
                f"REST API (e.g. http://127.0.0.1:8008, without a path); check --rest or TRUSTMESH_REST")
    return f"the REST API at {base_url} failed: {exc}"


def validator_failure(exc: Exception, url: str) -> str:
    """One line for a validator endpoint that cannot be followed, saying what to do about it."""
    if isinstance(exc, ValidatorUnreachable):
        return (f"{exc}; is the network up? `trustmesh up` starts a local one, --validator or "
                f"TRUSTMESH_VALIDATOR points elsewhere")
    if isinstance(exc, BadEndpoint):
        return f"{exc}; check --validator or TRUSTMESH_VALIDATOR"
    return f"following the validator at {url} failed: {exc}"


# ------------------------------------------------------------------------------ deploy


def user_key(home: pathlib.Path, key_path: str | None = None) -> PrivateKey:
    if key_path:
        return read_private_key(key_path)
    return load_or_create_key(home / "keys", "user")


def node_keys(nodes_dir: pathlib.Path, names: list[str]) -> dict[str, str]:
    """Public keys of the named nodes; RunError naming every one that has none."""
    keys, missing = {}, []
    for name in names:
        path = nodes_dir / name / "keys" / f"{name}.pub"
        try:
            keys[name] = path.read_text().strip()
        except OSError:
            missing.append(name)
    if missing:
        have = sorted(p.name for p in nodes_dir.iterdir() if (p / "keys").is_dir()) if nodes_dir.is_dir() else []
        raise RunError(f"no key for node{'s' if len(missing) > 1 else ''} {', '.join(missing)} in {nodes_dir} "
                       f"(nodes there: {', '.join(have) or 'none'}); start enough nodes (e.g. `trustmesh up "
                       f"--iot-nodes {len(names)}`) or give --nodes-dir")
    return keys


def prepare(path: str, nodes_dir: pathlib.Path, workflow_id: str | None = None) -> dict:
    """The definition from `path`, renamed if asked, node names resolved, fully checked.

    A file may list more than MAX_PARTICIPANTS participant_nodes (up to MAX_GROUP_MEMBERS): they
    are checked as the participant group `deploy` registers for them, and the definition comes
    back listing them all."""
    definition = workflow.load_definition(path)
    if workflow_id:
        definition["workflow_id"] = workflow_id
    definition = workflow.resolve_node_names(definition, node_keys(nodes_dir, workflow.node_names(definition)))
    if workflow.needs_group(definition):
        workflow.check_grouped_definition(definition)
        return definition
    return workflow.check_definition(definition)


async def deploy(rest: RestClient, signer: PrivateKey, definition: dict, *,
                 out: TextIO | None = None) -> tuple[str, dict]:
    """Deploy, or update when the signer owns a different version; ("deployed"|"updated"|"unchanged", record).

    A definition listing more than MAX_PARTICIPANTS participant_nodes (too many keys for one
    payload) is deployed naming a participant group of them instead: the group is registered
    first, one part per batch, each part's progress written to `out` (stdout by default), and
    continued where it stopped if an earlier deploy was interrupted. The record returned is the
    reader's expanded view (participant_nodes listed)."""
    try:
        if workflow.needs_group(definition):
            grouped, members = workflow.check_grouped_definition(definition)
            await _register_group(rest, signer, workflow.participant_group(grouped), members,
                                  sys.stdout if out is None else out)
            definition = grouped
        return await _deploy(rest, signer, definition)
    except RestError as exc:
        raise RunError(rest_failure(exc, rest.base_url)) from None
    except BatchTimeoutError as exc:
        raise RunError(f"workflow {definition['workflow_id']!r} was not committed in time ({exc}); deploy it "
                       f"again (the same definition is not deployed twice)") from None
    except OSError as exc:
        raise RunError(f"no network answers at {rest.base_url} ({exc}); `trustmesh up` starts a local one") from None


async def _register_group(rest: RestClient, signer: PrivateKey, group_id: str, members: list[str], out: TextIO) -> None:
    """Register the signer's participant group `group_id` of `members`, part by part; nothing to do
    when it is complete already (its id is derived from the member list: the same list)."""
    reader = FederationReader(rest)
    me = signer.public_key().as_hex()
    parts = workflow.split_parts(members)
    stored = await reader.participant_group(me, group_id)
    name = f"participant group {group_id}"
    if stored is not None and stored["received"] == stored["parts"]:
        if stored["members"] != members:
            raise RunError(f"{name} is registered with other members; deploy from a file naming another group")
        out.write(f"{name}: {len(members)} members, registered already\n")
        return
    done = 0
    if stored is not None:
        done = stored["received"]
        if stored["parts"] != len(parts) or stored["members"] != members[:len(stored["members"])] \
                or len(stored["members"]) != sum(len(p) for p in parts[:done]):
            raise RunError(f"{name} was begun on chain with other parts ({stored['received']} of {stored['parts']}) "
                           f"and cannot be finished with this member list; list the participants in the order "
                           f"of that registration, or change the list (which names another group)")
        out.write(f"{name}: continuing at part {done + 1} of {len(parts)}\n")
    else:
        out.write(f"{name}: registering {len(members)} participants in {len(parts)} part(s) "
                  f"(more than {workflow.MAX_PARTICIPANTS} do not fit one definition)\n")
    registered = sum(len(p) for p in parts[:done])
    for txn, number in zip(workflow.make_register_group_transactions(signer, group_id, members, first_part=done + 1),
                           range(done + 1, len(parts) + 1)):
        [status] = await rest.wait_for_batches(await rest.submit_batches([make_batch(signer, [txn])]), 60,
                                               raise_invalid=False)
        if status["status"] != "COMMITTED":
            raise RunError(f"{name}: part {number} of {len(parts)} was not registered: {refusal(status)}")
        registered += len(parts[number - 1])
        out.write(f"{name}: part {number}/{len(parts)} committed ({registered}/{len(members)} participants)\n")
        out.flush()


async def _deploy(rest: RestClient, signer: PrivateKey, definition: dict) -> tuple[str, dict]:
    reader = FederationReader(rest)
    workflow_id = definition["workflow_id"]
    stored = await reader.workflow(workflow_id, expanded=False)
    me = signer.public_key().as_hex()
    if stored is None:
        txn, outcome = workflow.make_deploy_transaction(signer, definition, check=False), "deployed"
        if "rewards" in definition:  # the budget is escrowed as the workflow is deployed, in one batch
            txn, outcome = [txn, rewards.make_escrow_transaction(signer, workflow_id)], "deployed, budget escrowed"
    elif stored["definition"] == definition:
        return "unchanged", await reader.workflow(workflow_id)
    elif stored["owner"] != me:
        raise RunError(f"workflow {workflow_id!r} is deployed by another owner ({stored['owner'][:16]}…) with a "
                       f"different definition; choose another id with --workflow-id")
    else:
        txn = workflow.make_update_transaction(signer, definition, stored["version"], check=False)
        outcome = "updated"
    txns = txn if isinstance(txn, list) else [txn]
    [status] = await rest.wait_for_batches(await rest.submit_batches([make_batch(signer, txns)]), 60,
                                           raise_invalid=False)
    if status["status"] != "COMMITTED":
        raise RunError(f"workflow {workflow_id!r} was not {outcome}: {refusal(status)}")
    return outcome, await reader.workflow(workflow_id)


# ------------------------------------------------------------------------------ follow


@dataclass
class RoundView:
    number: int
    status: str = "opening"      # collecting | ready | timeout | final
    submitted: int = 0
    expected: int = 0
    tasks_done: int = 0
    tasks_total: int = 0
    loss: float | None = None
    accuracy: float | None = None     # test accuracy of the global model, once evaluated
    global_model: str | None = None
    steps_label: str = "tasks"        # what tasks_done counts ("epochs" for a single-node run)
    epsilon: float | None = None      # the DP budget spent once this round is released
    noise_multiplier: float | None = None  # the DP noise multiplier the round's result recorded

    @property
    def over(self) -> bool:
        return self.status in ("final", "timeout")

    def render(self, rounds: int) -> str:
        steps = self.tasks_done / max(1, self.tasks_total)
        # A federated round is half collecting, half computing; a single-node run only computes.
        share = 1.0 if self.over else (0.5 * self.submitted / self.expected + 0.5 * steps if self.expected else steps)
        filled = int(round(share * BAR_WIDTH))
        head = (f"round {self.number:>{len(str(rounds))}}/{rounds} [{'█' * filled}{'░' * (BAR_WIDTH - filled)}] "
                f"{self.status:<10}")
        details = [f"participants {self.submitted}/{self.expected}"] if self.expected else []
        if self.tasks_total:
            details.append(f"{self.steps_label} {self.tasks_done}/{self.tasks_total}")
        if self.loss is not None:
            details.append(f"loss {self.loss:.3f}")
        if self.accuracy is not None:
            details.append(f"accuracy {self.accuracy:.3f}")
        if self.epsilon is not None:
            details.append(f"ε {self.epsilon:.3g}")
        return f"{head} {' · '.join(details)}"


async def read_round(reader: FederationReader, number: int, schedule_id: str) -> RoundView:
    view = RoundView(number)
    record = await reader.round(schedule_id)
    if record is None:
        return view
    view.status, view.submitted, view.expected = record["status"], len(record["submitted_nodes"]), len(record["expected_nodes"])
    # The result before the tasks: a block may commit between reads, and a result read as final
    # must not come with task counts from before its last task was done.
    result = await reader.round_result(schedule_id)
    assignments = await reader.assignments(schedule_id)
    if assignments is not None:
        view.tasks_total = len(assignments["order"])
        statuses = await reader.task_statuses(schedule_id, assignments["order"])
        view.tasks_done = sum(bool(s and s["status"] == "done") for s in statuses.values())
    if result is not None:
        view.loss = result["metrics"].get("loss")
        view.global_model = result["global_model_digest"]
        view.epsilon = (result.get("privacy") or {}).get("epsilon")
        view.noise_multiplier = privacy_block.recorded_multiplier(result)
        evaluations = result.get("evaluations") or {}
        scores = next(iter(evaluations.values()), {}).get("metrics", {}) if evaluations else {}
        view.accuracy = scores.get("accuracy")
        if result.get("final"):
            view.status = "final"
    return view


class ProgressPrinter:
    """One line per round: redrawn in place on a terminal, printed on each change otherwise."""

    def __init__(self, rounds: int, out: TextIO):
        self.rounds, self.out = rounds, out
        self.tty = out.isatty()
        self.last: dict[int, str] = {}
        self.closed: set[int] = set()
        self.phases: dict[int, tuple] = {}

    def show(self, view: RoundView) -> None:
        if view.number in self.closed:
            return
        line = view.render(self.rounds)
        if self.last.get(view.number) == line:
            return
        self.last[view.number] = line
        if self.tty:
            self.out.write("\r\033[K" + line + ("\n" if view.over else ""))
        elif view.over or self._phase(view) != self.phases.get(view.number):
            self.out.write(line + "\n")
        self.phases[view.number] = self._phase(view)
        if view.over:
            self.closed.add(view.number)
        self.out.flush()

    @staticmethod
    def _phase(view: RoundView) -> tuple:
        return (view.status, view.submitted == view.expected, view.tasks_total > 0)


async def follow(validator_url: str, rest: RestClient, workflow_id: str, *, out: TextIO = sys.stdout,
                 timeout: float | None = None) -> list[RoundView]:
    """Show each round's progress until the workflow's last round is over; returns the rounds."""
    reader = FederationReader(rest)
    stored = await reader.workflow(workflow_id)
    if stored is None:
        raise RunError(f"workflow {workflow_id!r} is not on chain; deploy it first")
    fed = stored["definition"].get("federation")
    if fed is None:
        raise RunError(f"workflow {workflow_id!r} is single-node: it has no federation rounds to follow")
    rounds = privacy_block.planned_rounds(stored["definition"])
    if budget_header(stored["definition"]):
        out.write(budget_header(stored["definition"]) + "\n")
    printer = ProgressPrinter(rounds, out)
    subscriber = await _subscribe(validator_url)
    deadline = None if timeout is None else time.monotonic() + timeout
    views: dict[int, RoundView] = {}
    block = None
    try:
        while True:
            index = await reader.rounds(workflow_id)
            for key, sid in sorted(index["rounds"].items(), key=lambda kv: int(kv[0])):
                number = int(key)
                if number in views and views[number].over:
                    continue
                views[number] = await read_round(reader, number, sid)
                printer.show(views[number])
            if views and all(v.over for v in views.values()) and (  # rounds overlap
                    len(views) == rounds or budget_ended(stored["definition"], list(views.values()))):
                return [views[n] for n in sorted(views)]
            if deadline is not None and time.monotonic() > deadline:
                raise RunError(f"workflow {workflow_id!r} did not finish within {timeout:g} s "
                               f"(round {index['latest']}/{rounds}); it goes on running")
            # A block that touches any round, or a tick for time-driven changes. Not wait_for:
            # on Python 3.11 it swallows a Ctrl-C that lands as the block arrives.
            if block is None:
                block = asyncio.ensure_future(subscriber.next_block())
            if (await asyncio.wait({block}, timeout=2.0))[0]:
                try:
                    block.result()
                except UnknownBlockError:
                    # The validator came back with another chain: no gap-free resume, but the
                    # view is re-read from the REST API at each block, so a fresh subscription does.
                    await subscriber.close()
                    subscriber = await _subscribe(validator_url)
                except EventSubscriptionError as exc:
                    raise RunError(validator_failure(exc, validator_url)) from None
                finally:
                    block = None
    finally:
        if block is not None:
            block.cancel()
            await asyncio.gather(block, return_exceptions=True)
        await subscriber.close()


async def _subscribe(validator_url: str) -> EventSubscriber:
    subscriber = EventSubscriber(validator_url, [event_subscription(e) for e in ROUND_EVENTS],
                                 first_contact=FIRST_CONTACT)
    try:
        await subscriber.start()
    except (ValidatorUnreachable, BadEndpoint, EventSubscriptionError) as exc:
        raise RunError(validator_failure(exc, validator_url)) from None
    return subscriber


def budget_header(definition: Mapping) -> str | None:
    """The line `run` prints first when the privacy budget allows fewer rounds than federation.rounds."""
    rounds, configured = privacy_block.planned_rounds(definition), definition["federation"]["rounds"]
    if rounds >= configured:
        return None
    budget = definition["privacy"]
    return (f"privacy budget: epsilon {budget['epsilon_budget']:g} (delta {budget['delta']:g}) allows {rounds} of "
            f"the {configured} rounds; the workflow ends then, budget exhausted")


def budget_ended(definition: Mapping, views: list[RoundView]) -> bool:
    """Whether the privacy budget ended the workflow after these rounds: one more within
    federation.rounds would pass it, given the multipliers their results recorded."""
    recorded = {v.number: v.noise_multiplier for v in views if v.noise_multiplier is not None}
    return "federation" in definition and privacy_block.budget_exhausted(definition, len(views), recorded)


def privacy_notice(definition: Mapping) -> str | None:
    """The one line deploy and run print for a privacy block whose noise seed goes on chain."""
    if (definition.get("privacy") or {}).get("where") != "server":
        return None
    return ("privacy where \"server\": each round's noise seed is revealed on chain, so whoever reads the chain can "
            "remove the noise; epsilon covers models given outside the consortium only (where \"client\" "
            "protects against members)")


def summary(workflow_id: str, views: list[RoundView], seconds: float, *, federated: bool = True,
            definition: Mapping | None = None) -> str:
    curve = ", ".join(f"{v.accuracy:.3f}" if v.accuracy is not None else "–" for v in views)
    final = views[-1]
    ended = " (budget exhausted)" if definition and federated and budget_ended(definition, views) else ""
    lines = [f"workflow {workflow_id}: {sum(v.status == 'final' for v in views)}/{len(views)} rounds final "
             f"in {seconds:.1f} s{ended}",
             f"test accuracy by round: {curve}"]
    if final.global_model:
        lines.append(f"final global model: sha256 {final.global_model}")
    if final.epsilon is not None:
        lines.append(f"privacy spent: epsilon {final.epsilon:.4g} (client-level, at the workflow's delta)")
    if federated:
        lines.append(f"verify it: trustmesh audit {workflow_id}")
    else:
        lines.append("trained here, off chain: single-node workflows have no rounds to audit")
    return "\n".join(lines)


def train_single_node(definition: dict, models_dir: pathlib.Path, out: TextIO) -> RoundView:
    """A single-node workflow has no rounds on chain: it trains here, on the whole training split,
    with the workflow's model and hyperparameters (the baseline federated runs compare with)."""
    from trustmesh.fl import datasets, model_format, training

    data = definition["data"]
    if data.get("dataset") != "digits":
        raise RunError(f"single-node workflow {definition['workflow_id']!r} uses data set {data.get('dataset')!r}; "
                       f"`run` trains single-node workflows on the built-in digits data only")
    train, test = datasets.split_train_test(datasets.load_digits(), data["test_fraction"], datasets.split_seed(data))
    view = RoundView(1, status="training", steps_label="epochs")
    printer = ProgressPrinter(1, out)

    def progress(p: training.Progress) -> None:
        if p.step == p.total or p.step % max(1, p.total // p.epochs) == 0:
            view.tasks_done, view.tasks_total, view.loss = p.epoch, p.epochs, p.loss
            printer.show(view)

    result = training.local_train(definition["model"], definition["hyperparameters"], None, train.x, train.y,
                                  progress=progress)
    scores = training.evaluate(definition["model"], result.state, test.x, test.y)
    blob = model_format.serialize(result.state, workflow_id=definition["workflow_id"], round=1,
                                  model_spec=definition["model"])
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / f"{definition['workflow_id']}.safetensors").write_bytes(blob)
    view.status, view.accuracy, view.global_model = "final", scores["accuracy"], model_format.digest(blob)
    printer.show(view)
    return view


async def wait_for_history(couch_url: str, workflow_id: str, digest: str, *, user: str | None = None,
                           password: str | None = None, timeout: float = 60, out: TextIO = sys.stdout) -> bool:
    """Wait until the final model is in the CouchDB history: the compute node that reported the
    last round records it from the chain after the round is final, off the round's path."""
    from trustmesh.stores.couch import CouchClient, CouchHistory

    deadline = time.monotonic() + timeout
    async with CouchClient(couch_url, user=user, password=password) as couch:
        history = CouchHistory(couch)
        while time.monotonic() < deadline:
            if await history.get_final_model(workflow_id, expected_digest=digest) is not None:
                out.write(f"history: final model {digest[:12]}… recorded in CouchDB\n")
                return True
            await asyncio.sleep(0.2)
    out.write(f"history: the final model is not in CouchDB after {timeout:g} s; `trustmesh audit` shows what is missing\n")
    return False


def escrow_left(workflow_id: str) -> str:
    return (f"its escrow stays on chain: `trustmesh rewards {workflow_id} --refund` takes back what is left once "
            f"the workflow has ended or gone quiet")


async def take_back_escrow(rest: RestClient, owner: PrivateKey, workflow_id: str, out: TextIO,
                           timeout: float = 60.0) -> None:
    """The workflow is over: once the coordinator has settled every final round, what is left in
    the escrow goes back to its owner (trustmesh-rewards refund)."""
    reader = FederationReader(rest)
    deadline = time.monotonic() + timeout
    while True:
        unpaid = await final_unsettled(reader, workflow_id)
        escrow = await reader.escrow(workflow_id)
        if escrow is None or escrow.get("refunded") or not unpaid or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if escrow is None or escrow.get("refunded"):
        return
    [status] = await rest.wait_for_batches(await rest.submit_batches(
        [make_batch(owner, [rewards.make_refund_transaction(owner, workflow_id)])]), 60, raise_invalid=False)
    if status["status"] == "COMMITTED":
        out.write(f"rewards: {escrow['paid']} paid over {len(escrow['settled'])} round(s), "
                  f"{escrow['remaining']} back to the owner\n")
    else:
        out.write(f"rewards: the escrow was not refunded: {refusal(status)}; `trustmesh rewards {workflow_id} "
                  f"--refund` tries again\n")


async def deploy_and_follow(path: str, *, home: pathlib.Path, nodes_dir: pathlib.Path, validator_url: str,
                            rest_url: str, workflow_id: str | None = None, key_path: str | None = None,
                            timeout: float | None = None, out: TextIO = sys.stdout, couch_url: str | None = None,
                            couch_user: str | None = None, couch_password: str | None = None) -> list[RoundView]:
    definition = prepare(path, nodes_dir, workflow_id)
    started = time.monotonic()
    try:
        async with rest_client(rest_url) as rest:
            outcome, record = await deploy(rest, user_key(home, key_path), definition, out=out)
            out.write(f"workflow {definition['workflow_id']} {outcome} (version {record['version']})\n")
            if privacy_notice(definition):
                out.write(privacy_notice(definition) + "\n")
            if "federation" in definition:
                try:
                    views = await follow(validator_url, rest, definition["workflow_id"], out=out, timeout=timeout)
                except RunError as exc:  # stopped early: take_back_escrow below does not run
                    if "rewards" not in definition:
                        raise
                    raise RunError(f"{exc}; {escrow_left(definition['workflow_id'])}") from None
                if "rewards" in definition:
                    await take_back_escrow(rest, user_key(home, key_path), definition["workflow_id"], out)
                if couch_url and views[-1].status == "final":
                    await wait_for_history(couch_url, definition["workflow_id"], views[-1].global_model,
                                           user=couch_user, password=couch_password, out=out)
            else:
                out.write("single-node workflow: training it here on the whole training split\n")
                views = [await asyncio.to_thread(train_single_node, definition, home / "models", out)]
    except RestError as exc:  # an outage is waited out: this one is for good
        raise RunError(rest_failure(exc, rest_url)) from None
    out.write(summary(definition["workflow_id"], views, time.monotonic() - started,
                      federated="federation" in definition, definition=definition) + "\n")
    return views
