"""The conference-worker benchmark: the worker against the bare floor, on this machine, in one run.

    python -m ops.bench.bench [--commands N] [--quick] [--scenarios drain,latency100,p99,rss]
                              [--out ops/bench/results/latest.json] [--repeat K] [--profile]

It starts the sandbox (``python -m worker sandbox``), then for each scenario a consumer process
(``python -m worker run``, or the floor ``python -m ops.bench.floor``) on a topology of its own
(``<run id>-<scenario>.*``, deleted afterwards), publishes commands and collects the result events
itself.  CPU comes from each process's own ``/proc/<pid>/stat`` (utime + stime), memory from
``/proc/<pid>/status`` (VmRSS sampled, VmHWM at the end).  See ``ops/bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import ctypes
import importlib.metadata
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aio_pika
import aiohttp
import orjson
import redis.asyncio as aioredis
from aio_pika.abc import AbstractChannel, AbstractConnection
from rich.console import Console
from rich.table import Table

from worker import topology as worker_topology
from worker.settings import Topology

from .load import (
    CommandFactory,
    CommandPublisher,
    PacedPublisher,
    ResultCollector,
    SandboxFixtures,
    percentiles,
    preload,
)

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCENARIOS = ("drain", "latency100", "p99", "rss")
Kind = Literal["worker", "floor"]
console = Console() if Console().is_terminal else Console(width=150)

# Acceptance thresholds of the issue.
MAX_CPU_RATIO = 1.6
MIN_THROUGHPUT_RATIO = 0.6
MIN_LATENCY100_RATIO = 0.9
MIN_LATENCY100_INFLIGHT = 300
MAX_P99_MS = 25.0
MAX_RSS_MB = 200.0
RSS_INFLIGHT = 2000


# --------------------------------------------------------------------------------------------
# /proc


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (None when the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` line of ``/proc/<pid>/status`` (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pids_named(*names: str) -> list[int]:
    """Processes whose ``comm`` is one of ``names``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="utf-8") as f:
                    if f.read().strip() in names:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def pids_listening(port: int) -> list[int]:
    """Processes holding a socket that listens on ``port`` (e.g. the beam.smp of 5672).

    Other engineers may run more RabbitMQ nodes or Redis servers on this machine: only the ones
    the benchmark talks to are counted.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(f"socket:[{parts[9]}]")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                    found.append(int(entry))
                    break
    return found


def server_pids(url: str, default_port: int, *names: str) -> list[int]:
    port = urlsplit(url).port or default_port
    return pids_listening(port) or pids_named(*names)


@dataclass(frozen=True, slots=True)
class Snap:
    """CPU seconds of each role's processes at one instant (perf_counter ``t``)."""

    t: float
    cpu: dict[str, float]


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def snap(roles: dict[str, list[int]]) -> Snap:
    """CPU seconds per role, plus ``others``: what the rest of the machine used meanwhile."""
    cpu: dict[str, float] = {}
    for role, pids in roles.items():
        total = 0.0
        for pid in pids:
            total += cpu_seconds(pid) or 0.0
        cpu[role] = total
    cpu["others"] = machine_busy_seconds() - sum(cpu.values())
    return Snap(time.perf_counter(), cpu)


# --------------------------------------------------------------------------------------------
# Child processes: always terminated (SIGTERM, then SIGKILL), even on failure or Ctrl-C.


@dataclass(slots=True)
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait()
        with contextlib.suppress(ValueError):
            CHILDREN.remove(self)

    async def astop(self, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """As :meth:`stop`, without blocking the event loop."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            deadline = time.monotonic() + timeout_s
            while self.popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        self.stop(timeout_s=5.0)

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


CHILDREN: list[Child] = []
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_runner() -> None:
    """In the child before exec: SIGTERM when the runner dies, even by SIGKILL (Linux)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))


def stop_all() -> None:
    for child in list(reversed(CHILDREN)):
        child.stop(timeout_s=5.0)


atexit.register(stop_all)


def spawn(name: str, argv: list[str], env: dict[str, str], logs: Path) -> Child:
    log = logs / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv,
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the runner only; it stops everyone
            preexec_fn=_die_with_runner,  # noqa: PLW1509 (no threads fork here)
        )
    child = Child(name, popen, log)
    CHILDREN.append(child)
    return child


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class BenchError(Exception):
    """The benchmark could not measure (a process died, results missing, ...)."""


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


def topology_for(prefix: str) -> Topology:
    return Topology(
        commands_exchange=f"{prefix}.commands",
        commands_queue=f"{prefix}.worker.commands",
        results_exchange=f"{prefix}.results",
        dead_exchange=f"{prefix}.dead",
        dead_queue=f"{prefix}.worker.dead",
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
            "CW_VINIX_BASE_URL": sandbox.base_url,
            "CW_VINIX_API_KEY": fx.vinix_api_key,
            "CW_TELNYX_BASE_URL": sandbox.base_url,
            "CW_TELNYX_API_KEY": fx.telnyx_api_key,
            "CW_PREFETCH": str(prefetch),
            "CW_HTTP_POOL_SIZE": str(pool_size),
            "CW_HTTP_PORT": "0",
        }
    )
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
    if kind == "worker":
        argv = [python(), "-m", "worker", "run", "--grace-s", "5"]
        env = worker_env(ctx, topology, sandbox, prefetch, pool_size)
        return spawn(name, argv, env, ctx.logs)
    fx = sandbox.fixtures
    argv = [python(), "-m", "ops.bench.floor", "--amqp-url", ctx.args.amqp_url]
    argv += ["--queue", topology.commands_queue, "--results-exchange", topology.results_exchange]
    argv += ["--telnyx-url", sandbox.base_url, "--telnyx-key", fx.telnyx_api_key]
    argv += ["--vinix-url", sandbox.base_url, "--vinix-key", fx.vinix_api_key]
    argv += ["--prefetch", str(prefetch), "--pool-size", str(pool_size)]
    return spawn(name, argv, base_env(), ctx.logs)


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
async def stage(ctx: Ctx, name: str, sandbox: SandboxProc) -> AsyncIterator[Stage]:
    prefix = f"{ctx.run_id}-{name}"
    topology = topology_for(prefix)
    results_queue = f"{prefix}.bench-results"
    collector = ResultCollector()
    channel = await ctx.connection.channel()
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
        await delete_dedup_keys(ctx, prefix)


