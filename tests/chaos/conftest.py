"""Chaos harness: real worker processes, RabbitMQ, Redis and the sandbox, disturbed on purpose.

Every scenario publishes a run of commands, disturbs something while the worker drains them, and
then checks the promises of the service: every command has a final result event, the dead-letter
queue holds exactly the non-successes, the provider's final state is what the newest commands
intended, repeats at the provider stay within what was in flight at each kill, and nothing is
left unacknowledged.  Each scenario's figures are printed at the end of the run.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from aio_pika.exceptions import CONNECTION_EXCEPTIONS

from tests.integration.conftest import (
    AMQP_URL,
    REDIS_URL,
    Admin,
    Processes,
    settled_command_counts,
    worker_env,
    worker_settings,
)
from worker.app import topology
from worker.dedup.redis import APPLIED_PREFIX
from worker.sandbox import Sandbox
from worker.settings import Settings

SUMMARIES: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print one line of figures per chaos scenario."""
    if not SUMMARIES:
        return
    terminalreporter.section("chaos summary")
    for row in SUMMARIES:
        terminalreporter.write_line(
            f"{row['scenario']:<18} published {row['published']:>6}  results {row['results']:>6}"
            f"  dead letters {row['dead_letters']:>5}  provider repeats {row['repeats']:>4}"
            f" (bound {row['repeat_bound']})  lost {row['lost']}"
        )


