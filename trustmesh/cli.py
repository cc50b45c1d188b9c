"""The `trustmesh` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import pathlib
import signal
import sys
import time

from trustmesh import audit, heap, logs, model_files, rewards_info, workflow_info
from trustmesh.dashboard import server as dashboard_server
from trustmesh.endpoints import add_endpoint_flags, from_args, home_dir


SERVICES = ("devnet", "processors", "compute-node", "iot-node", "iot-host", "supervise")  # long-running: log INFO


class CommandError(RuntimeError):
    """A command cannot do what was asked; main() prints the message (no traceback) and exits 2."""


def _configure_logging(verbosity: int) -> None:
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _devnet(args) -> int:
    from trustmesh.ledger.devnet.chain import ChainSettings
    from trustmesh.ledger.devnet.execution import ExecutorSettings
    from trustmesh.ledger.devnet.node import DevnetConfig, run_devnet

    rest_host, rest_port = args.rest
    config = DevnetConfig(
        data_dir=pathlib.Path(args.data_dir),
        endpoint=args.endpoint,
        rest_host=rest_host,
        rest_port=rest_port,
        block_info=not args.no_block_info,
        chain=ChainSettings(max_batches_per_block=args.max_batches_per_block,
                            max_pending_batches=args.max_pending_batches),
        executor=ExecutorSettings(missing_processor_grace=args.missing_processor_grace),
    )

    def ready(validator):
        heap.settle()
        # One parseable line on stdout, so scripts and supervisors know where to connect.
        print(f"devnet ready component={validator.component_url} rest={validator.rest_url}", flush=True)

    return _run_until_signal(run_devnet(config, ready))


def _processors(args) -> int:
    from trustmesh.ledger.processor import TransactionProcessor
    from trustmesh.scheduling.handlers import federation_handlers

    async def serve():
        processor = TransactionProcessor(args.endpoint, max_occupancy=args.max_occupancy)
        for handler in federation_handlers():
            processor.add_handler(handler)
        heap.settle()
        await processor.run()

    return _run_until_signal(serve())


def _node_flags(parser, endpoints) -> None:
    add_endpoint_flags(parser, endpoints)
    parser.add_argument("--name", required=True, help="node name; its keys are NAME.priv / NAME.pub in DATA_DIR/keys")
    parser.add_argument("--data-dir", required=True, help="keys (created 0600 at first start) and node state")
    parser.add_argument("--torch-threads", type=_threads, metavar="N",
                        default=os.environ.get("TRUSTMESH_TORCH_THREADS") or None,
                        help="threads torch trains with (env TRUSTMESH_TORCH_THREADS; default and 0: one per "
                             "core; `trustmesh up` gives each node its share)")


def _attack_argument(parse_name: str):
    """An argparse type from fl/attacks.py's parser `parse_name`: its error becomes argparse's."""
    def parse(text: str):
        from trustmesh.fl import attacks

        try:
            return getattr(attacks, parse_name)(text)
        except attacks.AttackError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _use_torch_threads(args) -> None:
    """Compute nodes set it at start; IoT nodes when they start training (torch only then)."""
    if args.torch_threads is not None:
        from trustmesh.fl.training import use_threads

        use_threads(args.torch_threads)


def _compute_node(args) -> int:
    from trustmesh.compute_node.node import ComputeNode

    where = from_args(args)
    _use_torch_threads(args)

    async def serve():
        node = ComputeNode(args.name, args.data_dir, validator_url=where.validator, rest_url=where.rest,
                           redis_url=where.redis, couch_url=where.couch, couch_user=where.couch_user,
                           couch_password=where.couch_password, attacks=dict(args.attack))
        await node.start()
        heap.settle()
        await _until_stopped(node)

    return _exit_fast(_run_until_signal(serve()))


def _iot_node(args) -> int:
    from trustmesh.iot_node.node import IoTNode

    where = from_args(args)
    if args.exit_when_done and not args.workflow:
        raise CommandError("--exit-when-done needs --workflow (which workflow's end to wait for)")

    def report(workflow_id, number, result):
        evaluation = result.get("evaluations", {})
        accuracy = next(iter(evaluation.values()), {}).get("metrics", {}).get("accuracy")
        shown = f"{accuracy:.3f}" if isinstance(accuracy, float) else "n/a"
        print(f"{workflow_id} round {number} final: global model {result['global_model_digest'][:16]}… verified, "
              f"test accuracy {shown}", flush=True)

    async def serve():
        role = {"auto": None, "coordinator": True, "participant": False}[args.role]
        node = IoTNode(args.name, args.data_dir, workflow_id=args.workflow or None, validator_url=where.validator,
                       rest_url=where.rest, redis_url=where.redis, coordinator=role,
                       data_path=args.data, on_round=report, task_deadline=args.task_deadline,
                       torch_threads=args.torch_threads, attack=args.attack)
        await node.start()
        heap.settle()
        print(f"{args.name}: public key {node.node}", flush=True)
        await _until_stopped(node, node.finished if args.exit_when_done else None)

    return _exit_fast(_run_until_signal(serve()))


def _node_range(text: str) -> tuple[int, int]:
    """FIRST-LAST (or N): which numbered nodes an IoT host runs."""
    first, _, last = text.partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST-LAST such as 1-500, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"expected 1 <= FIRST <= LAST, got {text!r}")
    return low, high


def _iot_host(args) -> int:
    from trustmesh.iot_node.host import IoTHost

    where = from_args(args)
    low, high = args.nodes
    names = [f"{args.prefix}{i}" for i in range(low, high + 1)]

    async def serve():
        host = IoTHost(names, args.data_root, workflow_id=args.workflow or None, validator_url=where.validator,
                       rest_url=where.rest, redis_url=where.redis, task_deadline=args.task_deadline,
                       torch_threads=args.torch_threads)
        started = time.monotonic()
        step = max(1, len(names) // 10)
        await host.start(progress=lambda done, total: done % step == 0 and print(
            f"started {done}/{total} IoT nodes", flush=True))
        heap.settle()
        print(f"IoT host: {len(names)} nodes {names[0]} … {names[-1]} started in {time.monotonic() - started:.1f} s",
              flush=True)
        await _until_stopped(host)

    return _exit_fast(_run_until_signal(serve()))


def _supervise(args) -> int:
    from trustmesh.local_network import Supervisor

    return Supervisor(home_dir(args.home), compute_nodes=args.compute_nodes, iot_nodes=args.iot_nodes,
                      iot_hosts=args.iot_hosts).run()


def _up(args) -> int:
    from trustmesh import local_network

    home = home_dir(args.home)
    started = time.monotonic()
    print(f"starting a local network in {home} ({args.compute_nodes} compute nodes, {args.iot_nodes} IoT nodes)",
          flush=True)
    state = local_network.start(home, compute_nodes=args.compute_nodes, iot_nodes=args.iot_nodes,
                                iot_hosts=args.iot_hosts, timeout=args.timeout,
                                progress=lambda text: print(f"  {text}", flush=True))
    print(f"local network up in {time.monotonic() - started:.1f} s, {local_network.memory_mib(state):,.0f} MiB "
          f"resident: REST {state['endpoints']['rest']}, validator {state['endpoints']['validator']}; "
          f"logs in {home / 'logs'}", flush=True)
    if state["endpoints"].get("dashboard"):
        print(f"dashboard: {state['endpoints']['dashboard']}/", flush=True)
    return 0


def _down(args) -> int:
    from trustmesh import local_network

    home = home_dir(args.home)
    killed = local_network.stop(home)
    if killed:
        print(f"killed processes that outlived their supervisor: {', '.join(killed)}", file=sys.stderr)
    left = [name for name, s in local_network.status(home).get("services", {}).items() if s["running"]]
    if left:
        raise CommandError(f"still running after down: {', '.join(left)}")
    print(f"local network in {home} stopped; its data stays there (`trustmesh up` resumes it)")
    return 0


def _status(args) -> int:
    from trustmesh import local_network
    from trustmesh.ledger.rest_client import RestClient

    home = home_dir(args.home)
    state = local_network.status(home)
    services = state.get("services", {})
    head = None
    if state["supervisor_running"]:
        async def read_head():
            async with RestClient(state["endpoints"]["rest"], retries=1) as rest:
                return await rest.head()
        try:
            head = asyncio.run(read_head())
        except Exception as exc:  # status must still print what runs when the chain does not answer
            head = {"error": str(exc)}
    if args.json:
        print(json.dumps({**state, "head": head}, indent=2, sort_keys=True))
    else:
        print(f"local network {home}: {'running' if state['supervisor_running'] else 'stopped'}"
              f"{' (ready)' if state.get('ready') else ''}")
        for name, service in services.items():
            health = {True: "healthy", False: "UNHEALTHY", None: "starting"}[service.get("healthy")]
            print(f"  {name:<12} {'up' if service['running'] else 'down':<5} pid {service.get('pid') or '-':<8} "
                  f"{health if service['running'] else '':<10} restarts {service.get('restarts', 0)}"
                  + (f"  ATTACK TEST MODE: {service['attack']}" if service.get("attack") else "")
                  + (_hosted(service["nodes"]) if service.get("nodes") else ""))
        if head and "error" not in head:
            header = head.get("header", {})
            print(f"chain head: block {header.get('block_num')} {head.get('header_signature', '')[:16]}… "
                  f"state root {header.get('state_root_hash', '')[:16]}…")
        elif head:
            print(f"chain head: not readable ({head['error']})")
    up = state["supervisor_running"] and all(s["running"] for s in services.values())
    return 0 if up else 1


def _hosted(nodes: dict) -> str:
    """`  50 IoT nodes: iot-1 … iot-50` for an IoT host's status line."""
    names = sorted(nodes, key=lambda n: (len(n), n))
    return f"  {len(names)} IoT nodes: {names[0]} … {names[-1]}" if len(names) > 1 else f"  IoT node {names[0]}"


