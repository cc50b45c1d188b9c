"""The `trustmesh` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import pathlib
import signal
import sys


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
        await processor.run()

    return _run_until_signal(serve())


def _node_endpoints(parser) -> None:
    parser.add_argument("--validator", default=os.environ.get("TRUSTMESH_VALIDATOR", "tcp://127.0.0.1:4004"),
                        help="validator component endpoint (env TRUSTMESH_VALIDATOR; default %(default)s)")
    parser.add_argument("--rest", default=os.environ.get("TRUSTMESH_REST", "http://127.0.0.1:8008"),
                        help="REST API (env TRUSTMESH_REST; default %(default)s)")
    parser.add_argument("--redis", default=os.environ.get("TRUSTMESH_REDIS", "redis://127.0.0.1:6379/0"),
                        help="Redis URL, password included if any (env TRUSTMESH_REDIS; default %(default)s)")
    parser.add_argument("--name", required=True, help="node name; its keys are NAME.priv / NAME.pub in DATA_DIR/keys")
    parser.add_argument("--data-dir", required=True, help="keys (created 0600 at first start) and node state")


def _compute_node(args) -> int:
    from trustmesh.compute_node.node import ComputeNode

    async def serve():
        node = ComputeNode(args.name, args.data_dir, validator_url=args.validator, rest_url=args.rest,
                           redis_url=args.redis, couch_url=args.couch or None,
                           couch_user=os.environ.get("COUCHDB_USER") or None,
                           couch_password=os.environ.get("COUCHDB_PASSWORD") or None)
        await node.start()
        try:
            await asyncio.Event().wait()
        finally:
            await node.stop()

    return _run_until_signal(serve())


def _iot_node(args) -> int:
    from trustmesh.iot_node.node import IoTNode

    def report(number, result):
        evaluation = result.get("evaluations", {})
        accuracy = next(iter(evaluation.values()), {}).get("metrics", {}).get("accuracy")
        shown = f"{accuracy:.3f}" if isinstance(accuracy, float) else "n/a"
        print(f"round {number} final: global model {result['global_model_digest'][:16]}… verified, "
              f"test accuracy {shown}", flush=True)

    async def serve():
        node = IoTNode(args.name, args.data_dir, workflow_id=args.workflow, validator_url=args.validator,
                       rest_url=args.rest, redis_url=args.redis, coordinator=args.role == "coordinator",
                       data_path=args.data, on_round=report, task_deadline=args.task_deadline)
        await node.start()
        print(f"{args.name}: public key {node.node}", flush=True)
        try:
            if args.exit_when_done:
                await node.finished.wait()
            else:
                await asyncio.Event().wait()
        finally:
            await node.stop()

    return _run_until_signal(serve())


def _demo(args) -> int:
    from trustmesh.demo import main as demo_main

    return demo_main(args.data_dir)


def _run_until_signal(coro) -> int:
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
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_const", const=0, dest="verbose", help="warnings only")
    sub = parser.add_subparsers(dest="command", required=True)

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
    _node_endpoints(compute)
    compute.add_argument("--couch", default=os.environ.get("COUCHDB_URL", ""),
                         help="CouchDB URL for round history and models (env COUCHDB_URL; credentials from "
                              "COUCHDB_USER / COUCHDB_PASSWORD)")
    compute.set_defaults(func=_compute_node)

    iot = sub.add_parser("iot-node", help="run an IoT node (coordinator or participant) of one workflow")
    _node_endpoints(iot)
    iot.add_argument("--role", choices=("coordinator", "participant"), default="participant")
    iot.add_argument("--workflow", required=True, help="workflow_id of a deployed workflow")
    iot.add_argument("--data", help=".npz file with x (float32 [n, features]) and y (int64 [n]); default: this "
                                    "node's share of the workflow's built-in data set")
    iot.add_argument("--task-deadline", type=int, metavar="SECONDS",
                     help="coordinator: seconds a compute node gets per task before it is reassigned "
                          "(default: the schedule family's 300)")
    iot.add_argument("--exit-when-done", action="store_true", help="exit once the workflow's last round is over")
    iot.set_defaults(func=_iot_node)

    demo = sub.add_parser("demo", help="run the embedded default end to end on loopback")
    demo.add_argument("--data-dir", help="keep the chain here (default: a temporary folder)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