async def delete_dedup_keys(ctx: Ctx, prefix: str) -> int:
    """The worker's ``cw:dedup:<command id>`` keys of this scenario."""
    deleted = 0
    try:
        batch: list[Any] = []
        async for key in ctx.redis.scan_iter(match=f"cw:dedup:{prefix}-*", count=2000):
            batch.append(key)
            if len(batch) >= 2000:
                deleted += await ctx.redis.unlink(*batch)
                batch.clear()
        if batch:
            deleted += await ctx.redis.unlink(*batch)
    except Exception as exc:
        console.print(f"[yellow]could not delete the dedup keys of {prefix}: {exc!r}")
    return deleted


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


# --------------------------------------------------------------------------------------------
# Profiling (optional): py-spy attached to the consumer for the measured window.


def start_profiler(ctx: Ctx, child: Child, name: str) -> Child | None:
    spy = shutil.which("py-spy", path=str(Path(python()).parent)) or shutil.which("py-spy")
    if spy is None:
        console.print("[yellow]--profile: py-spy is not installed (pip install py-spy); skipped")
        return None
    fmt = ctx.args.profile_format
    suffix = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[fmt]
    out = ctx.logs / f"{name}.pyspy.{suffix}"
    argv = [spy, "record", "--pid", str(child.pid), "--rate", str(ctx.args.profile_rate)]
    argv += ["--format", fmt, "--output", str(out)]
    if ctx.args.profile_nonblocking:
        argv.append("--nonblocking")  # cheaper, but many stacks come back truncated
    ctx.profiles[name] = str(out)
    return spawn(f"{name}.pyspy", argv, base_env(), ctx.logs)


def summarize_profile(path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive time by function, and by library, from py-spy's raw (collapsed) output."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_frame(f) for f in stack.split(";") if f]
        if not frames:
            continue
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        areas[_area(stack.split(";")[-1])] += count

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(top)]

    return {
        "samples": total,
        "self_pct": share(self_time),
        "inclusive_pct": share(inclusive),
        "leaf_by_library_pct": share(areas),
    }


def _frame(frame: str) -> str:
    """``func (path/to/file.py:123)`` → ``func (file.py)``: lines merged."""
    name, _, where = frame.partition(" (")
    file = where.rsplit(":", 1)[0].rstrip(")")
    return f"{name} ({_short(file)})"


def _short(file: str) -> str:
    if "site-packages/" in file:
        return file.split("site-packages/", 1)[1]
    for marker in ("/worker/", "/ops/"):
        if marker in file:
            return marker.strip("/") + "/" + file.split(marker, 1)[1]
    return file.rsplit("/lib/python3", 1)[-1].split("/", 1)[-1] if "/lib/python3" in file else file


def _area(frame: str) -> str:
    file = _short(frame.partition(" (")[2].rsplit(":", 1)[0])
    head = file.split("/", 1)[0]
    return head.removesuffix(".py") if "/" in file or file.endswith(".py") else file


# --------------------------------------------------------------------------------------------
# Scenarios


@dataclass(slots=True)
class DrainSpec:
    name: str
    kind: Kind
    sandbox: SandboxProc
    commands: int
    warmup: int
    prefetch: int
    pool_size: int
    sample_every_s: float = 0.2
    profile: bool = False
    max_window_s: float = 20.0


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


@dataclass(slots=True)
class Window:
    """What a drain observed: the snapshots around the measured window, the samples."""

    spawned: Snap
    start: Snap
    end: Snap
    sampler: Sampler
    hwm_kb: int
    statuses: Counter[str]
    measured: int  # commands in the window
    capped: bool  # the window hit its time cap before the last result


async def drain(ctx: Ctx, spec: DrainSpec) -> dict[str, Any]:
    """Preload warmup + N commands, start the consumer, time the N after the warm-up."""
    total = spec.warmup + spec.commands
    console.print(
        f"[bold]{spec.name}[/]: {spec.kind}, {total} commands ({spec.warmup} warm-up), "
        f"prefetch {spec.prefetch}, sandbox latency {spec.sandbox.latency_ms:g} ms"
    )
    async with stage(ctx, spec.name, spec.sandbox) as st:
        publisher = await CommandPublisher.open(ctx.channel, st.topology.commands_exchange)
        preload_rate = await preload(publisher, st.factory.make_many(0, total))
        ready, _ = await queue_state(ctx, st.topology.commands_queue)
        if ready != total:
            raise BenchError(f"{spec.name}: {ready} of {total} commands in the queue after preload")
        window = await _consume(ctx, spec, st, total)
    result = _drain_metrics(spec, window)
    result["preload_msg_s"] = round(preload_rate)
    if spec.name in ctx.profiles:
        result["profile"] = profile_result(ctx, spec.name)
    _check_statuses(spec.name, window.statuses)
    return result


