"""Dead-letter tooling: list, show, replay and purge the dead-letter queue, losing nothing.

**Browsing** (:func:`browse`) takes the messages ready in the queue when it starts (the count of a
passive declare) and holds them all *unacknowledged* on the caller's channel; nothing is nacked
or requeued during a scan (that would fetch the same message again).  An operation acks only what
it removes; the rest goes back when the caller closes the channel, unchanged but for RabbitMQ's
``x-delivery-count`` (+1), and not necessarily in its old place (a quorum queue puts returned
messages ahead of those not taken), so browsing can reorder the queue.  It consumes with a
prefetch of that count rather than looping on ``basic.get``: on a quorum queue each get is a Raft
round trip (11 s for 5,000 here, against 0.6 s delivered to a consumer); the guarantee is the
same.  Dead letters that arrive meanwhile (a replayed command failing again) wait for next time.

**Replay** first runs ``prepare`` on each dead letter (the CLI's reopens its command in the dedup
store, :mod:`worker.operators.dlq_outcomes`), then publishes it to the commands exchange (original
routing key, body and properties) and acks it only after the broker has confirmed that publish.
``in_flight`` such pairs may overlap (1: strictly one at a time, which a quorum queue's fsync per
confirm caps near 300/s on a busy machine). Interrupted anywhere, a dead letter is either still in
the queue or replayed and removed; only a crash between a confirm and its ack replays one twice,
and the worker's deduplication by ``command_id`` answers the second as a duplicate.

Everything takes a channel and names; the CLI builds the settings (see
:mod:`worker.operators.dlq_render`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage
from aio_pika.exceptions import ChannelNotFoundEntity, DeliveryError

#: The headers the worker adds to a dead letter (``consumer._dead_letter``), and the prefix of its
#: retry headers (``consumer.RETRY_HEADERS``; the routing key a delayed retry carries is one).
_DEAD_LETTER_HEADERS = ("x-error-code", "x-error-message", "x-attempts", "x-original-routing-key")
OUR_HEADERS = frozenset((*_DEAD_LETTER_HEADERS, "x-failed-at", "x-status"))
RETRY_PREFIX, CARRIED_ROUTING_KEY = "cw-", "cw-routing-key"
BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})  # dead-lettered, redelivered
DROPPED_PREFIXES = ("x-first-death-", "x-last-death-", RETRY_PREFIX)
#: AMQP properties carried over to a replayed command (``user_id`` and ``expiration`` are not).
KEPT_PROPERTIES = (
    *("content_type", "content_encoding", "correlation_id", "reply_to", "message_id"),
    *("timestamp", "type", "app_id", "priority"),
)
MAX_PREFETCH = 65535  # basic.qos prefetch-count is a short


class DeadLetterError(Exception):
    """An operation on the dead-letter queue could not start (e.g. the queue does not exist)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """What a dead letter says about itself; strings are empty when unknown."""

    command_id: str
    type: str
    code: str
    error: str
    attempts: int | None
    failed_at: datetime | None
    routing_key: str
    body: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    properties: Mapping[str, Any] = field(default_factory=dict)
    replay_count: int = 0
    replayed_at: datetime | None = None


def parse(
    body: bytes,
    headers: Mapping[str, Any] | None,
    routing_key: str | None,
    properties: Mapping[str, Any] | None = None,
) -> DeadLetter:
    """The :class:`DeadLetter` view of a message, dead-lettered by the worker or by the broker.

    Our headers win; without ``x-error-code`` the broker's newest ``x-death`` entry gives the code
    (its reason, e.g. ``delivery_limit``), the time and (unless a retry carried it) the routing key.
    """
    headers = dict(headers or {})
    death = _newest_death(headers)
    command_id, command_type = _identity(body)
    return DeadLetter(
        command_id=command_id,
        type=command_type,
        code=_text(headers.get("x-error-code"))
        or _text(death.get("reason"))
        or _text(headers.get("x-first-death-reason")),
        error=_text(headers.get("x-error-message")),
        attempts=_int(headers.get("x-attempts")),
        failed_at=_time(headers.get("x-failed-at")) or _time(death.get("time")),
        routing_key=_text(headers.get("x-original-routing-key"))
        or _text(headers.get(CARRIED_ROUTING_KEY))
        or _first(death.get("routing-keys"))
        or (routing_key or ""),
        body=body,
        headers=headers,
        properties=dict(properties or {}),
        replay_count=_int(headers.get("x-replay-count")) or 0,
        replayed_at=_time(headers.get("x-replayed-at")),
    )


