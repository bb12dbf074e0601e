"""What each library costs per command, measured in this process (``time.process_time``).

    .venv/bin/python -m ops.bench.costs [--repeat 3] [--messages 2000] [--requests 1000]
                                        [--redis-commands 5000] [--cpu-commands 20000]

Each variant runs ``--repeat`` times; the table shows the min–max of this process's CPU µs per
command (and of the wall-clock rate, for information).  The commands are ``load.CommandFactory``'s
(half ``conference.update``, half ``conference.supervisor_role``).

* message path (RabbitMQ at ``--amqp-url``): a classic queue preloaded with ``--messages``
  commands, then consumed with prefetch 256 by a bare aio-pika consumer (no-op callback, manual
  ack) or by a FastStream subscriber (no-op handler taking the ``dict``: default parser, JSON
  decoder, fast-depends validation, ack policy; with its default logging, written to /dev/null,
  and with ``logger=None``).  CPU from the 10 %-th message to the last one: the connection and
  the first deliveries are outside the window;
* HTTP (a sandbox, ``python -m worker sandbox``, started here): the command mix's provider calls
  (``peer.provider_request``), 256 at once, ``json=`` body and ``.json()`` answer, on
  ``httpx.AsyncClient()`` (defaults: 100 connections, 20 kept alive) or with 256 kept alive, and
  ``aiohttp.ClientSession()`` (default connector: 100) or ``TCPConnector(limit=256)`` (the floor);
  httpx's defaults once more with 16 at once: its pool (httpcore's
  ``AsyncConnectionPool._assign_requests_to_connections``) walks every queued request and
  connection on each enqueue and release, so its CPU per request grows with the queue (see
  encode/httpcore#1035);
* Redis (``--redis-url``): per command two ``SET`` calls (``NX EX``, then the result, as the
  peer) awaited in turn, 256 commands at once, or one ``EVALSHA`` doing both, the 256 in flight
  sent in one ``pipeline(transaction=False)``; keys ``cw:peer:bench-costs<id>:*``, deleted after;
* CPU only: ``worker.contract.codec.decode`` (pydantic) of a command body against
  ``orjson.loads``; a result event encoded by ``orjson.dumps`` against ``json.dumps``.

The machine is shared: the CPU of this process is what is counted, but a busy host still slows
it (caches, frequency); compare variants within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from rich.table import Table

from worker.contract import codec

from .costs_io import BARE, Figure, http_clients, message_path, redis_calls, start_sandbox
from .load import CommandFactory
from .procs import console, stop_all

MAX_BODY = 256 * 1024  # the worker's CW_MAX_BODY_BYTES default

# --------------------------------------------------------------------------------------------
# CPU only


def cpu_loop(n: int, items: list[Any], fn: Callable[[Any], Any]) -> tuple[float, float, int]:
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        fn(items[i % len(items)])
    return time.process_time() - cpu, time.perf_counter() - wall, n


def result_event(command: dict[str, Any]) -> dict[str, Any]:
    """A result event of the worker's shape, as the floor builds it (datetimes, ``data``)."""
    now = datetime.now(UTC)
    return {
        "command_id": command["command_id"],
        "type": command["type"],
        "status": "succeeded",
        "duplicate": False,
        "attempts": 1,
        "error": None,
        "provider": {"name": "vinix", "status_code": 200, "request_id": uuid.uuid4().hex},
        "data": command.get("conference") or {"supervisor_role": command.get("supervisor_role")},
        "received_at": now,
        "completed_at": now,
    }


