"""Finishing a delivery: the one place where ack, requeue, dead-letter and defer are decided.

:func:`settle` finishes every delivery the command handler took.  The result event goes to the
results exchange (and ``reply_to``), a non-success goes to the dead-letter exchange with the
CONTRACT headers, every publish goes through the FastStream broker's publishers and is confirmed
by RabbitMQ, and only then is the command acknowledged.  A deferred command goes to the
broker-held delay queue of its tier, with its retry state in ``cw-*`` headers, before it is
acknowledged.  If any publish fails the delivery is returned to the queue: an event may be
repeated after a crash, never lost.

The pure parts (:func:`delivery_of`, :func:`result_options`, :func:`dead_letter_options`,
:func:`defer_options`) read and write AMQP properties; :class:`Publisher` sends what they build.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from worker.contract import codec
from worker.pipeline.process import Delivery, Outcome
from worker.pipeline.retry import RetryState
from worker.settings import Topology

if TYPE_CHECKING:
    from faststream.rabbit.publisher import RabbitPublisher

log = logging.getLogger("worker.app.settle")

_MAX_HEADER_TEXT = 1000
_MAX_SHORT_STRING = 255  # bytes in an AMQP short string (correlation_id, reply_to, ...)
# Headers of our own that carry a command's retry state through the broker-held delays.
H_ATTEMPTS = "cw-attempts"
H_BUDGET_USED = "cw-budget-used-s"
H_FIRST_FAILURE = "cw-first-failure-at"
H_NOT_BEFORE = "cw-not-before"
H_ROUTING_KEY = "cw-routing-key"
H_PROBES = "cw-probes"
H_PUBLISHER = "cw-publisher"
H_ORIGIN = "cw-origin"  # set by the intake: "delay" or "publisher" (worker.app.intake)
RETRY_PREFIX = "cw-"
RETRY_HEADERS = (H_ATTEMPTS, H_BUDGET_USED, H_FIRST_FAILURE, H_NOT_BEFORE, H_ROUTING_KEY, H_PROBES)
APP_ID = "conference-worker"
REMEMBER_ANYWAY_S = 5.0  # how long a cancelled settle still waits for the dedup record


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def from_our_delay(message: AbstractIncomingMessage) -> bool:
    """True when the broker moved the message here from one of our delay queues.

    Delay queues dead-letter through the default exchange; publishers may not write to it
    (SECURITY.md), so only then are our ``cw-*`` headers ours and not a publisher's.
    """
    return message.exchange == ""


def _from_our_delay(message: AbstractIncomingMessage, routed: bool) -> bool:
    """``routed``: a partition's delivery, whose ``cw-*`` headers the intake wrote."""
    if routed:
        return (message.headers or {}).get(H_ORIGIN) == "delay"
    return from_our_delay(message)


def publisher_of(message: AbstractIncomingMessage, routed: bool = False) -> str | None:
    """The AMQP ``user_id`` of the command's publisher, as the broker validated it."""
    if not routed and not from_our_delay(message):
        return message.user_id
    publisher = (message.headers or {}).get(H_PUBLISHER)
    return publisher if isinstance(publisher, str) else None


def delivery_of(message: AbstractIncomingMessage, routed: bool = False) -> Delivery:
    """The pipeline's view of a message (retry state read defensively from our headers).

    ``routed``: the message came from a partition, through the intake (worker.app.intake).
    """
    user_id = publisher_of(message, routed)
    alive = partial(delivery_alive, message)
    if not _from_our_delay(message, routed):
        return Delivery(message.body, user_id=user_id, alive=alive)
    headers = message.headers or {}
    attempts = _number(headers.get(H_ATTEMPTS))
    if attempts is None:
        return Delivery(message.body, user_id=user_id, alive=alive)
    retry = RetryState(
        attempts=max(int(attempts), 0),
        budget_used_s=max(_number(headers.get(H_BUDGET_USED)) or 0.0, 0.0),
        first_failure_at=_number(headers.get(H_FIRST_FAILURE)),
        probes=max(int(_number(headers.get(H_PROBES)) or 0), 0),
    )
    not_before = _number(headers.get(H_NOT_BEFORE))
    return Delivery(message.body, retry, not_before, user_id=user_id, alive=alive)


def original_routing_key(message: AbstractIncomingMessage) -> str:
    """The routing key the publisher used (a command back from a delay carries it in a header)."""
    carried = (message.headers or {}).get(H_ROUTING_KEY)
    return carried if isinstance(carried, str) else (message.routing_key or "")


def _short(value: str | None) -> str | None:
    """``value`` when it fits an AMQP short string, else None (the body still carries it)."""
    if value is None or len(value.encode("utf-8", "surrogatepass")) > _MAX_SHORT_STRING:
        return None
    return value


