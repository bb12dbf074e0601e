"""``conference-worker dlq`` against the real broker: dead letters made by a running worker and by
RabbitMQ itself are listed, shown, replayed (once, even when replayed twice) and purged; 5,000 are
replayed through the CLI at a set rate, interrupted with SIGINT and resumed without a loss or a
duplicate.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import struct
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
import pamqp.encode
import pytest

from tests.integration.conftest import (
    AMQP_URL,
    Admin,
    Bus,
    WorkerFactory,
    settled_counts,
    worker_settings,
)
from worker.app import topology
from worker.operators import dlq
from worker.operators.dlq_render import Target, list_letters, target_from
from worker.settings import Settings

pytestmark = pytest.mark.integration


@dataclass
class Cli:
    """Runs ``python -m worker dlq ...`` in a subprocess on the test's topology."""

    settings: Settings
    started: list[asyncio.subprocess.Process] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)  # e.g. CW_DEDUP_URL

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CW_")}
        env.update(
            {
                "CW_AMQP_URL": AMQP_URL,
                "CW_COMMANDS_EXCHANGE": self.settings.commands_exchange,
                "CW_DEAD_QUEUE": self.settings.dead_queue,
                "COLUMNS": "160",
                **self.extra_env,
            }
        )
        return env

    async def start(self, *args: str) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "dlq",
            *args,
            env=self.env(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self.started.append(process)
        return process

    async def __call__(self, *args: str, answer: str = "") -> tuple[int, str, str]:
        process = await self.start(*args)
        out, err = await asyncio.wait_for(process.communicate(answer.encode()), 60)
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()


@pytest.fixture
async def cli(prefix: str) -> AsyncIterator[Cli]:
    """The dlq CLI on the test's topology; a process still running at the end is killed."""
    runner = Cli(worker_settings(prefix))
    yield runner
    for process in runner.started:
        if process.returncode is None:
            process.kill()
            await process.wait()


class Quiet:
    """A progress sink for replays driven from the test itself."""

    def start(self, total: int) -> None:
        pass

    def advance(self) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture
async def own_topology(prefix: str) -> AsyncIterator[Settings]:
    """The test's topology declared without a worker (delivery limit 1); deleted afterwards."""
    settings = worker_settings(prefix, delivery_limit=1)
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        await topology.declare(channel, settings.topology())
        yield settings
        await topology.delete(channel, settings.topology())


def role(fixtures: dict[str, Any], command_id: str, spread: int = 0) -> dict[str, Any]:
    """A supervisor_role command on the ``spread``-th (conference, call) pair of the sandbox
    (the worker runs the commands of one pair one at a time, different pairs concurrently)."""
    calls = fixtures["telnyx"]["calls_by_conference"]
    pairs = [(conference, call) for conference in sorted(calls) for call in calls[conference]]
    conference, call = pairs[spread % len(pairs)]
    return {
        "command_id": command_id,
        "type": "conference.supervisor_role",
        "conference_id": conference,
        "call_control_id": call,
        "supervisor_role": "monitor",
    }


def dead_message(
    body: dict[str, Any], code: str, failed_at: datetime | None = None
) -> aio_pika.Message:
    """A dead letter as the worker writes it (headers of consumer._dead_letter)."""
    return aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        correlation_id=body["command_id"],
        headers={
            "x-error-code": code,
            "x-error-message": "injected by the test",
            "x-attempts": 1,
            "x-original-routing-key": body["type"],
            "x-failed-at": (failed_at or datetime.now(UTC)).isoformat(),
        },
    )


async def put_dead(settings: Settings, messages: list[tuple[aio_pika.Message, str]]) -> None:
    """Publish dead letters straight into the dead-letter exchange, confirmed, 500 at a time."""
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.dead_exchange)
        for start in range(0, len(messages), 500):
            batch = messages[start : start + 500]
            await asyncio.gather(*(exchange.publish(m, key) for m, key in batch))


