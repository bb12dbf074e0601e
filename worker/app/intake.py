"""The intake hop: each command, as it came, on to the partition of its target.

Publishers send commands to ``conference.commands`` with the type as the routing key; nothing a
publisher sends names the target, which is in the body.  So the intake queue's consumer (single
active consumer: one replica at a time, in arrival order) reads the target from the body, puts
it in the ``x-cw-partition-key`` header and publishes the command, body and properties unchanged,
to the consistent-hash partitions exchange, which picks the partition (README, "Scaling").  The
publisher confirm comes before the intake delivery is acked: a crash in between publishes a
command twice, and the dedup store answers the second as a duplicate.

The intake decides nothing about a command: a body it cannot read still goes on (keyed by its
``message_id``, else empty), and the partition's pipeline rejects it with a result, as before.

Trust.  Publishers may write to ``conference.commands`` only (SECURITY.md), never to the default
exchange or to the partitions exchange.  The intake strips every ``cw-*`` header a publisher
sent, and records where the command came from: ``cw-origin`` is ``delay`` for a command that the
broker returned from one of our delay queues (its retry state travels on) and ``publisher``
otherwise, and ``cw-publisher`` is the AMQP ``user_id`` that the broker validated at the intake.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from aio_pika.abc import AbstractIncomingMessage

from worker.app.settle import (
    H_ORIGIN,
    H_PUBLISHER,
    RETRY_PREFIX,
    carried,
    carried_options,
    delivery_alive,
    from_our_delay,
    original_routing_key,
    publish_holding,
    quietly,
)
from worker.app.topology import PARTITION_KEY_HEADER

if TYPE_CHECKING:
    from faststream.rabbit.publisher import RabbitPublisher

log = logging.getLogger("worker.app.intake")

# What identifies a command's target, per type (worker.pipeline.sequencer.target_of, on the wire).
_TARGET_FIELDS = {
    "conference.update": ("vinix", "account_id", "conference_id"),
    "conference.supervisor_role": ("telnyx", "conference_id", "call_control_id"),
}


def partition_key(body: bytes, fallback: str = "") -> str:
    """The command's target as one string (``vinix|<account>|<conference>``,
    ``telnyx|<conference>|<call control id>``); ``fallback`` when the body does not say."""
    try:
        command = orjson.loads(body)
    except orjson.JSONDecodeError:
        return fallback
    if not isinstance(command, dict):
        return fallback
    kind = command.get("type")
    fields = _TARGET_FIELDS.get(kind) if isinstance(kind, str) else None  # a list is unhashable
    if fields is None:
        return fallback
    provider, first, second = fields
    one, two = command.get(first), command.get(second)
    if not isinstance(one, str) or not isinstance(two, str):
        return fallback
    return f"{provider}|{one}|{two}"


def routed_headers(message: AbstractIncomingMessage, key: str) -> dict[str, Any]:
    """The headers the command carries on to its partition (see the module's "Trust")."""
    incoming = message.headers or {}
    if from_our_delay(message):
        headers = dict(incoming)
        headers[H_ORIGIN] = "delay"
    else:
        headers = {k: v for k, v in incoming.items() if not k.startswith(RETRY_PREFIX)}
        headers[H_ORIGIN] = "publisher"
        headers[H_PUBLISHER] = message.user_id
    headers[PARTITION_KEY_HEADER] = key
    return headers


def routed_options(message: AbstractIncomingMessage, key: str) -> dict[str, Any]:
    """Publish options that carry ``message`` on unchanged (but for our headers), to the routing
    key its publisher used; unroutable (no partition bound) is a fault: back to the intake.  A
    command sent without a timestamp gets the intake's, so that its age is measured (README)."""
    options = carried_options(message, routed_headers(message, key))
    options["timestamp"] = message.timestamp or datetime.now(UTC)
    # A publisher's cw-routing-key is stripped like every cw-* header, so it is not used either.
    ours = from_our_delay(message)
    options["routing_key"] = original_routing_key(message) if ours else message.routing_key or ""
    return options


class OutOfOrder(Exception):
    """An earlier command of the same target could not be routed: this one must not overtake it."""


@dataclass(slots=True)
class Intake:
    """Routes each intake delivery to its partition; acks after the confirm, else requeues.

    Deliveries are routed concurrently, but one target's commands in arrival order: each waits
    for the publish of the target's previous command, and when that one failed (it goes back to
    the intake) it goes back too, so a retried command never lands behind a newer one.
    """

    partitions: RabbitPublisher
    routed: int = 0
    holding: bool = False  # stopping: what arrives waits for the next intake consumer
    _tails: dict[str, asyncio.Future[bool]] = field(default_factory=dict)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Route one delivery (or, stopping, leave it for the connection's close to return)."""
        if self.holding:
            return
        key = partition_key(message.body, fallback=message.message_id or "")
        previous = self._tails.get(key)
        mine: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        routed = False  # also when cancelled: the target's next command must not overtake it
        try:
            routed = await self._route(message, key, previous)
        finally:
            mine.set_result(routed)
            if self._tails.get(key) is mine:
                del self._tails[key]
        if routed:
            await quietly(message.ack())
            self.routed += 1

    async def _route(
        self, message: AbstractIncomingMessage, key: str, previous: asyncio.Future[bool] | None
    ) -> bool:
        """Publish to the partition after the target's previous command; False: requeued."""
        routed, arguments = carried(message.body, routed_options(message, key))
        send = partial(self.partitions.publish, routed, **arguments)
        try:
            if previous is not None and not await asyncio.shield(previous):
                raise OutOfOrder("the target's previous command was requeued")
            if not delivery_alive(message):  # the broker redelivers it: a stale copy must not go
                raise OutOfOrder("the delivery's channel closed before its turn")
            await publish_holding(send, message)
        except Exception as exc:  # unroutable, nacked by the broker, the connection gone
            log.error("could not route a command to its partition; requeued: %r", exc)
            await quietly(message.nack(requeue=True))
            return False
        return True
