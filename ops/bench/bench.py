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
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import redis.asyncio as aioredis

from .options import parse
from .otlp_sink import OtlpSink
from .procs import (
    SCENARIOS,
    BenchError,
    Kind,
    console,
    server_pids,
    stop_all,
)
from .report import (
    BROKER_STALL_MS,
    machine_facts,
    markdown,
    noise_warnings,
    summarize,
    tables,
)
from .scenarios import DrainSpec, drain, paced
from .stage import Ctx, SandboxProc, extra_worker_env, start_sandbox

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
    sink = OtlpSink() if args.tracing else None
    ok = False
    profiles: dict[str, str] = {}
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if sink is not None:
            await sink.start()
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
            sink=sink,
        )
        info = await redis.info("server")
        results = header(args, run_id, machine_facts(connection, str(info.get("redis_version"))))
        console.print(
            f"[bold]{run_id}[/] · scenarios {', '.join(scenarios)} · {args.commands} commands · "
            f"{results['machine']['nproc']} cores · load {os.getloadavg()[0]:.2f}"
        )
        await run_scenarios(ctx, scenarios, results)
        if sink is not None:
            results["tracing"].update(spans_exported=sink.spans, exports=sink.exports)
        results["duration_s"] = round(time.perf_counter() - began, 1)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        results["summary"] = summarize(results)
        results["noise_warnings"] = noise_warnings(results)
        write(results, out, args.markdown)
        ok = True
        failed = [k for k, a in results["summary"]["acceptance"].items() if not a["pass"]]
        return 1 if failed and args.strict else 0
    finally:
        stop_all()
        if sink is not None:
            await sink.stop()
        await http.close()
        await redis.aclose()
        await connection.close()
        if ok and not args.keep_logs and not profiles:
            shutil.rmtree(logs, ignore_errors=True)
        else:
            console.print(f"logs kept in {logs}")


def header(args: argparse.Namespace, run_id: str, machine: dict[str, Any]) -> dict[str, Any]:
    """The run's description, before any scenario."""
    return {
        "run_id": run_id,
        "started_at": datetime.now(UTC).isoformat(),
        "command": " ".join(["python -m ops.bench.bench", *sys.argv[1:]]),
        "machine": machine,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",) and not callable(v)},
        "tracing": {
            "on": args.tracing,
            "otel_env": {k: v for k, v in os.environ.items() if k.startswith("OTEL_")},
            "worker_env": extra_worker_env(args),
            "note": (
                "the worker exports spans over OTLP/HTTP to a sink in the runner, default "
                "sampler (parent-based, ratio 0.1); OTEL_* set here win"
                if args.tracing
                else "off (--no-tracing)"
            ),
        },
        "scenarios": {},
    }


def write(results: dict[str, Any], out: Path, markdown_path: str | None) -> None:
    """The JSON file, the tables and warnings on the console, and the Markdown if asked."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    for table in tables(results):
        console.print(table)
    for warning in results["noise_warnings"]:
        console.print(f"[yellow]{warning}")
    if markdown_path:
        Path(markdown_path).write_text(markdown(results), encoding="utf-8")
    console.print(f"wrote {out} · {results['duration_s']} s")


async def run_scenarios(ctx: Ctx, scenarios: list[str], results: dict[str, Any]) -> None:
    """One sandbox per latency.  Drain pairs and latency100 runs alternate (the host's speed
    drifts within minutes), and each is judged by its median; p99 follows the drains."""
    args = ctx.args
    scen = results["scenarios"]
    async with contextlib.AsyncExitStack() as stack:
        zero = slow = None
        if "drain" in scenarios or "p99" in scenarios:
            zero = await stack.enter_async_context(sandbox_at(ctx, 0.0))
        if "latency100" in scenarios:
            slow = await stack.enter_async_context(sandbox_at(ctx, args.latency_ms))
        pairs: list[dict[str, Any]] = []
        slows: list[dict[str, Any]] = []
        for i in range(args.repeat):
            if zero is not None and "drain" in scenarios:
                pairs.append(await drain_pair(ctx, zero, i))
            if slow is not None:
                spec = drain_spec(
                    ctx, "latency100", "worker", slow, index=i, prefetch=args.prefetch_latency
                )
                slows.append(await drain(ctx, spec))
        if pairs:
            scen["drain"] = {"runs": pairs}
        if slows:
            scen["latency100"] = median_run(slows)
        if zero is not None and "p99" in scenarios:
            await p99(ctx, zero, scen)
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


def drain_spec(
    ctx: Ctx, name: str, kind: Kind, sandbox: SandboxProc, *, index: int, prefetch: int
) -> DrainSpec:
    """A drain of ``--commands`` with the run's settings; ``index`` numbers repeated runs."""
    args = ctx.args
    return DrainSpec(
        name + (f"-{index + 1}" if args.repeat > 1 else ""),
        kind,
        sandbox,
        args.commands,
        args.warmup,
        prefetch,
        args.pool_size,
        profile=args.profile,
        max_window_s=args.max_window_s,
    )


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median throughput, with every run's throughput beside it."""
    ordered = sorted(runs, key=lambda r: r["throughput_cmd_s"])
    median = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        median["repeats_cmd_s"] = [r["throughput_cmd_s"] for r in runs]
    return median


@contextlib.asynccontextmanager
async def sandbox_at(ctx: Ctx, latency_ms: float) -> AsyncIterator[SandboxProc]:
    sandbox = await start_sandbox(ctx, latency_ms)
    try:
        yield sandbox
    finally:
        await sandbox.child.astop()


def pair_order(index: int) -> tuple[Kind, Kind]:
    """Floor first in even pairs, worker first in odd ones (floor, worker, worker, floor, ...):
    a host that slows down, or speeds up, during a run no longer always favours the same side."""
    return ("floor", "worker") if index % 2 == 0 else ("worker", "floor")


async def drain_pair(ctx: Ctx, sandbox: SandboxProc, index: int) -> dict[str, Any]:
    """The floor and the worker, in :func:`pair_order`, on the same sandbox and command mix."""
    pair: dict[str, Any] = {}
    for kind in pair_order(index):
        spec = drain_spec(
            ctx, f"drain-{kind}", kind, sandbox, index=index, prefetch=ctx.args.prefetch
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
    scen["p99"] = await paced_past_stalls(ctx, sandbox, "worker", measured / 2.0, measured)
    if ctx.args.p99_floor:
        scen["p99_floor"] = await paced(ctx, sandbox, "floor", measured / 2.0, measured)


async def paced_past_stalls(
    ctx: Ctx, sandbox: SandboxProc, kind: Kind, offered: float, measured: float
) -> dict[str, Any]:
    """A paced window, run again (``--p99-reruns`` times at most) while the broker stalled in it.

    When the broker alone takes over half the latency target to confirm (its quorum queue's disk
    write stalled), every consumer's latency measures the disk, not the consumer: such a window
    is kept in ``stalled_windows`` and the next one is judged (the last one if all stalled).
    """
    stalled: list[dict[str, Any]] = []
    while True:
        window = await paced(ctx, sandbox, kind, offered, measured)
        broker = window["broker_confirm_ms"]["p99"]
        if broker <= BROKER_STALL_MS or len(stalled) >= ctx.args.p99_reruns:
            break
        console.print(
            f"[yellow]{kind}: the broker took {broker:.1f} ms (p99, publish → confirm): "
            "its disk stalled; the window is run again"
        )
        stalled.append({k: window[k] for k in ("latency_ms", "broker_confirm_ms")})
    if stalled:
        window["stalled_windows"] = stalled
    return window


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
