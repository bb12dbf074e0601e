"""The RabbitMQ topology of CONTRACT.md, as FastStream ``RabbitQueue`` / ``RabbitExchange`` objects.

Queues are quorum queues.  The command queue dead-letters (at least once) into the dead-letter
exchange after ``delivery_limit`` failed deliveries, so a message that crashes workers again and
again ends in ``conference-worker.dead`` instead of looping.  Durable delayed retries use one
queue per delay tier (``<commands queue>.delay.<N>s``): a message-TTL queue that dead-letters
into the work queue through the default exchange, which works alike on RabbitMQ 3.10 and 4.x.
``ops/rabbitmq/definitions.json`` declares the same arguments; both must agree or RabbitMQ
answers PRECONDITION_FAILED.

**Partitions** (``Topology.partitions`` > 0, README "Scaling"): the commands exchange delivers to
the *intake* queue (single active consumer), whose consumer adds the command's target as the
``x-cw-partition-key`` header and publishes it to the partitions exchange, a consistent-hash
exchange (``rabbitmq_consistent_hash_exchange``) over P partition queues, each a quorum queue with
single active consumer, a DLX and the delivery limit.  Every replica consumes every partition; at
any moment the broker lets one consumer of each act, so one replica carries out a target's
commands, in arrival order.  Delay tiers return commands to the intake, which routes them again.
A queue of the single-queue layout (``commands_queue`` itself) that still exists is unbound from
the commands exchange and drained through the intake (:func:`adopt_legacy`).

The worker's FastStream broker declares it all at start-up (:func:`declare_on`; the command
queue and its binding are the subscriber's own); the operator tools, the benchmark and the
tests declare the same objects on a plain aio-pika channel (:func:`declare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from aio_pika.exceptions import ChannelNotFoundEntity
from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue

from worker.settings import Topology

if TYPE_CHECKING:
    from faststream.rabbit import RabbitBroker
    from faststream.rabbit.schemas.queue import QuorumQueueArgs

COMMAND_BINDING = "conference.*"
DEAD_BINDING = "#"
PARTITION_KEY_HEADER = "x-cw-partition-key"
PARTITION_WEIGHT = "1"  # a consistent-hash binding key is the queue's weight


def command_queue_arguments(topology: Topology) -> dict[str, Any]:
    """Arguments of the command queue (shared with the RabbitMQ definitions file)."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": topology.dead_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": topology.delivery_limit,
    }


def delay_queue_arguments(topology: Topology, seconds: float) -> dict[str, Any]:
    """A delay tier: messages wait ``seconds``, then the broker moves them to the work queue."""
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": round(seconds * 1000),
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": topology.intake_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def partitioned_queue_arguments(topology: Topology) -> dict[str, Any]:
    """The intake and each partition: the command queue's arguments plus single active consumer."""
    return {**command_queue_arguments(topology), "x-single-active-consumer": True}


def dead_queue_arguments() -> dict[str, Any]:
    """Arguments of the dead-letter queue."""
    return {"x-queue-type": "quorum"}


def _quorum(name: str, arguments: dict[str, Any], routing_key: str = "") -> RabbitQueue:
    args = cast("QuorumQueueArgs", arguments)
    return RabbitQueue(name, QueueType.QUORUM, arguments=args, routing_key=routing_key)


class Exchange(RabbitExchange):
    """A ``RabbitExchange`` that hashes without making garbage.

    FastStream hashes the exchange of every publish (its declarer caches exchanges by object), and
    ``RabbitExchange.__hash__`` defines a recursive inner function on each call: a function and its
    cell in a reference cycle, left to the cycle collector, per result event and per command
    routed by the intake.  Same hash, same equality, without the closure.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        arguments = _frozen(self.arguments or {})
        return hash((self.name, self.type, self.durable, self.auto_delete, arguments))


def _frozen(value: Any) -> Any:
    """``value`` with its dicts (at any depth) as frozensets of items, as FastStream hashes them."""
    if isinstance(value, dict):
        return frozenset((key, _frozen(item)) for key, item in value.items())
    return value


def _exchange(name: str) -> RabbitExchange:
    return Exchange(name, type=ExchangeType.TOPIC, durable=True)


def commands_exchange(topology: Topology) -> RabbitExchange:
    """``conference.commands``: publishers send commands here, routing key = the type."""
    return _exchange(topology.commands_exchange)


def results_exchange(topology: Topology) -> RabbitExchange:
    """``conference.results``: every result event, routing key ``<type>.<status>``."""
    return _exchange(topology.results_exchange)


def dead_exchange(topology: Topology) -> RabbitExchange:
    """``conference.dead``: dead letters."""
    return _exchange(topology.dead_exchange)


def commands_queue(topology: Topology) -> RabbitQueue:
    """The queue bound to the commands exchange with ``conference.*``: the intake when
    partitioned, else the work queue itself."""
    if topology.partitioned:
        arguments = partitioned_queue_arguments(topology)
        return _quorum(topology.intake_queue, arguments, COMMAND_BINDING)
    return _quorum(topology.commands_queue, command_queue_arguments(topology), COMMAND_BINDING)


def legacy_queue(topology: Topology) -> RabbitQueue:
    """The single-queue layout's work queue, as it was declared (drained after an upgrade)."""
    return _quorum(topology.commands_queue, command_queue_arguments(topology), COMMAND_BINDING)