def _workflow_schema(args) -> int:
    from trustmesh.scheduling.workflow import load_schema

    print(json.dumps(load_schema(), indent=2))
    return 0


def _workflow_deploy(args) -> int:
    from trustmesh import workflow_runs

    home = home_dir(args.home)
    where = from_args(args)
    definition = workflow_runs.prepare(args.file, _nodes_dir(args, home), args.workflow_id)

    async def deploy():
        async with workflow_runs.rest_client(where.rest) as rest:
            return await workflow_runs.deploy(rest, workflow_runs.user_key(home, args.key), definition)

    outcome, record = asyncio.run(deploy())
    print(f"workflow {record['workflow_id']} {outcome}: version {record['version']}, owner {record['owner'][:16]}…")
    if workflow_runs.privacy_notice(definition):
        print(workflow_runs.privacy_notice(definition))
    return 0


def _run(args) -> int:
    from trustmesh import workflow_runs

    home = home_dir(args.home)
    where = from_args(args)
    try:
        views = asyncio.run(workflow_runs.deploy_and_follow(
            args.file, home=home, nodes_dir=_nodes_dir(args, home), validator_url=where.validator,
            rest_url=where.rest, workflow_id=args.workflow_id, key_path=args.key, timeout=args.timeout,
            couch_url=where.couch, couch_user=where.couch_user, couch_password=where.couch_password))
    except KeyboardInterrupt:
        print("\nstopped following; the network keeps running the workflow (run again to follow it)", file=sys.stderr)
        return 130
    return 0 if views and views[-1].status == "final" else 1


