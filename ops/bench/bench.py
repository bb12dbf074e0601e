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

from .procs import (
    ROOT,
    SCENARIOS,
    BenchError,
    console,
    server_pids,
    stop_all,
)
from .report import machine_facts, markdown, noise_warnings, summarize, tables
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