async def ready_count(settings: Settings, expected: int, timeout_s: float = 10.0) -> int:
    """The dead-letter queue's ready count, once it reaches ``expected`` (or the timeout)."""
    count = -1
    deadline = time.monotonic() + timeout_s
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        while time.monotonic() < deadline:
            queue = await channel.declare_queue(settings.dead_queue, passive=True)
            count = queue.declaration_result.message_count or 0
            if count == expected:
                break
            await asyncio.sleep(0.1)
    return count


async def replay_in_process(target: Target, flt: dlq.Filter) -> dlq.ReplayReport:
    async with await aio_pika.connect(target.amqp_url) as connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return await dlq.replay(
            channel,
            target.dead_queue,
            target.commands_exchange,
            flt,
            stop=asyncio.Event(),
            progress=Quiet(),
        )


async def test_list_and_show_dead_letters_of_a_running_worker(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], cli: Cli
) -> None:
    """Invalid JSON, an invalid command and a provider 404 are listed and shown; none is lost."""
    run = uuid.uuid4().hex[:8]
    missing = {**role(fixtures, f"404-{run}"), "conference_id": f"no-such-{run}"}
    invalid = {**role(fixtures, f"bad-{run}"), "supervisor_role": "shout"}
    async with worker_factory() as (_, bus):
        await bus.publish(b'{"command_id": "x", "type": ', "conference.update")
        await bus.publish(invalid)
        await bus.publish(missing)
        await bus.events(3)
        assert await ready_count(bus.settings, 3) == 3
        code, out, _ = await cli("list", "--json")
        assert code == 0
        rows = {row["code"]: row for row in map(orjson.loads, out.splitlines())}
        assert set(rows) == {"invalid_json", "invalid_command", "provider_not_found"}
        assert rows["invalid_json"]["command_id"] is None
        assert rows["provider_not_found"]["command_id"] == f"404-{run}"
        assert rows["provider_not_found"]["attempts"] == 1
        assert rows["invalid_command"]["routing_key"] == "conference.supervisor_role"
        code, out, _ = await cli("list", "--code", "provider_not_found")
        assert code == 0
        assert f"404-{run}" in out
        assert "1 of 3 dead letter(s)" in out
        assert f"bad-{run}" not in out
        code, out, _ = await cli("show", f"404-{run}")
        assert code == 0
        assert f'"conference_id": "no-such-{run}"' in out
        assert "x-error-message" in out
        code, _, err = await cli("show", "nobody")
        assert code == 1
        assert "no dead letter with command id" in err
        assert await ready_count(bus.settings, 3) == 3