def _nodes_dir(args, home: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(args.nodes_dir) if args.nodes_dir else home / "nodes"


def _demo(args) -> int:
    from trustmesh.demo import main as demo_main

    return demo_main(args.home_given)


async def _until_stopped(service, done: asyncio.Event | None = None) -> None:
    """Keep a started node (or host) up until `done` is set, or without one until the signal that
    cancels us, then stop it."""
    try:
        await (done or asyncio.Event()).wait()
    finally:
        await service.stop()


def _exit_fast(code: int) -> int:
    """End a node process once it has stopped cleanly, without the interpreter's teardown:
    unloading torch takes a CPU-second, and a dozen nodes stop at once on `trustmesh down`."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _run_until_signal(coro) -> int:
    """Run a service (the validator, processors, a node, an IoT host) until SIGINT or SIGTERM."""
    heap.for_a_service()

    async def main():
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        return 0

    return asyncio.run(main())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trustmesh", description=__doc__)
    parser.add_argument("--home", help="the local network's folder: logs, chain, stores, node keys "
                                       "(env TRUSTMESH_HOME; default ./.trustmesh)")
    parser.add_argument("-v", "--verbose", action="count", help="more log output (-vv for debug); services log "
                                                                  "at INFO by default, other commands warnings only")
    parser.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    devnet = sub.add_parser("devnet", help="run the single-node dev validator (Sawtooth 1.2 protocols)")
    devnet.add_argument("--data-dir", required=True, help="chain, state and validator key live here")
    devnet.add_argument("--endpoint", default="tcp://127.0.0.1:4004",
                        help="component endpoint for processors and clients (default %(default)s)")
    devnet.add_argument("--rest", type=_host_port, default=("127.0.0.1", 8008), metavar="HOST:PORT",
                        help="REST API address (default 127.0.0.1:8008)")
    devnet.add_argument("--max-batches-per-block", type=int, default=100)
    devnet.add_argument("--max-pending-batches", type=int, default=4096,
                        help="beyond this, submissions are answered 429 (back-pressure)")
    devnet.add_argument("--missing-processor-grace", type=float, default=10.0, metavar="SECONDS",
                        help="how long a batch waits for its family's processor to register before "
                             "it is marked INVALID (default %(default)s)")
    devnet.add_argument("--no-block-info", action="store_true", help="do not inject BlockInfo transactions")
    devnet.set_defaults(func=_devnet)

    procs = sub.add_parser("processors", help="run the federation's transaction processors "
                                               "(workflow, peer, federation, schedule families)")
    procs.add_argument("--endpoint", default="tcp://127.0.0.1:4004",
                       help="the validator's component endpoint (default %(default)s)")
    procs.add_argument("--max-occupancy", type=int, default=10,
                       help="transactions processed at once (default %(default)s)")
    procs.set_defaults(func=_processors)

    compute = sub.add_parser("compute-node", help="run a compute node: register, train, aggregate, evaluate")
    _node_flags(compute, ("validator", "rest", "redis", "couch"))
    compute.add_argument("--attack", action="append", default=[], type=_attack_argument("parse_targeted"), metavar="OWNER=MODE[:PARAM]",
                         help="TESTS AND BENCHMARKS ONLY: poison the updates trained on the data of OWNER (an IoT "
                              "node's public key): scale:K, sign_flip, noise:SIGMA, label_flip or free_rider "
                              "(fl/attacks.py); repeatable, never on by default")
    compute.set_defaults(func=_compute_node)

    iot = sub.add_parser("iot-node", help="run an IoT node: coordinator or participant of the workflows naming it")
    _node_flags(iot, ("validator", "rest", "redis"))
    iot.add_argument("--workflow", default=os.environ.get("TRUSTMESH_WORKFLOW"),
                     help="serve this workflow only (env TRUSTMESH_WORKFLOW; default: every deployed workflow "
                          "whose federation names this node's key)")
    iot.add_argument("--attack", type=_attack_argument("parse_attack"), metavar="MODE[:PARAM]",
                     help="TESTS AND BENCHMARKS ONLY: poison the updates this node trains itself (train_on iot): "
                          "scale:K, sign_flip, noise:SIGMA, label_flip or free_rider (fl/attacks.py)")
    iot.add_argument("--role", choices=("auto", "coordinator", "participant"), default="auto",
                     help="auto (default): coordinate where the workflow's coordinator_node is this node")
    iot.add_argument("--data", help=".npz file with x (float32 [n, features]) and y (int64 [n]); default: this "
                                    "node's share of the workflow's built-in data set")
    iot.add_argument("--task-deadline", type=int, metavar="SECONDS",
                     help="coordinator: seconds a compute node gets per task before it is reassigned "
                          "(default: the schedule family's 300)")
    iot.add_argument("--exit-when-done", action="store_true", help="exit once the workflow's last round is over")
    iot.set_defaults(func=_iot_node)

    host = sub.add_parser("iot-host", help="run many IoT nodes in one process (local networks and simulations); "
                                           "each keeps its own keys, data and transactions")
    add_endpoint_flags(host, ("validator", "rest", "redis"))
    host.add_argument("--nodes", type=_node_range, required=True, metavar="FIRST-LAST",
                      help="the numbered nodes to run, e.g. 1-500 for iot-1 … iot-500")
    host.add_argument("--prefix", default="iot-", help="node names are PREFIX + number (default %(default)s)")
    host.add_argument("--data-root", required=True,
                      help="each node's keys (created 0600 at first start) and state go in DATA_ROOT/NAME")
    host.add_argument("--workflow", default=os.environ.get("TRUSTMESH_WORKFLOW"),
                      help="serve this workflow only (default: every deployed workflow naming each node)")
    host.add_argument("--task-deadline", type=int, metavar="SECONDS",
                      help="coordinator: seconds a compute node gets per task before it is reassigned")
    host.add_argument("--torch-threads", type=_threads, metavar="N", default=1,
                      help="threads torch trains with where nodes train themselves (default %(default)s)")
    host.set_defaults(func=_iot_host)

    up = sub.add_parser("up", help="start a local network: validator, processors, Redis, CouchDB-protocol "
                                   "server, compute and IoT nodes, supervised, in the background")
    up.add_argument("--compute-nodes", type=_count, default=2, metavar="N", help="default %(default)s")
    up.add_argument("--iot-nodes", type=_iot_count, default=10, metavar="M",
                    help="IoT nodes iot-1 … iot-M (default %(default)s, what workflows/federated-digits.json names)")
    up.add_argument("--iot-hosts", type=_hosts, metavar="K",
                    help="run the IoT nodes in K host processes, each keeping its nodes' own keys, data and "
                         "transactions (default: one per core); 0: a process per node, as devices run them")
    up.add_argument("--timeout", type=float, default=180, metavar="SECONDS",
                    help="give up if not every process is healthy by then (default %(default)s)")
    up.set_defaults(func=_up)

    supervise = sub.add_parser("supervise")  # what `up` runs in the background; not listed
    supervise.add_argument("--compute-nodes", type=_count, default=2)
    supervise.add_argument("--iot-nodes", type=_iot_count, default=10)
    supervise.add_argument("--iot-hosts", type=_hosts)
    supervise.set_defaults(func=_supervise)

    down = sub.add_parser("down", help="stop the local network; nothing is left running, its data stays")
    down.set_defaults(func=_down)

    status = sub.add_parser("status", help="what the local network runs, each process's health, the chain head")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=_status)

    wf = sub.add_parser("workflow", help="workflow definitions on chain")
    wf_sub = wf.add_subparsers(dest="workflow_command", required=True)
    deploy = wf_sub.add_parser("deploy", help="deploy a workflow JSON definition (or update it, as its owner)")
    _workflow_flags(deploy)
    add_endpoint_flags(deploy, ("rest",))
    deploy.set_defaults(func=_workflow_deploy)
    schema = wf_sub.add_parser("schema", help="print the JSON Schema of workflow definitions, whole "
                                              "(strategies and their parameters from the registry)")
    schema.set_defaults(func=_workflow_schema)
    workflow_info.register(wf_sub)  # list, show

    run = sub.add_parser("run", help="deploy a workflow and follow it to completion, a progress bar per round")
    _workflow_flags(run)
    add_endpoint_flags(run, ("validator", "rest", "couch"))
    run.add_argument("--timeout", type=float, metavar="SECONDS", help="stop following after this long")
    run.set_defaults(func=_run)

    audit.register(sub)
    dashboard_server.register(sub)
    model_files.register(sub)  # model export, model evaluate
    logs.register(sub)
    rewards_info.register(sub)  # rewards WORKFLOW, balance [KEY]

    demo = sub.add_parser("demo", help="the embedded default: a local network runs federated-digits to "
                                       "completion, the audit checks every round, the network stops")
    demo.set_defaults(func=_demo)
    return parser


def _threads(text: str) -> int | None:
    """A thread count; 0 means torch's default (one per core)."""
    if not text.isdigit() or not 0 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"expected a thread count from 0 (one per core) to 256, got {text!r}")
    return int(text) or None


