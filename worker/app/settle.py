"""The RabbitMQ side: take deliveries, hand their bodies to the pipeline, finish them.

:func:`settle` is the one place where a delivery is finished.  The result event goes to the
results exchange (and ``reply_to``), a non-success goes to the dead-letter exchange with the
CONTRACT headers, every publish is confirmed by the broker, and only then is the command
acknowledged.  A deferred command goes to the broker-held delay queue of its tier, with its retry
state in ``cw-*`` headers, before it is acknowledged.  If any publish fails the delivery is
returned to the queue: an event may be repeated after a crash, never lost.  A delivery whose
processing raises (a bug, not a bad message) is rejected back to the queue, where the quorum
queue's delivery limit ends a poison message in the dead-letter queue instead of a loop.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.commands import Basic

from worker.app import hardening as amqp_hardening
from worker.contract import codec
from worker.observability.observe import Observer, Watch
from worker.pipeline.process import Delivery, Outcome, Pipeline
from worker.pipeline.retry import RetryState
from worker.settings import Topology

log = logging.getLogger("worker.app.settle")
amqp_hardening.install()

_MAX_HEADER_TEXT = 1000
_MAX_REPLY_TO = 255
# Headers of our own that carry a command's retry state through the broker-held delays.
H_ATTEMPTS = "cw-attempts"
H_BUDGET_USED = "cw-budget-used-s"
H_FIRST_FAILURE = "cw-first-failure-at"
H_NOT_BEFORE = "cw-not-before"
H_ROUTING_KEY = "cw-routing-key"
H_PROBES = "cw-probes"
H_PUBLISHER = "cw-publisher"
RETRY_HEADERS = (H_ATTEMPTS, H_BUDGET_USED, H_FIRST_FAILURE, H_NOT_BEFORE, H_ROUTING_KEY, H_PROBES)


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


def delivery_of(message: AbstractIncomingMessage) -> Delivery:
    """The pipeline's view of a message (retry state read defensively from our headers)."""
    if not from_our_delay(message):
        return Delivery(message.body, user_id=message.user_id)
    headers = message.headers or {}
    publisher = headers.get(H_PUBLISHER)
    user_id = publisher if isinstance(publisher, str) else None
    attempts = _number(headers.get(H_ATTEMPTS))
    if attempts is None:
        return Delivery(message.body, user_id=user_id)
    retry = RetryState(
        attempts=max(int(attempts), 0),
        budget_used_s=max(_number(headers.get(H_BUDGET_USED)) or 0.0, 0.0),
        first_failure_at=_number(headers.get(H_FIRST_FAILURE)),
        probes=max(int(_number(headers.get(H_PROBES)) or 0), 0),
    )
    return Delivery(message.body, retry, _number(headers.get(H_NOT_BEFORE)), user_id=user_id)


def original_routing_key(message: AbstractIncomingMessage) -> str:
    """The routing key the publisher used (a command back from a delay carries it in a header)."""
    carried = (message.headers or {}).get(H_ROUTING_KEY)
    return carried if isinstance(carried, str) else (message.routing_key or "")


@dataclass(slots=True)
class Publisher:
    """Publishes result events and dead letters, each confirmed by the broker."""

    results: AbstractExchange
    dead: AbstractExchange
    default: AbstractExchange
    topology: Topology
    own_queues: frozenset[str]
    channel: AbstractChannel  # the one the exchanges are on (results go straight to it)
    observer: Observer = field(default_factory=Observer.disabled)

    async def publish(self, outcome: Outcome, message: AbstractIncomingMessage) -> None:
        """Publish everything ``outcome`` calls for, concurrently, and wait for the confirms."""
        if outcome.defer_s is not None and outcome.retry is not None:
            await self._defer(outcome.defer_s, outcome.retry, message)
            return
        await self._publish(outcome, message, self.observer.trace_headers(message))

    async def _publish(
        self,
        outcome: Outcome,
        message: AbstractIncomingMessage,
        headers: dict[str, Any] | None,
    ) -> None:
        body = codec.encode(outcome.event)
        event = _result_properties(outcome, message, headers)
        results = self.results.name
        sends: list[Awaitable[Any]] = [
            _send(self.channel, results, outcome.routing_key, body, event)
        ]
        reply_to = message.reply_to
        if reply_to and len(reply_to) <= _MAX_REPLY_TO and reply_to not in self.own_queues:
            sends.append(_send(self.channel, "", reply_to, body, event))
        if outcome.dead_letter:
            dead = _dead_letter(outcome, message)
            sends.append(self.dead.publish(dead, original_routing_key(message), mandatory=True))
        if len(sends) == 1:
            await sends[0]  # the usual case: no task to wrap a lone publish in
        else:
            await asyncio.gather(*sends)

    async def _defer(
        self, delay_s: float, retry: RetryState, message: AbstractIncomingMessage
    ) -> None:
        """Park the command in the delay queue of its tier; it comes back to the work queue."""
        tier = self.topology.delay_tier(delay_s)
        headers = dict(message.headers or {})
        headers.update(
            {
                H_ATTEMPTS: retry.attempts,
                H_BUDGET_USED: round(retry.budget_used_s, 3),
                H_FIRST_FAILURE: retry.first_failure_at or datetime.now(UTC).timestamp(),
                H_NOT_BEFORE: datetime.now(UTC).timestamp() + delay_s,
                H_ROUTING_KEY: original_routing_key(message),
                H_PROBES: retry.probes,
                H_PUBLISHER: delivery_of(message).user_id,
            }
        )
        delayed = _copy(message, headers)
        await self.default.publish(delayed, self.topology.delay_queue(tier), mandatory=True)


