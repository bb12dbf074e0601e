"""The I/O layers of ``ops.bench.costs``: the message path, the HTTP clients, the Redis calls.

Each function runs its variants ``--repeat`` times and returns :class:`Figure` rows: this
process's CPU seconds (``time.process_time``), the wall seconds and the commands of each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import httpx
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

from .load import SandboxFixtures
from .peer import Request, provider_request
from .procs import Child, free_port, spawn
from .stage import base_env, python

CONCURRENCY = 256


@dataclass(slots=True)
class Figure:
    """One variant's runs: (CPU seconds, wall seconds, commands) each."""

    layer: str
    variant: str
    runs: list[tuple[float, float, int]] = field(default_factory=list)

    def cpu_us(self) -> list[float]:
        return [cpu / n * 1e6 for cpu, _, n in self.runs]

    def rates(self) -> list[float]:
        return [n / wall for _, wall, n in self.runs if wall > 0]


async def timed(n: int, work: Awaitable[Any]) -> tuple[float, float, int]:
    """Run ``work`` (``n`` commands): (CPU seconds, wall seconds, n)."""
    cpu, wall = time.process_time(), time.perf_counter()
    await work
    return time.process_time() - cpu, time.perf_counter() - wall, n


# --------------------------------------------------------------------------------------------
# The message path

BARE = "aio-pika consumer, no-op callback, manual ack"


class Window:
    """Counts handled messages; CPU and wall time from the ``start``-th to the ``end``-th."""

    def __init__(self, start: int, end: int) -> None:
        self.start, self.end, self.count = start, end, 0
        self.marks: list[tuple[float, float]] = []
        self.done = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        if self.count in (self.start, self.end):
            self.marks.append((time.process_time(), time.perf_counter()))
        if self.count == self.end:
            self.done.set()

    async def result(self) -> tuple[float, float, int]:
        await asyncio.wait_for(self.done.wait(), 120.0)
        (cpu0, wall0), (cpu1, wall1) = self.marks
        return cpu1 - cpu0, wall1 - wall0, self.end - self.start


async def preload(connection: AbstractConnection, queue: str, bodies: list[bytes]) -> None:
    """Publish without confirms, then wait (up to 60 s) until the queue holds them all."""
    channel = await connection.channel(publisher_confirms=False)
    declared = await channel.declare_queue(queue, durable=False, auto_delete=False)
    await declared.purge()
    for body in bodies:
        message = aio_pika.Message(body, content_type="application/json")
        await channel.default_exchange.publish(message, routing_key=queue)
    raw = await channel.get_underlay_channel()  # aio-pika caches passive declares
    for _ in range(1200):
        if ((await raw.queue_declare(queue, passive=True)).message_count or 0) >= len(bodies):
            break
        await asyncio.sleep(0.05)
    await channel.close()


async def consume_aio_pika(url: str, queue: str, window: Window) -> tuple[float, float, int]:
    async def on_message(message: AbstractIncomingMessage) -> None:
        await message.ack()
        window.hit()

    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=CONCURRENCY)
        source = await channel.get_queue(queue, ensure=False)
        await source.consume(on_message, no_ack=False)
        return await window.result()


async def consume_faststream(
    url: str, queue: str, window: Window, *, logging_on: bool
) -> tuple[float, float, int]:
    options: dict[str, Any] = {} if logging_on else {"logger": None}
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=CONCURRENCY), **options)

    async def handle(command: dict[str, Any]) -> None:
        window.hit()

    broker.subscriber(RabbitQueue(queue, declare=False))(handle)
    async with broker:  # its access log writes to the sys.stdout it finds: costs.main's /dev/null
        await broker.start()
        return await window.result()


