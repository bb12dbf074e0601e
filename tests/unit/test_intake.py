"""The intake hop (worker.app.intake) and what the partitions make of its headers.

No broker: deliveries are stand-ins with the properties of an aio-pika incoming message, the
partitions publisher is a fake that records (or raises).  The real broker path is
``tests/integration/test_intake.py``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pytest

from tests.unit.test_pipeline import FakeProvider, make, role
from worker.app.handler import CommandHandler
from worker.app.intake import Intake, partition_key, routed_headers, routed_options
from worker.app.settle import (
    H_ATTEMPTS,
    H_BUDGET_USED,
    H_FIRST_FAILURE,
    H_NOT_BEFORE,
    H_ORIGIN,
    H_PROBES,
    H_PUBLISHER,
    H_ROUTING_KEY,
    delivery_of,
    publisher_of,
)
from worker.app.topology import PARTITION_KEY_HEADER
from worker.pipeline.process import Outcome

ACCOUNT = "a" * 32
CONFERENCE = "b" * 32
UPDATE: dict[str, Any] = {
    "command_id": "c-1",
    "type": "conference.update",
    "account_id": ACCOUNT,
    "conference_id": CONFERENCE,
    "conference": {"name": "Bridge"},
}
ROLE: dict[str, Any] = {
    "command_id": "r-1",
    "type": "conference.supervisor_role",
    "conference_id": "conf-1",
    "call_control_id": "v3:abc",
    "supervisor_role": "whisper",
}
RETRY_STATE = {
    H_ATTEMPTS: 2,
    H_BUDGET_USED: 1.5,
    H_FIRST_FAILURE: 1_700_000_000.0,
    H_NOT_BEFORE: 1_700_000_005.0,
    H_ROUTING_KEY: "conference.update",
    H_PROBES: 1,
    H_PUBLISHER: "svc-a",
}


class Message:
    """An incoming delivery stand-in: aio-pika's properties, and how it was settled."""

    def __init__(self, body: bytes = b"{}", **properties: Any) -> None:
        self.body = body
        self.headers: dict[str, Any] = {}
        self.exchange = "conference.commands"
        self.routing_key = "conference.update"
        self.user_id: str | None = "svc-a"
        self.content_type: str | None = "application/json"
        self.content_encoding: str | None = None
        self.correlation_id: str | None = None
        self.reply_to: str | None = None
        self.message_id: str | None = None
        self.timestamp: datetime | None = None
        self.type: str | None = None
        self.app_id: str | None = None
        self.priority: int | None = None
        for name, value in properties.items():
            setattr(self, name, value)
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack requeue={requeue}")

    async def reject(self, requeue: bool = False) -> None:
        self.settled.append(f"reject requeue={requeue}")


def as_partition_delivery(message: Message) -> Message:
    """What a partition consumer receives after the intake routed ``message``."""
    options = routed_options(message, partition_key(message.body))  # type: ignore[arg-type]
    return Message(
        message.body,
        headers=options["headers"],
        exchange="conference-worker.commands.partitions",
        routing_key=options["routing_key"],
        user_id="conference-worker",  # the worker's own connection published it
    )


# partition_key -----------------------------------------------------------------------------------


def test_partition_key_of_an_update_is_the_vinix_account_and_conference() -> None:
    """``conference.update`` is keyed ``vinix|<account_id>|<conference_id>``."""
    assert partition_key(orjson.dumps(UPDATE)) == f"vinix|{ACCOUNT}|{CONFERENCE}"


def test_partition_key_of_a_role_change_is_the_telnyx_conference_and_call() -> None:
    """``conference.supervisor_role`` is keyed ``telnyx|<conference_id>|<call_control_id>``."""
    assert partition_key(orjson.dumps(ROLE)) == "telnyx|conf-1|v3:abc"


