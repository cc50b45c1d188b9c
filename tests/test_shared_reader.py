"""An IoT host's shared reader keeps the list of workflows across blocks that deploy or update none."""

from __future__ import annotations

import asyncio

from trustmesh.iot_node.host import SharedReader
from trustmesh.ledger import protos as pb
from trustmesh.ledger.coalescing_rest import CoalescingRest
from trustmesh.ledger.events import BlockEvents
from trustmesh.scheduling import events


def _block(number: int, *event_types: str) -> BlockEvents:
    return BlockEvents(f"b{number}", number, "00" * 32, f"b{number - 1}",
                       [pb.Event(event_type=t) for t in ("sawtooth/block-commit", *event_types)])


async def test_the_workflow_list_is_read_again_only_after_a_deploy_or_an_update(devnet):
    rest = CoalescingRest(devnet.rest_url)
    reader = SharedReader(rest)
    try:
        assert await reader.workflows() == [] and await reader.workflows() == []
        assert reader.lists == 1  # one block, one listing for all the host's nodes
        reader.new_block(_block(2, events.TASK_DONE, events.SUBMISSION_ACCEPTED))
        await reader.workflows()
        assert reader.lists == 1  # nothing in that block writes a workflow record
        for number, change in ((3, events.WORKFLOW_DEPLOYED), (4, events.WORKFLOW_UPDATED)):
            reader.new_block(_block(number, change))
            await reader.workflows()
            assert reader.lists == number - 1
        reader.new_block()  # a block not looked at: read again
        await reader.workflows()
        assert reader.lists == 4
    finally:
        await rest.close()


async def test_a_round_is_assembled_once_per_block_for_all_the_hosts_nodes(devnet, monkeypatch):
    from trustmesh.scheduling.reader import FederationReader

    assembled = []
    plain_round = FederationReader.round

    async def counted(self, schedule_id):
        assembled.append(schedule_id)
        return await plain_round(self, schedule_id)

    monkeypatch.setattr(FederationReader, "round", counted)
    rest = CoalescingRest(devnet.rest_url)
    reader = SharedReader(rest)
    try:
        sid = "ab" * 32
        assert [await reader.round(sid) for _ in range(5)] == [None] * 5  # five nodes ask in one block
        assert assembled == [sid]
        reader.new_block(_block(2))
        await reader.round(sid)
        assert assembled == [sid, sid]
    finally:
        await rest.close()


async def test_the_host_tells_its_reader_of_each_block_before_its_nodes_hear_of_it(devnet, tmp_path):
    from trustmesh.iot_node.host import IoTHost

    host = IoTHost(["n1"], tmp_path, validator_url="tcp://127.0.0.1:1", rest_url=devnet.rest_url,
                   redis_url="redis://127.0.0.1:1")
    arriving = asyncio.Queue()

    class Stream:  # the validator's event stream as the host's subscriber hands it over
        async def next_block(self):
            return await arriving.get()

    host.subscriber, host.reader = Stream(), SharedReader(CoalescingRest(devnet.rest_url))
    inbox = host.inbox()
    pump = asyncio.get_running_loop().create_task(host._pump())
    try:
        await host.reader.workflows()
        for number, kind, lists in ((2, events.TASK_DONE, 1), (3, events.WORKFLOW_DEPLOYED, 2)):
            arriving.put_nowait(_block(number, kind))
            assert (await inbox.next_block()).block_num == number
            assert host.reader.generation == number - 1  # a new generation before the node's turn
            await host.reader.workflows()
            assert host.reader.lists == lists  # kept across a block that writes no workflow: the block was passed
        # a block with nothing but its commit event asks nothing of the nodes: not handed to 500 of them
        arriving.put_nowait(_block(4))
        arriving.put_nowait(_block(5, events.ROUND_OPENED))
        assert (await inbox.next_block()).block_num == 5 and host.reader.generation == 4
    finally:
        pump.cancel()
        await host.reader.rest.close()
