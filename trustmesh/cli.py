"""The `trustmesh` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
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
