"""Hostile input against a real worker, the real broker and the sandbox.

Ids that try to change the provider URL, and malicious or missing AMQP properties: every message
gets exactly one result event, the worker keeps consuming, and every request the sandbox saw has
one of the legitimate shapes with the ids exactly in their (percent-encoded) segments.

Known bugs (see ``tests/unit/test_hostile_input.py``) are pinned by ``xfail(strict=True)`` tests
at the end: each passes while its bug is there and fails once the bug is fixed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
import json
import logging
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aio_pika
import orjson
import pika
import pytest
from aio_pika.exceptions import ChannelPreconditionFailed

from tests.integration.conftest import (
    AMQP_URL,
    Admin,
    Bus,
    WorkerFactory,
    queue_counts,
    settled_command_counts,
)
from worker.contract import codec
from worker.errors import InvalidMessage

pytestmark = pytest.mark.integration

LIMIT = 256 * 1024
SETTLE_S = 1.5  # how long to keep listening for a second (wrong) event after the first

TELNYX_IDS = [
    "../",
    "..",
    "..%2F",
    "%2F",
    "..%2F..%2Fapi_auth",
    "?x=1",
    "a?x=1#frag",
    "#frag",
    "%00",
    "\x00",
    "a\r\nX-Injected: 1",
    "ünïcödé-🙂",
    "...",
    "%2e%2e",
    " ",
    "\\..\\",
    "a;b=c&d",
    "\u202e\u2028",
    "x" * 128,
]


def label() -> str:
    return f"h-{uuid.uuid4().hex[:10]}"


def role(fx: dict[str, Any], command_id: str, **fields: Any) -> dict[str, Any]:
    conference = fx["telnyx"]["conference_ids"][0]
    body = {
        "command_id": command_id,
        "type": "conference.supervisor_role",
        "conference_id": conference,
        "call_control_id": fx["telnyx"]["calls_by_conference"][conference][0],
        "supervisor_role": "monitor",
    }
    body.update(fields)
    return body


def update(fx: dict[str, Any], command_id: str, **fields: Any) -> dict[str, Any]:
    body = {
        "command_id": command_id,
        "type": "conference.update",
        "account_id": fx["vinix"]["account_id"],
        "conference_id": fx["vinix"]["conference_ids"][0],
        "conference": {"name": "Hostile bridge"},
    }
    body.update(fields)
    return body


def rejection(body: bytes) -> str | None:
    """The error code decode gives ``body``, or None when it is a valid command."""
    try:
        codec.decode(body, LIMIT)
    except InvalidMessage as exc:
        return exc.code
    return None


async def send(bus: Bus, body: bytes, routing_key: str, **props: Any) -> None:
    """Publish with exactly the given properties (none by default), confirmed by the broker."""
    exchange = await bus.channel.get_exchange(bus.settings.commands_exchange)
    await exchange.publish(aio_pika.Message(body, **props), routing_key)


async def events_by_id(bus: Bus, ids: set[str], timeout_s: float = 30.0) -> dict[str, list[Any]]:
    """Result events until every id has one, then SETTLE_S more to catch any extra event."""
    got: dict[str, list[Any]] = {}
    async with asyncio.timeout(timeout_s):
        while not ids <= got.keys():
            for event in await bus.events(1):
                got.setdefault(str(event["command_id"]), []).append(event)
    await asyncio.sleep(SETTLE_S)
    while (message := await bus.results.get(fail=False)) is not None:
        await message.ack()
        event = orjson.loads(message.body)
        got.setdefault(str(event["command_id"]), []).append(event)
    return got


def assert_legitimate_paths(
    requests: list[dict[str, Any]], fx: dict[str, Any], telnyx_ids: set[str]
) -> None:
    """Every provider request has a legitimate shape; ids are exactly one encoded segment."""
    account, vinix_confs = fx["vinix"]["account_id"], set(fx["vinix"]["conference_ids"])
    for request in requests:
        raw = request["path"].split("/")
        decoded = [unquote(segment) for segment in raw]
        assert all(segment == quote(d, safe="") for segment, d in zip(raw, decoded, strict=True)), (
            request["path"]
        )
        if request["provider"] == "telnyx":
            assert len(raw) == 6, request["path"]
            assert decoded[:3] == ["", "v2", "conferences"], request["path"]
            assert decoded[4:] == ["actions", "update"], request["path"]
            assert decoded[3] in telnyx_ids, request["path"]
        elif decoded == ["", "v2", "api_auth"]:
            assert request["method"] == "PUT"
        else:
            assert decoded[:3] == ["", "v2", "accounts"], request["path"]
            assert len(raw) == 6, request["path"]
            assert (decoded[3], decoded[4]) == (account, "conferences"), request["path"]
            assert decoded[5] in vinix_confs, request["path"]


async def test_path_injection_never_alters_the_provider_request_path(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """Ids with ../, %2F, ?, #, %00, NUL, CR/LF, unicode: one event each, paths intact."""
    fx = fixtures
    cases: dict[str, bytes] = {}
    for hostile in TELNYX_IDS:
        cid = label()
        cases[cid] = orjson.dumps(role(fx, cid, conference_id=hostile))
    for hostile in ("../../v2/api_auth", "%2F..%2F", "x\r\ny", "?x=1", "\u0000"):
        cid = label()
        cases[cid] = orjson.dumps(role(fx, cid, call_control_id=hostile))
    real = fx["vinix"]["conference_ids"][0]
    for field, hostile in [
        ("account_id", "../../v2/api_auth"),
        ("account_id", fx["vinix"]["account_id"] + "/.."),
        ("conference_id", real + "%2F.."),
        ("conference_id", real + "?x=1"),
        ("conference_id", real + "#f"),
        ("conference_id", "..%2F" * 6 + "aa"),
        ("conference_id", real[:-1] + "\x00"),
    ]:
        cid = label()
        cases[cid] = orjson.dumps(update(fx, cid, **{field: hostile}))
    good_update, good_role = label(), label()
    cases[good_update] = orjson.dumps(update(fx, good_update))

    async with worker_factory() as (_, bus):
        for body in cases.values():
            await send(bus, body, str(orjson.loads(body)["type"]), content_type="application/json")
        got = await events_by_id(bus, set(cases))
        for cid, body in cases.items():
            assert len(got.get(cid, [])) == 1, f"{cid}: {got.get(cid)}"
            event, code = got[cid][0], rejection(body)
            if code is not None:
                assert (event["status"], event["error"]["code"], event["attempts"]) == (
                    "rejected",
                    code,
                    0,
                ), body
            elif cid == good_update:
                assert event["status"] == "succeeded", event
            else:  # a valid but unknown Telnyx conference, or a call not in the conference
                assert event["status"] == "rejected", event
                assert event["error"]["code"] in {"provider_not_found", "provider_rejected"}
        # Still consuming.
        await send(bus, orjson.dumps(role(fx, good_role)), "conference.supervisor_role")
        assert (await events_by_id(bus, {good_role}))[good_role][0]["status"] == "succeeded"
        assert await settled_command_counts(bus.settings) == (0, 0)

    valid_telnyx = {
        orjson.loads(body)["conference_id"]
        for body in cases.values()
        if rejection(body) is None and b"supervisor_role" in body
    }
    requests = await admin.requests()
    assert_legitimate_paths(requests, fx, valid_telnyx | {fx["telnyx"]["conference_ids"][0]})
    telnyx_paths = sorted(r["path"] for r in requests if r["provider"] == "telnyx")
    expected = sorted(
        f"/v2/conferences/{quote(orjson.loads(b)['conference_id'], safe='')}/actions/update"
        for b in [*cases.values(), orjson.dumps(role(fx, good_role))]
        if rejection(b) is None and b"supervisor_role" in b
    )
    assert telnyx_paths == expected
    # The literal id "..%2F" travels as "..%252F": its "%" is encoded, so it is never a "/".
    assert {
        "/v2/conferences/..%252F/actions/update",
        "/v2/conferences/%3Fx%3D1/actions/update",
        "/v2/conferences/%23frag/actions/update",
        "/v2/conferences/%2500/actions/update",
        "/v2/conferences/.../actions/update",
    } <= set(telnyx_paths)


