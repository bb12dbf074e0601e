"""Integration fixtures: the real RabbitMQ and Redis on 127.0.0.1, the sandbox, a worker.

Every test gets a topology of its own (names prefixed ``it-<hex>.``) that is deleted afterwards,
so tests never see each other's messages and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest

from ops.bench.brokerctl import all_consume
from ops.bench.env import worker_env as shared_worker_env
from worker.app import topology
from worker.app.service import Service
from worker.sandbox import Sandbox
from worker.settings import Settings

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/0"

pytestmark = pytest.mark.integration


def worker_settings(prefix: str, **overrides: Any) -> Settings:
    """Settings for a worker on its own topology, with short retries."""
    values: dict[str, Any] = {
        "amqp_url": AMQP_URL,
        "dedup_url": "memory://",
        "commands_exchange": f"{prefix}.commands",
        "commands_queue": f"{prefix}.worker.commands",
        "results_exchange": f"{prefix}.results",
        "dead_exchange": f"{prefix}.dead",
        "dead_queue": f"{prefix}.worker.dead",
        "retry_max_attempts": 3,
        "retry_base_delay_s": 0.05,
        "retry_max_delay_s": 0.5,
        "retry_budget_s": 10.0,
        "vinix_base_url": None,
        "telnyx_base_url": None,
        "http_port": 0,  # any free port: many workers run side by side in tests
    }
    values.update(overrides)
    return Settings(**values)


@dataclass
class Admin:
    """The sandbox's admin API."""

    sandbox: Sandbox

    @property
    def root(self) -> str:
        return self.sandbox.base_url.removesuffix("/v2")

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, f"{self.root}{path}", json=body) as answer,
        ):
            answer.raise_for_status()
            return await answer.json() if answer.content_length != 0 else None

    async def fault(self, **fault: Any) -> None:
        await self.call("POST", "/__admin/faults", fault)

    async def requests(self) -> list[dict[str, Any]]:
        return list((await self.call("GET", "/__admin/requests"))["requests"])

    async def state(self) -> dict[str, Any]:
        return dict(await self.call("GET", "/__admin/state"))


async def take(
    queue: aio_pika.abc.AbstractQueue, count: int, timeout_s: float
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The next ``count`` messages of ``queue``, each acked; TimeoutError after ``timeout_s``."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout_s):
        while len(got) < count:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.02)
                continue
            await message.ack()
            got.append(message)
    return got


async def result_events(
    queue: aio_pika.abc.AbstractQueue, count: int, timeout_s: float
) -> list[dict[str, Any]]:
    """The next ``count`` result events of ``queue`` (acked), decoded."""
    return [orjson.loads(message.body) for message in await take(queue, count, timeout_s)]