def test_partition_key_ignores_everything_but_the_target() -> None:
    """Two commands for one target share the key whatever else differs; another target not."""
    other = {**UPDATE, "command_id": "c-2", "conference": {"name": "Other"}, "mode": "merge"}
    assert partition_key(orjson.dumps(other)) == partition_key(orjson.dumps(UPDATE))
    moved = {**UPDATE, "conference_id": "c" * 32}
    assert partition_key(orjson.dumps(moved)) != partition_key(orjson.dumps(UPDATE))
    call = {**ROLE, "call_control_id": "v3:other"}
    assert partition_key(orjson.dumps(call)) != partition_key(orjson.dumps(ROLE))


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"",
        b"[1, 2]",
        b'"conference.update"',
        b"null",
        b"42",
        orjson.dumps({**UPDATE, "type": "conference.unknown"}),
        orjson.dumps({k: v for k, v in UPDATE.items() if k != "type"}),
        orjson.dumps({**UPDATE, "type": ["conference.update"]}),
        orjson.dumps({k: v for k, v in UPDATE.items() if k != "account_id"}),
        orjson.dumps({**UPDATE, "conference_id": 7}),
        orjson.dumps({**UPDATE, "account_id": None}),
        orjson.dumps({k: v for k, v in ROLE.items() if k != "call_control_id"}),
        orjson.dumps({**ROLE, "conference_id": {"id": "conf-1"}}),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "empty",
        "array",
        "string",
        "null",
        "number",
        "unknown-type",
        "no-type",
        "type-not-a-string",
        "no-account",
        "conference-not-a-string",
        "account-null",
        "no-call",
        "conference-an-object",
    ],
)
def test_partition_key_falls_back_when_the_body_does_not_name_a_target(body: bytes) -> None:
    """A body that is not JSON, not an object, of an unknown type, or without string ids gives
    the fallback (the intake passes the ``message_id``), and never raises."""
    assert partition_key(body, fallback="m-1") == "m-1"
    assert partition_key(body) == ""


# routed_headers / routed_options -----------------------------------------------------------------


def test_a_publishers_cw_headers_are_stripped_and_its_origin_recorded() -> None:
    """From a publisher (the commands exchange), every ``cw-*`` header goes, the others stay,
    and the intake sets ``cw-origin=publisher``, ``cw-publisher=<user_id>`` and the key."""
    forged = {
        **RETRY_STATE,
        H_ORIGIN: "delay",
        H_PUBLISHER: "someone-else",
        "cw-anything": "x",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "x-custom": 1,
    }
    message = Message(orjson.dumps(UPDATE), headers=forged, user_id="svc-a")
    headers = routed_headers(message, "k")  # type: ignore[arg-type]
    assert headers == {
        "traceparent": forged["traceparent"],
        "x-custom": 1,
        H_ORIGIN: "publisher",
        H_PUBLISHER: "svc-a",
        PARTITION_KEY_HEADER: "k",
    }
    assert message.headers == forged  # the delivery itself is left alone


def test_a_publisher_without_user_id_is_recorded_as_none() -> None:
    """No validated ``user_id``: ``cw-publisher`` is None, never a header the publisher sent."""
    message = Message(headers={H_PUBLISHER: "admin"}, user_id=None)
    headers = routed_headers(message, "")  # type: ignore[arg-type]
    assert headers[H_PUBLISHER] is None
    assert headers[H_ORIGIN] == "publisher"


def test_a_command_back_from_our_delay_keeps_its_retry_state() -> None:
    """From our delay (the default exchange) the retry headers travel on, and ``cw-origin``
    (the ``publisher`` of its first routing) becomes ``delay``."""
    incoming = {**RETRY_STATE, H_ORIGIN: "publisher", "traceparent": "t"}
    message = Message(orjson.dumps(UPDATE), headers=incoming, exchange="", user_id="guest")
    headers = routed_headers(message, "k")  # type: ignore[arg-type]
    assert headers == {
        **RETRY_STATE,
        "traceparent": "t",
        H_ORIGIN: "delay",
        "x-cw-partition-key": "k",
    }
    assert headers[H_PUBLISHER] == "svc-a"  # the first publisher, not the dead-lettering user


def test_routed_options_carry_the_body_properties_on() -> None:
    """Every property of the command is published on unchanged, persistent and mandatory, to
    the routing key its publisher used."""
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    message = Message(
        orjson.dumps(ROLE),
        routing_key="conference.supervisor_role",
        content_type="application/json",
        content_encoding="utf-8",
        correlation_id="corr-1",
        reply_to="caller.replies",
        message_id="m-1",
        timestamp=stamp,
        type="command",
        app_id="caller",
        priority=3,
    )
    options = routed_options(message, "telnyx|conf-1|v3:abc")  # type: ignore[arg-type]
    assert options["routing_key"] == "conference.supervisor_role"
    assert options["content_type"] == "application/json"
    assert options["content_encoding"] == "utf-8"
    assert options["correlation_id"] == "corr-1"
    assert options["reply_to"] == "caller.replies"
    assert options["message_id"] == "m-1"
    assert options["timestamp"] == stamp
    assert options["message_type"] == "command"
    assert options["app_id"] == "caller"
    assert options["priority"] == 3
    assert options["persist"] is True
    assert options["mandatory"] is True
    assert options["headers"][PARTITION_KEY_HEADER] == "telnyx|conf-1|v3:abc"