def from_message(message: AbstractIncomingMessage) -> DeadLetter:
    """:func:`parse` applied to a delivered message."""
    kept = {n: v for n in KEPT_PROPERTIES if (v := getattr(message, n, None)) is not None}
    return parse(message.body, message.headers, message.routing_key, kept)


def _identity(body: bytes) -> tuple[str, str]:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    found = document if isinstance(document, dict) else {}
    ident, kind = found.get("command_id"), found.get("type")
    return (ident if isinstance(ident, str) else ""), (kind if isinstance(kind, str) else "")


def _newest_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _first(values: Any) -> str:
    return _text(values[0]) if isinstance(values, list) and values else ""


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _time(value: Any) -> datetime | None:
    if isinstance(value, bytes | str):
        try:
            value = datetime.fromisoformat(_text(value))
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters an operation applies to; unset fields match everything.

    Ages are measured from ``now`` (fixed when the filter is made) to the time the command failed;
    a dead letter whose time is unknown matches no age filter.
    """

    type: str | None = None
    code: str | None = None
    older_than: timedelta | None = None
    newer_than: timedelta | None = None
    ids: frozenset[str] | None = None
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` passes every filter that is set."""
        return (
            (self.type is None or letter.type == self.type)
            and (self.code is None or letter.code == self.code)
            and (self.ids is None or letter.command_id in self.ids)
            and self._age_matches(letter.failed_at)
        )

    def _age_matches(self, failed_at: datetime | None) -> bool:
        if self.older_than is None and self.newer_than is None:
            return True
        if failed_at is None:
            return False
        age = self.now - failed_at
        return (self.older_than is None or age >= self.older_than) and (
            self.newer_than is None or age < self.newer_than
        )


