"""The topology the worker declares: the single-queue layout and the partitioned one (intake,
consistent-hash exchange, partitions), which the shipped RabbitMQ definitions hold at P = 16."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from types import FunctionType
from typing import Any, cast

import aio_pika
from faststream.rabbit import RabbitExchange

from worker.app.topology import (
    COMMAND_BINDING,
    DEAD_BINDING,
    PARTITION_KEY_HEADER,
    PARTITION_WEIGHT,
    command_queue_arguments,
    commands_queue,
    dead_queue_arguments,
    declare,
    delay_queue_arguments,
    partition_queues,
    partitioned_queue_arguments,
    partitions_exchange,
    results_exchange,
)
from worker.settings import Topology

DEFINITIONS = Path(__file__).resolve().parents[2] / "ops" / "rabbitmq" / "definitions.json"


def test_definitions_match_the_worker_declarations() -> None:
    """Same queues, arguments, exchanges and bindings as the worker declares by default
    (``CW_PARTITIONS=16``), so RabbitMQ never answers PRECONDITION_FAILED."""
    from worker.settings import Settings

    topology = Settings().topology()
    assert topology.partitions == 16
    definitions = json.loads(DEFINITIONS.read_text())
    queues = {queue["name"]: queue["arguments"] for queue in definitions["queues"]}
    sac = partitioned_queue_arguments(topology)
    assert queues[topology.intake_queue] == sac
    for name in topology.partition_queues():
        assert queues[name] == sac
    assert queues[topology.dead_queue] == dead_queue_arguments()
    for seconds in topology.delay_tiers_s:
        assert queues[topology.delay_queue(seconds)] == delay_queue_arguments(topology, seconds)
    assert len(queues) == 2 + topology.partitions + len(topology.delay_tiers_s)
    exchanges = {x["name"]: (x["type"], x["arguments"]) for x in definitions["exchanges"]}
    assert exchanges == {
        topology.commands_exchange: ("topic", {}),
        topology.results_exchange: ("topic", {}),
        topology.dead_exchange: ("topic", {}),
        topology.partitions_exchange: ("x-consistent-hash", {"hash-header": PARTITION_KEY_HEADER}),
    }
    bindings = {(b["source"], b["destination"], b["routing_key"]) for b in definitions["bindings"]}
    assert bindings == {
        (topology.commands_exchange, topology.intake_queue, COMMAND_BINDING),
        *[(topology.partitions_exchange, q, PARTITION_WEIGHT) for q in topology.partition_queues()],
        (topology.dead_exchange, topology.dead_queue, DEAD_BINDING),
    }


# The partitioned layout (Topology.partitions > 0) -----------------------------------------------


class FakeQueue:
    """What ``channel.declare_queue`` returns: records its bindings."""

    def __init__(self, name: str, bindings: list[tuple[str, str, str]]) -> None:
        self.name = name
        self._bindings = bindings

    async def bind(self, exchange: Any, routing_key: str) -> None:
        self._bindings.append((exchange.name, self.name, routing_key))


class FakeExchange:
    def __init__(self, name: str) -> None:
        self.name = name


class RecordingChannel:
    """An aio-pika channel stand-in that records every declaration and binding."""

    def __init__(self) -> None:
        self.exchanges: dict[str, tuple[str, dict[str, Any] | None]] = {}
        self.queues: dict[str, dict[str, Any] | None] = {}
        self.bindings: list[tuple[str, str, str]] = []

    async def declare_exchange(
        self, name: str, type: Any, *, durable: bool, arguments: dict[str, Any] | None = None
    ) -> FakeExchange:
        assert durable
        self.exchanges[name] = (aio_pika.ExchangeType(type).value, arguments)
        return FakeExchange(name)

    async def declare_queue(
        self, name: str, *, durable: bool, arguments: dict[str, Any] | None = None
    ) -> FakeQueue:
        assert durable
        self.queues[name] = arguments
        return FakeQueue(name, self.bindings)


def test_partitioned_names() -> None:
    """With P partitions the commands exchange feeds ``<queue>.intake``, the partitions are
    ``<queue>.p00``..``p<P-1>`` behind ``<queue>.partitions``, and the delay tiers are the
    intake's; with P = 0 every name is the single queue's, as before."""
    topology = Topology(partitions=4)
    assert topology.partitioned
    assert topology.intake_queue == "conference-worker.commands.intake"
    assert topology.partitions_exchange == "conference-worker.commands.partitions"
    assert topology.partition_queues() == [f"conference-worker.commands.p0{i}" for i in range(4)]
    assert topology.work_queues() == topology.partition_queues()
    assert topology.delay_queue(5) == "conference-worker.commands.intake.delay.5s"
    assert Topology(partitions=120).partition_queue(100) == "conference-worker.commands.p100"
    single = Topology(partitions=0)
    assert not single.partitioned
    assert single.intake_queue == single.commands_queue == "conference-worker.commands"
    assert single.work_queues() == [single.commands_queue]
    assert single.partition_queues() == []
    assert single.delay_queue(5) == "conference-worker.commands.delay.5s"


def test_settings_default_to_sixteen_partitions() -> None:
    """``CW_PARTITIONS`` defaults to 16 (the Topology dataclass' own default stays 0)."""
    from worker.settings import Settings

    assert Settings().topology().partitions == 16
    assert Settings(partitions=0).topology().partitions == 0
    assert Topology().partitions == 0


def test_partitioned_queue_arguments() -> None:
    """The intake and every partition are the command queue (quorum, DLX, delivery limit) plus
    single active consumer; the delay tiers dead-letter into the intake by the default exchange."""
    topology = Topology(partitions=4, delivery_limit=7)
    expected = {**command_queue_arguments(topology), "x-single-active-consumer": True}
    assert partitioned_queue_arguments(topology) == expected
    assert expected["x-delivery-limit"] == 7
    assert expected["x-dead-letter-exchange"] == topology.dead_exchange
    intake = commands_queue(topology)
    assert intake.name == topology.intake_queue
    assert intake.arguments == expected
    assert intake.routing() == COMMAND_BINDING
    partitions = partition_queues(topology)
    assert [queue.name for queue in partitions] == topology.partition_queues()
    for queue in partitions:
        assert queue.arguments == expected
        assert queue.routing() == PARTITION_WEIGHT == "1"
    for seconds in topology.delay_tiers_s:
        arguments = delay_queue_arguments(topology, seconds)
        assert arguments["x-dead-letter-exchange"] == ""
        assert arguments["x-dead-letter-routing-key"] == topology.intake_queue
        assert arguments["x-message-ttl"] == round(seconds * 1000)


def test_partitions_exchange_hashes_the_partition_key_header() -> None:
    """The partitions exchange is a durable x-consistent-hash exchange on ``x-cw-partition-key``."""
    exchange = partitions_exchange(Topology(partitions=2))
    assert exchange.name == "conference-worker.commands.partitions"
    assert exchange.type.value == "x-consistent-hash"
    assert exchange.durable
    assert exchange.arguments == {"hash-header": PARTITION_KEY_HEADER}
    assert PARTITION_KEY_HEADER == "x-cw-partition-key"


def test_single_queue_layout_is_unchanged() -> None:
    """With P = 0 the commands exchange feeds the work queue itself, without single active
    consumer, and its delay tiers return to it."""
    topology = Topology(partitions=0)
    queue = commands_queue(topology)
    assert queue.name == topology.commands_queue
    assert queue.arguments == command_queue_arguments(topology)
    assert "x-single-active-consumer" not in command_queue_arguments(topology)
    assert queue.routing() == COMMAND_BINDING
    assert partition_queues(topology) == []
    for seconds in topology.delay_tiers_s:
        routing_key = delay_queue_arguments(topology, seconds)["x-dead-letter-routing-key"]
        assert routing_key == topology.commands_queue


async def test_declare_builds_the_partitioned_layout() -> None:
    """``declare`` makes the intake (bound with ``conference.*``), the consistent-hash exchange
    with every partition bound at weight "1", the dead-letter queue and the intake's delay tiers,
    and no single work queue."""
    topology = Topology(partitions=3)
    channel = RecordingChannel()
    await declare(cast("Any", channel), topology)
    assert channel.exchanges == {
        topology.commands_exchange: ("topic", None),
        topology.results_exchange: ("topic", None),
        topology.dead_exchange: ("topic", None),
        topology.partitions_exchange: ("x-consistent-hash", {"hash-header": PARTITION_KEY_HEADER}),
    }
    delays = [topology.delay_queue(seconds) for seconds in topology.delay_tiers_s]
    assert set(channel.queues) == {
        topology.intake_queue,
        topology.dead_queue,
        *topology.partition_queues(),
        *delays,
    }
    assert topology.commands_queue not in channel.queues
    sac = partitioned_queue_arguments(topology)
    assert channel.queues[topology.intake_queue] == sac
    for name in topology.partition_queues():
        assert channel.queues[name] == sac
    for seconds, name in zip(topology.delay_tiers_s, delays, strict=True):
        assert channel.queues[name] == delay_queue_arguments(topology, seconds)
    assert sorted(channel.bindings) == sorted(
        [
            (topology.dead_exchange, topology.dead_queue, DEAD_BINDING),
            (topology.commands_exchange, topology.intake_queue, COMMAND_BINDING),
            *[(topology.partitions_exchange, q, "1") for q in topology.partition_queues()],
        ]
    )


async def test_declare_builds_the_single_queue_layout() -> None:
    """With P = 0 ``declare`` makes the single work queue and no partitions exchange."""
    topology = Topology(partitions=0)
    channel = RecordingChannel()
    await declare(cast("Any", channel), topology)
    assert topology.partitions_exchange not in channel.exchanges
    assert channel.queues[topology.commands_queue] == command_queue_arguments(topology)
    assert (topology.commands_exchange, topology.commands_queue, COMMAND_BINDING) in (
        channel.bindings
    )
    assert len(channel.queues) == 2 + len(topology.delay_tiers_s)


def test_exchanges_hash_as_faststreams_do_and_leave_no_garbage() -> None:
    """The topology's exchanges hash and compare as FastStream's own RabbitExchange (its declarer
    caches them by hash on every publish), without the reference cycle FastStream's hash makes."""
    topology = Topology(partitions=2)
    exchanges = [results_exchange(topology), partitions_exchange(topology)]
    theirs = [
        RabbitExchange(e.name, type=e.type, durable=e.durable, arguments=e.arguments)
        for e in exchanges
    ]
    assert [hash(e) for e in exchanges] == [hash(e) for e in theirs]
    assert exchanges == theirs
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for exchange in exchanges:
            hash(exchange)
        gc.collect()
        left = [o for o in gc.garbage if isinstance(o, FunctionType)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
