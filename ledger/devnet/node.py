"""The dev validator as one object: store, state, chain, component endpoint, REST API, BlockInfo,
and the state worker process that computes state roots.

`trustmesh devnet` runs this. Everything lives under one data dir, so stopping the process
(even with kill -9) and starting it again on the same dir resumes the same chain.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
from dataclasses import dataclass, field

from .. import protos as pb
from ..processor import TransactionProcessor
from ..signing import load_or_create_key
from .block_info import NAMESPACE as BLOCK_INFO_NAMESPACE
from .block_info import BlockInfoHandler, latest_block_timestamp, make_block_info_batch
from .chain import Chain, ChainSettings
from .client_queries import ClientQueries
from .component_endpoint import ComponentEndpoint
from .execution import BlockExecutor, ExecutorSettings
from .merkle import MerkleRadix
from .processors import ProcessorRegistry
from .rest_api import start_rest_api
from .state_worker import StateWorker
from .store import ChainStore

LOGGER = logging.getLogger(__name__)


@dataclass
class DevnetConfig:
    data_dir: pathlib.Path
    endpoint: str = "tcp://127.0.0.1:4004"   # component endpoint; port 0 picks a free one
    rest_host: str = "127.0.0.1"
    rest_port: int = 8008                     # 0 picks a free one; None disables the REST API
    block_info: bool = True                   # inject BlockInfo and run its processor in-process
    chain: ChainSettings = field(default_factory=ChainSettings)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    ping_interval: float = 10.0


class DevValidator:
    def __init__(self, config: DevnetConfig):
        self.config = config
        self.store: ChainStore | None = None
        self.endpoint: ComponentEndpoint | None = None
        self.chain: Chain | None = None
        self._rest = None
        self._head_root: tuple[str, str] | None = None  # (block id, state root) of the head last asked for
        self._block_info_tp: TransactionProcessor | None = None
        self._state: StateWorker | None = None
        self._tasks: list[asyncio.Task] = []

    @property
    def component_url(self) -> str:
        return self.endpoint.bound_url

    @property
    def rest_url(self) -> str | None:
        return None if self._rest is None else f"http://{self.config.rest_host}:{self._rest.port}"

    def _head_and_root(self) -> tuple[str, str]:
        """(block id, state root) of the chain head; the header is parsed once per head."""
        head = self.chain.head
        if self._head_root is None or self._head_root[0] != head.header_signature:
            self._head_root = (head.header_signature, pb.BlockHeader.FromString(head.header).state_root_hash)
        return self._head_root

    async def start(self) -> None:
        cfg = self.config
        data_dir = pathlib.Path(cfg.data_dir)
        key = load_or_create_key(data_dir / "keys", "validator")
        self.store = ChainStore(data_dir)
        merkle = MerkleRadix(self.store.get_node)
        registry = ProcessorRegistry()
        endpoint_holder: list[ComponentEndpoint] = []

        async def send_request(identity, correlation_id, request):
            await endpoint_holder[0].send_process_request(identity, correlation_id, request)

        executor = BlockExecutor(registry, send_request, cfg.executor)

        async def on_commit(block, receipts):
            await endpoint_holder[0].broadcast_block(block, receipts)

        injector = (lambda parent, ts: make_block_info_batch(key, parent, ts)) if cfg.block_info else None

        async def injected_timestamp(read) -> int | None:
            return await latest_block_timestamp(
                lambda addresses: {a: v for a in addresses if (v := read(a)) is not None})

        self._state = StateWorker(self.store.path)
        self._state.start()
        self.chain = Chain(self.store, merkle, executor, key, cfg.chain, injector=injector,
                           injected_timestamp=injected_timestamp, injected_outputs=[BLOCK_INFO_NAMESPACE],
                           on_commit=on_commit, state=self._state)
        endpoint = ComponentEndpoint(
            _zmq_bind_url(cfg.endpoint), self.chain, registry, executor,
            ClientQueries(self.store, merkle, endpoint=cfg.endpoint),
            ping_interval=cfg.ping_interval,
        )
        endpoint_holder.append(endpoint)
        self.endpoint = endpoint
        await endpoint.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self.chain.run()))
        if cfg.block_info:
            self._block_info_tp = TransactionProcessor(self.component_url, identity="devnet-block-info")
            self._block_info_tp.add_handler(BlockInfoHandler())
            await self._block_info_tp.start()
        if cfg.rest_port is not None:
            self._rest = await start_rest_api(self.component_url, cfg.rest_host, cfg.rest_port,
                                              chain_head=self._head_and_root, queries=endpoint.queries)
        await self._state.ready()
        head = self.chain.head_header()
        LOGGER.info(
            "dev validator ready: component %s, REST %s, head block %d (state %s)",
            self.component_url, self.rest_url, head.block_num, head.state_root_hash[:16],
        )

    async def stop(self) -> None:
        if self._rest is not None:
            await self._rest.close()
        if self._block_info_tp is not None:
            await self._block_info_tp.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.endpoint is not None:
            await self.endpoint.close()
        if self._state is not None:
            await self._state.close()
        if self.store is not None:
            self.store.close()


def _zmq_bind_url(url: str) -> str:
    """ZMQ wants '*' for an ephemeral port; accept the familiar ':0' too."""
    return url[:-2] + ":*" if url.endswith(":0") else url


async def run_devnet(config: DevnetConfig, ready=None) -> None:
    """Run until cancelled; `ready(validator)` is called once both endpoints listen."""
    validator = DevValidator(config)
    await validator.start()
    try:
        if ready is not None:
            ready(validator)
        await asyncio.Event().wait()
    finally:
        await validator.stop()