def replay_headers(headers: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The command's headers again, without our dead-letter and retry headers or the broker's."""
    kept = {
        name: value
        for name, value in headers.items()
        if name not in OUR_HEADERS
        and name not in BROKER_HEADERS
        and not name.startswith(DROPPED_PREFIXES)
    }
    kept["x-replayed-at"] = now.isoformat()
    kept["x-replay-count"] = (_int(headers.get("x-replay-count")) or 0) + 1
    return kept


def replay_message(letter: DeadLetter, now: datetime) -> aio_pika.Message:
    """The command to publish again: original body and properties, persistent."""
    return aio_pika.Message(
        letter.body,
        headers=replay_headers(letter.headers, now),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **letter.properties,
    )


@dataclass(frozen=True, slots=True)
class Held:
    """A dead letter delivered to us and not yet acknowledged."""

    letter: DeadLetter
    message: AbstractIncomingMessage


async def browse(channel: AbstractChannel, queue_name: str, *, idle_s: float = 2.0) -> list[Held]:
    """Every dead letter ready now, oldest first, held unacknowledged on ``channel``.

    Stops after the count the queue reported, or when nothing arrives for ``idle_s`` (someone
    else took messages meanwhile).  Close ``channel`` to give back what you did not ack.
    """
    try:
        queue = await channel.declare_queue(queue_name, passive=True)
    except ChannelNotFoundEntity:
        raise DeadLetterError(f"queue {queue_name!r} does not exist") from None
    ready = queue.declaration_result.message_count or 0
    if not ready:
        return []
    await channel.set_qos(prefetch_count=ready if ready <= MAX_PREFETCH else 0)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def take(message: AbstractIncomingMessage) -> None:
        inbox.put_nowait(message)

    tag = await queue.consume(take, no_ack=False)
    held: list[Held] = []
    try:
        while len(held) < ready:
            try:
                message = await asyncio.wait_for(inbox.get(), idle_s)
            except TimeoutError:
                break
            held.append(Held(from_message(message), message))
    finally:
        await queue.cancel(tag)
    return held


def select(
    held: Iterable[Held], flt: Filter, limit: int | None = None, *, since: datetime | None = None
) -> list[Held]:
    """The held dead letters that match (and were not replayed ``since``), at most ``limit``."""
    chosen = [
        item
        for item in held
        if flt.matches(item.letter)
        and (since is None or item.letter.replayed_at is None or item.letter.replayed_at < since)
    ]
    return chosen if limit is None else chosen[:limit]


#: What a replay runs on each dead letter before publishing it (an error stops the replay, and
#: the dead letter stays).
Prepare = Callable[[DeadLetter], Awaitable[None]]


class Progress(Protocol):
    """Where :func:`replay` reports progress (a rich progress bar in the CLI)."""

    def start(self, total: int) -> None: ...

    def advance(self) -> None: ...

    def stop(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ReplayReport:
    """What a replay did; ``remaining`` matching dead letters are still in the queue."""

    matched: int
    replayed: int
    refused: int
    interrupted: bool
    elapsed_s: float

    @property
    def remaining(self) -> int:
        return self.matched - self.replayed


async def replay(
    channel: AbstractChannel,
    queue_name: str,
    exchange_name: str,
    flt: Filter,
    *,
    limit: int | None = None,
    pace: Callable[[], float] | None = None,
    in_flight: int = 1,
    stop: asyncio.Event,
    progress: Progress,
    prepare: Prepare | None = None,
) -> ReplayReport:
    """Publish each matching dead letter back to ``exchange_name``, confirmed, then ack it.

    ``channel`` must have publisher confirms on.  Each dead letter is acked only after the confirm
    of its own publish; ``in_flight`` such pairs may run at once (1: strictly one at a time).
    ``pace`` says how long to wait before each (a token bucket's ``reserve``); setting ``stop``
    ends the run once the pairs in hand are done.  Dead letters this run put back are skipped.
    """
    if not channel.publisher_confirms:
        raise ValueError("replay needs a channel with publisher confirms")
    started_at = datetime.now(UTC)
    try:
        exchange = await channel.get_exchange(exchange_name, ensure=True)
    except ChannelNotFoundEntity:
        raise DeadLetterError(f"exchange {exchange_name!r} does not exist") from None
    chosen = select(await browse(channel, queue_name), flt, limit, since=started_at)
    return await replay_held(
        exchange, chosen, pace, stop=stop, progress=progress, in_flight=in_flight, prepare=prepare
    )


async def replay_held(
    exchange: AbstractExchange,
    chosen: list[Held],
    pace: Callable[[], float] | None,
    *,
    stop: asyncio.Event,
    progress: Progress,
    in_flight: int = 1,
    prepare: Prepare | None = None,
) -> ReplayReport:
    """Replay ``chosen`` in order (see :func:`replay`); at most ``in_flight`` pairs at once.

    Each pair runs in a task of its own, so neither ``stop`` nor cancelling this coroutine cuts
    one short: both wait for the pairs in hand to finish.
    """
    outcomes: list[bool] = []
    pending: set[asyncio.Task[bool]] = set()
    began = time.monotonic()
    progress.start(len(chosen))
    try:
        for item in chosen:
            if len(pending) >= in_flight:
                await _settle(pending, outcomes, progress, asyncio.FIRST_COMPLETED)
            if stop.is_set() or (pace is not None and await _wait(pace(), stop)):
                break
            pending.add(asyncio.ensure_future(_replay_one(exchange, item, prepare)))
        await _settle(pending, outcomes, progress, asyncio.ALL_COMPLETED)
    finally:
        if pending:  # cancelled or failed: let the pairs in hand complete all the same
            await asyncio.wait(pending)
        progress.stop()
    replayed = sum(outcomes)
    interrupted = len(outcomes) < len(chosen)
    elapsed = time.monotonic() - began
    return ReplayReport(len(chosen), replayed, len(outcomes) - replayed, interrupted, elapsed)


async def _settle(
    pending: set[asyncio.Task[bool]], outcomes: list[bool], progress: Progress, when: str
) -> None:
    """Wait for one (or every) pending pair; record outcomes (a broker error is raised here)."""
    if not pending:
        return
    done, _ = await asyncio.wait(pending, return_when=when)
    for task in done:
        pending.discard(task)
        outcomes.append(task.result())
        progress.advance()


async def _wait(delay: float, stop: asyncio.Event) -> bool:
    """Sleep ``delay`` seconds unless ``stop`` is set first; whether it was."""
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
    return stop.is_set()


async def _replay_one(exchange: AbstractExchange, item: Held, prepare: Prepare | None) -> bool:
    """Prepare, publish, wait for the confirm, ack the dead letter; False (it stays) if the
    publish failed."""
    if prepare is not None:
        await prepare(item.letter)
    message = replay_message(item.letter, datetime.now(UTC))
    try:
        await exchange.publish(message, item.letter.routing_key, mandatory=True)
    except (DeliveryError, TypeError, ValueError):  # nacked, unroutable, or a header pamqp
        return False  # cannot encode (e.g. bytes: then nothing was sent)
    await item.message.ack()
    return True
