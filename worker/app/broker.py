"""The FastStream application: one ``RabbitBroker``, the command subscriber and the publishers.

:func:`build` and :func:`subscribe` declare, on a new broker, the contract's endpoints:

- the **command subscriber** on ``conference-worker.commands`` (quorum, DLX, delivery limit;
  bound to ``conference.commands`` with ``conference.*``), with FastStream's manual ack policy,
  so that :func:`worker.app.settle.settle` alone acks, requeues, dead-letters or defers;
- the **publishers** of result events (``conference.results``, and ``reply_to`` on the default
  exchange), of dead letters (``conference.dead``) and of deferred commands (the delay queues,
  left out of the AsyncAPI document: they are the worker's own business).

Nothing connects until the broker is started.  ``conference-worker schemas`` renders the
AsyncAPI document from a broker built by these same two functions, so the document is
FastStream's view of the real subscriber and publishers (:mod:`worker.contract.schemas`).

Cost control (ops/bench/RESULTS.md): FastDepends is off (``apply_types=False``) and the
subscriber's decoder hands the handler the aio-pika delivery, undecoded: the pipeline validates
the body itself, once, and turns a bad one into a ``rejected`` result rather than a parse error.
The handler's parameter still carries the command union's JSON Schema, which is what the
AsyncAPI document shows as the payload.  FastStream's own log line per message is off unless
``CW_BROKER_LOG_MESSAGES=true``.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, cast

from aio_pika.abc import AbstractIncomingMessage
from faststream.middlewares import AckPolicy
from faststream.rabbit import RabbitBroker, RabbitExchange
from faststream.rabbit.publisher import RabbitPublisher
from faststream.rabbit.schemas import Channel
from faststream.rabbit.subscriber import RabbitSubscriber
from pydantic import GetPydanticSchema

from worker.app import topology as top
from worker.app.settle import APP_ID
from worker.contract.messages import Command, ResultEvent
from worker.settings import BrokerConfig, Topology

if TYPE_CHECKING:
    from faststream.rabbit.utils import RabbitClientProperties

BROKER_LOGGER = "worker.faststream"

# What the handler gets: the delivery itself.  Its JSON Schema is the command union's, so the
# AsyncAPI document shows what publishers send (FastDepends, which would validate it, is off).
CommandDelivery = Annotated[
    AbstractIncomingMessage, GetPydanticSchema(lambda _source, handler: handler(Command))
]
Handle = Callable[[AbstractIncomingMessage], Awaitable[None]]

_RESULTS_TEXT = (
    "Every result event, routing key `<type>.<status>` (`unknown.rejected` when the type could "
    "not be read)."
)
_REPLY_TEXT = (
    "The same result event, also sent to the command's `reply_to` queue (direct reply-to works) "
    "on the default exchange."
)
_DEAD_TEXT = (
    "Every command that did not succeed (duplicates aside), as it came, with headers "
    "x-error-code, x-error-message, x-attempts, x-original-routing-key, x-failed-at."
)

_SUBSCRIBER_TEXT = (
    "Commands to carry out. Each delivery gets exactly one result event; whatever did not "
    "succeed is also dead-lettered. Acknowledged only after the result's publisher confirm."
)


@dataclass(frozen=True, slots=True)
class App:
    """The broker and the publishers :func:`build` declared on it."""

    broker: RabbitBroker
    results: RabbitPublisher
    reply: RabbitPublisher
    dead: RabbitPublisher
    delay: RabbitPublisher
    partitions: RabbitPublisher | None = None  # the intake's, when partitioned


async def _delivery(message: Any) -> AbstractIncomingMessage:
    """The subscriber's decoder: the aio-pika delivery, for the pipeline to decode."""
    raw: AbstractIncomingMessage = message.raw_message
    return raw


def make_broker(config: BrokerConfig, *, grace_s: float = 30.0) -> RabbitBroker:
    """A broker that connects to ``config.url`` once started (publisher confirms on)."""
    logger = logging.getLogger(BROKER_LOGGER)
    if not config.log_messages:
        logger.setLevel(logging.WARNING)
    # aio-pika reads the connection's name (shown by RabbitMQ) from the URL's ``name`` query
    # parameter, which FastStream builds from these "client properties".
    properties = cast("RabbitClientProperties", {"name": config.connection_name})
    return RabbitBroker(
        config.url.get_secret_value(),
        client_properties=properties,
        default_channel=Channel(
            prefetch_count=config.prefetch, publisher_confirms=True, on_return_raises=True
        ),
        app_id=APP_ID,
        graceful_timeout=grace_s,
        apply_types=False,
        logger=logger,
        description="conference-worker: telephony conference commands carried out against "
        "Vinix (Kazoo) and Telnyx.",
    )


