"""Benchmark scenarios: timed drains and a paced publisher, measured per process."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .load import (
    CommandPublisher,
    PacedPublisher,
    ResultCollector,
    percentiles,
    preload,
)
from .procs import (
    BenchError,
    Child,
    Kind,
    Snap,
    console,
    snap,
    status_kb,
)
from .profiling import start_profiler, summarize_profile
from .stage import (
    Ctx,
    Sampler,
    SandboxProc,
    Stage,
    queue_state,
    stage,
    start_consumer,
)

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
    if ctx.sink is not None:
        ctx.sink.mark(spec.name)
    async with stage(ctx, spec.name, spec.sandbox) as st:
        publisher = await CommandPublisher.open(ctx.channel, st.topology.commands_exchange)
        preload_rate = await preload(publisher, st.factory.make_many(0, total))
        ready, _ = await queue_state(ctx, st.topology.commands_queue)
        if ready != total:
            raise BenchError(f"{spec.name}: {ready} of {total} commands in the queue after preload")
        window = await _consume(ctx, spec, st, total)
    result = _drain_metrics(spec, window)
    result["preload_msg_s"] = round(preload_rate)
    if ctx.sink is not None and spec.kind == "worker":
        result["spans_exported"] = ctx.sink.since(spec.name)
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
        "http_pool_size": None if spec.kind == "peer" else spec.pool_size,  # httpx's default
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
    name = "p99" if kind == "worker" else f"p99-{kind}"
    args = ctx.args
    console.print(
        f"[bold]{name}[/]: {kind}, {offered:.0f} commands/s for {args.p99_seconds:g} s "
        f"(half of {measured_max:.0f}), prefetch {args.prefetch}, "
        f"sandbox latency {sandbox.latency_ms:g} ms"
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
            publisher.confirms.clear()
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
        "broker_confirm_ms": {
            k: round(v, 2)
            for k, v in percentiles([x * 1000 for x in publisher.confirms], (50, 99, 100)).items()
        },
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
