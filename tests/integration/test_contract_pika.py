"""CONTRACT.md from the outside: a plain pika client (not this project's code) publishes commands
and reads one result event per delivery from its own reply queue, for every case the contract names.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pika
import pytest

from tests.integration.conftest import (
    AMQP_URL,
    Admin,
    Bus,
    WorkerFactory,
    settled_command_counts,
    take,
)

pytestmark = pytest.mark.integration


class PikaClient:
    """A blocking pika publisher with its own durable reply queue."""

    def __init__(self, exchange: str) -> None:
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.confirm_delivery()
        self.reply_to = f"pika-replies-{uuid.uuid4().hex[:8]}"
        self.channel.queue_declare(self.reply_to, durable=True)

    def publish(self, body: bytes, routing_key: str, correlation_id: str) -> None:
        props = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            reply_to=self.reply_to,
            correlation_id=correlation_id,
        )
        self.channel.basic_publish(self.exchange, routing_key, body, props, mandatory=True)

    def results(self, count: int, timeout_s: float = 60.0) -> dict[str, list[dict[str, Any]]]:
        """Result events by correlation id."""
        got: dict[str, list[dict[str, Any]]] = {}
        seen = 0
        deadline = time.monotonic() + timeout_s
        while seen < count and time.monotonic() < deadline:
            method, props, body = self.channel.basic_get(self.reply_to, auto_ack=True)
            if method is None:
                self.connection.sleep(0.02)
                continue
            got.setdefault(props.correlation_id, []).append(orjson.loads(body))
            seen += 1
        return got

    def close(self) -> None:
        self.channel.queue_delete(self.reply_to)
        self.connection.close()


@dataclass
class Case:
    label: str
    body: bytes
    routing_key: str
    status: str
    code: str | None
    attempts: int
    duplicate: bool = False


def cid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def update(fx: dict[str, Any], conf: int = 0, **fields: Any) -> dict[str, Any]:
    body = {
        "command_id": cid("upd"),
        "type": "conference.update",
        "account_id": fx["vinix"]["account_id"],
        "conference_id": fx["vinix"]["conference_ids"][conf],
        "conference": {"name": "Team bridge"},
    }
    body.update(fields)
    return body


def calls_in(fx: dict[str, Any], conference: str) -> list[str]:
    return list(fx["telnyx"]["calls_by_conference"][conference])


def role(fx: dict[str, Any], conf: int = 0, **fields: Any) -> dict[str, Any]:
    conference = fx["telnyx"]["conference_ids"][conf]
    body = {
        "command_id": cid("role"),
        "type": "conference.supervisor_role",
        "conference_id": conference,
        "call_control_id": calls_in(fx, conference)[0],
        "supervisor_role": "monitor",
    }
    body.update(fields)
    return body


def case(
    label: str,
    body: dict[str, Any] | bytes,
    status: str,
    *,
    code: str | None = None,
    attempts: int = 0,
    routing_key: str = "conference.update",
    duplicate: bool = False,
) -> Case:
    if isinstance(body, dict):
        return Case(
            label,
            orjson.dumps(body),
            str(body.get("type", routing_key)),
            status,
            code,
            attempts,
            duplicate,
        )
    return Case(label, body, routing_key, status, code, attempts, duplicate)


async def exchange_all(client: PikaClient, cases: list[Case]) -> dict[str, list[dict[str, Any]]]:
    for item in cases:
        await asyncio.to_thread(client.publish, item.body, item.routing_key, item.label)
    return await asyncio.to_thread(client.results, len(cases))


def check(cases: list[Case], results: dict[str, list[dict[str, Any]]]) -> None:
    for item in cases:
        events = results.get(item.label, [])
        assert len(events) == 1, f"{item.label}: {len(events)} result events"
        event = events[0]
        got = (
            event["status"],
            (event["error"] or {}).get("code"),
            event["attempts"],
            event["duplicate"],
        )
        assert got == (item.status, item.code, item.attempts, item.duplicate), (
            f"{item.label}: {event}"
        )


async def assert_dead_lettered(bus: Bus, cases: list[Case]) -> None:
    failures = [c for c in cases if c.status != "succeeded"]
    letters = await bus.dead_letters(len(failures))
    by_label = {m.correlation_id: m for m in letters}
    for item in failures:
        headers = by_label[item.label].headers
        assert headers["x-error-code"] == item.code, item.label
        assert headers["x-attempts"] == item.attempts
        assert headers["x-original-routing-key"] == item.routing_key
        assert {"x-error-message", "x-failed-at"} <= set(headers)
        assert by_label[item.label].body == item.body


async def test_every_contract_case_gets_one_result_with_the_right_status(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """Each CONTRACT case: one result event; non-successes dead-lettered; nothing left unacked."""
    fx = fixtures
    vconf, tconf = fx["vinix"]["conference_ids"], fx["telnyx"]["conference_ids"]
    await admin.fault(
        provider="vinix",
        status=503,
        count=2,
        path_prefix=f"/v2/accounts/{fx['vinix']['account_id']}/conferences/{vconf[1]}",
    )
    await admin.fault(provider="telnyx", status=503, path_prefix=f"/v2/conferences/{tconf[2]}/")
    past = (datetime.now(UTC) - timedelta(seconds=5)).isoformat()
    done, conflicting = update(fx), None
    cases = [
        case("replace", done, "succeeded", attempts=1),
        case(
            "merge",
            update(fx, conf=2, mode="merge", conference={"play_name": True, "flags": None}),
            "succeeded",
            attempts=1,
        ),
        case(
            "role",
            role(
                fx, supervisor_role="whisper", whisper_call_control_ids=calls_in(fx, tconf[0])[1:]
            ),
            "succeeded",
            attempts=1,
        ),
        case("invalid-json", b'{"command_id": "x", "type": ', "rejected", code="invalid_json"),
        case(
            "schema",
            update(fx, conference={"profile": {"interval": 1}}),
            "rejected",
            code="invalid_command",
        ),
        case("unknown-type", update(fx, type="conference.delete"), "rejected", code="unknown_type"),
        case(
            "oversize",
            orjson.dumps(update(fx, conference={"name": "x", "pad": "y" * 300_000})),
            "rejected",
            code="too_large",
        ),
        case("expired", update(fx, expires_at=past), "expired", code="expired"),
        case("503-twice", update(fx, conf=1), "succeeded", attempts=3),
        case(
            "404",
            update(fx, conference_id="e" * 32),
            "rejected",
            code="provider_not_found",
            attempts=1,
        ),
        case(
            "422",
            role(fx, call_control_id="v3:no-such-call"),
            "rejected",
            code="provider_rejected",
            attempts=1,
        ),
        case("down", role(fx, conf=2), "failed", code="provider_unavailable", attempts=3),
    ]
    async with worker_factory() as (_, bus):
        client = await asyncio.to_thread(PikaClient, bus.settings.commands_exchange)
        try:
            check(cases, await exchange_all(client, cases))
            conflicting = {**done, "conference": {"name": "Other"}}
            later = [
                case("duplicate", done, "succeeded", duplicate=True),
                case("conflict", conflicting, "rejected", code="idempotency_conflict"),
            ]
            check(later, await exchange_all(client, later))
            await assert_dead_lettered(bus, cases + later)
            # Still consuming afterwards.
            after = [case("after", role(fx, conf=1), "succeeded", attempts=1)]
            check(after, await exchange_all(client, after))
        finally:
            await asyncio.to_thread(client.close)
        assert await settled_command_counts(bus.settings) == (0, 0)


async def test_rate_limited_answer_is_retried_after_retry_after(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """A 429 with Retry-After: 1 is retried no sooner than a second later, then succeeds."""
    await admin.fault(provider="telnyx", status=429, count=1, retry_after_s=1)
    body = role(fixtures)
    async with worker_factory() as (_, bus):
        client = await asyncio.to_thread(PikaClient, bus.settings.commands_exchange)
        try:
            results = await exchange_all(client, [case("429", body, "succeeded", attempts=2)])
        finally:
            await asyncio.to_thread(client.close)
    event = results["429"][0]
    assert (event["status"], event["attempts"]) == ("succeeded", 2)
    calls = [r for r in await admin.requests() if r["provider"] == "telnyx"]
    assert [r["status"] for r in calls] == [429, 200]
    assert calls[1]["at"] - calls[0]["at"] >= 0.95


async def test_concurrent_duplicates_call_the_provider_once(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """Two deliveries of one command in flight together: one provider call, one duplicate answer."""
    await admin.fault(provider="telnyx", latency_ms=300, count=1)
    body = role(fixtures)
    async with worker_factory() as (_, bus):
        client = await asyncio.to_thread(PikaClient, bus.settings.commands_exchange)
        try:
            pair = [
                case("first", body, "succeeded", attempts=1),
                case("second", body, "succeeded", attempts=1),
            ]
            results = await exchange_all(client, pair)
        finally:
            await asyncio.to_thread(client.close)
    events = results["first"] + results["second"]
    assert sorted(e["duplicate"] for e in events) == [False, True]
    calls = [r for r in await admin.requests() if r["provider"] == "telnyx"]
    assert len(calls) == 1


async def test_a_command_without_correlation_id_gets_its_command_id_back(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """CONTRACT: the result's ``correlation_id`` is the command's, else its ``command_id``; also
    after the intake routed it to a partition and after a retry through a delay tier, and the
    dead letter of one that failed carries none it did not have (its timestamp is the intake's,
    as a command sent without one gets on its way to a partition: README, metrics)."""
    conference = fixtures["telnyx"]["conference_ids"][1]
    await admin.fault(
        provider="telnyx", status=503, count=1, path_prefix=f"/v2/conferences/{conference}/"
    )
    plain, retried = role(fixtures), role(fixtures, conf=1)
    rejected = role(fixtures, call_control_id="v3:none")
    async with worker_factory() as (_, bus):
        assert bus.settings.partitions > 0
        for body in (plain, retried, rejected):
            await bus.publish(body)
        results = await take(bus.results, 3, 30.0)
        letters = await bus.dead_letters(1)
    by_id = {orjson.loads(m.body)["command_id"]: m for m in results}
    assert {k: m.correlation_id for k, m in by_id.items()} == {k: k for k in by_id}
    assert orjson.loads(by_id[retried["command_id"]].body)["attempts"] == 2
    assert set(by_id) == {plain["command_id"], retried["command_id"], rejected["command_id"]}
    assert letters[0].correlation_id is None
    assert letters[0].timestamp is not None