def deep_headers(depth: int) -> dict[str, Any]:
    table: dict[str, Any] = {"leaf": True}
    for _ in range(depth):
        table = {"n": table, "list": [1, "two", None]}
    return table


async def test_malicious_and_missing_amqp_properties_are_harmless(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """reply_to at our own queues, huge ids, odd headers, no properties: one event each."""
    fx = fixtures
    async with worker_factory() as (_, bus):
        settings = bus.settings
        topology = settings.topology()
        # The intake, a partition (or the single command queue), the dead letters, a delay tier.
        own = [topology.intake_queue, topology.work_queues()[0], settings.dead_queue]
        own.append(topology.delay_queue(topology.delay_tiers_s[0]))
        cases: dict[str, tuple[bytes, str, dict[str, Any]]] = {}

        def add(body_of: Any, props: dict[str, Any], valid: bool = True) -> None:
            cid = label()
            body = orjson.dumps(body_of(fx, cid))
            if not valid:
                body = orjson.dumps({**orjson.loads(body), "supervisor_role": "shout"})
            cases[cid] = (body, str(orjson.loads(body)["type"]), props)

        for queue in own:
            add(role, {"reply_to": queue})
            add(role, {"reply_to": queue}, valid=False)
        add(role, {"reply_to": "q" * 255})
        add(role, {"reply_to": "amq.rabbitmq.reply-to.forged"})
        add(role, {"reply_to": "amq.rabbitmq.reply-to.g1h2AA"}, valid=False)
        add(role, {"correlation_id": "é" * 127 + "x"})
        add(role, {"correlation_id": "c" * 255, "message_id": "m" * 255, "type": "t" * 255})
        add(
            role,
            {
                "headers": {
                    "deep": deep_headers(40),
                    "decimal": decimal.Decimal("3.14"),
                    "when": dt.datetime(2030, 1, 1, tzinfo=dt.UTC),
                    "bytes": bytearray(b"\x00\xff"),
                    "none": None,
                    "x-error-code": "forged",
                    "traceparent": "garbage",
                    "cw-routing-key": 7,
                }
            },
            valid=False,
        )
        add(update, {"content_type": "text/plain", "content_encoding": "gzip"})
        add(update, {"content_type": "application/xml", "app_id": "x" * 255, "priority": 255})
        add(role, {})  # no properties at all
        add(role, {}, valid=False)

        for body, key, props in cases.values():
            await send(bus, body, key, **props)

        # Direct reply-to: the publisher gets its answer on its own channel.
        direct = label()
        replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        reply_channel = await bus.connection.channel()
        pseudo = await reply_channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await pseudo.consume(replies.put, no_ack=True)
        exchange = await reply_channel.get_exchange(settings.commands_exchange)
        await exchange.publish(
            aio_pika.Message(orjson.dumps(role(fx, direct)), reply_to="amq.rabbitmq.reply-to"),
            "conference.supervisor_role",
        )

        # No properties at all, from a client that sends none (pika, properties=None).
        bare = label()
        await asyncio.to_thread(
            publish_with_pika,
            settings.commands_exchange,
            "conference.supervisor_role",
            orjson.dumps(role(fx, bare)),
            None,
        )

        got = await events_by_id(bus, {*cases, direct, bare})
        for cid in (*cases, direct, bare):
            assert len(got.get(cid, [])) == 1, f"{cid} {cases.get(cid)}: {got.get(cid)}"
        for cid, (body, _, props) in cases.items():
            expected = "succeeded" if rejection(body) is None else "rejected"
            assert got[cid][0]["status"] == expected, (props, got[cid])
        async with asyncio.timeout(10):
            answer = await replies.get()
        assert orjson.loads(answer.body)["command_id"] == direct
        await reply_channel.close()

        # reply_to naming our own queues put nothing in them: only the expected dead letters.
        invalid = sum(1 for body, _, _ in cases.values() if rejection(body) is not None)
        letters = await bus.dead_letters(invalid)
        assert all(m.headers.get("x-error-code") == "invalid_command" for m in letters)
        assert await settled_command_counts(settings) == (0, 0)
        assert queue_counts(settings.dead_queue) == (0, 0)
        assert await bus.results.get(fail=False) is None, "an extra result event arrived late"
        for queue in own[3:]:
            assert queue_counts(queue) == (0, 0)
        forged: dict[str, Any] = next(
            dict(m.headers) for m in letters if "deep" in (m.headers or {})
        )
        assert forged["x-error-code"] == "invalid_command"
        assert forged["deep"]["n"]["n"]["list"] == [1, "two", None]

    requests = await admin.requests()
    assert_legitimate_paths(requests, fx, {fx["telnyx"]["conference_ids"][0]})


def publish_with_pika(exchange: str, key: str, body: bytes, props: Any) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, key, body, props)
    finally:
        connection.close()