def result_options(
    outcome: Outcome, message: AbstractIncomingMessage, headers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The result event's publish options (a fresh ``message_id`` each)."""
    return {
        "message_id": uuid.uuid4().hex,
        "content_type": "application/json",
        "persist": True,
        "correlation_id": _short(message.correlation_id or outcome.event.get("command_id")),
        "timestamp": datetime.now(UTC),
        "app_id": APP_ID,
        "message_type": "result",
        "headers": headers,
        "mandatory": False,  # a reply_to that names no queue is dropped by the broker
    }


def carried_options(message: AbstractIncomingMessage, headers: dict[str, Any]) -> dict[str, Any]:
    """Publish options that carry ``message`` again, persistent, with ``headers`` (also the
    intake's, :mod:`worker.app.intake`)."""
    return {
        "headers": headers,
        "content_type": message.content_type,
        "content_encoding": message.content_encoding,
        "persist": True,
        "correlation_id": message.correlation_id,
        "reply_to": message.reply_to,
        "message_id": message.message_id,
        "timestamp": message.timestamp,
        "message_type": message.type,
        "app_id": message.app_id,
        "priority": message.priority,
        "mandatory": True,  # our own queues: unroutable is a fault, the delivery is requeued
    }


_PUBLISH_ARGUMENTS = ("routing_key", "mandatory")


def carried(body: bytes, options: dict[str, Any]) -> tuple[aio_pika.Message, dict[str, Any]]:
    """``body`` with the properties of ``options`` as a message FastStream sends unchanged, and
    the publish's own arguments.  Given the properties instead, FastStream would invent a
    ``correlation_id`` (and a timestamp) for a command that had none, and its result would echo
    that instead of the ``command_id`` (CONTRACT.md)."""
    properties = {k: v for k, v in options.items() if k not in _PUBLISH_ARGUMENTS}
    persist = properties.pop("persist", False)
    message = aio_pika.Message(
        body,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persist else None,
        type=properties.pop("message_type", None),
        **properties,
    )
    return message, {k: options[k] for k in _PUBLISH_ARGUMENTS if k in options}


def dead_letter_options(outcome: Outcome, message: AbstractIncomingMessage) -> dict[str, Any]:
    """The dead letter: the command as it came, the CONTRACT headers, no retry headers."""
    error = outcome.event.get("error") or {}
    headers = {k: v for k, v in (message.headers or {}).items() if k not in RETRY_HEADERS}
    headers.update(
        {
            "x-error-code": str(error.get("code", "")),
            "x-error-message": str(error.get("message", ""))[:_MAX_HEADER_TEXT],
            "x-attempts": int(outcome.event.get("attempts", 0)),
            "x-original-routing-key": original_routing_key(message),
            "x-failed-at": datetime.now(UTC).isoformat(),
        }
    )
    return carried_options(message, headers)


def defer_options(
    delay_s: float, retry: RetryState, message: AbstractIncomingMessage, routed: bool = False
) -> dict[str, Any]:
    """The command again, with its retry state in our ``cw-*`` headers."""
    now = datetime.now(UTC).timestamp()
    headers = dict(message.headers or {})
    headers.update(
        {
            H_ATTEMPTS: retry.attempts,
            H_BUDGET_USED: round(retry.budget_used_s, 3),
            H_FIRST_FAILURE: retry.first_failure_at or now,
            H_NOT_BEFORE: now + delay_s,
            H_ROUTING_KEY: original_routing_key(message),
            H_PROBES: retry.probes,
            H_PUBLISHER: publisher_of(message, routed),
        }
    )
    return carried_options(message, headers)


class TraceHeaders(Protocol):
    """Where the result event's ``traceparent`` comes from (the observer)."""

    def trace_headers(self, message: AbstractIncomingMessage) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class Publisher:
    """Publishes result events, dead letters and deferrals through the broker's publishers.

    ``results`` and ``dead`` are FastStream publishers on the results and dead-letter exchanges;
    ``reply`` and ``delay`` publish on the default exchange (to ``reply_to``, and to our delay
    queues).  The broker's channel has publisher confirms on: each publish returns once RabbitMQ
    confirmed it.
    """

    results: RabbitPublisher
    reply: RabbitPublisher
    dead: RabbitPublisher
    delay: RabbitPublisher
    topology: Topology
    own_queues: frozenset[str]
    tracing: TraceHeaders

    async def publish(self, outcome: Outcome, message: AbstractIncomingMessage) -> None:
        """Publish everything ``outcome`` calls for, concurrently, and wait for the confirms."""
        if outcome.defer_s is not None and outcome.retry is not None:
            tier = self.topology.delay_tier(outcome.defer_s)
            routed = self.topology.partitioned
            options = defer_options(outcome.defer_s, outcome.retry, message, routed)
            deferred, arguments = carried(message.body, options)
            await self.delay.publish(
                deferred, routing_key=self.topology.delay_queue(tier), **arguments
            )
            return
        body = codec.encode(outcome.event)
        options = result_options(outcome, message, self.tracing.trace_headers(message))
        sends: list[Awaitable[Any]] = [
            self.results.publish(body, routing_key=outcome.routing_key, **options)
        ]
        reply_to = _short(message.reply_to)
        if reply_to and reply_to not in self.own_queues:
            sends.append(self.reply.publish(body, routing_key=reply_to, **options))
        if outcome.dead_letter:
            dead, arguments = carried(message.body, dead_letter_options(outcome, message))
            sends.append(
                self.dead.publish(dead, routing_key=original_routing_key(message), **arguments)
            )
        if len(sends) == 1:
            await sends[0]  # the usual case: no task to wrap a lone publish in
        else:
            await asyncio.gather(*sends)


class Sends(Protocol):
    """What :func:`settle` needs of a :class:`Publisher`."""

    async def publish(self, outcome: Outcome, message: AbstractIncomingMessage) -> None: ...


async def settle(message: AbstractIncomingMessage, outcome: Outcome, publisher: Sends) -> bool:
    """Finish a delivery: publish and confirm, then ack; on failure return it to the queue.

    The dedup store's record of the outcome (:attr:`Outcome.remember`) is made while the result
    is being published (one round trip off the command's latency), and the delivery is acked only
    when both are done: a crash in between redelivers it, and the worst case is a repeated event.
    """
    remembering = None if outcome.remember is None else asyncio.ensure_future(outcome.remember())
    failure: BaseException | None = None
    try:
        await publish_holding(partial(publisher.publish, outcome, message), message)
    except CONNECTION_EXCEPTIONS as exc:
        failure = exc
    except BaseException:
        if remembering is not None:
            await _remember_anyway(remembering)
        raise
    if remembering is not None and not await _remembered(remembering, outcome):
        failure = failure or RuntimeError("the dedup store's record failed")
    if failure is not None:
        log.error(
            "could not finish %s; returning it to the queue: %r",
            outcome.event.get("command_id"),
            failure,
        )
        await quietly(message.nack(requeue=True))
        return False
    await quietly(message.ack())
    return True


async def _remember_anyway(remembering: asyncio.Future[None]) -> None:
    """Settling was cancelled (a stop's grace is over), but the command was carried out: its
    record is still made, for up to ``REMEMBER_ANYWAY_S`` (else its claim's lease runs out and
    the redelivered copy calls the provider again)."""
    try:
        await asyncio.wait_for(asyncio.shield(remembering), REMEMBER_ANYWAY_S)
    except BaseException:  # the store is away, or a second cancellation: give up on it
        remembering.cancel()


async def _remembered(remembering: asyncio.Future[None], outcome: Outcome) -> bool:
    """Wait for the dedup store's record; False (logged) if making it raised."""
    try:
        await remembering
    except Exception:
        log.exception("could not record %s in the dedup store", outcome.event.get("command_id"))
        return False
    return True


HOLD_FIRST_S, HOLD_MAX_S, HOLD_TOTAL_S = 0.05, 1.0, 15.0


def _channel_closed(message: AbstractIncomingMessage) -> bool | None:
    """Whether the channel ``message`` came on is closed; None for a stand-in without one.

    aio-pika's ``IncomingMessage.channel`` raises once the channel is closed, so its own
    attribute is read (a test broker's message carries a mock there: unknown)."""
    channel = getattr(message, "_IncomingMessage__channel", None)
    closed = getattr(channel, "is_closed", None)
    return closed if isinstance(closed, bool) else None


def delivery_gone(message: AbstractIncomingMessage) -> bool:
    """The delivery cannot be settled any more (unknown counts as gone: never held for)."""
    return _channel_closed(message) is not False


def delivery_alive(message: AbstractIncomingMessage) -> bool:
    """The delivery can still be settled (unknown counts as alive: carried out)."""
    return _channel_closed(message) is not True


async def publish_holding(
    send: Callable[[], Awaitable[Any]], message: AbstractIncomingMessage
) -> None:
    """``send()``; while the broker connection is being restored, hold ``message`` and try again.

    After a broker restart the consumers' channels can be back before the publishers' one: a
    delivery returned to its queue at once would come straight back, fail again, and reach the
    queue's delivery limit within milliseconds (dead-lettered by the broker with no result).  So
    the delivery is held, with backoff, for up to ``HOLD_TOTAL_S``; the last connection error is
    raised once its own channel is gone (the broker redelivers it) or the hold is over.
    """
    wait, held = HOLD_FIRST_S, 0.0
    while True:
        try:
            await send()
            return
        except CONNECTION_EXCEPTIONS:
            if held >= HOLD_TOTAL_S or delivery_gone(message):
                raise
        await asyncio.sleep(wait)
        held += wait
        wait = min(wait * 2, HOLD_MAX_S)


async def quietly(settling: Awaitable[Any]) -> None:
    """Ack/nack on a channel that may be gone: the broker requeues the delivery itself then."""
    try:
        await settling
    except CONNECTION_EXCEPTIONS as exc:
        log.warning("could not settle a delivery (the broker will redeliver it): %r", exc)