async def _consume(ctx: Ctx, spec: DrainSpec, st: Stage, total: int) -> Window:
    """Start the consumer on the preloaded queue; snapshots at the warm-up and at the end.

    The window ends at the last result, or after ``spec.max_window_s`` (a slow, busy machine
    still finishes in bounded time; the commands measured are then fewer than N).
    """
    snaps: dict[str, Snap] = {}
    holder: dict[str, Child] = {}

    def window_start(_: int) -> None:
        child = holder["consumer"]
        snaps["start"] = snap(ctx.roles(child, spec.sandbox))
        if spec.profile:
            profiler = start_profiler(ctx, child, spec.name)
            if profiler is not None:
                holder["profiler"] = profiler

    def window_end(_: int) -> None:
        snaps["end"] = snap(ctx.roles(holder["consumer"], spec.sandbox))

    if spec.warmup > 0:
        st.collector.hooks[spec.warmup] = window_start
    st.collector.hooks[total] = window_end
    child = holder["consumer"] = start_consumer(
        ctx,
        kind=spec.kind,
        name=spec.name,
        topology=st.topology,
        sandbox=spec.sandbox,
        prefetch=spec.prefetch,
        pool_size=spec.pool_size,
    )
    spawned = snap(ctx.roles(child, spec.sandbox))
    if spec.warmup == 0:
        snaps["start"] = spawned
    sampler = Sampler(
        ctx, child, st.topology.commands_queue, total, st.collector, spec.sample_every_s
    )
    sampler.start()
    try:
        end_count = await _wait_window(
            ctx, spec, collector=st.collector, child=child, total=total, snaps=snaps
        )
        hwm = status_kb(child.pid, "VmHWM") or 0
    finally:
        await sampler.stop()
        if "profiler" in holder:
            await holder["profiler"].astop(timeout_s=20, sig=signal.SIGINT)
        await child.astop()
    return Window(
        spawned,
        snaps["start"],
        snaps["end"],
        sampler,
        hwm,
        st.collector.statuses,
        end_count - spec.warmup,
        end_count < total,
    )


async def _wait_window(
    ctx: Ctx,
    spec: DrainSpec,
    *,
    collector: ResultCollector,
    child: Child,
    total: int,
    snaps: dict[str, Snap],
) -> int:
    """Wait for the last result or the window's time cap; the count at the window's end."""
    deadline = time.monotonic() + 60.0 + spec.max_window_s
    while not await collector.wait_for(total, timeout_s=0.25):
        if not child.alive():
            raise BenchError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")
        start = snaps.get("start")
        if start is not None and time.perf_counter() - start.t > spec.max_window_s:
            count = collector.count
            snaps["end"] = snap(ctx.roles(child, spec.sandbox))
            console.print(
                f"[yellow]{spec.name}: window capped at {spec.max_window_s:g} s "
                f"({count - spec.warmup} commands measured; --max-window-s to change)"
            )
            return count
        if time.monotonic() > deadline:
            raise BenchError(
                f"{spec.name}: {collector.count} of {total} results, the window never started "
                f"(statuses {dict(collector.statuses)}); {child.name} log:\n{child.tail()}"
            )
    return total


def _drain_metrics(spec: DrainSpec, w: Window) -> dict[str, Any]:
    seconds = w.end.t - w.start.t
    inflight = [s[2] for s in w.sampler.between(w.start.t, w.end.t)]
    cpu = {role: w.end.cpu[role] - w.start.cpu[role] for role in w.end.cpu}
    cpu["others"] = max(0.0, cpu["others"])  # a difference of differences: can dip below 0
    total = spec.warmup + spec.commands
    n = w.measured
    result: dict[str, Any] = {
        "kind": spec.kind,
        "commands": n,
        "commands_preloaded": total,
        "window_capped": w.capped,
        "warmup": spec.warmup,
        "prefetch": spec.prefetch,
        "http_pool_size": spec.pool_size,
        "sandbox_latency_ms": spec.sandbox.latency_ms,
        "window_s": round(seconds, 3),
        "throughput_cmd_s": round(rate(n, seconds), 1),
        "consumer_cpu_us_per_cmd": round(cpu["consumer"] / n * 1e6, 1),
        "consumer_cpu_util_pct": round(100.0 * cpu["consumer"] / seconds, 1),
        "cpu_us_per_cmd": {r: round(v / n * 1e6, 1) for r, v in cpu.items()},
        "cpu_util_pct": {r: round(100.0 * v / seconds, 1) for r, v in cpu.items()},
        "startup_cpu_s": round(w.start.cpu["consumer"] - w.spawned.cpu["consumer"], 2),
        "spawn_to_last_result_s": round(w.end.t - w.spawned.t, 3),
        "throughput_incl_startup_cmd_s": round(rate(n + spec.warmup, w.end.t - w.spawned.t), 1),
        "rss_peak_mb": round(max((s[1] for s in w.sampler.samples), default=0) / 1024, 1),
        "rss_hwm_mb": round(w.hwm_kb / 1024, 1),
        "inflight_mean": round(statistics.fmean(inflight), 1) if inflight else None,
        "inflight_max": max(inflight) if inflight else None,
        "statuses": dict(w.statuses),
    }
    if spec.sandbox.latency_ms > 0:
        result["provider_concurrency_littles_law"] = round(
            rate(n, seconds) * spec.sandbox.latency_ms / 1000.0, 1
        )
    return result


def _check_statuses(name: str, statuses: Counter[str]) -> None:
    bad = {k: v for k, v in statuses.items() if k != "succeeded"}
    if bad:
        console.print(f"[red]{name}: not every command succeeded: {dict(statuses)}")


async def wait_results(
    collector: ResultCollector, child: Child, total: int, timeout_s: float
) -> bool:
    """Wait for ``total`` results, failing early if the consumer died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await collector.wait_for(total, timeout_s=0.5):
            return True
        if not child.alive():
            raise BenchError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")
    return False


async def wait_consumer(ctx: Ctx, child: Child, queue: str, timeout_s: float = 60.0) -> float:
    """Wait until ``queue`` has a consumer; returns the seconds it took."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if not child.alive():
            raise BenchError(f"{child.name} exited ({child.popen.returncode}):\n{child.tail()}")
        _, consumers = await queue_state(ctx, queue)
        if consumers > 0:
            return time.perf_counter() - started
        await asyncio.sleep(0.1)
    raise BenchError(f"{child.name} did not consume {queue} within {timeout_s:.0f} s")