@dataclass
class Bus:
    """A test's view of the broker: publish commands, read result events and dead letters."""

    settings: Settings
    connection: aio_pika.abc.AbstractConnection
    channel: aio_pika.abc.AbstractChannel
    results: aio_pika.abc.AbstractQueue
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def publish(
        self, body: dict[str, Any] | bytes, routing_key: str | None = None, **props: Any
    ) -> None:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        key = (
            routing_key
            or (body.get("type") if isinstance(body, dict) else None)
            or "conference.update"
        )
        exchange = await self.channel.get_exchange(self.settings.commands_exchange)
        message = aio_pika.Message(
            raw,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **props,
        )
        await exchange.publish(message, key)

    async def events(self, count: int, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """The next ``count`` result events."""
        got = await result_events(self.results, count, timeout_s)
        self.seen += got
        return got

    async def dead_letters(
        self, count: int, timeout_s: float = 10.0
    ) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take ``count`` messages from the dead-letter queue (acked: the queue is left empty)."""
        queue = await self.channel.get_queue(self.settings.dead_queue)
        return await take(queue, count, timeout_s)


def listed_counts() -> dict[str, tuple[int, int]]:
    """(ready, unacknowledged) messages of every queue, as RabbitMQ itself reports them."""
    out = subprocess.run(
        [
            "rabbitmqctl",
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages_ready",
            "messages_unacknowledged",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    counts = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3:
            counts[parts[0]] = (int(parts[1]), int(parts[2]))
    return counts


def queue_counts(name: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of a queue, as RabbitMQ itself reports them."""
    counts = listed_counts()
    if name not in counts:
        raise AssertionError(f"queue {name} not found")
    return counts[name]


def command_queues(settings: Settings) -> list[str]:
    """Every queue a command waits in before it is carried out: the intake and the work queues
    (the partitions when partitioned, else the single command queue)."""
    top = settings.topology()
    return list(dict.fromkeys([top.intake_queue, *top.work_queues()]))


def total_counts(names: list[str]) -> tuple[int, int]:
    """(ready, unacknowledged) summed over ``names``, from one listing of RabbitMQ's queues."""
    counts = listed_counts()
    missing = [name for name in names if name not in counts]
    assert not missing, f"queues not found: {missing}"
    return sum(counts[n][0] for n in names), sum(counts[n][1] for n in names)


STATS_LAG_S = 6.0  # rabbitmqctl's counts of a quorum queue are refreshed on a ~5 s tick


async def settled_counts(name: str) -> tuple[int, int]:
    """(ready, unacked) of a queue once RabbitMQ's metrics caught up with it.

    A quorum queue's counts, as ``rabbitmqctl list_queues`` reports them, are a snapshot taken on
    the queue's tick (every ~5 s): read at once after activity, they can show deliveries acked a
    moment ago as unacknowledged (or the reverse).  A delivery that is really stuck stays so.
    """
    await asyncio.sleep(STATS_LAG_S)
    return queue_counts(name)


async def settled_command_counts(settings: Settings) -> tuple[int, int]:
    """(ready, unacked) over every command queue (:func:`command_queues`), once settled."""
    await asyncio.sleep(STATS_LAG_S)
    return total_counts(command_queues(settings))


@pytest.fixture
def prefix() -> str:
    return f"it-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def sandbox() -> AsyncIterator[Sandbox]:
    async with Sandbox() as running:
        yield running


@pytest.fixture
def admin(sandbox: Sandbox) -> Admin:
    return Admin(sandbox)


@pytest.fixture
def fixtures(sandbox: Sandbox) -> dict[str, Any]:
    return sandbox.fixtures


WorkerFactory = Callable[..., AbstractAsyncContextManager[tuple[Service, Bus]]]


@pytest.fixture
async def worker_factory(prefix: str, sandbox: Sandbox) -> AsyncIterator[WorkerFactory]:
    """Start a worker (and a bus to talk to it); everything is removed at the end of the test."""
    made: list[Settings] = []

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[tuple[Service, Bus]]:
        settings = worker_settings(prefix, **overrides)
        made.append(settings)
        service = Service(settings, sandbox=sandbox, grace_s=5.0)
        await service.start()
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        results = await channel.declare_queue(
            f"{prefix}.test-results", durable=False, auto_delete=False
        )
        await results.bind(settings.results_exchange, "#")
        try:
            yield service, Bus(settings, connection, channel, results)
        finally:
            await service.stop()
            await channel.queue_delete(f"{prefix}.test-results")
            await connection.close()

    yield start
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for settings in made[:1]:
            await topology.delete(channel, settings.topology())


def worker_env(prefix: str, sandbox: Sandbox, **overrides: Any) -> dict[str, str]:
    """Environment for a worker process on the test's topology, using the sandbox's keys
    (``amqp_url`` and ``dedup_url`` may be overridden like any setting)."""
    return shared_worker_env(
        worker_settings(prefix),
        sandbox,
        amqp_url=overrides.pop("amqp_url", AMQP_URL),
        dedup_url=overrides.pop("dedup_url", REDIS_URL),
        **{"retry_base_delay_s": 0.05, **overrides},
    )


class Processes:
    """Worker processes started by a test; whatever is left running is stopped at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def spawn(self, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "run", *args], env=env)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def processes() -> Iterator[Processes]:
    running = Processes()
    yield running
    running.stop_all()


async def wait_for_consumers(channel: aio_pika.abc.AbstractChannel, queue: str, count: int) -> None:
    """Until ``queue`` has at least ``count`` consumers (a started worker is consuming)."""
    async with asyncio.timeout(30):
        while True:
            declared = await channel.declare_queue(queue, passive=True)
            if (declared.declaration_result.consumer_count or 0) >= count:
                return
            await asyncio.sleep(0.1)


async def wait_for_workers(
    channel: aio_pika.abc.AbstractChannel, settings: Settings, count: int
) -> None:
    """Until ``count`` workers consume every command queue (the intake and each partition,
    waiting single-active consumers included).  ``channel`` is unused (kept for the callers that
    wait on a fresh connection's channel)."""
    del channel
    await workers_consume(settings, count)


async def workers_consume(settings: Settings, count: int) -> None:
    """Until ``count`` workers consume every command queue of ``settings`` (60 s at most)."""
    queues = command_queues(settings)
    async with asyncio.timeout(60):
        while not await asyncio.to_thread(all_consume, queues, count):
            await asyncio.sleep(0.2)


@dataclass
class Broker:
    """A test's own connection: declare the topology, publish, read results by command id."""

    settings: Settings
    channel: aio_pika.abc.AbstractChannel
    results: aio_pika.abc.AbstractQueue

    async def publish_all(self, bodies: list[dict[str, Any]]) -> None:
        exchange = await self.channel.get_exchange(self.settings.commands_exchange)
        for body in bodies:
            message = aio_pika.Message(
                orjson.dumps(body), delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, str(body["type"]))

    async def collect(self, count: int, timeout_s: float) -> list[dict[str, Any]]:
        """The next ``count`` result events."""
        return await result_events(self.results, count, timeout_s)


@pytest.fixture
async def broker(prefix: str) -> AsyncIterator[Broker]:
    """The test's topology, declared, with a queue of every result event; removed afterwards."""
    settings = worker_settings(prefix)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await topology.declare(channel, settings.topology())
        results = await channel.declare_queue(f"{prefix}.test-results")
        await results.bind(settings.results_exchange, "#")
        yield Broker(settings, channel, results)
        await channel.queue_delete(f"{prefix}.test-results")
        await topology.delete(channel, settings.topology())