def test_routed_options_of_a_delayed_command_use_its_original_routing_key() -> None:
    """A command back from a delay arrives with the delay queue's name as routing key; it goes
    on with the ``cw-routing-key`` its first publisher used."""
    message = Message(
        orjson.dumps(UPDATE),
        headers=dict(RETRY_STATE),
        exchange="",
        routing_key="conference-worker.commands.intake.delay.5s",
    )
    options = routed_options(message, "k")  # type: ignore[arg-type]
    assert options["routing_key"] == "conference.update"


def test_a_publishers_cw_routing_key_does_not_change_the_routing_key() -> None:
    """A publisher's ``cw-routing-key`` is one of the stripped headers: the command goes on with
    the routing key it was published with (it ends in a dead letter's x-original-routing-key)."""
    message = Message(orjson.dumps(UPDATE), headers={H_ROUTING_KEY: "evil.key"})
    options = routed_options(message, "k")  # type: ignore[arg-type]
    assert options["routing_key"] == "conference.update"
    assert H_ROUTING_KEY not in options["headers"]


# settle.delivery_of(routed=True) -----------------------------------------------------------------


def test_a_routed_delivery_trusts_the_retry_state_only_from_a_delay() -> None:
    """On a partition, ``cw-origin=delay`` (set by the intake) is what makes the retry headers
    count; the partition delivery's own exchange says nothing."""
    delayed = Message(headers={**RETRY_STATE, H_ORIGIN: "delay"}, exchange="p")
    delivery = delivery_of(delayed, routed=True)  # type: ignore[arg-type]
    assert delivery.retry.attempts == 2
    assert delivery.retry.budget_used_s == 1.5
    assert delivery.retry.first_failure_at == 1_700_000_000.0
    assert delivery.retry.probes == 1
    assert delivery.not_before == 1_700_000_005.0
    for origin in ("publisher", None, "DELAY", 1):
        headers = {**RETRY_STATE, H_ORIGIN: origin}
        for exchange in ("p", ""):
            message = Message(headers=headers, exchange=exchange)
            plain = delivery_of(message, routed=True)  # type: ignore[arg-type]
            assert plain.retry.attempts == 0, (origin, exchange)
            assert plain.not_before is None


def test_a_routed_delivery_takes_the_publisher_from_cw_publisher() -> None:
    """On a partition the AMQP ``user_id`` is the worker's own: the publisher is the intake's
    ``cw-publisher`` (None when missing or not a string), from a publisher or a delay alike."""
    for origin in ("publisher", "delay"):
        message = Message(headers={H_ORIGIN: origin, H_PUBLISHER: "svc-a"}, user_id="worker")
        assert delivery_of(message, routed=True).user_id == "svc-a"  # type: ignore[arg-type]
        assert publisher_of(message, routed=True) == "svc-a"  # type: ignore[arg-type]
    assert publisher_of(Message(headers={}, user_id="worker"), routed=True) is None  # type: ignore[arg-type]
    odd = Message(headers={H_PUBLISHER: 7}, user_id="worker")
    assert publisher_of(odd, routed=True) is None  # type: ignore[arg-type]


def test_the_single_queue_delivery_is_read_as_before() -> None:
    """Not routed: the retry state counts only from the default exchange (our delay), and the
    publisher is the message's ``user_id`` unless it came back from a delay."""
    headers = {**RETRY_STATE, H_ORIGIN: "delay"}
    published = Message(headers=headers, exchange="conference.commands", user_id="svc-b")
    delivery = delivery_of(published)  # type: ignore[arg-type]
    assert delivery.retry.attempts == 0
    assert delivery.user_id == "svc-b"
    delayed = Message(headers=headers, exchange="", user_id="guest")
    delivery = delivery_of(delayed)  # type: ignore[arg-type]
    assert delivery.retry.attempts == 2
    assert delivery.user_id == "svc-a"


def test_forged_retry_headers_are_ignored_end_to_end() -> None:
    """A publisher's ``cw-attempts``/``cw-origin=delay`` do not survive the intake: the
    partition reads a first delivery from the validated publisher."""
    forged = {**RETRY_STATE, H_ORIGIN: "delay", H_PUBLISHER: "admin"}
    published = Message(orjson.dumps(UPDATE), headers=forged, user_id="svc-b")
    delivery = delivery_of(as_partition_delivery(published), routed=True)  # type: ignore[arg-type]
    assert delivery.retry.attempts == 0
    assert delivery.not_before is None
    assert delivery.user_id == "svc-b"


