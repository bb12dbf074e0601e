"""The RabbitMQ topology of CONTRACT.md, declared idempotently at start-up.

Queues are quorum queues.  The command queue dead-letters (at least once) into the dead-letter
exchange after ``delivery_limit`` failed deliveries, so a message that crashes workers again and
again ends in ``conference-worker.dead`` instead of looping.  Durable delayed retries use one
queue per delay tier (``<commands queue>.delay.<N>s``): a message-TTL queue that dead-letters
into the work queue through the default exchange, which works alike on RabbitMQ 3.10 and 4.x.
``ops/rabbitmq/definitions.json`` declares the same arguments; both must agree or RabbitMQ
answers PRECONDITION_FAILED.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

from worker.settings import Topology

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


@dataclass(frozen=True, slots=True)
class Declared:
    """Handles on what :func:`declare` created (or found)."""

    commands: AbstractQueue
    commands_exchange: AbstractExchange
    results_exchange: AbstractExchange
    dead_exchange: AbstractExchange


async def declare(channel: AbstractChannel, topology: Topology) -> Declared:
    """Declare exchanges, queues and bindings; a no-op when they already exist alike."""
    topic = aio_pika.ExchangeType.TOPIC
    commands_x = await channel.declare_exchange(topology.commands_exchange, topic, durable=True)
    results_x = await channel.declare_exchange(topology.results_exchange, topic, durable=True)
    dead_x = await channel.declare_exchange(topology.dead_exchange, topic, durable=True)
    dead_q = await channel.declare_queue(
        topology.dead_queue, durable=True, arguments=dead_queue_arguments()
    )
    await dead_q.bind(dead_x, DEAD_BINDING)
    commands_q = await channel.declare_queue(
        topology.commands_queue, durable=True, arguments=command_queue_arguments(topology)
    )
    await commands_q.bind(commands_x, COMMAND_BINDING)
    for seconds in topology.delay_tiers_s:
        await channel.declare_queue(
            topology.delay_queue(seconds),
            durable=True,
            arguments=delay_queue_arguments(topology, seconds),
        )
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