def build(config: BrokerConfig, topology: Topology, *, grace_s: float = 30.0) -> App:
    """A broker with the contract's publishers (connecting only once started)."""
    broker = make_broker(config, grace_s=grace_s)
    partitions = None
    if topology.partitioned:
        partitions = broker.publisher(
            exchange=top.partitions_exchange(topology), persist=True, include_in_schema=False
        )
    return App(broker, *_publishers(broker, topology), partitions=partitions)


def subscribe(broker: RabbitBroker, topology: Topology, handle: Handle) -> RabbitSubscriber:
    """The command subscriber: every delivery of the command queue goes to ``handle``."""

    async def carry_out(command: CommandDelivery) -> None:
        await handle(command)

    subscriber = broker.subscriber(
        top.commands_queue(topology),
        top.commands_exchange(topology),
        ack_policy=AckPolicy.MANUAL,
        no_reply=True,  # the result goes to reply_to through settle, confirmed, before the ack
        decoder=_delivery,
        title=topology.intake_queue,
        description=_SUBSCRIBER_TEXT,
    )
    subscriber(carry_out)
    return subscriber


def subscribe_partitions(
    broker: RabbitBroker,
    topology: Topology,
    handle: Handle,
    *,
    prefetch: int,
    instance: str,
) -> list[RabbitSubscriber]:
    """One subscriber per partition (single active consumer decides which replica acts).

    The prefetch is shared out: ``ceil(prefetch / P)`` per partition.  Each consumer asks for a
    priority of its own (``x-priority``, rendezvous-hashed from ``instance`` and the partition):
    brokers whose single active consumer follows priorities (RabbitMQ 4.x quorum queues) spread the
    partitions over the replicas; older ones (3.x) make the first replica to attach active.
    """
    channel = Channel(prefetch_count=max(1, math.ceil(prefetch / topology.partitions)))
    exchange = top.partitions_exchange(topology)
    subscribers = []
    for index, queue in enumerate(top.partition_queues(topology)):

        async def carry_out(command: CommandDelivery) -> None:
            await handle(command)

        subscriber = broker.subscriber(
            queue,
            exchange,
            ack_policy=AckPolicy.MANUAL,
            no_reply=True,
            decoder=_delivery,
            channel=channel,
            consume_args={"x-priority": consumer_priority(instance, index)},
            include_in_schema=False,
        )
        subscriber(carry_out)
        subscribers.append(subscriber)
    return subscribers


def subscribe_legacy(broker: RabbitBroker, topology: Topology, handle: Handle) -> RabbitSubscriber:
    """The single-queue layout's work queue, drained through the intake after an upgrade."""

    async def route(command: CommandDelivery) -> None:
        await handle(command)

    queue = top.legacy_queue(topology)
    queue.declare = False  # it exists (adopt_legacy saw it); never created again
    subscriber = broker.subscriber(
        queue,
        ack_policy=AckPolicy.MANUAL,
        no_reply=True,
        decoder=_delivery,
        include_in_schema=False,
    )
    subscriber(route)
    return subscriber


def consumer_priority(instance: str, partition: int) -> int:
    """A stable pseudo-random priority, 0–999, of ``instance`` for ``partition``."""
    digest = hashlib.blake2b(f"{instance}/{partition}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") % 1000


def _publishers(
    broker: RabbitBroker, topology: Topology
) -> tuple[RabbitPublisher, RabbitPublisher, RabbitPublisher, RabbitPublisher]:
    default = RabbitExchange()
    documented = (
        (top.results_exchange(topology), "{type}.{status}", ResultEvent, _RESULTS_TEXT),
        (default, "{reply_to}", ResultEvent, _REPLY_TEXT),
        (top.dead_exchange(topology), "{routing_key}", Any, _DEAD_TEXT),
    )
    results, reply, dead = (
        broker.publisher(
            exchange=exchange,
            routing_key=routing_key,
            persist=True,
            schema=schema,
            title=exchange.name or "reply_to",
            description=text,
        )
        for exchange, routing_key, schema, text in documented
    )
    delay = broker.publisher(exchange=default, persist=True, include_in_schema=False)
    return results, reply, dead, delay