def test_a_real_retry_state_survives_the_intake_end_to_end() -> None:
    """A command our delay returned keeps its retry state and first publisher through the
    intake to its partition."""
    delayed = Message(orjson.dumps(UPDATE), headers=dict(RETRY_STATE), exchange="", user_id="x")
    delivery = delivery_of(as_partition_delivery(delayed), routed=True)  # type: ignore[arg-type]
    assert delivery.retry.attempts == 2
    assert delivery.not_before == 1_700_000_005.0
    assert delivery.user_id == "svc-a"


# Intake.handle -----------------------------------------------------------------------------------


class FakePartitions:
    """The partitions publisher: records each publish and the order of events, or raises."""

    def __init__(self, log: list[str], error: Exception | None = None) -> None:
        self.log, self.error = log, error
        self.published: list[tuple[bytes, dict[str, Any]]] = []
        self.messages: list[aio_pika.Message] = []

    async def publish(self, message: aio_pika.Message, **arguments: Any) -> None:
        await asyncio.sleep(0)
        if self.error is not None:
            raise self.error
        self.messages.append(message)
        self.published.append((message.body, {"headers": message.headers, **arguments}))
        self.log.append("published")


class LoggedMessage(Message):
    def __init__(self, log: list[str], body: bytes, **properties: Any) -> None:
        super().__init__(body, **properties)
        self.log = log

    async def ack(self) -> None:
        self.log.append("ack")
        await super().ack()

    async def nack(self, requeue: bool = True) -> None:
        self.log.append("nack")
        await super().nack(requeue)


async def test_the_intake_acks_after_the_publish() -> None:
    """The command is published to the partitions exchange with its key, and the intake
    delivery is acked only after the publish (its confirm) returned."""
    log: list[str] = []
    partitions = FakePartitions(log)
    intake = Intake(partitions)  # type: ignore[arg-type]
    message = LoggedMessage(log, orjson.dumps(UPDATE), message_id="m-1")
    await intake.handle(message)  # type: ignore[arg-type]
    assert log == ["published", "ack"]
    assert message.settled == ["ack"]
    assert intake.routed == 1
    ((body, options),) = partitions.published
    assert body == orjson.dumps(UPDATE)
    assert options["headers"][PARTITION_KEY_HEADER] == f"vinix|{ACCOUNT}|{CONFERENCE}"
    assert options["routing_key"] == "conference.update"


async def test_the_intake_invents_no_properties() -> None:
    """The command goes on with its own properties, persistent: one without a correlation_id
    gets none on the way (its result then echoes its command_id, CONTRACT.md); one without a
    timestamp gets the intake's (its age is measured), one with a timestamp keeps it."""
    partitions = FakePartitions([])
    intake = Intake(partitions)  # type: ignore[arg-type]
    await intake.handle(Message(orjson.dumps(ROLE), message_id="m-1"))  # type: ignore[arg-type]
    sent = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    correlated_message = Message(orjson.dumps(UPDATE), correlation_id="corr-2", timestamp=sent)
    await intake.handle(correlated_message)  # type: ignore[arg-type]
    bare, correlated = partitions.messages
    assert (bare.correlation_id, bare.message_id) == (None, "m-1")
    assert bare.timestamp is not None
    assert bare.timestamp > sent
    assert bare.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert (correlated.correlation_id, correlated.timestamp) == ("corr-2", sent)
    assert partitions.published[0][1]["mandatory"] is True


async def test_an_unreadable_command_is_keyed_by_its_message_id() -> None:
    """The intake decides nothing: a body that names no target goes on, keyed by message_id."""
    log: list[str] = []
    partitions = FakePartitions(log)
    intake = Intake(partitions)  # type: ignore[arg-type]
    await intake.handle(LoggedMessage(log, b"not json", message_id="m-9"))  # type: ignore[arg-type]
    await intake.handle(LoggedMessage(log, b"[]"))  # type: ignore[arg-type]
    keys = [options["headers"][PARTITION_KEY_HEADER] for _, options in partitions.published]
    assert keys == ["m-9", ""]
    assert log == ["published", "ack", "published", "ack"]


async def test_the_intake_requeues_when_the_publish_raises() -> None:
    """A publish that raises (unroutable, nacked, the connection gone) is not acked: the intake
    delivery is nacked back to the queue, nothing is counted as routed."""
    log: list[str] = []
    intake = Intake(FakePartitions(log, error=RuntimeError("unroutable")))  # type: ignore[arg-type]
    message = LoggedMessage(log, orjson.dumps(ROLE))
    await intake.handle(message)  # type: ignore[arg-type]
    assert message.settled == ["nack requeue=True"]
    assert intake.routed == 0