async def paced(
    ctx: Ctx, sandbox: SandboxProc, kind: Kind, offered: float, measured_max: float
) -> dict[str, Any]:
    """Offer ``offered`` commands/s to a running consumer; publish→result latency per command."""
    name = "p99" if kind == "worker" else "p99-floor"
    args = ctx.args
    console.print(
        f"[bold]{name}[/]: {kind}, {offered:.0f} commands/s for {args.p99_seconds:g} s "
        f"(half of {measured_max:.0f}), prefetch {args.prefetch}, sandbox latency 0 ms"
    )
    async with stage(ctx, name, sandbox) as st:
        child = start_consumer(
            ctx,
            kind=kind,
            name=name,
            topology=st.topology,
            sandbox=sandbox,
            prefetch=args.prefetch,
            pool_size=args.pool_size,
        )
        profiler: Child | None = None
        try:
            startup_s = await wait_consumer(ctx, child, st.topology.commands_queue)
            await asyncio.sleep(0.5)
            rss_idle = status_kb(child.pid, "VmRSS") or 0
            commands = await CommandPublisher.open(ctx.channel, st.topology.commands_exchange)
            publisher = PacedPublisher(commands, st.factory, st.collector, offered)
            # Warm-up at the same rate (token, pools, scripts, first-use costs), not measured.
            await publisher.run(args.p99_warmup_s)
            if not await wait_results(st.collector, child, publisher.sent, 30.0):
                raise BenchError(f"{name}: the warm-up's results did not all arrive")
            st.collector.latencies.clear()
            publisher.lag_max_s = 0.0
            warmed = publisher.sent
            if args.profile:
                profiler = start_profiler(ctx, child, name)
            start = snap(ctx.roles(child, sandbox))
            achieved = await publisher.run(args.p99_seconds)
            done = await wait_results(st.collector, child, publisher.sent, 30.0)
            end = snap(ctx.roles(child, sandbox))
            hwm = status_kb(child.pid, "VmHWM") or 0
        finally:
            if profiler is not None:
                await profiler.astop(timeout_s=20, sig=signal.SIGINT)
            await child.astop()
        if not done:
            raise BenchError(f"{name}: {st.collector.count} of {publisher.sent} results")
    kept = [lat for _, lat in st.collector.latencies]
    pct = percentiles([x * 1000 for x in kept], (50, 95, 99, 99.9))
    cpu = {role: end.cpu[role] - start.cpu[role] for role in end.cpu}
    cpu["others"] = max(0.0, cpu["others"])
    sent = publisher.sent - warmed
    _check_statuses(name, st.collector.statuses)
    result = {
        "kind": kind,
        "offered_cmd_s": round(offered, 1),
        "achieved_cmd_s": round(achieved, 1),
        "measured_max_cmd_s": round(measured_max, 1),
        "seconds": args.p99_seconds,
        "commands": sent,
        "latency_samples": len(kept),
        "warmup_s": args.p99_warmup_s,
        "warmup_commands": warmed,
        "latency_ms": {k: round(v, 2) for k, v in pct.items()}
        | {
            "mean": round(statistics.fmean(kept) * 1000, 2) if kept else None,
            "max": round(max(kept) * 1000, 2) if kept else None,
        },
        "latency_timeline_ms": timeline(st.collector.latencies, start.t),
        "publisher_lag_max_ms": round(publisher.lag_max_s * 1000, 2),
        "consumer_cpu_us_per_cmd": round(cpu["consumer"] / sent * 1e6, 1),
        "consumer_cpu_util_pct": round(100.0 * cpu["consumer"] / (end.t - start.t), 1),
        "cpu_us_per_cmd": {r: round(v / sent * 1e6, 1) for r, v in cpu.items()},
        "cpu_util_pct": {r: round(100.0 * v / (end.t - start.t), 1) for r, v in cpu.items()},
        "startup_s": round(startup_s, 2),
        "rss_idle_mb": round(rss_idle / 1024, 1),
        "rss_hwm_mb": round(hwm / 1024, 1),
        "statuses": dict(st.collector.statuses),
    }
    if name in ctx.profiles:
        result["profile"] = profile_result(ctx, name)
    return result