async def test_forged_user_id_is_refused_by_the_broker(
    worker_factory: WorkerFactory, fixtures: dict[str, Any]
) -> None:
    """RabbitMQ refuses a user_id other than the connection's user: the allow-list's premise."""
    async with worker_factory() as (_, bus):
        forged = label()
        channel = await bus.connection.channel()
        exchange = await channel.get_exchange(bus.settings.commands_exchange)
        with pytest.raises(ChannelPreconditionFailed, match="user_id property set to 'mallory'"):
            await exchange.publish(
                aio_pika.Message(orjson.dumps(role(fixtures, forged)), user_id="mallory"),
                "conference.supervisor_role",
            )
        got = await events_by_id(bus, set(), timeout_s=5)
        assert forged not in got


# --- known bugs: xfail until the lead's fixes land ------------------------------------------------


async def poison_then_normal(
    bus: Bus, fx: dict[str, Any], poison: bytes, props: Any, timeout_s: float
) -> dict[str, list[Any]]:
    """Publish a poison message (with pika: raw properties) and then a normal command."""
    normal = label()
    await asyncio.to_thread(
        publish_with_pika,
        bus.settings.commands_exchange,
        "conference.supervisor_role",
        poison,
        props,
    )
    await send(bus, orjson.dumps(role(fx, normal)), "conference.supervisor_role")
    got = await events_by_id(bus, {normal}, timeout_s=timeout_s)
    assert got[normal][0]["status"] == "succeeded"
    return got


