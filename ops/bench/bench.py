"""The conference-worker benchmark: the worker, the bare floor and the naive peer, in one run.

    python -m ops.bench.bench [--commands N] [--quick] [--scenarios drain,latency100,p99,rss]
                              [--out ops/bench/results/latest.json] [--repeat K] [--profile]
                              [--consumers floor,worker,peer] [--peer-scenarios drain|all|...]

It starts the sandbox (``python -m worker sandbox``), then for each scenario a consumer process
(``python -m worker run``, the floor ``python -m ops.bench.floor`` or the naive FastStream peer
``python -m ops.bench.peer``; which runs where: ``ops/bench/plan.py``) on a topology of its own
(``<run id>-<scenario>.*``, deleted afterwards), publishes commands and collects the result events
itself.  CPU comes from each process's own ``/proc/<pid>/stat`` (utime + stime), memory from
``/proc/<pid>/status`` (VmRSS sampled, VmHWM at the end).  See ``ops/bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import redis.asyncio as aioredis

from .options import parse
from .otlp_sink import OtlpSink
from .plan import run_scenarios
from .procs import SCENARIOS, BenchError, console, server_pids, stop_all
from .replicas import grids as replica_grids
from .replicas import run_replicas
from .report import machine_facts, markdown, tables, to_markdown, to_table
from .stage import Ctx, extra_worker_env
from .verdict import failed_points, noise_warnings, summarize

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
        console.print(banner(args, run_id, scenarios, results["machine"]["nproc"]))
        if args.replicas is not None:
            results["replicas"] = await run_replicas(ctx)
        else:
            await run_scenarios(ctx, scenarios, results)
        if sink is not None:
            results["tracing"].update(spans_exported=sink.spans, exports=sink.exports)
        results["duration_s"] = round(time.perf_counter() - began, 1)
        results["machine"]["loadavg_at_end"] = os.getloadavg()
        code = report(args, results, out)
        ok = True
        return code
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


def report(args: argparse.Namespace, results: dict[str, Any], out: Path) -> int:
    """Write and print the run; the exit code (1: a command lost, or ``--strict`` and a point
    failed)."""
    if args.replicas is not None:
        write_replicas(results, out, args.markdown)
        return 1 if results["replicas"].get("takeover", {}).get("lost") else 0
    results["summary"] = summarize(results)
    results["noise_warnings"] = noise_warnings(results)
    write(results, out, args.markdown)
    return 1 if failed_points(results["summary"]) and args.strict else 0


def banner(args: argparse.Namespace, run_id: str, scenarios: list[str], nproc: int) -> str:
    what = (
        f"{args.replicas} replicas, P={args.partitions}"
        if args.replicas is not None
        else f"scenarios {', '.join(scenarios)} · consumers {', '.join(args.consumers)} "
        f"(peer in {', '.join(args.peer_scenarios)})"
    )
    return (
        f"[bold]{run_id}[/] · {what} · {args.commands} commands · {nproc} cores · "
        f"load {os.getloadavg()[0]:.2f}"
    )


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


def write_replicas(results: dict[str, Any], out: Path, markdown_path: str | None) -> None:
    """The JSON file and the ``--replicas`` tables (console, and Markdown if asked)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    found = replica_grids(results["replicas"])
    for grid in found:
        console.print(to_table(grid))
    if markdown_path:
        lines = [f"### Run `{results['run_id']}` ({results['duration_s']} s)", ""]
        lines.append(f"- command: `{results['command']}`")
        for grid in found:
            lines += to_markdown(grid)
        Path(markdown_path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    console.print(f"wrote {out} · {results['duration_s']} s")


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
    """Delete what runs that were killed (SIGKILL, power) left: ``bench-<id>-*`` and its keys
    (the worker's ``cw:dedup:bench-*``, the peer's ``cw:peer:bench-*``)."""
    names = await asyncio.to_thread(leftover_names)
    connection = await aio_pika.connect(args.amqp_url)
    async with connection:
        channel = await connection.channel()
        for queue in names["queues"]:
            await channel.queue_delete(queue)
        for exchange in names["exchanges"]:
            await channel.exchange_delete(exchange)
    redis = aioredis.Redis.from_url(args.dedup_url)
    keys = [
        k
        for match in ("cw:dedup:bench-*", "cw:peer:bench-*")
        async for k in redis.scan_iter(match=match, count=2000)
    ]
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
