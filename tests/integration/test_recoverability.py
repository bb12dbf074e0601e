"""Recoverability against the real broker and sandbox: outages, crashes, ordering, shutdown.

Worker processes run as the CLI runs them (``python -m worker run``) so that SIGKILL and SIGTERM
are real.  Scenario lengths can be shortened for local runs with ``CW_TEST_OUTAGE_S``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.integration.conftest import (
    Admin,
    Broker,
    Processes,
    WorkerFactory,
    settled_command_counts,
    wait_for_workers,
    worker_env,
)
from worker.sandbox import Sandbox

pytestmark = pytest.mark.integration

OUTAGE_S = float(os.environ.get("CW_TEST_OUTAGE_S", "120"))


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    """A sandbox with many targets, as real traffic spreads over many conferences."""
    async with Sandbox(conferences=50) as running:
        yield running


def roles(fx: dict[str, Any], count: int, run: str, **fields: Any) -> list[dict[str, Any]]:
    """``count`` supervisor-role commands spread over every call of the sandbox."""
    calls = [(c, call) for c, ids in fx["telnyx"]["calls_by_conference"].items() for call in ids]
    return [
        {
            "command_id": f"{run}-{n}",
            "type": "conference.supervisor_role",
            "conference_id": calls[n % len(calls)][0],
            "call_control_id": calls[n % len(calls)][1],
            "supervisor_role": ("monitor", "whisper", "barge")[n % 3],
            **fields,
        }
        for n in range(count)
    ]


@pytest.mark.timeout(OUTAGE_S + 300)
async def test_outage_pauses_instead_of_dead_lettering(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """A long provider outage with 1,000 commands queued: few probe calls, nothing dead-lettered
    for the outage, every command without a deadline succeeds after it, 30 s deadlines expire."""
    processes.spawn(worker_env(prefix, sandbox, breaker_failures=5, breaker_cooldown_s=5))
    await wait_for_workers(broker.channel, broker.settings, 1)
    await admin.fault(provider="telnyx", status=503)
    outage_began = time.time()
    run = uuid.uuid4().hex[:8]
    deadline = (datetime.now(UTC) + timedelta(seconds=30)).isoformat()
    plain = roles(sandbox.fixtures, 900, f"{run}-p")
    timed = roles(sandbox.fixtures, 100, f"{run}-t", expires_at=deadline)
    await broker.publish_all(plain + timed)
    await asyncio.sleep(OUTAGE_S)
    await admin.call("DELETE", "/__admin/faults")
    outage_ended = time.time()
    events = await broker.collect(1000, timeout_s=180)

    by_id = {e["command_id"]: e for e in events}
    assert Counter(by_id[c["command_id"]]["status"] for c in plain) == {"succeeded": 900}
    if OUTAGE_S > 30:
        assert Counter(by_id[c["command_id"]]["status"] for c in timed) == {"expired": 100}
    during = [
        r
        for r in await admin.requests()
        if r["provider"] == "telnyx" and outage_began + 3 <= r["at"] < outage_ended
    ]
    assert len(during) <= 8, f"{len(during)} calls reached the provider during the outage"
    dead = await broker.channel.declare_queue(broker.settings.dead_queue, passive=True)
    assert dead.declaration_result.message_count == sum(
        1 for c in timed if by_id[c["command_id"]]["status"] != "succeeded"
    )


async def test_sigkill_during_long_backoff_loses_nothing(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """Commands parked in a broker-held delay survive SIGKILL; after restart they complete with
    their attempt count continuing (2: one failure before the kill, one success after)."""
    env = worker_env(
        prefix,
        sandbox,
        breaker_failures=1000,
        retry_delay_tiers_s="[4,8]",
        retry_inline_max_s=0,
        retry_base_delay_s=3,
    )
    worker = processes.spawn(env)
    await wait_for_workers(broker.channel, broker.settings, 1)
    await admin.fault(provider="telnyx", status=503, count=20)
    commands = roles(sandbox.fixtures, 20, uuid.uuid4().hex[:8])
    await broker.publish_all(commands)
    async with asyncio.timeout(20):
        while sum(r["status"] == 503 for r in await admin.requests()) < 20:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # the deferrals are confirmed and acked
    worker.send_signal(signal.SIGKILL)
    worker.wait(timeout=10)
    delayed = await broker.channel.declare_queue(
        broker.settings.topology().delay_queue(4), passive=True
    )
    assert delayed.declaration_result.message_count == 20
    processes.spawn(env)
    events = await broker.collect(20, timeout_s=120)
    assert Counter((e["status"], e["attempts"]) for e in events) == {("succeeded", 2): 20}
    for seconds in (4, 8):  # this test's own delay tiers
        await broker.channel.queue_delete(broker.settings.topology().delay_queue(seconds))


async def test_alternating_roles_end_on_the_last_one(
    worker_factory: WorkerFactory, fixtures: dict[str, Any], admin: Admin
) -> None:
    """200 alternating role changes for one call while a third of requests fail: the final role
    is the last one published and no older command is applied after a newer one."""
    conference = fixtures["telnyx"]["conference_ids"][0]
    call = fixtures["telnyx"]["calls_by_conference"][conference][0]
    start = datetime(2026, 11, 23, tzinfo=UTC)
    run = uuid.uuid4().hex[:8]
    commands = [
        {
            "command_id": f"{run}-{n:03d}",
            "type": "conference.supervisor_role",
            "conference_id": conference,
            "call_control_id": call,
            "supervisor_role": ("whisper", "monitor")[n % 2],
            "issued_at": (start + timedelta(milliseconds=n)).isoformat(),
        }
        for n in range(200)
    ]
    await admin.fault(provider="telnyx", status=503, probability=1 / 3, seed=7)
    async with worker_factory(
        retry_max_attempts=12, retry_max_delay_s=0.2, breaker_failures=1000
    ) as (
        _,
        bus,
    ):
        for command in commands:
            await bus.publish(command)
        events = await bus.events(200, timeout_s=120)
    statuses = Counter(e["status"] for e in events)
    assert statuses["succeeded"] >= 150, statuses
    applied = [
        r["body"]["command_id"]
        for r in await admin.requests()
        if r["provider"] == "telnyx" and r["status"] == 200
    ]
    assert applied == sorted(applied), "an older command was applied after a newer one"
    assert applied[-1] == commands[-1]["command_id"]
    state = (await admin.state())["telnyx"][conference][call]
    assert state == commands[-1]["supervisor_role"]


async def test_sigterm_under_load_exits_cleanly_and_loses_nothing(
    prefix: str, sandbox: Sandbox, admin: Admin, broker: Broker, processes: Processes
) -> None:
    """SIGTERM mid-run: exit 0 within the grace period; a restarted worker finishes the rest;
    every command has its result and nothing is left unacknowledged."""
    await admin.fault(provider="telnyx", latency_ms=50)
    env = worker_env(prefix, sandbox, prefetch=100)
    worker = processes.spawn(env, "--grace-s", "10")
    await wait_for_workers(broker.channel, broker.settings, 1)
    commands = roles(sandbox.fixtures, 2000, uuid.uuid4().hex[:8])
    await broker.publish_all(commands)
    await asyncio.sleep(2)
    began = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 20) == 0
    assert time.monotonic() - began < 12
    processes.spawn(env)
    events = await broker.collect(2000, timeout_s=120)
    finals = Counter(e["command_id"] for e in events if not e["duplicate"])
    assert set(finals) == {c["command_id"] for c in commands}
    assert Counter(e["status"] for e in events) == {"succeeded": 2000}
    assert await settled_command_counts(broker.settings) == (0, 0)