class FailFirst:
    """The partitions publisher: the first publish fails slowly, the others succeed at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.published: list[bytes] = []

    async def publish(self, message: aio_pika.Message, **arguments: Any) -> None:
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(0.01)
            raise RuntimeError("nacked by the broker")
        self.published.append(message.body)


async def test_a_targets_next_command_never_overtakes_one_that_goes_back() -> None:
    """Three deliveries routed concurrently: the first fails (back to the intake), so the second,
    for the same target, goes back too without being published; another target's goes on."""
    intake = Intake(FailFirst())  # type: ignore[arg-type]
    first = Message(orjson.dumps({**ROLE, "command_id": "r-1"}))
    second = Message(orjson.dumps({**ROLE, "command_id": "r-2"}))
    other = Message(orjson.dumps(UPDATE))
    await asyncio.gather(*(intake.handle(m) for m in (first, second, other)))  # type: ignore[arg-type]
    assert first.settled == ["nack requeue=True"]
    assert second.settled == ["nack requeue=True"]
    assert other.settled == ["ack"]
    assert intake.partitions.published == [orjson.dumps(UPDATE)]  # type: ignore[attr-defined]
    assert intake.routed == 1


async def test_a_targets_commands_are_published_in_arrival_order() -> None:
    """Concurrent deliveries of one target reach the partitions exchange in arrival order, even
    when an earlier publish takes longer."""
    order: list[str] = []

    class Slow:
        async def publish(self, message: aio_pika.Message, **arguments: Any) -> None:
            command_id = orjson.loads(message.body)["command_id"]
            await asyncio.sleep(0.02 if command_id == "r-1" else 0)
            order.append(command_id)

    intake = Intake(Slow())  # type: ignore[arg-type]
    messages = [Message(orjson.dumps({**ROLE, "command_id": f"r-{n}"})) for n in (1, 2, 3)]
    await asyncio.gather(*(intake.handle(m) for m in messages))  # type: ignore[arg-type]
    assert order == ["r-1", "r-2", "r-3"]
    assert not intake._tails  # nothing left behind


async def test_a_holding_intake_neither_routes_nor_settles() -> None:
    """Stopping, the intake leaves what arrives unsettled, for the connection's close to
    return to the queue."""
    log: list[str] = []
    partitions = FakePartitions(log)
    intake = Intake(partitions, holding=True)  # type: ignore[arg-type]
    message = LoggedMessage(log, orjson.dumps(ROLE))
    await intake.handle(message)  # type: ignore[arg-type]
    assert log == []
    assert message.settled == []
    assert partitions.published == []


# CommandHandler on partitions --------------------------------------------------------------------


class Sent:
    """The handler's publisher: records the outcomes it was asked to publish."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    async def publish(self, outcome: Outcome, message: Any) -> None:
        self.outcomes.append(outcome)


def partition_delivery(body: bytes) -> Message:
    return Message(
        body,
        headers={H_ORIGIN: "publisher", H_PUBLISHER: "svc-a"},
        exchange="conference-worker.commands.partitions",
        routing_key="conference.supervisor_role",
    )


async def test_a_routed_handler_holds_deliveries_after_stopping() -> None:
    """On a partition, once stopping, a delivery is neither processed (no provider call) nor
    settled (no ack, nack or reject): the connection's close returns it to the queue head."""
    telnyx = FakeProvider("telnyx")
    sent = Sent()
    handler = CommandHandler(make(telnyx=telnyx), sent, routed=True)
    before = partition_delivery(role())
    await handler.handle(before)  # type: ignore[arg-type]
    assert before.settled == ["ack"]
    assert telnyx.calls == 1
    handler.stopping()
    held = partition_delivery(role(command_id="r-2"))
    await handler.handle(held)  # type: ignore[arg-type]
    assert held.settled == []
    assert telnyx.calls == 1
    assert len(sent.outcomes) == 1
    assert handler.held == 1
    assert handler.completed == 1


async def test_a_single_queue_handler_does_not_hold_after_stopping() -> None:
    """Not routed (the single queue), stopping holds nothing: what still arrives before the
    consumer is cancelled is carried out and settled."""
    telnyx = FakeProvider("telnyx")
    handler = CommandHandler(make(telnyx=telnyx), Sent())
    handler.stopping()
    message = partition_delivery(role())
    await handler.handle(message)  # type: ignore[arg-type]
    assert message.settled == ["ack"]
    assert telnyx.calls == 1
    assert handler.held == 0