@pytest.mark.parametrize(
    "poison",
    [
        b'{"command_id": "p-\\ud800", "type": "conference.delete"}',
        orjson.dumps({"command_id": "é" * 128, "type": "conference.delete"}),
    ],
    ids=["BUG-1-surrogate", "BUG-2-long-correlation-id"],
)
async def test_poison_bodies_get_one_event_and_leave_no_unacked_message(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], poison: bytes
) -> None:
    """A message whose answer cannot be encoded still gets an event and is not left unacked."""
    async with worker_factory() as (_, bus):
        got = await poison_then_normal(bus, fixtures, poison, None, timeout_s=8)
        assert len(got) == 2, got
        assert await settled_command_counts(bus.settings) == (0, 0)


async def test_bug3_huge_integer_gets_a_rejection_not_a_crash_loop(
    worker_factory: WorkerFactory, fixtures: dict[str, Any]
) -> None:
    """An integer beyond 64 bits in the conference ends rejected with one result event."""
    cid = label()
    body = orjson.dumps(update(fixtures, cid)).replace(
        b'"Hostile bridge"', b'"x","max_participants":99999999999999999999'
    )
    async with worker_factory() as (_, bus):
        await send(bus, body, "conference.update")
        got = await events_by_id(bus, {cid}, timeout_s=8)
        assert got[cid][0]["error"]["code"] == "invalid_command"