def _bounded(low: int, high: int):
    def count(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"expected a whole number from {low} to {high}, got {text!r}")
        return int(text)
    return count


_count = _bounded(0, 100)
_iot_count = _bounded(0, 5000)  # nodes beyond a few dozen share host processes (--iot-hosts)
_hosts = _bounded(0, 64)


def _workflow_flags(parser) -> None:
    parser.add_argument("file", help="workflow JSON definition (see workflows/ and scheduling/workflow.schema.json)")
    parser.add_argument("--workflow-id", help="deploy under this id instead of the file's workflow_id")
    parser.add_argument("--nodes-dir", help="node names resolve to DIR/NAME/keys/NAME.pub (default HOME/nodes)")
    parser.add_argument("--key", help="sign with this private key file (default HOME/keys/user.priv, created 0600)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.home_given = args.home
    verbosity = args.verbose if args.verbose is not None else int(args.command in SERVICES)
    _configure_logging(verbosity)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _known_failure(exc, args)
        if message is None and (args.command in SERVICES or verbosity > 1):
            raise  # a bug: services log it whole for their logs; -vv shows it
        if message is None:
            message = (f"unexpected {type(exc).__name__}: {exc} (a bug; `trustmesh -vv {args.command} …` shows "
                       f"where)")
        print(f"trustmesh {args.command}: {message}", file=sys.stderr)
        return 2


def _known_failure(exc: Exception, args) -> str | None:
    """The one line a known failure ends with (no traceback), or None for anything else."""
    from trustmesh.ledger.events import EventSubscriptionError, ValidatorUnreachable
    from trustmesh.ledger.messaging import BadEndpoint
    from trustmesh.ledger.rest_client import BadRestURL, RestError
    from trustmesh.local_network import NetworkError
    from trustmesh.scheduling.workflow import DefinitionError
    from trustmesh.workflow_runs import RunError, rest_failure, validator_failure

    if isinstance(exc, (CommandError, NetworkError, RunError, DefinitionError)):
        return str(exc)
    if isinstance(exc, BadRestURL):
        return f"{exc}; check --rest or TRUSTMESH_REST"
    if isinstance(exc, RestError):
        return rest_failure(exc, from_args(args).rest)
    if isinstance(exc, (BadEndpoint, ValidatorUnreachable, EventSubscriptionError)):
        return validator_failure(exc, from_args(args).validator)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return f"{exc or type(exc).__name__}; is the network up? `trustmesh status` says what runs"
    return None


if __name__ == "__main__":
    sys.exit(main())
