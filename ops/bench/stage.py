"""Benchmark stages: the sandbox and consumer processes, their environment, sampling, profiling."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection

from worker.app import topology as worker_topology
from worker.settings import Topology

from .load import (
    CommandFactory,
    ResultCollector,
    SandboxFixtures,
)
from .otlp_sink import OtlpSink
from .procs import (
    ROOT,
    BenchError,
    Child,
    Kind,
    console,
    free_port,
    spawn,
    status_kb,
)

# --------------------------------------------------------------------------------------------
# Context


@dataclass(slots=True)
class SandboxProc:
    child: Child
    base_url: str  # http://127.0.0.1:PORT/v2
    latency_ms: float
    fixtures: SandboxFixtures

    @property
    def admin(self) -> str:
        return self.base_url.removesuffix("/v2") + "/__admin"


@dataclass(slots=True)
class Ctx:
    args: argparse.Namespace
    run_id: str
    logs: Path
    connection: AbstractConnection
    channel: AbstractChannel  # publishes (with confirms) and declares
    probe: AbstractChannel  # passive declares for in-flight counts
    redis: aioredis.Redis
    http: aiohttp.ClientSession
    beam: list[int]
    redis_server: list[int]
    profiles: dict[str, str] = field(default_factory=dict)
    sink: OtlpSink | None = None  # tracing on: the worker exports its spans here

    def roles(self, consumer: Child, sandbox: SandboxProc) -> dict[str, list[int]]:
        return {
            "consumer": [consumer.pid],
            "sandbox": [sandbox.child.pid],
            "rabbitmq": self.beam,
            "redis": self.redis_server,
            "runner": [os.getpid()],
        }


def python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CW_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONHASHSEED", "0")  # same dict/set layouts run after run
    return env


async def start_sandbox(ctx: Ctx, latency_ms: float) -> SandboxProc:
    port = free_port()
    argv = [python(), "-m", "worker", "sandbox", "--port", str(port)]
    argv += ["--conferences", str(ctx.args.conferences), "--latency-ms", f"{latency_ms:g}"]
    child = spawn(f"sandbox-{latency_ms:g}ms", argv, base_env(), ctx.logs)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if not child.alive():
            raise BenchError(f"the sandbox exited:\n{child.tail()}")
        with contextlib.suppress(aiohttp.ClientError):
            async with ctx.http.get(f"{root}/__admin/fixtures") as answer:
                if answer.status == 200:
                    doc = orjson.loads(await answer.read())
                    return SandboxProc(
                        child, f"{root}/v2", latency_ms, SandboxFixtures.from_document(doc)
                    )
        if time.monotonic() > deadline:
            raise BenchError(f"the sandbox did not answer within 30 s:\n{child.tail()}")
        await asyncio.sleep(0.1)


async def reset_sandbox(ctx: Ctx, sandbox: SandboxProc) -> None:
    """Demo data, tokens and the request log back to the start (memory stays flat)."""
    async with ctx.http.post(f"{sandbox.admin}/reset") as answer:
        answer.raise_for_status()


def topology_for(prefix: str, partitions: int = 0) -> Topology:
    """The names under ``prefix``; ``partitions`` 0 is the single command queue the floor and
    the peer consume (the worker's drains run on it too, so all three do the same work)."""
    return Topology(
        commands_exchange=f"{prefix}.commands",
        commands_queue=f"{prefix}.worker.commands",
        results_exchange=f"{prefix}.results",
        dead_exchange=f"{prefix}.dead",
        dead_queue=f"{prefix}.worker.dead",
        partitions=partitions,
    )


def worker_env(
    ctx: Ctx, topology: Topology, sandbox: SandboxProc, prefetch: int, pool_size: int
) -> dict[str, str]:
    fx = sandbox.fixtures
    env = base_env()
    env.update(
        {
            "CW_AMQP_URL": ctx.args.amqp_url,
            "CW_DEDUP_URL": ctx.args.dedup_url,
            "CW_DEDUP_RETENTION_S": "3600",  # a safety net: the runner deletes its keys itself
            "CW_COMMANDS_EXCHANGE": topology.commands_exchange,
            "CW_COMMANDS_QUEUE": topology.commands_queue,
            "CW_RESULTS_EXCHANGE": topology.results_exchange,
            "CW_DEAD_EXCHANGE": topology.dead_exchange,
            "CW_DEAD_QUEUE": topology.dead_queue,
            "CW_PARTITIONS": str(topology.partitions),
            "CW_VINIX_BASE_URL": sandbox.base_url,
            "CW_VINIX_API_KEY": fx.vinix_api_key,
            "CW_TELNYX_BASE_URL": sandbox.base_url,
            "CW_TELNYX_API_KEY": fx.telnyx_api_key,
            "CW_PREFETCH": str(prefetch),
            "CW_HTTP_POOL_SIZE": str(pool_size),
            "CW_HTTP_PORT": "0",
        }
    )
    if ctx.sink is not None and not any(name.startswith("OTEL_TRACES") for name in os.environ):
        env["OTEL_TRACES_EXPORTER"] = "otlp"  # the default sampler: parent-based, ratio 0.1
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = ctx.sink.endpoint
        env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
    env.update(extra_worker_env(ctx.args))
    return env


def extra_worker_env(args: argparse.Namespace) -> dict[str, str]:
    extra: dict[str, str] = {}
    for item in args.worker_env:
        name, _, value = item.partition("=")
        extra[name] = value
    return extra


def start_consumer(
    ctx: Ctx,
    *,
    kind: Kind,
    name: str,
    topology: Topology,
    sandbox: SandboxProc,
    prefetch: int,
    pool_size: int,
) -> Child:
    """Spawn the consumer of ``kind`` on ``topology`` (see :func:`consumer_command`)."""
    argv, env = consumer_command(
        ctx,
        kind,
        name=name,
        topology=topology,
        sandbox=sandbox,
        prefetch=prefetch,
        pool_size=pool_size,
    )
    return spawn(name, argv, env, ctx.logs)


def consumer_command(
    ctx: Ctx,
    kind: Kind,
    *,
    name: str,
    topology: Topology,
    sandbox: SandboxProc,
    prefetch: int,
    pool_size: int,
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment of a consumer; ``name`` is the stage's: the peer's dedup keys
    are ``cw:peer:<run id>-<name>:<command id>``, deleted with the stage."""
    if kind == "worker":
        argv = [python(), "-m", "worker", "run", "--grace-s", "5"]
        return argv, worker_env(ctx, topology, sandbox, prefetch, pool_size)
    argv = [python(), "-m", f"ops.bench.{kind}", *pipeline_args(ctx, topology, sandbox, prefetch)]
    if kind == "peer":
        argv += ["--redis-url", ctx.args.dedup_url, "--run", f"{ctx.run_id}-{name}"]
    else:
        argv += ["--pool-size", str(pool_size)]
    return argv, base_env()


def pipeline_args(ctx: Ctx, topology: Topology, sandbox: SandboxProc, prefetch: int) -> list[str]:
    """What the floor and the peer are both told: the broker, the queue, the providers."""
    fx = sandbox.fixtures
    argv = ["--amqp-url", ctx.args.amqp_url]
    argv += ["--queue", topology.commands_queue, "--results-exchange", topology.results_exchange]
    argv += ["--telnyx-url", sandbox.base_url, "--telnyx-key", fx.telnyx_api_key]
    argv += ["--vinix-url", sandbox.base_url, "--vinix-key", fx.vinix_api_key]
    return [*argv, "--prefetch", str(prefetch)]


# --------------------------------------------------------------------------------------------
# One scenario's topology, results queue and collector; removed afterwards.


@dataclass(slots=True)
class Stage:
    ctx: Ctx
    name: str
    topology: Topology
    results_queue: str
    collector: ResultCollector
    factory: CommandFactory


@contextlib.asynccontextmanager
async def stage(
    ctx: Ctx, name: str, sandbox: SandboxProc, partitions: int = 0
) -> AsyncIterator[Stage]:
    prefix = f"{ctx.run_id}-{name}"
    topology = topology_for(prefix, partitions)
    results_queue = f"{prefix}.bench-results"
    collector = ResultCollector()
    channel = await ctx.connection.channel()
    marks = await applied_marks(ctx)
    try:
        await worker_topology.declare(ctx.channel, topology)
        queue = await channel.declare_queue(results_queue, exclusive=True, durable=False)
        await queue.bind(topology.results_exchange, "#")
        await collector.start(channel, queue)
        await reset_sandbox(ctx, sandbox)
        yield Stage(
            ctx, name, topology, results_queue, collector, CommandFactory(sandbox.fixtures, prefix)
        )
    finally:
        with contextlib.suppress(Exception):
            await collector.stop()
        with contextlib.suppress(Exception):
            await channel.queue_delete(results_queue)
        with contextlib.suppress(Exception):
            await channel.close()
        try:
            await worker_topology.delete(ctx.channel, topology)
        except Exception as exc:  # the channel may be gone: say so, go on
            console.print(f"[yellow]could not delete the topology {prefix}.*: {exc!r}")
        await delete_dedup_keys(ctx, prefix, marks)


APPLIED = "cw:applied:*"  # the worker's per-target marks (kept a day), not named by command


async def delete_dedup_keys(ctx: Ctx, prefix: str, before: frozenset[bytes] | None) -> int:
    """The worker's ``cw:dedup:<command id>`` keys of this scenario, the peer's
    ``cw:peer:<prefix>:<command id>``, and the applied marks the worker made: those not among
    ``before`` (None: the marks there before were not read, keep all)."""
    deleted = 0
    matches = [f"cw:dedup:{prefix}-*", f"cw:peer:{prefix}:*"]
    matches += [APPLIED] if before is not None else []
    try:
        for match in matches:
            keys = [k async for k in ctx.redis.scan_iter(match=match, count=2000)]
            keys = [k for k in keys if before is None or k not in before]
            for offset in range(0, len(keys), 2000):
                deleted += await ctx.redis.unlink(*keys[offset : offset + 2000])
    except Exception as exc:
        console.print(f"[yellow]could not delete the dedup keys of {prefix}: {exc!r}")
    return deleted


async def applied_marks(ctx: Ctx) -> frozenset[bytes] | None:
    """The applied marks already in Redis (None when it cannot be read)."""
    try:
        return frozenset([k async for k in ctx.redis.scan_iter(match=APPLIED, count=2000)])
    except Exception:
        return None


async def queue_state(ctx: Ctx, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``, asked of the broker each time."""
    if ctx.probe.is_closed:
        ctx.probe = await ctx.connection.channel()
    raw = await ctx.probe.get_underlay_channel()  # aio-pika caches passive declares
    result = await raw.queue_declare(queue, passive=True)
    return int(result.message_count or 0), int(result.consumer_count or 0)


@dataclass(slots=True)
class Sampler:
    """Samples the consumer's VmRSS and the commands in flight (taken, not yet answered)."""

    ctx: Ctx
    child: Child
    queue: str
    total: int
    collector: ResultCollector
    every_s: float
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (t, rss kB, in flight)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            rss = status_kb(self.child.pid, "VmRSS") or 0
            try:
                ready, _ = await queue_state(self.ctx, self.queue)
                inflight = max(0, self.total - ready - self.collector.count)
            except Exception:
                inflight = -1
            self.samples.append((time.perf_counter(), rss, inflight))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.every_s)

    async def stop(self) -> None:
        """Stop after the current sample (cancelling an RPC would close the probe channel)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._task, 10.0)

    def between(self, start: float, end: float) -> list[tuple[float, int, int]]:
        return [s for s in self.samples if start <= s[0] <= end and s[2] >= 0]