async def _send(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    properties: Basic.Properties,
) -> None:
    """Publish (unroutable: dropped) and wait for the broker's confirm.

    Straight on the channel under aio-pika's ``Exchange.publish`` (which adds a ``Message`` to
    convert), with ``wait=False``: aiormq then releases the channel's lock once the frames are
    queued instead of once they are written, so concurrent results are not serialized one event
    loop turn apart. The confirm is still awaited (a nack raises ``DeliveryError``).
    """
    underlay = cast(aiormq.Channel, await channel.get_underlay_channel())  # declares ``wait``
    await underlay.basic_publish(
        body,
        exchange=exchange,
        routing_key=routing_key,
        properties=properties,
        mandatory=False,
        wait=False,
    )


def _result_properties(
    outcome: Outcome, message: AbstractIncomingMessage, headers: dict[str, Any] | None = None
) -> Basic.Properties:
    """The result event's properties; aiormq adds a random ``message_id``."""
    correlation_id = message.correlation_id or outcome.event.get("command_id")
    if correlation_id is not None and len(correlation_id.encode("utf-8")) > 255:
        correlation_id = None  # an AMQP short string holds 255 bytes; the event body has the id
    return Basic.Properties(
        content_type="application/json",
        delivery_mode=2,  # persistent
        correlation_id=correlation_id,
        timestamp=datetime.now(UTC),
        app_id="conference-worker",
        message_type="result",
        headers=headers,
    )


def _dead_letter(outcome: Outcome, message: AbstractIncomingMessage) -> Any:
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
    return _copy(message, headers)


def _copy(message: AbstractIncomingMessage, headers: dict[str, Any]) -> Any:
    """The message again, persistent, with its properties and the given headers."""
    return aio_pika.Message(
        message.body,
        headers=headers,
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        user_id=None,
        app_id=message.app_id,
    )


async def settle(message: AbstractIncomingMessage, outcome: Outcome, publisher: Publisher) -> bool:
    """Finish a delivery: publish and confirm, then ack; on failure return it to the queue.

    The dedup store's record of the outcome (:attr:`Outcome.remember`) is made while the result
    is being published (one round trip off the command's latency), and the delivery is acked only
    when both are done: a crash in between redelivers it, and the worst case is a repeated event.
    """
    remembering = None if outcome.remember is None else asyncio.ensure_future(outcome.remember())
    failure: BaseException | None = None
    try:
        await publisher.publish(outcome, message)
    except CONNECTION_EXCEPTIONS as exc:
        failure = exc
    except BaseException:
        if remembering is not None:
            remembering.cancel()
        raise
    if remembering is not None and not await _remembered(remembering, outcome):
        failure = failure or RuntimeError("the dedup store's record failed")
    if failure is not None:
        log.error(
            "could not finish %s; returning it to the queue: %r",
            outcome.event.get("command_id"),
            failure,
        )
        await _quietly(message.nack(requeue=True))
        return False
    await _quietly(message.ack())
    return True


async def _remembered(remembering: asyncio.Future[None], outcome: Outcome) -> bool:
    """Wait for the dedup store's record; False (logged) if making it raised."""
    try:
        await remembering
    except Exception:
        log.exception("could not record %s in the dedup store", outcome.event.get("command_id"))
        return False
    return True


async def _quietly(settling: Any) -> None:
    """Ack/nack on a channel that may be gone: the broker requeues the delivery itself then."""
    try:
        await settling
    except CONNECTION_EXCEPTIONS as exc:
        log.warning("could not settle a delivery (the broker will redeliver it): %r", exc)


@dataclass(slots=True)
class Consumer:
    """Consumes the command queue with bounded concurrency (the prefetch count)."""

    queue: AbstractQueue
    pipeline: Pipeline
    publisher: Publisher
    observer: Observer = field(default_factory=Observer.disabled)
    _tag: str | None = None
    _inflight: set[asyncio.Task[Any]] = field(default_factory=set)
    completed: int = 0

    async def start(self) -> None:
        self._tag = await self.queue.consume(self._on_message, no_ack=False)

    @property
    def active(self) -> bool:
        """Consuming: started, not stopped, and the channel is open."""
        return self._tag is not None and not self.queue.channel.is_closed

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        try:
            await self._handle(message)
        finally:
            self._inflight.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        watch = self.observer.begin(message)
        try:
            await self._carry_out(message, watch)
        finally:
            self.observer.end(watch)

    async def _carry_out(self, message: AbstractIncomingMessage, watch: Watch) -> None:
        try:
            delivery = delivery_of(message)
            watch.first_delivery = delivery.retry.attempts == 0 and delivery.not_before is None
            outcome = await self.pipeline.process(delivery, remember_later=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("processing crashed; rejecting the delivery back to the queue")
            self.observer.crashed(watch, exc)
            await _quietly(message.reject(requeue=True))
            return
        settled = await settle(message, outcome, self.publisher)
        if settled:
            self.completed += 1
        self.observer.finish(watch, message, outcome, settled)

    async def stop(self, grace_s: float) -> None:
        """Stop taking deliveries; let those in flight finish within ``grace_s``.

        Commands waiting in a backoff or for an open circuit breaker are handed to the
        broker-held delay at once (the pipeline's ``stopping`` event) and acknowledged.
        """
        self.pipeline.stopping.set()
        if self._tag is not None:
            try:
                await self.queue.cancel(self._tag)
            except CONNECTION_EXCEPTIONS as exc:
                log.warning("could not cancel the consumer: %r", exc)
            self._tag = None
        pending = set(self._inflight)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                log.warning(
                    "%d commands still running after %.1f s were returned to the queue",
                    len(late),
                    grace_s,
                )