def partitions_exchange(topology: Topology) -> RabbitExchange:
    """The consistent-hash exchange that spreads targets over the partitions."""
    return Exchange(
        topology.partitions_exchange,
        type=ExchangeType.X_CONSISTENT_HASH,
        durable=True,
        arguments={"hash-header": PARTITION_KEY_HEADER},
    )


def partition_queues(topology: Topology) -> list[RabbitQueue]:
    """The P partition queues (each bound to the partitions exchange with weight 1)."""
    arguments = partitioned_queue_arguments(topology)
    return [_quorum(name, arguments, PARTITION_WEIGHT) for name in topology.partition_queues()]


def dead_queue(topology: Topology) -> RabbitQueue:
    """The dead-letter queue, bound to the dead-letter exchange with ``#``."""
    return _quorum(topology.dead_queue, dead_queue_arguments(), DEAD_BINDING)


def delay_queues(topology: Topology) -> list[RabbitQueue]:
    """One message-TTL queue per delay tier."""
    return [
        _quorum(topology.delay_queue(seconds), delay_queue_arguments(topology, seconds))
        for seconds in topology.delay_tiers_s
    ]


async def declare_on(broker: RabbitBroker, topology: Topology) -> None:
    """Declare, through the connected broker, what the command subscriber does not.

    The subscriber declares the command queue, the commands exchange and their binding itself.
    """
    await broker.declare_exchange(results_exchange(topology))
    if topology.partitioned:
        await broker.declare_exchange(partitions_exchange(topology))
    dead_x = await broker.declare_exchange(dead_exchange(topology))
    queue = dead_queue(topology)
    dead_q = await broker.declare_queue(queue)
    await dead_q.bind(dead_x, queue.routing())
    for delay in delay_queues(topology):
        await broker.declare_queue(delay)


@dataclass(frozen=True, slots=True)
class Declared:
    """Handles on what :func:`declare` created (or found)."""

    commands: AbstractQueue
    commands_exchange: AbstractExchange
    results_exchange: AbstractExchange
    dead_exchange: AbstractExchange


async def _declare_exchange(channel: AbstractChannel, exchange: RabbitExchange) -> AbstractExchange:
    return await channel.declare_exchange(
        exchange.name,
        aio_pika.ExchangeType(exchange.type.value),
        durable=exchange.durable,
        arguments=exchange.arguments,
    )


async def _declare_queue(channel: AbstractChannel, queue: RabbitQueue) -> AbstractQueue:
    return await channel.declare_queue(queue.name, durable=True, arguments=queue.arguments)


async def declare(channel: AbstractChannel, topology: Topology) -> Declared:
    """Declare all of it on an aio-pika channel; a no-op when it already exists alike."""
    commands_x = await _declare_exchange(channel, commands_exchange(topology))
    results_x = await _declare_exchange(channel, results_exchange(topology))
    dead_x = await _declare_exchange(channel, dead_exchange(topology))
    dead = dead_queue(topology)
    dead_q = await _declare_queue(channel, dead)
    await dead_q.bind(dead_x, dead.routing())
    commands = commands_queue(topology)
    commands_q = await _declare_queue(channel, commands)
    await commands_q.bind(commands_x, commands.routing())
    if topology.partitioned:
        partitions_x = await _declare_exchange(channel, partitions_exchange(topology))
        for partition in partition_queues(topology):
            queue = await _declare_queue(channel, partition)
            await queue.bind(partitions_x, partition.routing())
    for delay in delay_queues(topology):
        await _declare_queue(channel, delay)
    return Declared(commands_q, commands_x, results_x, dead_x)


async def adopt_legacy(channel: AbstractChannel, topology: Topology) -> bool:
    """After an upgrade to partitions: stop routing to the old work queue, and say whether it
    exists (and must be drained through the intake).  Its delay tiers keep returning to it.

    ``channel`` is closed by the broker when the queue does not exist: pass one of its own."""
    if not topology.partitioned:
        return False
    try:
        legacy = await channel.declare_queue(topology.commands_queue, passive=True)
    except ChannelNotFoundEntity:
        return False
    await legacy.unbind(topology.commands_exchange, COMMAND_BINDING)
    return True


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove everything :func:`declare` made (tests and the demo clean up with it)."""
    delays = [topology.delay_queue(seconds) for seconds in topology.delay_tiers_s]
    legacy = [f"{topology.commands_queue}.delay.{seconds:g}s" for seconds in topology.delay_tiers_s]
    queues = [topology.intake_queue, *topology.partition_queues(), topology.dead_queue, *delays]
    if topology.partitioned:
        queues += [topology.commands_queue, *legacy]  # an upgrade test's old layout
    for queue in queues:
        await channel.queue_delete(queue)
    exchanges = [topology.commands_exchange, topology.results_exchange, topology.dead_exchange]
    if topology.partitioned:
        exchanges.append(topology.partitions_exchange)
    for exchange in exchanges:
        await channel.exchange_delete(exchange)
