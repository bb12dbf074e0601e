"""The RabbitMQ topology of CONTRACT.md, as FastStream ``RabbitQueue`` / ``RabbitExchange`` objects.

Queues are quorum queues.  The command queue dead-letters (at least once) into the dead-letter
exchange after ``delivery_limit`` failed deliveries, so a message that crashes workers again and
again ends in ``conference-worker.dead`` instead of looping.  Durable delayed retries use one
queue per delay tier (``<commands queue>.delay.<N>s``): a message-TTL queue that dead-letters
into the work queue through the default exchange, which works alike on RabbitMQ 3.10 and 4.x.
``ops/rabbitmq/definitions.json`` declares the same arguments; both must agree or RabbitMQ
answers PRECONDITION_FAILED.

The worker's FastStream broker declares it all at start-up (:func:`declare_on`; the command
queue and its binding are the subscriber's own); the operator tools, the benchmark and the
tests declare the same objects on a plain aio-pika channel (:func:`declare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from faststream.rabbit import ExchangeType, QueueType, RabbitExchange, RabbitQueue

from worker.settings import Topology

if TYPE_CHECKING:
    from faststream.rabbit import RabbitBroker
    from faststream.rabbit.schemas.queue import QuorumQueueArgs

COMMAND_BINDING = "conference.*"
DEAD_BINDING = "#"


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
        "x-dead-letter-routing-key": topology.commands_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def dead_queue_arguments() -> dict[str, Any]:
    """Arguments of the dead-letter queue."""
    return {"x-queue-type": "quorum"}


def _quorum(name: str, arguments: dict[str, Any], routing_key: str = "") -> RabbitQueue:
    args = cast("QuorumQueueArgs", arguments)
    return RabbitQueue(name, QueueType.QUORUM, arguments=args, routing_key=routing_key)


def _exchange(name: str) -> RabbitExchange:
    return RabbitExchange(name, type=ExchangeType.TOPIC, durable=True)


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
    """The work queue, bound to the commands exchange with ``conference.*``."""
    return _quorum(topology.commands_queue, command_queue_arguments(topology), COMMAND_BINDING)


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
        exchange.name, aio_pika.ExchangeType(exchange.type.value), durable=exchange.durable
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
    for delay in delay_queues(topology):
        await _declare_queue(channel, delay)
    return Declared(commands_q, commands_x, results_x, dead_x)


async def delete(channel: AbstractChannel, topology: Topology) -> None:
    """Remove everything :func:`declare` made (tests and the demo clean up with it)."""
    delays = [topology.delay_queue(seconds) for seconds in topology.delay_tiers_s]
    for queue in (topology.commands_queue, topology.dead_queue, *delays):
        await channel.queue_delete(queue)
    for exchange in (
        topology.commands_exchange,
        topology.results_exchange,
        topology.dead_exchange,
    ):
        await channel.exchange_delete(exchange)