@pytest.mark.parametrize(
    "props",
    [
        pika.BasicProperties(timestamp=2**64 - 1),
        pika.BasicProperties(correlation_id=b"\xff\xfe"),
    ],
    ids=["timestamp-past-9999", "correlation-id-not-utf8"],
)
async def test_bug4_unreadable_properties_do_not_kill_the_connection(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], props: Any
) -> None:
    """A property pamqp cannot decode must not take the worker's connection down in a loop."""
    async with worker_factory() as (_, bus):
        await poison_then_normal(bus, fixtures, orjson.dumps(role(fixtures, label())), props, 8)


class NotUtf8(str):
    """Text that pika writes as a long string ('S') of bytes that are not UTF-8, as some clients
    (e.g. Java's LongString) can."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"\xff\xfe"


async def test_bug6_header_that_is_not_utf8_is_dead_lettered(
    worker_factory: WorkerFactory, fixtures: dict[str, Any]
) -> None:
    """A header value that is not UTF-8 text still lets an invalid command be dead-lettered."""
    cid = label()
    body = orjson.dumps(role(fixtures, cid, supervisor_role="shout"))
    async with worker_factory() as (_, bus):
        props = pika.BasicProperties(headers={"blob": NotUtf8("blob")})
        await poison_then_normal(bus, fixtures, body, props, timeout_s=8)
        letters = await bus.dead_letters(1, timeout_s=8)
        assert letters[0].headers["x-error-code"] == "invalid_command"


# --- the publisher allow-list (acceptance: a publisher cannot act on another account) -------------


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


async def test_allowlist_rejects_a_publisher_acting_on_another_account(
    worker_factory: WorkerFactory,
    fixtures: dict[str, Any],
    admin: Admin,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the allow-list on, B cannot change A's account: forbidden, dead-lettered, logged."""
    fx = fixtures
    user_a, user_b, password = f"it-pub-a-{label()}", f"it-pub-b-{label()}", uuid.uuid4().hex
    other_account = "0" * 32
    path = tmp_path / "allow.json"
    path.write_text(
        json.dumps(
            {
                "publishers": {
                    user_a: {"vinix_accounts": [fx["vinix"]["account_id"]]},
                    user_b: {"vinix_accounts": [other_account], "telnyx_conferences": ["*"]},
                }
            }
        ),
        encoding="utf-8",
    )
    for user in (user_a, user_b):
        await asyncio.to_thread(rabbitmqctl, "add_user", user, password)
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", "/", user, "", ".*", "")
    try:
        async with worker_factory(allowlist_file=str(path)) as (_, bus):
            caplog.set_level(logging.INFO)
            ok, stolen, anonymous = label(), label(), label()
            for user, cid in ((user_a, ok), (user_b, stolen)):
                url = f"amqp://{user}:{password}@127.0.0.1:5672/"
                async with await aio_pika.connect(url) as connection:
                    channel = await connection.channel()
                    exchange = await channel.get_exchange(bus.settings.commands_exchange)
                    message = aio_pika.Message(orjson.dumps(update(fx, cid)), user_id=user)
                    await exchange.publish(message, "conference.update")
            await send(bus, orjson.dumps(update(fx, anonymous)), "conference.update")

            got = await events_by_id(bus, {ok, stolen, anonymous})
            assert got[ok][0]["status"] == "succeeded"
            for cid in (stolen, anonymous):
                assert len(got[cid]) == 1
                assert (got[cid][0]["status"], got[cid][0]["error"]["code"]) == (
                    "rejected",
                    "forbidden",
                ), got[cid]
                assert got[cid][0]["attempts"] == 0
            letters = await bus.dead_letters(2)
            assert {m.headers["x-error-code"] for m in letters} == {"forbidden"}
            assert any(user_b in str(record.__dict__) for record in caplog.records), (
                "the refusal is logged with the publisher's user id"
            )
    finally:
        for user in (user_a, user_b):
            await asyncio.to_thread(rabbitmqctl, "delete_user", user)
    conference_calls = [r for r in await admin.requests() if r["provider"] == "vinix"]
    assert [r["method"] for r in conference_calls if "conferences" in r["path"]] == ["POST"]
