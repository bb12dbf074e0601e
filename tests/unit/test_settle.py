"""consumer.settle: the one place a delivery is finished, with the dedup record made meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiormq.exceptions import ChannelInvalidStateError

from worker.app.settle import settle
from worker.pipeline.process import Outcome


class FakeMessage:
    """Records how the delivery was settled."""

    def __init__(self) -> None:
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack requeue={requeue}")


class FakePublisher:
    """Publishes after ``delay_s``, or raises ``error``; logs the moment it finished."""

    def __init__(self, log: list[str], delay_s: float = 0.0, error: Exception | None = None):
        self.log, self.delay_s, self.error = log, delay_s, error

    async def publish(self, outcome: Outcome, message: Any) -> None:
        await asyncio.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        self.log.append("published")


def outcome(remember: Any) -> Outcome:
    event = {"command_id": "c-1", "type": "conference.supervisor_role", "status": "succeeded"}
    return Outcome(event, "conference.supervisor_role.succeeded", False, remember=remember)


async def test_the_record_is_made_while_publishing_and_the_ack_waits_for_both() -> None:
    """The dedup record starts before the publish ends, and the ack comes after both."""
    log: list[str] = []

    async def remember() -> None:
        log.append("remember started")
        await asyncio.sleep(0.05)
        log.append("remembered")

    message = FakeMessage()
    publisher: Any = FakePublisher(log, delay_s=0.01)
    assert await settle(message, outcome(remember), publisher)  # type: ignore[arg-type]
    assert log == ["remember started", "published", "remembered"]
    assert message.settled == ["ack"]


async def test_a_failed_record_returns_the_delivery_to_the_queue() -> None:
    """When the dedup record raises, the delivery is not acked but returned to the queue."""

    async def remember() -> None:
        raise RuntimeError("boom")

    message = FakeMessage()
    publisher: Any = FakePublisher([])
    assert not await settle(message, outcome(remember), publisher)  # type: ignore[arg-type]
    assert message.settled == ["nack requeue=True"]


async def test_a_failed_publish_still_waits_for_the_record_then_requeues() -> None:
    """A publish lost with the channel: the record is still finished, the delivery requeued."""
    done: list[str] = []

    async def remember() -> None:
        await asyncio.sleep(0.02)
        done.append("remembered")

    message = FakeMessage()
    publisher: Any = FakePublisher([], error=ChannelInvalidStateError("closed"))
    assert not await settle(message, outcome(remember), publisher)  # type: ignore[arg-type]
    assert done == ["remembered"]
    assert message.settled == ["nack requeue=True"]


async def test_a_cancelled_settle_still_makes_the_record_then_gives_up_the_delivery() -> None:
    """Settling cancelled while it publishes (a stop's grace is over): the command was carried
    out, so its dedup record is still made before the cancellation goes on; nothing is acked."""
    done: list[str] = []

    async def remember() -> None:
        await asyncio.sleep(0.05)
        done.append("remembered")

    message = FakeMessage()
    publisher: Any = FakePublisher([], delay_s=10)
    settling = asyncio.create_task(settle(message, outcome(remember), publisher))  # type: ignore[arg-type]
    await asyncio.sleep(0.01)
    settling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await settling
    assert done == ["remembered"]
    assert message.settled == []


class OpenChannel:
    is_closed = False


class LiveMessage(FakeMessage):
    """A delivery whose own channel is still open (the consumer's channel was restored)."""

    _IncomingMessage__channel = OpenChannel()  # where aio-pika keeps it


class FlakyPublisher:
    """Raises a connection error ``failures`` times (the publishing channel not restored yet)."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    async def publish(self, outcome: Outcome, message: Any) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise ChannelInvalidStateError("the publishing channel is closed")


async def test_a_publish_that_fails_while_the_delivery_is_alive_is_held_and_retried() -> None:
    """After a broker restart the consumer's channel may be back before the publisher's: the
    delivery is held and the publish retried, not requeued at once (which would burn through the
    queue's delivery limit in milliseconds)."""
    message = LiveMessage()
    publisher: Any = FlakyPublisher(failures=3)
    assert await settle(message, outcome(None), publisher)  # type: ignore[arg-type]
    assert publisher.calls == 4
    assert message.settled == ["ack"]


async def test_a_publish_held_too_long_returns_the_delivery(monkeypatch: Any) -> None:
    """The hold is bounded: past it, the delivery goes back to its queue."""
    monkeypatch.setattr("worker.app.settle.HOLD_TOTAL_S", 0.2)
    message = LiveMessage()
    publisher: Any = FlakyPublisher(failures=1000)
    assert not await settle(message, outcome(None), publisher)  # type: ignore[arg-type]
    assert 3 <= publisher.calls < 20
    assert message.settled == ["nack requeue=True"]