def cpu_only(args: argparse.Namespace, bodies: list[bytes]) -> list[Figure]:
    events = [result_event(orjson.loads(b)) for b in bodies[:200]]
    texts = [e | {"received_at": e["received_at"].isoformat()} for e in events]
    texts = [t | {"completed_at": t["received_at"]} for t in texts]
    variants: list[tuple[str, str, list[Any], Callable[[Any], Any]]] = [
        ("validation", "worker.contract.codec.decode (pydantic)", bodies, _decode),
        ("validation", "orjson.loads (the floor: no validation)", bodies, orjson.loads),
        ("encoding", "orjson.dumps of a result event", events, orjson.dumps),
        ("encoding", "json.dumps of a result event (ISO strings)", texts, json.dumps),
    ]
    figures = [Figure(layer, name) for layer, name, _, _ in variants]
    for _ in range(args.repeat):
        for figure, (_, _, items, fn) in zip(figures, variants, strict=True):
            figure.runs.append(cpu_loop(args.cpu_commands, items, fn))
    return figures


def _decode(body: bytes) -> Any:
    return codec.decode(body, MAX_BODY)


# --------------------------------------------------------------------------------------------
# The table


def _span(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    low, high = min(values), max(values)
    return f"{low:,.{digits}f}" if low == high else f"{low:,.{digits}f}–{high:,.{digits}f}"


def print_table(figures: list[Figure], repeat: int, seconds: float) -> None:
    table = Table(title=f"what each library costs per command (min–max of {repeat} runs)")
    for col in ("layer", "variant", "commands", "CPU µs/command", "commands/s (wall)"):
        table.add_column(col, justify="left" if col in ("layer", "variant") else "right")
    for f in figures:
        n = f.runs[0][2] if f.runs else 0
        table.add_row(f.layer, f.variant, f"{n:,}", _span(f.cpu_us()), _span(f.rates(), 0))
    console.print(table)
    by_name = {f.variant: statistics.median(f.cpu_us()) for f in figures if f.runs}
    bare = by_name.get(BARE)
    for name, cpu in by_name.items():
        if name.startswith("FastStream") and bare is not None:
            how = name.rsplit(", ", 1)[-1]
            console.print(f"FastStream's own share ({how}): {cpu - bare:+,.1f} µs per message")
    console.print(f"{seconds:.1f} s; this process's CPU (time.process_time), a shared machine")


async def run(args: argparse.Namespace) -> list[Figure]:
    """Every layer in turn (the sandbox up for all: its fixtures shape the commands)."""
    sandbox = await start_sandbox()
    try:
        factory = CommandFactory(sandbox.fixtures, f"bench-costs{uuid.uuid4().hex[:8]}")
        count = max(args.messages, args.requests)
        bodies = [c.body for c in factory.make_many(0, count)]
        commands = [orjson.loads(b) for b in bodies]
        value = orjson.dumps(result_event(commands[0]))
        sections: list[tuple[str, Callable[[], Awaitable[list[Figure]]]]] = [
            ("message path", lambda: message_path(args, bodies[: args.messages])),
            ("HTTP", lambda: http_clients(args, sandbox, commands)),
            ("Redis", lambda: redis_calls(args, value)),
        ]
        figures: list[Figure] = []
        for name, section in sections:
            began = time.perf_counter()
            figures += await section()
            print(f"{name}: {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    finally:
        await sandbox.child.astop()
    return figures + cpu_only(args, bodies)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ops.bench.costs", description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--messages", type=int, default=2000, help="per message-path run")
    p.add_argument("--requests", type=int, default=1000, help="per HTTP run")
    p.add_argument("--redis-commands", type=int, default=5000, help="per Redis run")
    p.add_argument("--cpu-commands", type=int, default=20000, help="per validation/encoding run")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    began = time.perf_counter()
    print("measuring (about a minute) ...", file=sys.stderr, flush=True)
    try:  # FastStream's access log finds /dev/null as sys.stdout (its lines cost, not show)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            figures = asyncio.run(run(args))
    finally:
        stop_all()
    print_table(figures, args.repeat, time.perf_counter() - began)
    if args.json:
        rows = [
            {"layer": f.layer, "variant": f.variant, "cpu_us": f.cpu_us(), "rate": f.rates()}
            for f in figures
        ]
        Path(args.json).write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