async def test_broker_dead_letters_are_listed_and_replayed(
    own_topology: Settings, worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """A command RabbitMQ dead-lettered at its delivery limit is listed so, replays, succeeds."""
    settings, command_id = own_topology, f"limit-{uuid.uuid4().hex[:8]}"
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.commands_exchange)
        body = orjson.dumps(role(fixtures, command_id))
        await exchange.publish(aio_pika.Message(body), "conference.supervisor_role")
        # A consumer that always gives it back (basic.get is refused on a single-active-consumer
        # queue): RabbitMQ dead-letters it at the delivery limit.
        queue = await channel.get_queue(settings.topology().intake_queue)

        async def give_back(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            await message.reject(requeue=True)

        tag = await queue.consume(give_back)
        assert await ready_count(settings, 1) == 1
        await queue.cancel(tag)
    letters, total = await list_letters(target_from(settings), dlq.Filter(), None)
    assert total == 1
    assert (letters[0].command_id, letters[0].code) == (command_id, "delivery_limit")
    assert letters[0].routing_key == "conference.supervisor_role"
    assert letters[0].failed_at is not None
    assert datetime.now(UTC) - letters[0].failed_at < timedelta(minutes=1)
    async with worker_factory(delivery_limit=1) as (_, bus):
        flt = dlq.Filter(code="delivery_limit")
        report = await replay_in_process(target_from(settings), flt)
        assert (report.matched, report.replayed) == (1, 1)
        [event] = await bus.events(1)
    assert (event["command_id"], event["status"], event["duplicate"]) == (
        command_id,
        "succeeded",
        False,
    )
    assert await ready_count(settings, 0) == 0


async def test_replay_carries_out_a_failed_command_once_even_when_replayed_twice(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """Failed, replayed once fixed: succeeds; the same dead letter replayed again: a duplicate."""
    command = role(fixtures, f"down-{uuid.uuid4().hex[:8]}")
    await admin.fault(provider="telnyx", status=503)
    async with worker_factory() as (_, bus):
        target = target_from(bus.settings)
        await bus.publish(command)
        [failed] = await bus.events(1)
        assert (failed["status"], failed["error"]["code"]) == ("failed", "provider_unavailable")
        await admin.call("DELETE", "/__admin/faults")
        assert await ready_count(bus.settings, 1) == 1
        [letter], _ = await list_letters(target, dlq.Filter(), None)
        only = dlq.Filter(ids=frozenset({command["command_id"]}))
        report = await replay_in_process(target, only)
        assert (report.matched, report.replayed, report.remaining) == (1, 1, 0)
        [event] = await bus.events(1)
        assert (event["status"], event["duplicate"], event["attempts"]) == ("succeeded", False, 1)
        # The same dead letter again, as a replay killed between a confirm and its ack leaves it:
        # replaying it once more must not reach Telnyx again.
        again = aio_pika.Message(letter.body, headers=dict(letter.headers), **letter.properties)
        await put_dead(bus.settings, [(again, letter.routing_key)])
        report = await replay_in_process(target, only)
        assert (report.matched, report.replayed) == (1, 1)
        [event] = await bus.events(1)
        assert (event["status"], event["duplicate"]) == ("succeeded", True)
        assert await ready_count(bus.settings, 0) == 0  # duplicates are not dead-lettered
        report = await replay_in_process(target, dlq.Filter())
        assert (report.matched, report.replayed) == (0, 0)
    sent = [
        r["status"]
        for r in await admin.requests()
        if r["provider"] == "telnyx"
        and (r["body"] or {}).get("command_id") == command["command_id"]
    ]
    assert sent.count(200) == 1
    assert set(sent) == {503, 200}


async def test_purge_removes_only_what_matches_after_confirmation(
    own_topology: Settings, fixtures: dict[str, Any], cli: Cli
) -> None:
    """purge asks first (no → nothing removed); --yes with filters removes only the matches."""
    settings, run = own_topology, uuid.uuid4().hex[:8]
    old = datetime.now(UTC) - timedelta(hours=3)
    letters = [
        (dead_message(role(fixtures, f"{run}-nf-old"), "provider_not_found", old), "x"),
        (dead_message(role(fixtures, f"{run}-nf-new"), "provider_not_found"), "x"),
        (dead_message(role(fixtures, f"{run}-exp-old"), "expired", old), "x"),
        (dead_message(role(fixtures, f"{run}-exp-new"), "expired"), "x"),
    ]
    await put_dead(settings, letters)
    assert await ready_count(settings, 4) == 4
    code, _, err = await cli("purge", "--code", "expired", answer="n\n")
    assert code == 1
    assert "Remove 2 dead letter(s) (expired: 2) for good?" in err
    assert "nothing was purged" in err
    code, out, _ = await cli("purge", "--older-than", "1h", "--code", "expired", "--yes")
    assert (code, out.strip()) == (0, "purged 1 dead letter(s)")
    code, out, _ = await cli("purge", "--newer-than", "1h", answer="y\n")
    assert (code, out.strip()) == (0, "purged 2 dead letter(s)")
    remaining, total = await list_letters(target_from(settings), dlq.Filter(), None)
    assert [letter.command_id for letter in remaining] == [f"{run}-nf-old"]
    assert total == 1


def raw_bytes_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pamqp write bytes header values as raw long strings, as a foreign client may."""
    encode = pamqp.encode.encode_table_value

    def encode_raw(value: Any) -> bytes:
        if isinstance(value, bytes):
            return b"S" + struct.pack(">I", len(value)) + value
        return encode(value)

    monkeypatch.setattr(pamqp.encode, "encode_table_value", encode_raw)


async def test_a_dead_letter_with_a_header_that_is_not_utf8_is_replayed(
    own_topology: Settings, fixtures: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header value that is not UTF-8 survives decoding (amqp_hardening) and is replayed."""
    settings, run = own_topology, uuid.uuid4().hex[:8]
    odd = dead_message(role(fixtures, f"{run}-odd"), "expired")
    odd.headers["x-odd"] = b"\xff\xfe"
    raw_bytes_headers(monkeypatch)
    await put_dead(
        settings,
        [
            (dead_message(role(fixtures, f"{run}-a"), "expired"), "x"),
            (odd, "x"),
            (dead_message(role(fixtures, f"{run}-b"), "expired"), "x"),
        ],
    )
    monkeypatch.undo()
    assert await ready_count(settings, 3) == 3
    report = await replay_in_process(target_from(settings), dlq.Filter())
    assert (report.matched, report.replayed, report.refused) == (3, 3, 0)
    left, total = await list_letters(target_from(settings), dlq.Filter(), None)
    assert (left, total) == ([], 0)


async def collect_events(bus: Bus, ids: set[str], timeout_s: float) -> list[dict[str, Any]]:
    """Result events for ``ids`` until each has one, then 0.5 s more to catch any extra."""
    events: list[dict[str, Any]] = []
    complete = asyncio.Event()

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        events.append(orjson.loads(message.body))
        if {e["command_id"] for e in events} >= ids:
            complete.set()

    tag = await bus.results.consume(take, no_ack=True)
    try:
        await asyncio.wait_for(complete.wait(), timeout_s)
        await asyncio.sleep(0.5)
    except TimeoutError:
        missing = ids - {e["command_id"] for e in events}
        statuses = Counter((e["status"], e["duplicate"]) for e in events)
        raise AssertionError(f"{len(missing)} without a result; got {statuses}") from None
    finally:
        await bus.results.cancel(tag)
    return events


REPORT = re.compile(r"replayed (\d+) of (\d+) in ([\d.]+) s \(([\d,]+)/s\); (\d+) remain")


async def test_5000_dead_letters_replayed_at_500_per_s_interrupted_and_resumed(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin, cli: Cli
) -> None:
    """CLI replay at 500/s, SIGINT, resume: each command succeeds exactly once; the DLQ empties."""
    run = uuid.uuid4().hex[:8]
    ids = [f"acc-{run}-{n}" for n in range(5000)]
    async with worker_factory() as (_, bus):
        await put_dead(
            bus.settings,
            [
                (dead_message(role(fixtures, i, n), "provider_unavailable"), "x")
                for n, i in enumerate(ids)
            ],
        )
        assert await ready_count(bus.settings, 5000) == 5000
        first = await cli.start("replay", "--rate", "500/s")
        await asyncio.sleep(5)
        first.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(first.communicate(), 30)
        assert first.returncode == 130, err.decode()
        assert "interrupted: run the same command again to resume" in err.decode()
        assert "replaying" in err.decode()
        assert "/5000" in err.decode()
        done = REPORT.search(out.decode())
        assert done is not None, out.decode()
        first_replayed = int(done.group(1))
        assert 0 < first_replayed < 5000
        assert int(done.group(5)) == 5000 - first_replayed
        code, out2, err2 = await cli("replay", "--rate", "500/s")
        assert code == 0, err2
        rest = REPORT.search(out2)
        assert rest is not None, out2
        assert (int(rest.group(1)), int(rest.group(2)), int(rest.group(5))) == (
            5000 - first_replayed,
            5000 - first_replayed,
            0,
        )
        assert int(rest.group(4).replace(",", "")) <= 520, out2  # the token bucket holds
        events = await collect_events(bus, set(ids), timeout_s=45)
    per_id = Counter(e["command_id"] for e in events)
    assert set(per_id) == set(ids)
    assert max(per_id.values()) == 1
    assert {(e["status"], e["duplicate"]) for e in events} == {("succeeded", False)}
    sent = Counter(
        (r["body"] or {}).get("command_id")
        for r in await admin.requests()
        if r["provider"] == "telnyx"
    )
    assert all(sent[i] == 1 for i in ids)
    assert await settled_counts(bus.settings.dead_queue) == (0, 0)
    print(f"replay rates: {done.group(4)}/s then {rest.group(4)}/s")
