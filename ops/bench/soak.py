"""Soak: a worker at a steady rate for a long time, with provider faults; leaks and loss watched.

    python -m ops.bench.soak [--duration-s 3600] [--rate 200] [--fault-rate 0.1]

It starts the sandbox (in this process, injecting random 503s, 429s and latency), one worker
process on Redis deduplication and a topology of its own, publishes commands at a steady rate,
collects every result event, and samples the worker's RSS.  At the end it prints (and writes as
JSON) the outcome counts, memory growth, and the two numbers that must be 0: commands *lost*
(published, no result event) and commands *duplicated* (carried out more than once at the
provider).  Not part of CI: an hour is the default.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson

from worker.app import topology
from worker.sandbox import Sandbox
from worker.settings import Settings

from .env import worker_env

AMQP_URL = os.environ.get("CW_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("CW_DEDUP_URL", "redis://127.0.0.1:6379/0")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def command(fx: dict[str, Any], run: str, n: int) -> dict[str, Any]:
    calls = [(c, x) for c, ids in fx["telnyx"]["calls_by_conference"].items() for x in ids]
    confs = fx["vinix"]["conference_ids"]
    common = {"command_id": f"soak-{run}-{n}"}
    if n % 2:
        conf, call = calls[(n // 2) % len(calls)]
        return {
            **common,
            "type": "conference.supervisor_role",
            "conference_id": conf,
            "call_control_id": call,
            "supervisor_role": ("monitor", "whisper")[n % 2],
        }
    return {
        **common,
        "type": "conference.update",
        "account_id": fx["vinix"]["account_id"],
        "conference_id": confs[(n // 2) % len(confs)],
        "conference": {"name": common["command_id"]},
    }


async def inject_faults(sandbox: Sandbox, fault_rate: float) -> None:
    """Random 503s, 429s and 50 ms delays at ``fault_rate`` (none at 0)."""
    if fault_rate <= 0:
        return
    root = sandbox.base_url.removesuffix("/v2")
    faults = [
        {"status": 503, "probability": fault_rate, "seed": 1},
        {"status": 429, "probability": fault_rate / 4, "retry_after_s": 1, "seed": 2},
        {"latency_ms": 50, "probability": fault_rate, "seed": 3},
    ]
    async with aiohttp.ClientSession() as http:
        for fault in faults:
            async with http.post(f"{root}/__admin/faults", json=fault) as answer:
                answer.raise_for_status()


async def publish_steadily(
    exchange: aio_pika.abc.AbstractExchange,
    fx: dict[str, Any],
    run: str,
    rate: float,
    duration_s: float,
) -> int:
    started, n = time.monotonic(), 0
    while (elapsed := time.monotonic() - started) < duration_s:
        due = int(elapsed * rate)
        while n < due:
            body = command(fx, run, n)
            await exchange.publish(
                aio_pika.Message(orjson.dumps(body), delivery_mode=2), body["type"]
            )
            n += 1
        await asyncio.sleep(0.01)
    return n


async def collect(
    queue: aio_pika.abc.AbstractQueue, events: dict[str, list[str]], stop: asyncio.Event
) -> None:
    async with queue.iterator() as messages:
        async for message in messages:
            async with message.process():
                event = orjson.loads(message.body)
                events.setdefault(event["command_id"], []).append(
                    "duplicate" if event["duplicate"] else event["status"]
                )
            if stop.is_set():
                return


def carried_out(sandbox: Sandbox) -> Counter[str]:
    """Commands carried out (2xx) at the provider, by command id."""
    done: Counter[str] = Counter()
    for request in sandbox.requests.entries():
        body = request.get("body") or {}
        if request.get("status") == 200 and isinstance(body, dict):
            command_id = body.get("command_id") or (body.get("data") or {}).get("name")
            if isinstance(command_id, str):
                done[command_id] += 1
    return done


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    prefix = f"soak-{run}"
    settings = Settings(
        commands_exchange=f"{prefix}.commands",
        commands_queue=f"{prefix}.worker.commands",
        results_exchange=f"{prefix}.results",
        dead_exchange=f"{prefix}.dead",
        dead_queue=f"{prefix}.worker.dead",
    )
    async with Sandbox(conferences=500) as sandbox:
        await inject_faults(sandbox, args.fault_rate)
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await topology.declare(channel, settings.topology())
            results = await channel.declare_queue(f"{prefix}.results")
            await results.bind(settings.results_exchange, "#")
            worker = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, "-m", "worker", "run"],
                env=worker_env(settings, sandbox, amqp_url=AMQP_URL, dedup_url=REDIS_URL),
            )
            try:
                return await _measure(
                    args,
                    sandbox,
                    channel=channel,
                    results=results,
                    settings=settings,
                    worker=worker,
                    run=run,
                )
            finally:
                worker.send_signal(signal.SIGTERM)
                worker.wait(timeout=60)
                await channel.queue_delete(f"{prefix}.results")
                await topology.delete(channel, settings.topology())


async def _measure(
    args: argparse.Namespace,
    sandbox: Sandbox,
    *,
    channel: aio_pika.abc.AbstractChannel,
    results: aio_pika.abc.AbstractQueue,
    settings: Settings,
    worker: subprocess.Popen[bytes],
    run: str,
) -> dict[str, Any]:
    events: dict[str, list[str]] = {}
    stop = asyncio.Event()
    collector = asyncio.create_task(collect(results, events, stop))
    samples: list[float] = []
    started = time.monotonic()

    async def sample() -> None:
        while True:
            samples.append(rss_mb(worker.pid))
            if len(samples) % 6 == 0:  # a progress line a minute
                print(
                    f"soak: {time.monotonic() - started:.0f} of {args.duration_s:.0f} s, "
                    f"{len(events)} commands answered, worker RSS {samples[-1]:.1f} MB",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(10)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(3)  # the worker starts consuming
    exchange = await channel.get_exchange(settings.commands_exchange)
    published = await publish_steadily(exchange, sandbox.fixtures, run, args.rate, args.duration_s)
    deadline = time.monotonic() + 300
    while len(events) < published and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a count
        await asyncio.sleep(1)
    stop.set()
    sampler.cancel()
    collector.cancel()
    ids = [f"soak-{run}-{n}" for n in range(published)]
    done = carried_out(sandbox)
    outcomes = Counter(
        next((s for s in events[i] if s != "duplicate"), "duplicate") for i in ids if i in events
    )
    return {
        "duration_s": args.duration_s,
        "rate": args.rate,
        "fault_rate": args.fault_rate,
        "published": published,
        "outcomes": dict(outcomes),
        "lost": sum(1 for i in ids if i not in events),
        "duplicated": sum(1 for i in ids if done[i] > 1),
        "rss_mb_first": samples[1] if len(samples) > 1 else None,
        "rss_mb_last": samples[-1] if samples else None,
        "rss_mb_max": max(samples, default=None),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.soak", description=__doc__)
    parser.add_argument("--duration-s", type=float, default=3600.0)
    parser.add_argument("--rate", type=float, default=200.0, help="commands per second")
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("ops/bench/results/soak.json"))
    args = parser.parse_args(argv)
    try:
        report = asyncio.run(soak(args))
    except KeyboardInterrupt:
        print("soak: interrupted; the worker was stopped and the topology deleted", file=sys.stderr)
        return 130
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return 0 if report["lost"] == 0 and report["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