async def consume_worker_broker(url: str, queue: str, window: Window) -> tuple[float, float, int]:
    """The worker's own FastStream set-up (``worker.app.broker``): FastDepends off, the delivery
    handed over undecoded, manual ack, FastStream's logger at WARNING."""
    from pydantic import SecretStr

    from worker.app import broker as app_broker
    from worker.settings import BrokerConfig, Topology

    config = BrokerConfig(url=SecretStr(url), prefetch=CONCURRENCY)
    broker = app_broker.make_broker(config)

    async def handle(message: AbstractIncomingMessage) -> None:
        await message.ack()
        window.hit()

    topology = Topology(commands_queue=queue)
    subscriber = app_broker.subscribe(broker, topology, handle)
    subscriber.queue.declare = False  # the runner's queue, passively
    async with broker:
        await broker.start()
        return await window.result()


async def message_path(args: argparse.Namespace, bodies: list[bytes]) -> list[Figure]:
    url = args.amqp_url
    queue = f"bench-costs{uuid.uuid4().hex[:8]}.messages"
    n = len(bodies)
    start = max(1, n // 10)
    variants: list[tuple[str, Callable[[Window], Awaitable[tuple[float, float, int]]]]] = [
        (
            "aio-pika consumer, no-op callback, manual ack",
            lambda w: consume_aio_pika(url, queue, w),
        ),
        (
            "FastStream subscriber, no-op dict handler, defaults (logging on)",
            lambda w: consume_faststream(url, queue, w, logging_on=True),
        ),
        (
            "FastStream subscriber, no-op dict handler, logger=None",
            lambda w: consume_faststream(url, queue, w, logging_on=False),
        ),
        (
            "FastStream subscriber as the worker's (worker.app.broker)",
            lambda w: consume_worker_broker(url, queue, w),
        ),
    ]
    figures = [Figure("message path", name) for name, _ in variants]
    connection = await aio_pika.connect(url)
    try:
        for _ in range(args.repeat):
            for figure, (_, run) in zip(figures, variants, strict=True):
                await preload(connection, queue, bodies)
                figure.runs.append(await run(Window(start, n)))
    finally:
        with contextlib.suppress(Exception):
            channel = await connection.channel()
            await channel.queue_delete(queue)
        await connection.close()
    return figures


# --------------------------------------------------------------------------------------------
# HTTP


async def start_sandbox() -> Sandbox:
    """``python -m worker sandbox`` on a free port, once it answers (logs in a temp dir)."""
    port = free_port()
    argv = [python(), "-m", "worker", "sandbox", "--port", str(port), "--conferences", "1000"]
    child = spawn("costs-sandbox", argv, base_env(), Path(tempfile.mkdtemp(prefix="bench-costs-")))
    root = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(f"{root}/__admin/fixtures") as answer:
                    if answer.status == 200:
                        doc = orjson.loads(await answer.read())
                        return Sandbox(child, root, SandboxFixtures.from_document(doc))
            if not child.alive():
                break
            await asyncio.sleep(0.1)
    raise SystemExit(f"the sandbox did not start:\n{child.tail()}")


async def vinix_token(root: str, fixtures: SandboxFixtures) -> str:
    async with httpx.AsyncClient() as client:
        body = {"data": {"api_key": fixtures.vinix_api_key}}
        answer = await client.put(f"{root}/v2/api_auth", json=body)
        answer.raise_for_status()
        return str(answer.json()["auth_token"])


async def fan_out(
    requests: list[Request], call: Callable[[Request], Awaitable[None]], at_once: int
) -> None:
    """``requests`` through ``at_once`` workers."""
    it: Iterator[Request] = iter(requests)

    async def worker() -> None:
        for request in it:
            await call(request)

    await asyncio.gather(*(worker() for _ in range(at_once)))


async def with_httpx(
    requests: list[Request], limits: httpx.Limits | None = None, at_once: int = CONCURRENCY
) -> None:
    client = httpx.AsyncClient() if limits is None else httpx.AsyncClient(limits=limits)

    async def call(request: Request) -> None:
        _, method, url, body, headers = request
        answer = await client.request(method, url, json=body, headers=headers)
        answer.json()

    async with client:
        await fan_out(requests, call, at_once)


async def with_aiohttp(requests: list[Request], limit: int | None = None) -> None:
    connector = None if limit is None else aiohttp.TCPConnector(limit=limit)

    async def call(request: Request) -> None:
        _, method, url, body, headers = request
        async with session.request(method, url, json=body, headers=headers) as answer:
            await answer.json()

    async with aiohttp.ClientSession(connector=connector) as session:
        await fan_out(requests, call, CONCURRENCY)


@dataclass(frozen=True, slots=True)
class Sandbox:
    """The sandbox started for the HTTP figures (its fixtures also shape the commands)."""

    child: Child
    root: str
    fixtures: SandboxFixtures


async def http_clients(
    args: argparse.Namespace, sandbox: Sandbox, commands: list[dict[str, Any]]
) -> list[Figure]:
    """The command mix's provider calls through each client, ``CONCURRENCY`` at once (and
    httpx's defaults 16 at once: its pool's bookkeeping grows with the requests queued)."""
    fx = sandbox.fixtures
    token = await vinix_token(sandbox.root, fx)
    base = f"{sandbox.root}/v2"
    requests = [
        provider_request(c, telnyx=(base, fx.telnyx_api_key), vinix=(base, token))
        for c in commands[: args.requests]
    ]
    many = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    variants: list[tuple[str, Callable[[], Awaitable[None]]]] = [
        ("httpx.AsyncClient() defaults (100, 20 kept alive)", lambda: with_httpx(requests)),
        ("httpx.AsyncClient(limits=256, 256 kept alive)", lambda: with_httpx(requests, many)),
        ("httpx.AsyncClient() defaults, 16 at once", lambda: with_httpx(requests, at_once=16)),
        ("aiohttp.ClientSession() defaults (100)", lambda: with_aiohttp(requests)),
        ("aiohttp TCPConnector(limit=256) (the floor)", lambda: with_aiohttp(requests, 256)),
    ]
    figures = [Figure("HTTP (256 at once)", name) for name, _ in variants]
    for _ in range(args.repeat):
        for figure, (_, work) in zip(figures, variants, strict=True):
            figure.runs.append(await timed(len(requests), work()))
    return figures


# --------------------------------------------------------------------------------------------
# Redis

CLAIM_AND_STORE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
return 0
"""


async def two_sets(client: aioredis.Redis, keys: list[str], value: bytes) -> None:
    it = iter(keys)

    async def worker() -> None:
        for key in it:
            await client.set(key, "1", nx=True, ex=3600)
            await client.set(key, value, ex=3600)

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def evalsha_pipelined(
    client: aioredis.Redis, keys: list[str], value: bytes, sha: str
) -> None:
    for offset in range(0, len(keys), CONCURRENCY):
        pipe = client.pipeline(transaction=False)
        for key in keys[offset : offset + CONCURRENCY]:
            pipe.evalsha(sha, 1, key, value, 3600)
        await pipe.execute()


async def redis_calls(args: argparse.Namespace, value: bytes) -> list[Figure]:
    client = aioredis.Redis.from_url(args.redis_url, max_connections=CONCURRENCY)
    prefix = f"cw:peer:bench-costs{uuid.uuid4().hex[:8]}:"
    figures = [
        Figure("Redis (256 at once)", "2 × SET (NX EX, then the result), awaited in turn"),
        Figure("Redis (256 at once)", "1 × EVALSHA (both SETs), 256 per pipeline"),
    ]
    try:
        sha = str(await client.script_load(CLAIM_AND_STORE))
        for i in range(args.repeat):
            keys = [f"{prefix}{i}:a:{k}" for k in range(args.redis_commands)]
            figures[0].runs.append(await timed(len(keys), two_sets(client, keys, value)))
            keys = [f"{prefix}{i}:b:{k}" for k in range(args.redis_commands)]
            work = evalsha_pipelined(client, keys, value, sha)
            figures[1].runs.append(await timed(len(keys), work))
    finally:
        stale = [k async for k in client.scan_iter(match=prefix + "*", count=2000)]
        for offset in range(0, len(stale), 2000):
            await client.unlink(*stale[offset : offset + 2000])
        await client.aclose()
    return figures