@dataclass
class Run:
    """One scenario's commands, results and the checks over them."""

    scenario: str
    settings: Settings
    sandbox: Sandbox
    channel: aio_pika.abc.AbstractChannel
    results: aio_pika.abc.AbstractQueue
    commands: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    repeat_bound: int = 0

    def make_commands(self, count: int) -> None:
        """A mix of Vinix replaces and Telnyx role changes, issued in order, over many targets."""
        fx = self.sandbox.fixtures
        run = uuid.uuid4().hex[:8]
        start = datetime.now(UTC)
        calls = [(c, x) for c, ids in fx["telnyx"]["calls_by_conference"].items() for x in ids]
        confs = fx["vinix"]["conference_ids"]
        for n in range(count):
            common = {
                "command_id": f"{self.scenario}-{run}-{n}",
                "issued_at": (start + timedelta(milliseconds=n)).isoformat(),
            }
            if n % 2:
                conf, call = calls[(n // 2) % len(calls)]
                self.commands.append(
                    {
                        **common,
                        "type": "conference.supervisor_role",
                        "conference_id": conf,
                        "call_control_id": call,
                        "supervisor_role": ("monitor", "whisper", "barge")[n % 3],
                    }
                )
            else:
                self.commands.append(
                    {
                        **common,
                        "type": "conference.update",
                        "account_id": fx["vinix"]["account_id"],
                        "conference_id": confs[(n // 2) % len(confs)],
                        "conference": {"name": common["command_id"]},
                    }
                )

    async def publish(self) -> None:
        exchange = await self.channel.get_exchange(self.settings.commands_exchange)
        for command in self.commands:
            message = aio_pika.Message(orjson.dumps(command), delivery_mode=2)
            await exchange.publish(message, command["type"])

    async def collect_until_complete(self, timeout_s: float) -> None:
        """Read result events until every command has one (or the time is up)."""
        wanted = {c["command_id"] for c in self.commands}
        async with asyncio.timeout(timeout_s):
            while not wanted <= self.events.keys():
                await self.drain_results()
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        await self.drain_results()

    async def drain_results(self) -> None:
        """Take every result event waiting (none while the broker is away: it reconnects)."""
        try:
            while (message := await self.results.get(fail=False)) is not None:
                await message.ack()
                event = orjson.loads(message.body)
                self.events[event["command_id"]].append(event)
        except CONNECTION_EXCEPTIONS:
            await asyncio.sleep(0.5)

    def result_count(self) -> int:
        return sum(len(events) for events in self.events.values())

    def final_status(self, command_id: str) -> str:
        events = self.events[command_id]
        firsts = [e for e in events if not e["duplicate"]] or events
        return str(firsts[-1]["status"])

    async def dead_letter_ids(self) -> Counter[str]:
        queue = await self.channel.get_queue(self.settings.dead_queue)
        ids: Counter[str] = Counter()
        while (message := await queue.get(fail=False)) is not None:
            await message.ack()
            ids[orjson.loads(message.body)["command_id"]] += 1
        return ids

    async def provider_repeats(self, admin: Admin) -> int:
        """Commands carried out (2xx) more than once at the provider, counted in extra calls."""
        done: Counter[str] = Counter()
        for request in await admin.requests():
            body = request.get("body") or {}
            if request["status"] != 200 or not isinstance(body, dict):
                continue
            command_id = body.get("command_id") or (body.get("data") or {}).get("name")
            if isinstance(command_id, str):
                done[command_id] += 1
        return sum(n - 1 for n in done.values() if n > 1)

    async def settled(self, timeout_s: float = 120.0) -> tuple[int, int]:
        """Wait until the command queues (intake, partitions) are empty, nothing unacknowledged.

        After a broker restart, deliveries whose acks were lost come back and are answered again
        (as duplicates) after every command already has its result, so the queue is watched.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            counts = await settled_command_counts(self.settings)  # a fresh snapshot
            await self.drain_results()
            if counts == (0, 0) or asyncio.get_running_loop().time() > deadline:
                return counts

    async def check(
        self, admin: Admin, *, all_succeed: bool = True, superseded_ok: bool = False
    ) -> None:
        """Every promise of the service, asserted; the figures recorded for the summary.

        Without provider faults (``all_succeed``) every command must end ``succeeded``; with
        ``superseded_ok`` a command may instead end ``rejected``/``superseded`` when a newer
        command of its target was applied first (never applied after it).
        """
        left = await self.settled()
        ids = [c["command_id"] for c in self.commands]
        lost = [i for i in ids if not self.events.get(i)]
        dead = await self.dead_letter_ids()
        failures = {i for i in ids if self.events.get(i) and self.final_status(i) != "succeeded"}
        repeats = await self.provider_repeats(admin)
        SUMMARIES.append(
            {
                "scenario": self.scenario,
                "published": len(ids),
                "results": sum(len(v) for v in self.events.values()),
                "dead_letters": sum(dead.values()),
                "repeats": repeats,
                "repeat_bound": self.repeat_bound,
                "lost": len(lost),
            }
        )
        assert not lost, f"{len(lost)} commands without a result, e.g. {lost[:3]}"
        statuses = Counter(self.final_status(i) for i in ids)
        if all_succeed:
            odd = [
                (i, self.final_status(i), (self.events[i][-1].get("error") or {}).get("code"))
                for i in ids
                if self.final_status(i) != "succeeded"
            ]
            if superseded_ok:
                odd = [o for o in odd if o[1:] != ("rejected", "superseded")]
                assert not odd, (statuses, odd[:3])
                self.assert_superseded_by_newer()
            else:
                assert statuses == {"succeeded": len(ids)}, (statuses, odd[:3])
        else:  # provider faults may exhaust a budget; nothing may be rejected or superseded
            assert set(statuses) <= {"succeeded", "failed"}, statuses
        assert set(dead) == failures
        assert repeats <= self.repeat_bound
        assert await self.final_state_is_intended()
        assert left == (0, 0), f"ready, unacknowledged left on the work queue: {left}"

    def assert_superseded_by_newer(self) -> None:
        """Each superseded command has a newer command of its target that succeeded."""
        newest: dict[tuple[str, ...], str] = {}
        for command in self.commands:
            if self.final_status(command["command_id"]) == "succeeded":
                key = (command["conference_id"], command.get("call_control_id", ""))
                newest[key] = max(newest.get(key, ""), command["issued_at"])
        for command in self.commands:
            if self.final_status(command["command_id"]) == "rejected":
                key = (command["conference_id"], command.get("call_control_id", ""))
                assert newest.get(key, "") > command["issued_at"], command

    async def final_state_is_intended(self) -> bool:
        intended: dict[tuple[str, ...], dict[str, Any]] = {}
        for command in self.commands:  # in issue order: the last succeeded one wins
            if self.final_status(command["command_id"]) == "succeeded":
                key = (command["conference_id"], command.get("call_control_id", ""))
                intended[key] = command
        state = self.sandbox.state()
        for (conf, call), command in intended.items():
            if call:
                assert state["telnyx"][conf][call] == command["supervisor_role"], command
            else:
                assert state["vinix"][conf]["name"] == command["command_id"], command
        return True


REDIS_START = [
    "redis-server",
    "--daemonize",
    "yes",
    "--bind",
    "127.0.0.1",
    "-::1",
    "--port",
    "6379",
    "--save",
    "",
    "--appendonly",
    "no",
    "--dir",
    "/var/lib/redis",
    "--logfile",
    "/var/log/redis/ci.log",
]


def listens(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_redis() -> None:
    """Start Redis as ``scripts/_env.sh`` does (bare, if its log folder is not there), unless
    it runs, and wait for its port."""
    if listens(6379):
        return
    if subprocess.run(REDIS_START, check=False, capture_output=True).returncode != 0:
        subprocess.run(REDIS_START[:12], check=True, capture_output=True)
    for _ in range(100):
        if listens(6379):
            return
        time.sleep(0.1)
    raise RuntimeError("Redis did not come back on 127.0.0.1:6379")


def start_rabbitmq() -> None:
    """Start RabbitMQ's app (a no-op when it runs) and wait until it is up."""
    for command in (["rabbitmqctl", "start_app"], ["rabbitmqctl", "await_startup"]):
        subprocess.run(command, check=True, capture_output=True)


@pytest.fixture(autouse=True)
def services_restored() -> Iterator[None]:
    """After each scenario, Redis and RabbitMQ run again, even if it failed or timed out while
    one of them was stopped: the tests after it need them."""
    yield
    start_redis()
    if not listens(5672):
        start_rabbitmq()


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox(conferences=200) as running:
        yield running


@pytest.fixture
def admin(sandbox: Sandbox) -> Admin:
    return Admin(sandbox)


@pytest.fixture
def processes() -> Iterator[Processes]:
    running = Processes()
    yield running
    running.stop_all()


async def forget_applied() -> None:
    """Drop what earlier runs recorded as applied to the sandbox's (deterministic) targets."""
    client = aioredis.Redis.from_url(REDIS_URL)
    keys = [key async for key in client.scan_iter(match=f"{APPLIED_PREFIX}*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


@pytest.fixture
async def chaos(request: Any, sandbox: Sandbox) -> AsyncIterator[Run]:
    """A declared topology with a results queue, for one scenario; removed afterwards."""
    await forget_applied()
    prefix = f"chaos-{uuid.uuid4().hex[:8]}"
    settings = worker_settings(prefix)
    connection = await aio_pika.connect_robust(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, settings.topology())
        results = await channel.declare_queue(f"{prefix}.results", durable=True)
        await results.bind(settings.results_exchange, "#")
        yield Run(request.node.name.removeprefix("test_"), settings, sandbox, channel, results)
        await channel.queue_delete(f"{prefix}.results")
        await topology.delete(channel, settings.topology())


def env_for(run: Run, **overrides: Any) -> dict[str, str]:
    prefix = run.settings.commands_queue.removesuffix(".worker.commands")
    return worker_env(prefix, run.sandbox, **overrides)