def timeline(
    latencies: list[tuple[float, float]], start: float, bucket_s: float = 0.5
) -> list[list[float]]:
    """``[second sent, p50 ms, max ms, count]`` per ``bucket_s`` of send time: stalls show here."""
    buckets: dict[int, list[float]] = {}
    for sent, latency in latencies:
        buckets.setdefault(int((sent - start) / bucket_s), []).append(latency * 1000)
    rows = []
    for index in sorted(buckets):
        values = sorted(buckets[index])
        rows.append(
            [
                round(index * bucket_s, 2),
                round(values[len(values) // 2], 1),
                round(values[-1], 1),
                len(values),
            ]
        )
    return rows


def profile_result(ctx: Ctx, name: str) -> dict[str, Any]:
    path = Path(ctx.profiles[name])
    result: dict[str, Any] = {"file": str(path)}
    if ctx.args.profile_format == "raw" and path.exists():
        result.update(summarize_profile(path))
    return result


# --------------------------------------------------------------------------------------------
# Machine facts


def machine_facts(ctx_connection: AbstractConnection, redis_version: str) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    rabbit = "?"
    with contextlib.suppress(Exception):
        transport = ctx_connection.transport
        assert transport is not None
        props = transport.connection.server_properties
        version = props.get("version", b"?")
        rabbit = version.decode() if isinstance(version, bytes) else str(version)
    packages = {}
    for name in (
        "aio-pika",
        "aiormq",
        "aiohttp",
        "redis",
        "orjson",
        "pydantic",
        "opentelemetry-sdk",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            packages[name] = importlib.metadata.version(name)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "rabbitmq": rabbit,
        "redis": redis_version,
        "packages": packages,
        "loadavg_at_start": os.getloadavg(),
        "git": git_facts(),
    }


def git_facts() -> dict[str, Any]:
    """HEAD and the changed files: the worker measured is the working tree, not HEAD."""

    def run(*argv: str) -> str:
        try:
            return subprocess.run(
                ["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in run("status", "--porcelain").splitlines() if len(line) > 3]
    return {"head": run("rev-parse", "--short", "HEAD").strip(), "dirty_files": dirty}


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Worker/floor ratios (medians of the drain runs) and the acceptance flags."""
    scen = results["scenarios"]
    acceptance: dict[str, Any] = {}
    ratios: dict[str, Any] = {}
    drain_runs = scen.get("drain", {}).get("runs", [])
    workers = [r["worker"] for r in drain_runs if "worker" in r]
    floors = [r["floor"] for r in drain_runs if "floor" in r]
    worker_thr = median_of(workers, "throughput_cmd_s") if workers else None
    if workers and floors:
        w_cpu = median_of(workers, "consumer_cpu_us_per_cmd")
        f_cpu = median_of(floors, "consumer_cpu_us_per_cmd")
        f_thr = median_of(floors, "throughput_cmd_s")
        assert worker_thr is not None
        ratios = {
            "cpu_us_per_cmd_worker_over_floor": round(w_cpu / f_cpu, 3),
            "throughput_worker_over_floor": round(worker_thr / f_thr, 3),
            "worker_cpu_us_per_cmd": w_cpu,
            "floor_cpu_us_per_cmd": f_cpu,
            "worker_throughput_cmd_s": worker_thr,
            "floor_throughput_cmd_s": f_thr,
            "runs": len(drain_runs),
        }
        tracing = bool(results["tracing"]["otel_env"]) or bool(results["tracing"]["worker_env"])
        acceptance["1a_cpu_per_cmd_vs_floor"] = {
            "measured": ratios["cpu_us_per_cmd_worker_over_floor"],
            "threshold": f"<= {MAX_CPU_RATIO}",
            "pass": ratios["cpu_us_per_cmd_worker_over_floor"] <= MAX_CPU_RATIO,
            "note": "Redis dedup on; tracing "
            + ("env given (see tracing)" if tracing else "off (no OTEL_*/extra env given)"),
        }
        acceptance["1b_throughput_vs_floor"] = {
            "measured": ratios["throughput_worker_over_floor"],
            "threshold": f">= {MIN_THROUGHPUT_RATIO}",
            "pass": ratios["throughput_worker_over_floor"] >= MIN_THROUGHPUT_RATIO,
        }
    lat = scen.get("latency100")
    if lat and worker_thr:
        ratio = lat["throughput_cmd_s"] / worker_thr
        ratios["throughput_latency100_over_zero"] = round(ratio, 3)
        inflight = lat.get("inflight_max") or 0
        acceptance["2_latency100_throughput"] = {
            "measured": round(ratio, 3),
            "inflight_max": inflight,
            "threshold": f">= {MIN_LATENCY100_RATIO} with >= {MIN_LATENCY100_INFLIGHT} in flight",
            "pass": ratio >= MIN_LATENCY100_RATIO and inflight >= MIN_LATENCY100_INFLIGHT,
        }
    p99 = scen.get("p99")
    if p99:
        value = p99["latency_ms"]["p99"]
        acceptance["3_p99_at_half_rate"] = {
            "measured": value,
            "threshold": f"<= {MAX_P99_MS} ms",
            "pass": value <= MAX_P99_MS,
        }
    rss = scen.get("rss")
    if rss:
        peak = max(rss["rss_hwm_mb"], rss["rss_peak_mb"])
        inflight = rss.get("inflight_max") or 0
        acceptance["4_rss_2000_in_flight"] = {
            "measured": peak,
            "inflight_max": inflight,
            "threshold": f"<= {MAX_RSS_MB} MB with >= {RSS_INFLIGHT} in flight",
            "pass": peak <= MAX_RSS_MB and inflight >= RSS_INFLIGHT,
        }
    readme = (ROOT / "README.md").read_text(errors="replace")
    acceptance["5_one_command"] = {
        "measured": "./scripts/bench",
        "threshold": "in README.md",
        "pass": "./scripts/bench" in readme and os.access(ROOT / "scripts" / "bench", os.X_OK),
    }
    return {"ratios": ratios, "acceptance": acceptance}


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


_MAIN_COLUMNS = (
    "scenario",
    "process",
    "cmds",
    "cmd/s",
    "CPU µs/cmd",
    "CPU %",
    "RSS MB",
    "in flight mean/max",
    "sandbox µs",
    "rabbit µs",
    "redis µs",
    "runner µs",
    "others CPU %",
)


def _row(tag: str, r: dict[str, Any]) -> list[str]:
    cpu = r["cpu_us_per_cmd"]
    paced = "achieved_cmd_s" in r
    return [
        tag,
        r["kind"],
        _fmt(r["commands"]),
        f"{_fmt(r['achieved_cmd_s'])} paced" if paced else _fmt(r["throughput_cmd_s"]),
        _fmt(r["consumer_cpu_us_per_cmd"]),
        _fmt(r["consumer_cpu_util_pct"]),
        _fmt(max(r["rss_hwm_mb"], r.get("rss_peak_mb", 0.0)), 1),
        "" if paced else f"{_fmt(r['inflight_mean'])}/{_fmt(r['inflight_max'])}",
        _fmt(cpu["sandbox"]),
        _fmt(cpu["rabbitmq"]),
        _fmt(cpu["redis"]),
        _fmt(cpu["runner"]),
        _fmt(r["cpu_util_pct"]["others"]),
    ]


def _main_rows(scen: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    runs = scen.get("drain", {}).get("runs", [])
    for i, run in enumerate(runs):
        tag = "drain" + (f"#{i + 1}" if len(runs) > 1 else "")
        rows += [(tag, run[kind]) for kind in ("floor", "worker") if kind in run]
    for key in ("p99", "p99_floor", "latency100", "rss"):
        if key in scen:
            rows.append((key.replace("_floor", ""), scen[key]))
    return rows


def main_table(results: dict[str, Any]) -> Table:
    table = Table(title=f"conference-worker bench {results['run_id']}", title_justify="left")
    for col in _MAIN_COLUMNS:
        table.add_column(col, justify="left" if col in ("scenario", "process") else "right")
    for tag, r in _main_rows(results["scenarios"]):
        table.add_row(*_row(tag, r))
    return table


def latency_table(scen: dict[str, Any]) -> Table:
    table = Table(title="publish → result latency at half the measured maximum rate (ms)")
    for col in ("process", "offered cmd/s", "p50", "p95", "p99", "p99.9", "max", "samples"):
        table.add_column(col, justify="left" if col == "process" else "right")
    for key in ("p99", "p99_floor"):
        if key in scen:
            r = scen[key]
            lat = r["latency_ms"]
            table.add_row(
                r["kind"],
                _fmt(r["offered_cmd_s"]),
                *(_fmt(lat[k], 2) for k in ("p50", "p95", "p99", "p99.9", "max")),
                _fmt(r["latency_samples"]),
            )
    return table


def ratio_table(r: dict[str, Any]) -> Table:
    table = Table(title=f"worker / floor (median of {r['runs']} drain run(s))")
    for col in ("CPU µs/cmd worker", "floor", "ratio", "cmd/s worker", "floor", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(
        _fmt(r["worker_cpu_us_per_cmd"]),
        _fmt(r["floor_cpu_us_per_cmd"]),
        _fmt(r["cpu_us_per_cmd_worker_over_floor"], 2),
        _fmt(r["worker_throughput_cmd_s"]),
        _fmt(r["floor_throughput_cmd_s"]),
        _fmt(r["throughput_worker_over_floor"], 2),
    )
    return table


def acceptance_table(acceptance: dict[str, Any]) -> Table:
    table = Table(title="acceptance")
    for col in ("criterion", "measured", "threshold", "result"):
        table.add_column(col)
    for key, a in acceptance.items():
        measured = _fmt(a["measured"], 2) if isinstance(a["measured"], float) else a["measured"]
        if "inflight_max" in a:
            measured = f"{measured} ({a['inflight_max']} in flight)"
        table.add_row(
            key, str(measured), a["threshold"], "[green]pass" if a["pass"] else "[red]FAIL"
        )
    return table


def markdown(results: dict[str, Any]) -> str:
    """The run as Markdown (machine facts, command, tables): RESULTS.md is made of these."""
    m = results["machine"]
    scen = results["scenarios"]
    lines = [
        f"### Run `{results['run_id']}` ({results['started_at'][:19]}Z, {results['duration_s']} s)",
        "",
        f"- command: `{results['command']}`",
        f"- machine: {m['nproc']} cores, {m['cpu_model']}, kernel {m['kernel']}; "
        f"RabbitMQ {m['rabbitmq']}, Redis {m['redis']}, Python {m['python']}",
        "- libraries: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items()),
        f"- load average at start/end: {m['loadavg_at_start'][0]:.2f} / "
        f"{m.get('loadavg_at_end', [0.0])[0]:.2f}; git {m['git']['head']}"
        + (
            f" with {len(m['git']['dirty_files'])} changed file(s)"
            if m["git"]["dirty_files"]
            else ""
        ),
        "",
        "| " + " | ".join(_MAIN_COLUMNS) + " |",
        "|" + "---|" * len(_MAIN_COLUMNS),
    ]
    for tag, r in _main_rows(scen):
        lines.append("| " + " | ".join(_row(tag, r)) + " |")
    if "p99" in scen:
        lines += [
            "",
            "| publish→result (ms) | offered cmd/s | p50 | p95 | p99 | p99.9 | max |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in ("p99", "p99_floor"):
            if key in scen:
                lat = scen[key]["latency_ms"]
                cells = [_fmt(lat[k], 2) for k in ("p50", "p95", "p99", "p99.9", "max")]
                offered = _fmt(scen[key]["offered_cmd_s"])
                lines.append(f"| {scen[key]['kind']} | {offered} | " + " | ".join(cells) + " |")
    r = results["summary"]["ratios"]
    if r.get("runs"):
        lines += [
            "",
            f"| worker / floor, median of {r['runs']} drain run(s) | worker | floor | ratio |",
            "|---|---|---|---|",
            "| CPU µs per command | "
            + " | ".join(
                [
                    _fmt(r["worker_cpu_us_per_cmd"]),
                    _fmt(r["floor_cpu_us_per_cmd"]),
                    _fmt(r["cpu_us_per_cmd_worker_over_floor"], 2),
                ]
            )
            + " |",
            "| drain throughput (cmd/s) | "
            + " | ".join(
                [
                    _fmt(r["worker_throughput_cmd_s"]),
                    _fmt(r["floor_throughput_cmd_s"]),
                    _fmt(r["throughput_worker_over_floor"], 2),
                ]
            )
            + " |",
        ]
    lines += ["", "| acceptance | measured | threshold | result |", "|---|---|---|---|"]
    for key, a in results["summary"]["acceptance"].items():
        measured = _fmt(a["measured"], 2) if isinstance(a["measured"], float) else a["measured"]
        if "inflight_max" in a:
            measured = f"{measured} ({a['inflight_max']} in flight)"
        lines.append(
            f"| {key} | {measured} | {a['threshold']} | {'pass' if a['pass'] else 'FAIL'} |"
        )
    lines += [""] + [f"> {w}" for w in results.get("noise_warnings", [])]
    return "\n".join(lines) + "\n"


NOISY_OTHERS_PCT = 20.0


def noise_warnings(results: dict[str, Any]) -> list[str]:
    """Say so when other processes used the CPU during a measurement (the machine is shared)."""
    scen = results["scenarios"]
    measured: list[tuple[str, dict[str, Any]]] = []
    for i, run in enumerate(scen.get("drain", {}).get("runs", [])):
        measured += [(f"drain#{i + 1} {k}", v) for k, v in run.items()]
    measured += [(k, v) for k, v in scen.items() if k != "drain"]
    noisy = [
        f"{name} {r['cpu_util_pct']['others']:.0f}%"
        for name, r in measured
        if r.get("cpu_util_pct", {}).get("others", 0.0) > NOISY_OTHERS_PCT
    ]
    if not noisy:
        return []
    return [
        "other processes used the CPU during: "
        + ", ".join(noisy)
        + " (of 100% per core): these figures are noisy; run again on a quiet machine"
        + " or with --repeat"
    ]


def tables(results: dict[str, Any]) -> Iterator[Table]:
    yield main_table(results)
    if "p99" in results["scenarios"]:
        yield latency_table(results["scenarios"])
    if results["summary"]["ratios"].get("runs"):
        yield ratio_table(results["summary"]["ratios"])
    yield acceptance_table(results["summary"]["acceptance"])


# --------------------------------------------------------------------------------------------
# Main


async def run(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    if task is not None:  # Ctrl-C or SIGTERM: cancel, so every finally stops and deletes
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, task.cancel)
    began = time.perf_counter()
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    out = Path(args.out)
    logs = out.parent / run_id
    logs.mkdir(parents=True, exist_ok=True)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(scenarios) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    connection = await aio_pika.connect(  # not robust: nothing is re-declared behind our back
        args.amqp_url, client_properties={"connection_name": f"{run_id}-runner"}
    )
    redis = aioredis.Redis.from_url(args.dedup_url)
    http = aiohttp.ClientSession()
    ok = False
    profiles: dict[str, str] = {}
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        ctx = Ctx(
            args=args,
            run_id=run_id,
            logs=logs,
            connection=connection,
            channel=channel,
            probe=await connection.channel(),
            redis=redis,
            http=http,
            beam=server_pids(args.amqp_url, 5672, "beam.smp"),
            redis_server=server_pids(args.dedup_url, 6379, "redis-server"),
            profiles=profiles,
        )
        info = await redis.info("server")
        results: dict[str, Any] = {
            "run_id": run_id,
            "started_at": datetime.now(UTC).isoformat(),
            "command": " ".join(["python -m ops.bench.bench", *sys.argv[1:]]),
            "machine": machine_facts(connection, str(info.get("redis_version", "?"))),
            "settings": {
                k: v for k, v in vars(args).items() if k not in ("out",) and not callable(v)
            },
            "tracing": {
                "otel_env": {k: v for k, v in os.environ.items() if k.startswith("OTEL_")},
                "worker_env": extra_worker_env(args),
                "note": "the worker has no tracing yet; OTEL_* and --worker-env are passed through",
            },
            "scenarios": {},
        }
        console.print(
            f"[bold]{run_id}[/] · scenarios {', '.join(scenarios)} · {args.commands} commands · "
            f"{results['machine']['nproc']} cores · load {os.getloadavg()[0]:.2f}"
        )
        await run_scenarios(ctx, scenarios, results)
        results["duration_s"] = round(time.perf_counter() - began, 1)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        results["summary"] = summarize(results)
        results["noise_warnings"] = noise_warnings(results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")  # noqa: ASYNC240
        for table in tables(results):
            console.print(table)
        for warning in results["noise_warnings"]:
            console.print(f"[yellow]{warning}")
        if args.markdown:
            Path(args.markdown).write_text(markdown(results), encoding="utf-8")  # noqa: ASYNC240
        console.print(f"wrote {out} · {results['duration_s']} s")
        ok = True
        failed = [k for k, a in results["summary"]["acceptance"].items() if not a["pass"]]
        return 1 if failed and args.strict else 0
    finally:
        stop_all()
        await http.close()
        await redis.aclose()
        await connection.close()
        if ok and not args.keep_logs and not profiles:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            console.print(f"logs kept in {logs}")


async def run_scenarios(ctx: Ctx, scenarios: list[str], results: dict[str, Any]) -> None:
    """One sandbox per latency; the zero-latency one serves drain and p99."""
    args = ctx.args
    scen = results["scenarios"]
    if "drain" in scenarios or "p99" in scenarios:
        async with sandbox_at(ctx, 0.0) as sandbox:
            if "drain" in scenarios:
                scen["drain"] = {
                    "runs": [await drain_pair(ctx, sandbox, i) for i in range(args.repeat)]
                }
            if "p99" in scenarios:
                await p99(ctx, sandbox, scen)
    if "latency100" in scenarios:
        async with sandbox_at(ctx, args.latency_ms) as sandbox:
            spec = DrainSpec(
                "latency100",
                "worker",
                sandbox,
                args.commands,
                args.warmup,
                args.prefetch_latency,
                args.pool_size,
                profile=args.profile,
                max_window_s=args.max_window_s,
            )
            scen["latency100"] = await drain(ctx, spec)
    if "rss" in scenarios:
        async with sandbox_at(ctx, args.rss_latency_ms) as sandbox:
            spec = DrainSpec(
                "rss",
                "worker",
                sandbox,
                args.rss_commands,
                0,
                args.rss_prefetch,
                args.rss_pool_size,
                sample_every_s=0.1,
                max_window_s=120.0,
            )
            scen["rss"] = await drain(ctx, spec)


@contextlib.asynccontextmanager
async def sandbox_at(ctx: Ctx, latency_ms: float) -> AsyncIterator[SandboxProc]:
    sandbox = await start_sandbox(ctx, latency_ms)
    try:
        yield sandbox
    finally:
        await sandbox.child.astop()


async def drain_pair(ctx: Ctx, sandbox: SandboxProc, index: int) -> dict[str, Any]:
    """The floor, then the worker, on the same sandbox and the same command mix."""
    args = ctx.args
    suffix = f"-{index + 1}" if args.repeat > 1 else ""
    pair: dict[str, Any] = {}
    for kind in ("floor", "worker"):
        spec = DrainSpec(
            f"drain-{kind}{suffix}",
            kind,
            sandbox,
            args.commands,
            args.warmup,
            args.prefetch,
            args.pool_size,
            profile=args.profile,
            max_window_s=args.max_window_s,
        )
        pair[kind] = await drain(ctx, spec)
    return pair


async def p99(ctx: Ctx, sandbox: SandboxProc, scen: dict[str, Any]) -> None:
    """Half the worker's measured drain rate (or ``--rate``/2), worker then floor."""
    measured = ctx.args.rate
    if measured is None and "drain" in scen:
        measured = statistics.median(r["worker"]["throughput_cmd_s"] for r in scen["drain"]["runs"])
    if measured is None:
        raise SystemExit("p99 needs the drain scenario or --rate (commands/s)")
    scen["p99"] = await paced(ctx, sandbox, "worker", measured / 2.0, measured)
    if ctx.args.p99_floor:
        scen["p99_floor"] = await paced(ctx, sandbox, "floor", measured / 2.0, measured)


LEFTOVER = re.compile(r"^bench-[0-9a-f]{8}-")


def leftover_names() -> dict[str, list[str]]:
    """``bench-<id>-*`` queues and exchanges, as ``rabbitmqctl`` lists them."""
    names: dict[str, list[str]] = {}
    for what in ("queues", "exchanges"):
        out = subprocess.run(
            ["rabbitmqctl", "-q", f"list_{what}", "--no-table-headers", "name"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
        names[what] = [n.strip() for n in out.splitlines() if LEFTOVER.match(n.strip())]
    return names


async def cleanup(args: argparse.Namespace) -> int:
    """Delete what runs that were killed (SIGKILL, power) left: ``bench-<id>-*`` and its keys."""
    names = await asyncio.to_thread(leftover_names)
    connection = await aio_pika.connect(args.amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in names["queues"]:
            await channel.queue_delete(queue)
        for exchange in names["exchanges"]:
            await channel.exchange_delete(exchange)
    redis = aioredis.Redis.from_url(args.dedup_url)
    keys = [k async for k in redis.scan_iter(match="cw:dedup:bench-*", count=2000)]
    for offset in range(0, len(keys), 2000):
        await redis.unlink(*keys[offset : offset + 2000])
    await redis.aclose()
    console.print(
        f"deleted {len(names['queues'])} queue(s), {len(names['exchanges'])} exchange(s), "
        f"{len(keys)} dedup key(s) of earlier benchmark runs"
    )
    return 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ops.bench.bench",
        description="Benchmark the worker against the bare floor (see ops/bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--commands",
        type=int,
        default=None,
        help="measured commands per drain (default 5000, --quick 2000)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="commands before the measured window (default 10%%, at least 300)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke run: 2000 commands, 5 s of paced load"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help="comma-separated subset of " + ",".join(SCENARIOS),
    )
    p.add_argument("--out", default=str(ROOT / "ops" / "bench" / "results" / "latest.json"))
    p.add_argument(
        "--max-window-s",
        type=float,
        default=20.0,
        help="cap on a drain's measured window (a busy machine still finishes in time)",
    )
    p.add_argument(
        "--repeat", type=int, default=1, help="floor/worker drain pairs (the median is judged)"
    )
    p.add_argument(
        "--prefetch", type=int, default=256, help="CW_PREFETCH (and the floor's prefetch)"
    )
    p.add_argument("--pool-size", type=int, default=256, help="CW_HTTP_POOL_SIZE (and the floor's)")
    p.add_argument("--conferences", type=int, default=1000, help="sandbox --conferences")
    p.add_argument("--latency-ms", type=float, default=100.0, help="sandbox latency of latency100")
    p.add_argument("--prefetch-latency", type=int, default=400, help="CW_PREFETCH in latency100")
    p.add_argument(
        "--rate", type=float, default=None, help="max rate for p99 when drain is not run"
    )
    p.add_argument(
        "--p99-seconds",
        type=float,
        default=None,
        help="paced load duration (default 10, --quick 5)",
    )
    p.add_argument(
        "--p99-warmup-s",
        type=float,
        default=2.0,
        help="paced load before the measured seconds (not counted)",
    )
    p.add_argument(
        "--p99-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the floor's latency at the same offered rate (the harness's own floor)",
    )
    p.add_argument("--rss-commands", type=int, default=2500)
    p.add_argument("--rss-prefetch", type=int, default=2000)
    p.add_argument(
        "--rss-pool-size", type=int, default=1024, help="per provider, so ~all are at the provider"
    )
    p.add_argument("--rss-latency-ms", type=float, default=2000.0)
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--dedup-url", default="redis://127.0.0.1:6379/0", help="CW_DEDUP_URL")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra env for the worker (repeatable), e.g. tracing settings",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="py-spy record the consumers during the measured windows",
    )
    p.add_argument("--profile-format", choices=("raw", "flamegraph", "speedscope"), default="raw")
    p.add_argument(
        "--profile-nonblocking",
        action="store_true",
        help="py-spy --nonblocking: no pauses, but inclusive shares suffer from torn stacks",
    )
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples/s")
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs (kept anyway on failure)"
    )
    p.add_argument("--markdown", default=None, help="also write the run as Markdown to this file")
    p.add_argument(
        "--cleanup",
        action="store_true",
        help="only delete what killed runs left (bench-<id>-* queues, exchanges, dedup keys)",
    )
    p.add_argument(
        "--strict", action="store_true", help="exit 1 when an acceptance threshold fails"
    )
    args = p.parse_args(argv)
    if args.commands is None:
        args.commands = 2000 if args.quick else 5000
    if args.warmup is None:
        args.warmup = max(300, args.commands // 10)
    if args.p99_seconds is None:
        args.p99_seconds = 5.0 if args.quick else 10.0
    for item in args.worker_env:
        if "=" not in item:
            p.error(f"--worker-env {item!r}: expected NAME=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return asyncio.run(cleanup(args) if args.cleanup else run(args))
    except BenchError as exc:
        console.print(f"[red]benchmark failed: {exc}")
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted: processes stopped, topology deleted")
        return 130
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
